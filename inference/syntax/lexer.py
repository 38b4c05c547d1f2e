"""The lexer: brackets, strings and comments at any point of a text, per language, and the line helpers the rules
share. It jumps between interesting characters with one regex, so scanning costs what the text between them does."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

CLOSER_OF = {"(": ")", "[": "]", "{": "}"}
OPENER_OF = {")": "(", "]": "[", "}": "{"}


@dataclass(frozen=True)
class Lexicon:
    """What the lexer must know to tell code from strings and comments in one language (the languages' lexicons
    are in inference/syntax/languages.py)."""

    line_comments: tuple[str, ...]
    block_comment: tuple[str, str] | None
    quotes: tuple[str, ...]  # longest first: ''' must win over '
    multiline_quotes: frozenset[str]
    clause_words: frozenset[str]  # a line starting with one continues the statement above it (else, except)
    block_opener: str  # the last character of a line that opens a block
    raw_quotes: frozenset[str] = frozenset()  # no escapes inside: Go's `…`, Rust's r"…"
    quote_ends: tuple[tuple[str, str], ...] = ()  # quotes closed by another text than themselves: r#" by "#
    atoms: str = ""  # a regex of literals skipped whole where a quote alone would mislead: Rust's char literals

    def end_of(self, quote: str) -> str:
        """The text that closes a string opened by `quote`."""
        return next((end for opener, end in self.quote_ends if opener == quote), quote)


@dataclass(frozen=True)
class _Patterns:
    code: re.Pattern[str]  # the next character that changes the state, outside strings and comments
    string: dict[str, re.Pattern[str]]  # per delimiter: an escape, the delimiter, or (one-line strings) a line break


@lru_cache(maxsize=None)
def _patterns(lex: Lexicon) -> _Patterns:
    marks = [*lex.quotes, *lex.line_comments, *([lex.block_comment[0]] if lex.block_comment else [])]
    marks.sort(key=len, reverse=True)
    atom = f"(?P<atom>{lex.atoms})|" if lex.atoms else ""
    code = re.compile(atom + "|".join(re.escape(m) for m in marks) + r"|[()\[\]{}]")
    string = {q: re.compile(("" if q in lex.raw_quotes else r"\\.|") + re.escape(lex.end_of(q))
                            + ("" if q in lex.multiline_quotes else r"|\n"), re.S)
              for q in lex.quotes}
    return _Patterns(code, string)


@dataclass(frozen=True)
class CodeState:
    """The lexer's state at a point: open brackets (innermost last), the open string's delimiter, and the text that
    ends the comment we are in ("\\n" for a line comment)."""

    brackets: str = ""
    quote: str | None = None
    comment: str | None = None

    @property
    def in_code(self) -> bool:
        return self.quote is None and self.comment is None


def advance(lex: Lexicon, text: str, state: CodeState, start: int = 0, end: int | None = None, *,
            floor: int | None = None, in_cursor_string: bool = False) -> tuple[CodeState, int | None]:
    """The state after text[start:end], and None; or stops at the first character that closes what was open at the
    cursor and returns the state before it and its index. That is a closing bracket met with at most `floor`
    brackets open (with `floor`), or the end of the string open in `state` (with `in_cursor_string`)."""
    end = len(text) if end is None else end
    pats = _patterns(lex)
    brackets = list(state.brackets)
    quote, comment = state.quote, state.comment
    i = start
    while i < end:
        if comment is not None:
            j = text.find(comment, i, end)
            if j < 0:
                i = end
                break
            i = j if comment == "\n" else j + len(comment)
            comment = None
        elif quote is not None:
            m = pats.string[quote].search(text, i, end)
            if m is None:
                i = end
                break
            token = m.group()
            if token == "\n":  # a one-line string ends at the line break, closed or not
                quote, in_cursor_string = None, False
            elif token[0] != "\\":
                if in_cursor_string:
                    return CodeState("".join(brackets), quote, None), m.start()
                quote = None
            i = m.end()
        else:
            m = pats.code.search(text, i, end)
            if m is None:
                break
            token, i = m.group(), m.end()
            if m.lastgroup == "atom":
                continue
            if token in CLOSER_OF:  # an opening bracket
                brackets.append(token)
            elif token in OPENER_OF:  # a closing one
                if floor is not None and len(brackets) <= floor:
                    return CodeState("".join(brackets), None, None), m.start()
                if brackets and brackets[-1] == OPENER_OF[token]:
                    brackets.pop()
            elif token in lex.line_comments:
                comment = "\n"
            elif lex.block_comment and token == lex.block_comment[0]:
                comment = lex.block_comment[1]
            else:
                quote = token
    return CodeState("".join(brackets), quote, comment), None


def closing_events(lex: Lexicon, text: str, state: CodeState, start: int = 0,
                    end: int | None = None) -> tuple[list[tuple[int, str]], CodeState, int]:
    """Every character in text[start:end] that closes something open at `start` (a bracket, at any depth, or the
    string), the final state, and how many of the brackets open at `start` are still open at the end."""
    end = len(text) if end is None else end
    events: list[tuple[int, str]] = []
    in_string = state.quote is not None
    floor = len(state.brackets)
    i = start
    while True:
        before, at = advance(lex, text, state, i, end, floor=floor, in_cursor_string=in_string)
        if at is None:
            return events, before, floor
        if before.quote is not None:  # the string open at `start` ends here
            events.append((at, before.quote))
            state, in_string, i = CodeState(before.brackets), False, at + len(lex.end_of(before.quote))
        else:
            events.append((at, text[at]))
            closes = before.brackets.endswith(OPENER_OF[text[at]])
            state, i = CodeState(before.brackets[:-1] if closes else before.brackets), at + 1
            floor = len(state.brackets)


def indent_of(line: str) -> int:
    """Indentation width, tabs to the next multiple of 8 as Python's tokenizer counts them."""
    width = 0
    for ch in line:
        if ch == " ":
            width += 1
        elif ch == "\t":
            width = width // 8 * 8 + 8
        else:
            break
    return width


def is_word(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


_WORD = re.compile(r"[^\W\d]\w*")


def first_word(code: str, complete: bool) -> str | None:
    """The line's first word, or its first character when that is not a letter; None while the word may go on."""
    m = _WORD.match(code)
    if m is None:
        return code[:1]
    if m.end() == len(code) and not complete:
        return None
    return m.group()


def escaped(text: str, at: int, state: CodeState) -> bool:
    """Whether text[at] is escaped by the backslashes before it, inside a string (`state` is the state at `at`)."""
    if state.quote is None:
        return False
    slashes = len(text[:at]) - len(text[:at].rstrip("\\"))
    return slashes % 2 == 1
