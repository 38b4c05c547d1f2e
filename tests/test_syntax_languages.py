"""The syntax rules in every language of inference/syntax/languages.py: its literals and comments, its blocks, its
calls, and the clean-up. In the style of tests/test_syntax.py (which covers the rules themselves, mostly in Python)."""

from __future__ import annotations

import pytest

from inference.syntax.finish import finish, repeated_suffix
from inference.syntax.languages import LANGUAGES, language_of, parse
from inference.syntax.lexer import CodeState, advance
from inference.syntax.scope import cursor_context
from tests.test_syntax import stream

BRACE_LANGUAGES = ["javascript", "typescript", "tsx", "go", "rust", "c", "cpp", "java"]


def state_after(language: str, text: str) -> CodeState:
    return advance(language_of(language).lexicon, text, CodeState())[0]


# --- the table ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(LANGUAGES))
def test_every_grammar_loads_and_parses_its_language(name):
    language = LANGUAGES[name]
    assert language.rules == f"{name} (tree-sitter)"
    tree = parse(language, b"x")
    assert tree is not None and tree.root_node.type in {"module", "program", "source_file", "translation_unit"}


@pytest.mark.parametrize(("language_id", "uri", "name"), [
    ("python", "", "python"),
    ("typescriptreact", "", "tsx"),
    ("javascriptreact", "", "javascript"),
    ("Go", "", "go"),
    ("plaintext", "file:///src/lib.rs", "rust"),  # the extension when the id says nothing
    ("", "file:///src/app/main%20copy.cpp", "cpp"),
    ("rust", "file:///notes.txt", "rust"),  # the id wins over the extension
])
def test_language_ids_and_extensions_name_a_grammar(language_id, uri, name):
    assert language_of(language_id, uri).name == name


def test_an_unknown_language_gets_the_text_rules_and_says_so():
    lua = language_of("lua")
    assert lua.grammar is None and lua.rules == "lua (text rules)"
    assert language_of("ruby").lexicon.line_comments == ("#",)
    assert language_of("plaintext", "file:///notes.txt").rules == "plaintext (text rules)"


# --- literals, strings and comments: brackets inside them do not count ------------------------------------------

@pytest.mark.parametrize(("language", "text", "brackets"), [
    ("javascript", "const s = `a ${b} (\n [`; f(", "("),  # a template string spans lines
    ("typescript", "const re = '['; /* ( */ g<T>(x, ", "("),
    ("tsx", "const el = <div>{\"(\"}</div>; f(", "("),
    ("go", "x := `raw \\` ( f(", "(("),  # raw strings have no escapes: the backtick closes it
    ("go", "r := '('; // )\nf(", "("),  # a rune
    ("rust", "fn f<'a>(x: &'a str) -> char { let c = '{'; ", "{"),  # lifetimes are not strings, '{' is a char
    ("rust", "let s = r#\"a \"( b\"#; let t = \"two\n lines ( \"; f(", "("),  # raw and multi-line strings
    ("rust", "let q = '\\''; let e = '\\u{1F600}'; [", "["),
    ("c", "int x = f(/* ) */ a, \"\\\")\", ", "("),
    ("cpp", "auto s = R\"(a ( [ )\"; v[", "["),  # a raw string ends at )"
    ("java", "String s = \"\"\"\n  ( [\n  \"\"\"; char c = '{'; f(", "("),  # a text block
])
def test_brackets_in_strings_and_comments_do_not_count(language, text, brackets):
    state = state_after(language, text)
    assert state.in_code and state.brackets == brackets


@pytest.mark.parametrize(("language", "text", "quote"), [
    ("javascript", "f(`open ${", "`"),
    ("go", "s := `line one\n", "`"),
    ("rust", "let s = \"line one\n", '"'),
    ("rust", "let s = r#\"no \"end", 'r#"'),
    ("java", "String s = \"\"\"\n", '"""'),
    ("c", "char *s = \"one line", '"'),
])
def test_an_open_string_is_seen(language, text, quote):
    assert state_after(language, text).quote == quote


@pytest.mark.parametrize("language", BRACE_LANGUAGES)
def test_comments_hide_brackets(language):
    assert state_after(language, "f(a, // )\n b /* ] ) */").brackets == "("
    assert state_after(language, "x = 1; // note (").comment == "\n"


# --- scope: functions and blocks -------------------------------------------------------------------------------

FUNCTIONS = {
    "javascript": "function add(a, b) {\n    ",
    "typescript": "export function add(a: number, b: number): number {\n    ",
    "tsx": "export function App(): JSX.Element {\n    ",
    "go": "func add(a, b int) int {\n\t",
    "rust": "pub fn add<'a>(a: &'a i32, b: i32) -> i32 {\n    ",
    "c": "static int add(int a, int b)\n{\n    ",
    "cpp": "template <typename T>\nT add(T a, T b) {\n    ",
    "java": "public static int add(int a, int b) {\n        ",
}


@pytest.mark.parametrize("language", BRACE_LANGUAGES)
def test_an_empty_function_body_is_a_block(language):
    assert cursor_context(FUNCTIONS[language], "\n}\n", language).scope == "multi"


@pytest.mark.parametrize("language", BRACE_LANGUAGES)
def test_a_body_with_code_below_is_one_line(language):
    assert cursor_context(FUNCTIONS[language], "\n    return a;\n}\n", language).scope == "single"


@pytest.mark.parametrize("language", BRACE_LANGUAGES)
def test_a_block_ends_before_the_closing_brace_the_suffix_has(language):
    body = "if (a > b) {\n        return a;\n    } else {\n        return b;\n    }\n"
    completion = body + "}\n\nint other() {\n"
    assert stream(FUNCTIONS[language], "\n}\n", completion, language=language)[0] == body.rstrip("\n")


