"""The stop rule: ends a completion at a syntactic boundary while it streams, scanning only the lines it gained."""

from __future__ import annotations

from inference.syntax.languages import DECORATED_WORDS, Language, parse
from inference.syntax.lexer import OPENER_OF, CodeState, advance, escaped, first_word, indent_of, is_word
from inference.syntax.scope import CursorContext, Scope, cursor_context


def _before_line(text: str, start: int) -> int:
    """Characters to keep to end the completion before the line at `start`: trailing blank lines go too."""
    return len(text[:start].rstrip())


def _line_end(text: str, end: int) -> int:
    """Characters to keep to end the completion at the end of the complete line ending at `end` (after its '\\n')."""
    end -= 1
    return end - 1 if end > 0 and text[end - 1] == "\r" else end


def _node_continues(language: Language, snippet: str) -> bool:
    """Whether the node that starts on the snippet's first line runs on into its last line (Cody's rule: the largest
    node that starts on that line). The snippet is dedented so that its first line starts at column 0. Without a
    grammar, or where tree-sitter sees only an error, the clause word that brought us here decides for brace
    languages (a block not yet closed is often an error to it), and ends the node in Python."""
    source = snippet.encode("utf-8", "surrogatepass")
    tree = parse(language, source)
    if tree is None:
        return True
    last_line = source.rstrip(b"\r\n").rfind(b"\n") + 1
    last_code = last_line + len(source[last_line:]) - len(source[last_line:].lstrip())
    node = tree.root_node.named_descendant_for_byte_range(0, 1)
    if node is None or node.parent is None:
        return False
    while node.parent is not None and node.parent.parent is not None and \
            node.parent.start_point.row == node.start_point.row:
        node = node.parent
    if node.type == "ERROR":
        return language.error_continues
    return node.end_byte > last_code


class SyntaxStop:
    """A StopRule (inference/generate.py) that ends a completion at a syntactic boundary while it streams.

    It keeps per-completion state (the lines already scanned), so each draft needs its own; another for the same
    cursor is cheap, since `cursor_context` is cached. Given a text that does not extend the previous one, it starts
    over, so it stays correct, only slower, if shared.
    """

    def __init__(self, prefix: str, suffix: str, scope: Scope | None = None, language: str = "python") -> None:
        self.context: CursorContext = cursor_context(prefix, suffix, language)
        self.scope: Scope = scope or self.context.scope
        self._restart()

    def _restart(self) -> None:
        ctx = self.context
        self._seen = 0  # characters of complete lines already scanned
        self._text = ""  # the text of the last call: state on its partial last line holds for its extensions only
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
            self._limit = indent_of(self._anchor_head)
            self._depth = len((ctx.state if ctx.opener_text else ctx.line_state).brackets)

    def cut(self, text: str) -> int | None:
        """Characters of `text` (the completion so far) to keep if it is complete, else None."""
        if self._decided is not None and text.startswith(self._decided[0]):
            return self._decided[1]
        if not text.startswith(self._text):  # another draft's text, or an edited one
            self._restart()
        self._text = text
        on_line = self._single_line if self.scope == "single" else self._block_line
        while (newline := text.find("\n", self._seen)) >= 0:
            keep = on_line(text, self._seen, newline + 1, True)
            if keep is not None:
                return self._decide(text, keep)
            self._seen = newline + 1
        if self._seen < len(text):
            keep = on_line(text, self._seen, len(text), False)
            if keep is not None:
                return self._decide(text, keep)
        return None

    def _decide(self, text: str, keep: int) -> int:
        self._decided = (text, keep)
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
            at, closing = closer
            mismatched = closing in OPENER_OF and OPENER_OF[closing] != ctx.state.brackets[-1:]
            if closing == ctx.suffix_closer or mismatched:
                return at  # the suffix's own closer, or a bracket that does not pair with the cursor's: not written
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
        if left and is_word(left) and is_word(text[at]):
            return None  # `x = 21` before the suffix `1` is not a repetition
        kept, _ = advance(ctx.lexicon, text, ctx.state, 0, at)
        if len(kept.brackets) > len(ctx.state.brackets) or kept.quote != ctx.state.quote:
            return None  # the "repeated" text closes something the completion opened: f(x) before `)`
        if escaped(text, at, kept):
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
                    self._limit, self._depth, self._anchor_start = indent_of(whole), len(state.brackets), start
                    self._anchor_head, self._anchor_code = (ctx.line_prefix if start == 0 else ""), code
            elif (self._block or start != self._anchor_start) and len(state.brackets) <= self._depth \
                    and indent_of(whole) <= self._limit and code[0] not in OPENER_OF:
                word = first_word(whole.lstrip(), complete)
                if word is None:
                    return None
                if self._block or word not in self._continuations():
                    return _before_line(text, start)
                if not complete:
                    return None
                if word in self.context.language.confirmed and not self._continues(text, start, end):
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
        """Whether the complete line at text[start:end] continues the anchor node (tree-sitter decides)."""
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
        return _node_continues(self.context.language, "\n".join(dedented) + "\n")
