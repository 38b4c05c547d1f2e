"""Syntax-aware stopping: where a completion at the cursor should end, decided while it streams.

* `completion_scope`: one line, or a block? A block when the cursor is in an empty body (right after
  `def f():`, on a blank line below it or at the end of that line); one line everywhere else.
* `SyntaxStop.cut` (the StopRule of inference/generate.py): a single line ends at its line break, or earlier where the
  rest would repeat the text after the cursor (`foo(|)` and the model writes `x)`: keep `x`). A block ends when the
  node begun at the cursor is complete: in Python, at the next line that dedents out of it, unless tree-sitter shows
  that line continues the node (`else:` after an `if`, the `def` under a decorator).
* `finish`: the last clean-up against the suffix: never repeat the text after the cursor, close the brackets the
  completion left open, drop trailing blank lines.

Brackets, strings and comments are tracked by a small lexer that jumps between interesting characters with one
regex, so the cost of a call does not grow with the file: the context is computed once per request from a bounded
window before the cursor, and while streaming only new lines are scanned. Tree-sitter parses the few lines of a
header when the cursor follows a `:`, and while streaming parses only the completion, and only when a line
dedented to the node's level starts with a clause word.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Literal

import tree_sitter
import tree_sitter_python

Scope = Literal["single", "multi"]

WINDOW_LINES = 300  # how far back to look for a line where no bracket, string or comment is open
SUFFIX_SCAN_CHARS = 4000  # how much of the suffix to search for the closer of the cursor's bracket or string
NEXT_LINES = 50  # how many suffix lines to look through for the next line of code
HEADER_LINES = 40  # how far up from a ':' to look for the first line of its statement

CLOSER_OF = {"(": ")", "[": "]", "{": "}"}
OPENER_OF = {")": "(", "]": "[", "}": "{"}
# Python statements whose header ends in ':' and opens a block (tree-sitter-python node types).
PYTHON_COMPOUND = frozenset({
    "function_definition", "class_definition", "if_statement", "elif_clause", "else_clause", "for_statement",
    "while_statement", "with_statement", "try_statement", "except_clause", "except_group_clause", "finally_clause",
    "match_statement", "case_clause",
})
PYTHON_COMPOUND_WORDS = frozenset({
    "def", "class", "if", "elif", "else", "for", "while", "with", "try", "except", "finally", "async", "match", "case",
})
PYTHON_HEADER_WORDS = PYTHON_COMPOUND_WORDS - {"elif", "else", "except", "finally", "case"}  # first clause words
DECORATED_WORDS = frozenset({"def", "class", "async", "@"})  # what may follow a decorator at its indentation


@dataclass(frozen=True)
class Lexicon:
    """What the lexer must know to tell code from strings and comments in one language."""

    line_comments: tuple[str, ...]
    block_comment: tuple[str, str] | None
    quotes: tuple[str, ...]  # longest first: ''' must win over '
    multiline_quotes: frozenset[str]
    clause_words: frozenset[str]  # a line starting with one continues the statement above it (else, except)
    block_opener: str  # the last character of a line that opens a block


PYTHON = Lexicon(("#",), None, ('"""', "'''", '"', "'"), frozenset({'"""', "'''"}),
                 frozenset({"elif", "else", "except", "finally"}), ":")
C_LIKE = Lexicon(("//",), ("/*", "*/"), ('"', "'", "`"), frozenset({"`"}), frozenset({"else", "catch", "finally"}), "{")
HASH_COMMENTS = Lexicon(("#",), None, ('"', "'"), frozenset(),
                        frozenset({"else", "elif", "elsif", "rescue", "ensure"}), "{")
_HASH_LANGUAGES = frozenset({"shellscript", "bash", "sh", "ruby", "perl", "r", "yaml", "toml", "makefile",
                             "dockerfile", "elixir", "julia", "nim", "coffeescript", "powershell"})


def lexicon(language: str) -> Lexicon:
    """The lexicon for an LSP language id; C-like comments and strings for languages not named here."""
    language = language.lower()
    if language == "python":
        return PYTHON
    return HASH_COMMENTS if language in _HASH_LANGUAGES else C_LIKE