@pytest.mark.parametrize("language", ["javascript", "c", "cpp", "java"])
def test_an_allman_brace_and_an_else_line_continue_the_statement(language):
    prefix = "void f()\n{\n    int a = 0;\n    "
    body = "if (x)\n    {\n        y();\n    }\n    else\n    {\n        z();\n    }\n"
    completion = body + "    done();\n}\n"
    assert stream(prefix, "\n    return;\n}\n", completion, "multi", language)[0] == body.rstrip("\n")


def test_go_statements_with_tabs_end_at_the_next_statement():
    prefix = "func f() {\n\t"
    completion = "for i := range xs {\n\t\tsum += i\n\t}\n\treturn sum\n}\n"
    assert stream(prefix, "\n}\n", completion, "multi", "go")[0].startswith("for i := range xs {\n\t\tsum += i\n\t}")
    # forced multi-line mid-body: one statement, then stop at the next one at its indentation
    assert stream("func f() {\n\tx := 1\n\t", "\n\treturn x\n}\n", "if x > 0 {\n\t\tx--\n\t}\n\ty := 2\n",
                  "multi", "go")[0] == "if x > 0 {\n\t\tx--\n\t}"


def test_a_rust_match_keeps_its_arms_and_ends_at_its_brace():
    prefix = "fn f(x: Option<u8>) -> u8 {\n    "
    body = "match x {\n        Some(v) => v,\n        None => 0,\n    }"
    assert stream(prefix, "\n}\n", body + "\n}\n\nfn g() {}\n", language="rust")[0] == body


# --- calls and single lines ------------------------------------------------------------------------------------

@pytest.mark.parametrize("language", BRACE_LANGUAGES)
def test_a_call_stops_where_the_suffix_closes_it(language):
    assert stream("    result = compute(", ");\n", "a, b);\n    next();\n", language=language)[0] == "a, b"
    assert stream("    result = compute(", ");\n", "inner(1), 2);\n", language=language)[0] == "inner(1), 2"


@pytest.mark.parametrize("language", BRACE_LANGUAGES)
def test_a_single_line_ends_at_its_line_break_and_keeps_its_terminator(language):
    assert stream("    x = ", "\n    y = 2;\n", "compute(1);\n    z = 3;\n", language=language)[0] == "compute(1);"


@pytest.mark.parametrize("language", BRACE_LANGUAGES)
def test_the_statement_terminator_in_the_suffix_is_not_written_twice(language):
    assert finish("compute(1);", "    x = ", ";\n", language) == "compute(1)"
    assert repeated_suffix("compute(1);", "    x = ", ";\n", language) == ";"


@pytest.mark.parametrize(("language", "prefix", "suffix", "completion", "expected"), [
    ("javascript", "const s = `hello ${", "}`;\n", "name}`;\n", "name"),  # the template's `}` is the suffix's
    ("go", "\tmsg := fmt.Sprintf(\"", "\", n)\n", "%d items\", n)\n", "%d items"),
    ("rust", "    let c = '", "';\n", "x';\n", "x"),
    ("java", "    String s = \"", "\";\n", "done\";\n", "done"),
])
def test_a_string_the_suffix_closes_ends_the_completion(language, prefix, suffix, completion, expected):
    assert finish(stream(prefix, suffix, completion, language=language)[0], prefix, suffix, language) == expected


# --- finish: close only what the completion opened and the line ends ------------------------------------------

@pytest.mark.parametrize(("language", "prefix", "text", "expected"), [
    ("python", "HeaderValue = ", "t.Union[", "t.Union["),  # the real code continues on the next lines
    ("rust", "    ", "if flushed == 0 {", "if flushed == 0 {"),
    ("go", "\t", "call(a,", "call(a,"),
    ("typescript", "const x = ", "foo(a, [b", "foo(a, [b])"),  # the line ends: its brackets are closed
    ("rust", "    let v = ", "vec![f(1", "vec![f(1)]"),
    ("c", "    int n = ", "max(a, \"(\"", "max(a, \"(\")"),  # the string's bracket is not closed
    ("java", "        ", "list.add(x); // (", "list.add(x); // ("),
    # a line that goes on below: a macro's continuation, an operator, a member access
    ("cpp", "", "struct op_impl<L, R> {   \\", "struct op_impl<L, R> {   \\"),
    ("c", "    ", "if ((a || b) &&", "if ((a || b) &&"),
    ("python", "    x = ", "f(a +", "f(a +"),
    ("javascript", "    ", "items.map((x) =>", "items.map((x) =>"),
    ("rust", "    ", "let y = f(p.", "let y = f(p."),
    ("typescript", "const x = ", "{ a:", "{ a:"),
    # ... and lines that end: a postfix operator, a type
    ("c", "    ", "f(i++", "f(i++)"),
    ("cpp", "    auto v = ", "make(std::vector<int>", "make(std::vector<int>)"),
])
def test_finish_closes_only_what_the_line_ends(language, prefix, text, expected):
    assert finish(text, prefix, "\n", language) == expected


@pytest.mark.parametrize("language", BRACE_LANGUAGES)
def test_finish_never_repeats_the_next_line_or_the_closing_brace(language):
    prefix = FUNCTIONS[language]
    assert finish("return a + b;\n}", prefix, "\n}\n", language) == "return a + b;"
    assert finish("x = 1;\n    return x;", prefix, "\n    return x;\n}\n", language) == "x = 1;"
