// Package sample is a fixture for tests/test_bench_languages.py.
package sample

import (
	"fmt"
	"strings"
)

/*
Join joins words.
It is a block comment.
*/
func Join(words []string) string {
	// a comment line
	if len(words) == 0 {
		return ""
	}
	s := strings.Join(words, ", ") // trailing comment
	return fmt.Sprintf("(%s)", s)
}

var raw = `a raw string
that spans lines`

func Pair(a, b int) (int, int) {
	return b, a
}