@dataclass(frozen=True)
class _Patterns:
    code: re.Pattern[str]  # the next character that changes the state, outside strings and comments
    string: dict[str, re.Pattern[str]]  # per delimiter: an escape, the delimiter, or (one-line strings) a line break


@lru_cache(maxsize=None)
def _patterns(lex: Lexicon) -> _Patterns:
    marks = [*lex.quotes, *lex.line_comments, *([lex.block_comment[0]] if lex.block_comment else [])]
    marks.sort(key=len, reverse=True)
    code = re.compile("|".join(re.escape(m) for m in marks) + r"|[()\[\]{}]")
    string = {q: re.compile(r"\\.|" + re.escape(q) + ("" if q in lex.multiline_quotes else r"|\n"), re.S)
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


def _closing_events(lex: Lexicon, text: str, state: CodeState, start: int = 0,
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
            state, in_string, i = CodeState(before.brackets), False, at + len(before.quote)
        else:
            events.append((at, text[at]))
            closes = before.brackets.endswith(OPENER_OF[text[at]])
            state, i = CodeState(before.brackets[:-1] if closes else before.brackets), at + 1
            floor = len(state.brackets)


# ---------------------------------------------------------------------------------------------------------------
# Text helpers


def _indent(line: str) -> int:
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


def _is_word(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


_WORD = re.compile(r"[^\W\d]\w*")


def _first_word(code: str, complete: bool) -> str | None:
    """The line's first word, or its first character when that is not a letter; None while the word may go on."""
    m = _WORD.match(code)
    if m is None:
        return code[:1]
    if m.end() == len(code) and not complete:
        return None
    return m.group()


def _escaped(text: str, at: int, state: CodeState) -> bool:
    """Whether text[at] is escaped by the backslashes before it, inside a string (`state` is the state at `at`)."""
    if state.quote is None:
        return False
    slashes = len(text[:at]) - len(text[:at].rstrip("\\"))
    return slashes % 2 == 1


def _before_line(text: str, start: int) -> int:
    """Characters to keep to end the completion before the line at `start`: trailing blank lines go too."""
    return len(text[:start].rstrip())


def _line_end(text: str, end: int) -> int:
    """Characters to keep to end the completion at the end of the complete line ending at `end` (after its '\\n')."""
    end -= 1
    return end - 1 if end > 0 and text[end - 1] == "\r" else end


def _next_line(rest: str, skip: tuple[str, ...] = ()) -> str | None:
    """The first line of `rest` that is not blank and does not start with one of `skip` (None if none is near)."""
    for count, line in enumerate(rest.splitlines()):
        if count >= NEXT_LINES:
            return None
        code = line.strip()
        if code and not (skip and code.startswith(skip)):
            return line
    return None


# ---------------------------------------------------------------------------------------------------------------
# Tree-sitter (Python only)


@lru_cache(maxsize=1)
def _python_language() -> tree_sitter.Language:
    return tree_sitter.Language(tree_sitter_python.language())


def _python_tree(source: bytes) -> tree_sitter.Tree:
    return tree_sitter.Parser(_python_language()).parse(source)  # a parser per call: safe across threads


def _python_opener(window: str) -> int | None:
    """Where (index in `window`) the compound statement starts whose header's ':' is the last code before the end
    of `window`; None if the last code is not such a ':' (a dict, a slice, a lambda, or an unparsable header)."""
    source = window.encode("utf-8", "surrogatepass")
    root = _python_tree(source).root_node
    end = len(source.rstrip())
    node = None
    while end > 0:
        node = root.descendant_for_byte_range(end - 1, end)
        if node is None or node.type != "comment":
            break
        end = len(source[:node.start_byte].rstrip())
    if node is None or end == 0 or node.type != ":" or node.parent is None:
        return None
    if node.parent.type not in PYTHON_COMPOUND:
        return None
    return len(source[:node.parent.start_byte].decode("utf-8", "surrogatepass"))


def _python_node_continues(snippet: str) -> bool:
    """Whether the node that starts on the snippet's first line runs on into its last line (Cody's rule: the largest
    node that starts on that line). The snippet is dedented so that its first line starts at column 0."""
    source = snippet.encode("utf-8", "surrogatepass")
    last_line = source.rstrip(b"\r\n").rfind(b"\n") + 1
    last_code = last_line + len(source[last_line:]) - len(source[last_line:].lstrip())
    root = _python_tree(source).root_node
    node = root.named_descendant_for_byte_range(0, 1)
    if node is None or node.parent is None:
        return False
    while node.parent is not None and node.parent.parent is not None and \
            node.parent.start_point.row == node.start_point.row:
        node = node.parent
    return node.type != "ERROR" and node.end_byte > last_code


# ---------------------------------------------------------------------------------------------------------------
# The cursor's context, computed once per request


@dataclass(frozen=True)
class CursorContext:
    """What the stopping rules need to know about the text around the cursor."""

    language: str
    lexicon: Lexicon
    line_prefix: str  # the cursor line before the cursor
    line_suffix: str  # the cursor line after the cursor, without its line break
    next_line: str  # the first non-blank line after the cursor line, without trailing whitespace ("" if none)
    line_state: CodeState  # the lexer state at the start of the cursor line
    state: CodeState  # the lexer state at the cursor
    suffix_closer: str | None  # how the suffix closes the innermost bracket or the string open at the cursor
    suffix_line_closers: int  # unmatched closing brackets on the rest of the cursor line
    block_indent: int | None  # indentation of the block opener whose empty body the cursor is in
    opener_text: str  # the prefix from the opener's first line to the cursor ("" if no opener)
    scope: Scope


def _window_start(lex: Lexicon, prefix: str, line_start: int) -> int:
    """A line start before the cursor where nothing is open: the nearest line at column 0 that starts a statement
    (a heuristic: a column-0 line inside a multi-line string fools it)."""
    end = len(prefix)
    pos = line_start
    for _ in range(WINDOW_LINES):
        line = prefix[pos:end]
        head = line[:1]
        if head and (head.isalpha() or head in "_@#") and _first_word(line, True) not in lex.clause_words:
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
    limit = _indent(prefix[colon_line:])
    pos = colon_line
    for _ in range(HEADER_LINES):
        newline = prefix.find("\n", pos)
        line = prefix[pos:newline if newline >= 0 else len(prefix)]
        if line.strip():
            indent = _indent(line)
            if indent <= limit and _first_word(line.lstrip(), True) in PYTHON_HEADER_WORDS:
                return pos
            limit = min(limit, indent)
        if pos == 0:
            break
        pos = prefix.rfind("\n", 0, pos - 1) + 1
    return colon_line


def _opener(lex: Lexicon, language: str, prefix: str, window: int, state: CodeState) -> int | None:
    """Where the line of the block opener that the cursor follows (only blank lines or comments between) starts in
    `prefix`, or None."""
    code = prefix.rstrip()
    if not code:
        return None
    if language == "python":
        head = _python_header_start(prefix, max(window, code.rfind("\n") + 1))
        start = _python_opener(prefix[head:])
        if start is not None:
            return prefix.rfind("\n", 0, head + start) + 1
        # Text fallback when tree-sitter sees an error: a line that starts with a compound keyword and ends in ':'.
        line_start = code.rfind("\n") + 1
        line = code[line_start:].split("#", 1)[0].rstrip()
        if line.endswith(":") and _first_word(line.lstrip(), True) in PYTHON_COMPOUND_WORDS:
            return line_start
        return None
    if code.endswith(lex.block_opener) and state.brackets.endswith(lex.block_opener):
        return code.rfind("\n") + 1
    return None


def _block_is_empty(lex: Lexicon, rest: str, opener_indent: int) -> bool:
    """The lines after the cursor line hold nothing of the block: the next code line is dedented or closes it."""
    line = _next_line(rest, lex.line_comments)
    return line is None or _indent(line) <= opener_indent or line.lstrip()[:1] in OPENER_OF


@lru_cache(maxsize=8)
def cursor_context(prefix: str, suffix: str, language: str = "python") -> CursorContext:
    """The context of one cursor (cached: the scope, the stop rule and `finish` of one request share it)."""
    lex = lexicon(language)
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
        events, _, _ = _closing_events(lex, suffix, state, 0, min(len(suffix), SUFFIX_SCAN_CHARS))
        suffix_closer = events[0][1] if events else None
    line_events, _, _ = _closing_events(lex, line_suffix, CodeState(quote=state.quote))
    suffix_line_closers = sum(1 for _, closer in line_events if closer in OPENER_OF)

    block_indent, opener_text, scope = None, "", "single"
    if state.in_code and not line_suffix.strip():
        opener = _opener(lex, language, prefix, window, state)
        if opener is not None and _block_is_empty(lex, rest, _indent(prefix[opener:])):
            block_indent, opener_text, scope = _indent(prefix[opener:]), prefix[opener:], "multi"
    return CursorContext(language, lex, line_prefix, line_suffix, next_line.rstrip(), line_state, state,
                         suffix_closer, suffix_line_closers, block_indent, opener_text, scope)


def completion_scope(prefix: str, suffix: str, language: str = "python") -> Scope:
    """"multi" when the cursor is in an empty block body (on a blank line below a header such as `def f():` or at
    the end of that header line, with nothing indented below); "single" otherwise."""
    return cursor_context(prefix, suffix, language).scope


# ---------------------------------------------------------------------------------------------------------------
# The stop rule


class SyntaxStop:
    """A StopRule (inference/generate.py) that ends a completion at a syntactic boundary while it streams.

    It keeps per-completion state (the lines already scanned), so each draft needs its own: `fresh()` makes another
    for the same cursor without recomputing the context. Given a text that does not extend the previous one, it
    starts over, so it stays correct, only slower, if shared.
    """

    def __init__(self, prefix: str, suffix: str, scope: Scope | None = None, language: str = "python", *,
                 context: CursorContext | None = None) -> None:
        self.context = context or cursor_context(prefix, suffix, language)
        self.scope: Scope = scope or self.context.scope
        self._restart()

    def fresh(self) -> SyntaxStop:
        """A new rule for the same cursor and scope, with no text seen."""
        return SyntaxStop("", "", self.scope, context=self.context)

    def _restart(self) -> None:
        ctx = self.context
        self._seen = 0  # characters of complete lines already scanned
        self._seen_text = ""
        self._state = ctx.state  # the lexer state at _seen
        self._decided: tuple[str, int] | None = None
        self._floor = len(ctx.state.brackets)
        self._in_cursor_string = ctx.state.quote is not None
        if self.scope == "single":
            self._watch = ctx.suffix_closer is not None
        else:
            self._watch = ctx.state.comment is None and (self._in_cursor_string or self._floor > 0)
        self._closing: str | None = None  # the closer of the cursor's bracket or string met on this line
        # The node the completion belongs to: the empty block (a line dedented to its opener ends it), or the
        # statement that starts on the cursor line or, on a blank cursor line, on the first line of code.
        self._block = ctx.block_indent is not None and not ctx.line_prefix.strip()
        self._anchor_start: int | None = None  # index in the text of the anchor's first line
        self._anchor_head = ""  # the text of the anchor before the completion (from the prefix)
        self._anchor_code = ""  # the anchor's first line, stripped
        self._limit: int | None = None  # a line indented at most this much (outside brackets) may end the node
        self._depth = 0  # ... if no more brackets are open at its start than at the anchor's
        if self._block:
            self._limit, self._depth = ctx.block_indent, len(ctx.state.brackets)
        elif ctx.line_prefix.strip():  # the node starts on the cursor line (or on the header it ends)
            self._anchor_start, self._anchor_head = 0, ctx.opener_text or ctx.line_prefix
            self._anchor_code = self._anchor_head.lstrip()
            self._limit = _indent(self._anchor_head)
            self._depth = len((ctx.state if ctx.opener_text else ctx.line_state).brackets)

    def cut(self, text: str) -> int | None:
        """Characters of `text` (the completion so far) to keep if it is complete, else None."""
        if self._decided is not None and text.startswith(self._decided[0]):
            return self._decided[1]
        if not text.startswith(self._seen_text):
            self._restart()
        on_line = self._single_line if self.scope == "single" else self._block_line
        while (newline := text.find("\n", self._seen)) >= 0:
            keep = on_line(text, self._seen, newline + 1, True)
            if keep is not None:
                return self._decide(text, keep)
            self._seen = newline + 1
        self._seen_text = text[:self._seen]
        if self._seen < len(text):
            keep = on_line(text, self._seen, len(text), False)
            if keep is not None:
                return self._decide(text, keep)
        return None

    def _decide(self, text: str, keep: int) -> int:
        self._decided, self._seen_text = (text, keep), text[:self._seen]
        return keep

    def _closer(self, text: str, start: int, end: int) -> tuple[int, str] | None:
        """The first character in text[start:end] that closes the cursor's bracket or string (if still watched), and
        that closer (a bracket or the string's delimiter)."""
        if not self._watch:
            return None
        before, at = advance(self.context.lexicon, text, self._state, start, end, floor=self._floor,
                             in_cursor_string=self._in_cursor_string)
        if at is None:
            return None
        return at, before.quote if before.quote is not None else text[at]

    def _scan(self, text: str, start: int, end: int) -> None:
        """Move the lexer state over a complete line, noting when the string open at the cursor ends."""
        lex = self.context.lexicon
        if self._in_cursor_string:
            before, at = advance(lex, text, self._state, start, end, in_cursor_string=True)
            if at is None:
                self._state = before
                self._in_cursor_string = before.quote is not None  # a one-line string ends with its line
                return
            self._in_cursor_string = False
            self._state, start = CodeState(before.brackets), at + len(before.quote or "")
        self._state = advance(lex, text, self._state, start, end)[0]

    def _single_line(self, text: str, start: int, end: int, complete: bool) -> int | None:
        """Single scope: the first line of code ends the completion; the suffix's text is never written again."""
        ctx = self.context
        line = text[start:end]
        if not line.strip():  # blank lines before the code are kept: at a line's end the suggestion starts below
            if complete:
                self._scan(text, start, end)
            return None
        closer = self._closer(text, start, end)
        if closer is not None:
            if closer[1] == ctx.suffix_closer:
                return closer[0]
            self._watch = False  # the model closes what the suffix leaves open: fine
        if start == 0 and ctx.line_suffix.strip():
            keep = self._repeats_line_suffix(text, end)
            if keep is not None:
                return keep
        if not complete:
            return None
        whole = ctx.line_prefix + line if start == 0 else line
        if ctx.next_line and not ctx.line_suffix.strip() and whole.rstrip() == ctx.next_line:
            return _before_line(text, start)
        return _line_end(text, end)

    def _repeats_line_suffix(self, text: str, end: int) -> int | None:
        """Where the completion's first line starts writing the rest of the cursor line again, if it has."""
        ctx = self.context
        written = text[:end].rstrip()
        target = ctx.line_suffix.rstrip()
        if not written.endswith(target):
            target = target.lstrip()
            if not written.endswith(target):
                return None
        at = len(written) - len(target)
        left = text[at - 1] if at > 0 else ctx.line_prefix[-1:]
        if left and _is_word(left) and _is_word(text[at]):
            return None  # `x = 21` before the suffix `1` is not a repetition
        kept, _ = advance(ctx.lexicon, text, ctx.state, 0, at)
        if len(kept.brackets) > len(ctx.state.brackets) or kept.quote != ctx.state.quote:
            return None  # the "repeated" text closes something the completion opened: f(x) before `)`
        if _escaped(text, at, kept):
            return None
        if ctx.line_suffix[:1].isspace():
            at = len(text[:at].rstrip(" \t"))  # the suffix brings its own spacing
        return at

    def _block_line(self, text: str, start: int, end: int, complete: bool) -> int | None:
        """Multi scope: stop before the line that ends the node begun at the cursor, or after the line that closes
        the cursor's bracket; never write the suffix's next line again."""
        ctx = self.context
        line = text[start:end]
        whole = ctx.line_prefix + line if start == 0 else line
        code = whole.strip()
        state = self._state
        if code and state.in_code:
            if self._limit is None:  # blank cursor line: the first line of code starts the node
                if not code.startswith(ctx.lexicon.line_comments):
                    self._limit, self._depth, self._anchor_start = _indent(whole), len(state.brackets), start
                    self._anchor_head, self._anchor_code = (ctx.line_prefix if start == 0 else ""), code
            elif (self._block or start != self._anchor_start) and len(state.brackets) <= self._depth \
                    and _indent(whole) <= self._limit and code[0] not in OPENER_OF:
                word = _first_word(whole.lstrip(), complete)
                if word is None:
                    return None
                if self._block or word not in self._continuations():
                    return _before_line(text, start)
                if not complete:
                    return None
                if not self._continues(text, start, end):
                    return _before_line(text, start)
        if complete and code and whole.rstrip() == ctx.next_line and (start > 0 or not ctx.line_prefix.strip()):
            return _before_line(text, start)
        closer = self._closer(text, start, end)
        if closer is not None:
            at, closing = closer
            if closing == ctx.suffix_closer:
                return at if text[start:at].strip() else _before_line(text, start)
            self._watch, self._closing = False, closing  # the node at the cursor ends with this line
        if not complete:
            return None
        self._scan(text, start, end)
        if self._closing is not None:
            if self._closing not in OPENER_OF or len(self._state.brackets) < self._floor:
                return _line_end(text, end)
            self._closing = None  # `} else {` opened the block again
        return None

    def _continuations(self) -> frozenset[str]:
        """Words that may start a line continuing the anchor node at its own indentation."""
        words = self.context.lexicon.clause_words
        return words | DECORATED_WORDS if self._anchor_code.startswith("@") else words

    def _continues(self, text: str, start: int, end: int) -> bool:
        """Whether the complete line at text[start:end] continues the anchor node; tree-sitter decides for Python,
        other languages trust the clause word."""
        if self.context.language != "python":
            return True
        lines = (self._anchor_head + text[self._anchor_start or 0:end]).splitlines()
        margin = lines[0][:len(lines[0]) - len(lines[0].lstrip())]
        dedented = []
        for line in lines:
            if line.startswith(margin):
                dedented.append(line[len(margin):])
            elif not line.strip():
                dedented.append("")
            else:
                return False  # a line left of the anchor (in a string, say): not a clause of it
        return _python_node_continues("\n".join(dedented) + "\n")


# ---------------------------------------------------------------------------------------------------------------
# Post-processing


def _strip_trailing_blank(text: str, ctx: CursorContext) -> str:
    """Drop trailing blank lines; trailing spaces too when nothing follows the cursor on its line."""
    stripped = text.rstrip()
    if not ctx.line_suffix.strip() or "\n" in text[len(stripped):]:
        return stripped
    return text


def _repeated_next_line(text: str, ctx: CursorContext) -> int | None:
    """Where the completion's last line starts if it equals the suffix's next line (indentation included)."""
    if not ctx.next_line or ctx.line_suffix.strip():
        return None
    start = text.rfind("\n") + 1
    if not text[start:].strip():
        return None
    last = ctx.line_prefix + text if start == 0 else text[start:]
    return start if last.rstrip() == ctx.next_line else None


def _suffix_overlap(text: str, suffix: str, ctx: CursorContext) -> int | None:
    """Where the longest end of the completion that the suffix starts with begins: it would be written twice. Not
    an overlap that is blank, splits a word, or closes a bracket or string that the rest of the completion opened."""
    if not text:
        return None
    lex = ctx.lexicon
    for k in range(min(len(text), len(suffix)), 0, -1):
        head = suffix[:k]
        if head[-1] != text[-1] or not head.strip() or not text.endswith(head):
            continue
        at = len(text) - k
        left = text[at - 1] if at > 0 else ctx.line_prefix[-1:]
        if (left and _is_word(left) and _is_word(text[at])) or \
                (k < len(suffix) and _is_word(suffix[k - 1]) and _is_word(suffix[k])):
            continue  # the overlap would split a word
        kept, _ = advance(lex, text, ctx.state, 0, at)
        if (not kept.in_code and kept.quote != ctx.state.quote) or _escaped(text, at, kept):
            continue  # the overlap sits inside a string the completion opened, or starts with an escaped quote
        if len(kept.brackets) > len(ctx.state.brackets):
            _, closes = advance(lex, text, kept, at, floor=len(kept.brackets))
            if closes is not None:
                continue  # f(x) before the suffix `)`: the `)` is the completion's own
        return at
    return None


def repeated_suffix(text: str, prefix: str, suffix: str, language: str = "python") -> str:
    """The end of `text` that repeats the text after the cursor ("" if none): an overlap with the suffix's start, or
    a last line equal to the suffix's next line. `finish` removes it; benchmarks count it."""
    ctx = cursor_context(prefix, suffix, language)
    at = _suffix_overlap(text, suffix, ctx)
    if at is None:
        at = _repeated_next_line(text, ctx)
    return "" if at is None else text[at:]


def _strip_trailing_blank(text: str, ctx: CursorContext) -> str:
    """Drop trailing blank lines; trailing spaces too when nothing follows the cursor on its line."""
    stripped = text.rstrip()
    if not ctx.line_suffix.strip() or "\n" in text[len(stripped):]:
        return stripped
    return text


def _drop_provided_closer(text: str, ctx: CursorContext) -> str:
    """Cut before the completion closes the cursor's bracket or string when the suffix closes it already."""
    if ctx.suffix_closer is None:
        return text
    before, at = advance(ctx.lexicon, text, ctx.state, floor=len(ctx.state.brackets),
                         in_cursor_string=ctx.state.quote is not None)
    if at is None:
        return text
    closer = before.quote if before.quote is not None else text[at]
    return text[:at] if closer == ctx.suffix_closer else text


def _close_brackets(text: str, ctx: CursorContext) -> str:
    """Close the brackets the completion opened and left open, unless the cursor line's suffix has closers to spare
    for them (more than the brackets open before the cursor need)."""
    _, end, low = _closing_events(ctx.lexicon, text, ctx.state)
    if not end.in_code:
        return text  # inside a string or comment the completion opened: a closer would land in it
    opened = end.brackets[low:]  # outermost first
    spare = max(0, ctx.suffix_line_closers - low)
    needed = opened[spare:]  # the suffix's spare closers close the outermost ones, after ours
    return text + "".join(CLOSER_OF[b] for b in reversed(needed))


def finish(text: str, prefix: str, suffix: str, language: str = "python") -> str:
    """The completion to insert: without what the suffix already has (the closer of the cursor's bracket, an
    overlap with the suffix's start, its next line), without trailing blank lines, with its own brackets closed."""
    ctx = cursor_context(prefix, suffix, language)
    text = _drop_provided_closer(_strip_trailing_blank(text, ctx), ctx)
    while True:  # removing one repetition can uncover another: `))` before `)`
        text = _strip_trailing_blank(text, ctx)
        at = _suffix_overlap(text, suffix, ctx)
        if at is None:
            at = _repeated_next_line(text, ctx)
        if at is None:
            return _close_brackets(text, ctx)
        text = text[:at]


@dataclass
class Budget:
    """Token and time limits of one completion: a decoder stops at whichever comes first."""

    max_tokens: int = 64
    max_seconds: float | None = None
    started: float = field(default_factory=time.perf_counter)

    def spent(self, tokens: int) -> bool:
        return tokens >= self.max_tokens or (
            self.max_seconds is not None and time.perf_counter() - self.started >= self.max_seconds)
