"""The cursor's context, computed once per request: the lexer state there, how the suffix closes what is open, and
whether the cursor sits in an empty block body (then a completion may span several lines)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

from inference.syntax.languages import Language, language_of, parse
from inference.syntax.lexer import OPENER_OF, CodeState, Lexicon, advance, closing_events, first_word, indent_of

Scope = Literal["single", "multi"]

WINDOW_LINES = 300  # how far back to look for a line where no bracket, string or comment is open
SUFFIX_SCAN_CHARS = 4000  # how much of the suffix to search for the closer of the cursor's bracket or string
NEXT_LINES = 50  # how many suffix lines to look through for the next line of code
HEADER_LINES = 40  # how far up from a ':' to look for the first line of its statement
PYTHON_COMPOUND_WORDS = frozenset({
    "def", "class", "if", "elif", "else", "for", "while", "with", "try", "except", "finally", "async", "match", "case",
})
PYTHON_HEADER_WORDS = PYTHON_COMPOUND_WORDS - {"elif", "else", "except", "finally", "case"}  # first clause words


def _next_line(rest: str, skip: tuple[str, ...] = ()) -> str | None:
    """The first line of `rest` that is not blank and does not start with one of `skip` (None if none is near)."""
    for count, line in enumerate(rest.splitlines()):
        if count >= NEXT_LINES:
            return None
        code = line.strip()
        if code and not (skip and code.startswith(skip)):
            return line
    return None


def _compound_opener(language: Language, window: str) -> int | None:
    """Where (index in `window`) the compound statement starts whose header's opener (Python's ':') is the last
    code before the end of `window`; None if the last code is not such an opener (a dict, a slice, a lambda, or
    an unparsable header)."""
    source = window.encode("utf-8", "surrogatepass")
    tree = parse(language, source)
    if tree is None:
        return None
    root = tree.root_node
    end = len(source.rstrip())
    node = None
    while end > 0:
        node = root.descendant_for_byte_range(end - 1, end)
        if node is None or node.type != "comment":
            break
        end = len(source[:node.start_byte].rstrip())
    if node is None or end == 0 or node.type != language.lexicon.block_opener or node.parent is None:
        return None
    if node.parent.type not in language.compound:
        return None
    return len(source[:node.parent.start_byte].decode("utf-8", "surrogatepass"))


@dataclass(frozen=True)
class CursorContext:
    """What the stopping rules need to know about the text around the cursor."""

    language: Language
    line_prefix: str  # the cursor line before the cursor
    line_suffix: str  # the cursor line after the cursor, without its line break
    next_line: str  # the first non-blank line after the cursor line, without trailing whitespace ("" if none)
    line_state: CodeState  # the lexer state at the start of the cursor line
    state: CodeState  # the lexer state at the cursor
    suffix_closer: str | None  # how the suffix closes the innermost bracket or the string open at the cursor
    suffix_line_closers: int  # unmatched closing brackets on the rest of the cursor line
    block_indent: int | None  # indentation of the block opener whose empty body the cursor is in
    opener_text: str  # the prefix from the opener's first line to the cursor ("" if no opener)
    scope: Scope  # "multi" in an empty block body (nothing indented below its header), else "single"

    @property
    def lexicon(self) -> Lexicon:
        return self.language.lexicon


def _window_start(lex: Lexicon, prefix: str, line_start: int) -> int:
    """A line start before the cursor where nothing is open: the nearest line at column 0 that starts a statement
    (a heuristic: a column-0 line inside a multi-line string fools it)."""
    end = len(prefix)
    pos = line_start
    for _ in range(WINDOW_LINES):
        line = prefix[pos:end]
        head = line[:1]
        if head and (head.isalpha() or head in "_@#") and first_word(line, True) not in lex.clause_words:
            return pos
        if pos == 0:
            return 0
        end = pos - 1
        pos = prefix.rfind("\n", 0, end) + 1
    return pos


def _python_header_start(prefix: str, colon_line: int) -> int:
    """A line start at or before the line of the last ':' from which tree-sitter can parse its statement: the
    nearest line, at most HEADER_LINES up, that starts a compound statement and is not indented past the ':' line
    (nor past any line between them)."""
    limit = indent_of(prefix[colon_line:])
    pos = colon_line
    for _ in range(HEADER_LINES):
        newline = prefix.find("\n", pos)
        line = prefix[pos:newline if newline >= 0 else len(prefix)]
        if line.strip():
            indent = indent_of(line)
            if indent <= limit and first_word(line.lstrip(), True) in PYTHON_HEADER_WORDS:
                return pos
            limit = min(limit, indent)
        if pos == 0:
            break
        pos = prefix.rfind("\n", 0, pos - 1) + 1
    return colon_line


def _opener(language: Language, prefix: str, window: int, state: CodeState) -> int | None:
    """Where the line of the block opener that the cursor follows (only blank lines or comments between) starts in
    `prefix`, or None. Indented blocks (Python) ask tree-sitter; brace blocks end their line with the opener."""
    code = prefix.rstrip()
    if not code:
        return None
    if language.compound:
        head = _python_header_start(prefix, max(window, code.rfind("\n") + 1))
        start = _compound_opener(language, prefix[head:])
        if start is not None:
            return prefix.rfind("\n", 0, head + start) + 1
        # Text fallback when tree-sitter sees an error: a line that starts with a compound keyword and ends in ':'.
        line_start = code.rfind("\n") + 1
        line = code[line_start:].split("#", 1)[0].rstrip()
        if line.endswith(":") and first_word(line.lstrip(), True) in PYTHON_COMPOUND_WORDS:
            return line_start
        return None
    opener = language.lexicon.block_opener
    if code.endswith(opener) and state.brackets.endswith(opener):
        return code.rfind("\n") + 1
    return None


def _block_is_empty(lex: Lexicon, rest: str, opener_indent: int) -> bool:
    """The lines after the cursor line hold nothing of the block: the next code line is dedented or closes it."""
    line = _next_line(rest, lex.line_comments)
    return line is None or indent_of(line) <= opener_indent or line.lstrip()[:1] in OPENER_OF


@lru_cache(maxsize=8)
def cursor_context(prefix: str, suffix: str, language: str = "python") -> CursorContext:
    """The context of one cursor (cached: the scope, the stop rule and `finish` of one request share it).
    `language`: an LSP language id or a name of inference/syntax/languages.py's table."""
    spec = language_of(language)
    lex = spec.lexicon
    line_start = prefix.rfind("\n") + 1
    line_prefix = prefix[line_start:]
    newline = suffix.find("\n")
    line_suffix = (suffix if newline < 0 else suffix[:newline]).rstrip("\r")
    rest = "" if newline < 0 else suffix[newline + 1:]
    window = _window_start(lex, prefix, line_start)
    line_state, _ = advance(lex, prefix, CodeState(), window, line_start)
    state, _ = advance(lex, prefix, line_state, line_start)
    next_line = _next_line(rest) or ""

    suffix_closer = None
    if state.comment is None and (state.quote or state.brackets):
        events, _, _ = closing_events(lex, suffix, state, 0, min(len(suffix), SUFFIX_SCAN_CHARS))
        suffix_closer = events[0][1] if events else None
    line_events, _, _ = closing_events(lex, line_suffix, CodeState(quote=state.quote))
    suffix_line_closers = sum(1 for _, closer in line_events if closer in OPENER_OF)

    block_indent, opener_text, scope = None, "", "single"
    if state.in_code and not line_suffix.strip():
        opener = _opener(spec, prefix, window, state)
        if opener is not None and _block_is_empty(lex, rest, indent_of(prefix[opener:])):
            block_indent, opener_text, scope = indent_of(prefix[opener:]), prefix[opener:], "multi"
    return CursorContext(spec, line_prefix, line_suffix, next_line.rstrip(), line_state, state,
                         suffix_closer, suffix_line_closers, block_indent, opener_text, scope)
