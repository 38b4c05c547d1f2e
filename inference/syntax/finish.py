"""The last clean-up of a completion against the text after the cursor: nothing of it written twice, the completion's
own brackets closed, no trailing blank lines."""

from __future__ import annotations

import re

from inference.syntax.lexer import CLOSER_OF, advance, closing_events, escaped, is_word
from inference.syntax.scope import CursorContext, cursor_context


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
        if (left and is_word(left) and is_word(text[at])) or \
                (k < len(suffix) and is_word(suffix[k - 1]) and is_word(suffix[k])):
            continue  # the overlap would split a word
        kept, _ = advance(lex, text, ctx.state, 0, at)
        if (not kept.in_code and kept.quote != ctx.state.quote) or escaped(text, at, kept):
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


# A line ending in one of these goes on below, so its brackets stay open: an opener or a comma (`t.Union[`,
# `if x {`, `f(a,`), a line continuation (a C macro's `\`), a member access or a binary operator (`x.`, `p->`,
# `if (a &&`, `f(x +`, `(a) =>`, `{k:`; not `i++`, `i--`, nor `>`, `*` or `&`, which also end types: `vector<int>`)
CONTINUED_BY = re.compile(r"(?:[([{,\\.:<=/%|^?~]|&&|=>|->|(?<![+-])[+-]|\b(?:and|or|not|in|is))\s*$")


def _close_brackets(text: str, ctx: CursorContext) -> str:
    """Close the brackets the completion opened and left open, unless the cursor line's suffix has closers to spare
    for them (more than the brackets open before the cursor need), or the completion ends where the code goes on
    below (CONTINUED_BY: the model was stopped at that line break, and `t.Union[]` or `if x {}` would be
    wrong)."""
    _, end, low = closing_events(ctx.lexicon, text, ctx.state)
    if not end.in_code:
        return text  # inside a string or comment the completion opened: a closer would land in it
    if CONTINUED_BY.search(text):
        return text
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
