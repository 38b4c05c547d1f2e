"""Text edits become minimal token splices, so a KV cache keeps the rows of every unchanged token.

Only a window around each edit is re-tokenized. Its ends must be places where the tokenization of the
whole text is sure to split the same way before and after the edit. Every pre-tokenizer that
inference/tokenizer.py builds (Qwen2's regex, and GPT-2's regex, alone or after splitting digits)
cuts text into pieces with a left-to-right regex that has no look-behind, and BPE never merges
across pieces. Between some pairs of characters no match of the regex can cross, whatever the rest of
the text is. Call such a position an *anchor*. Then:

- the pieces after an anchor depend only on the text after it;
- the pieces before it depend only on the text before it plus the next character.

So if the window starts and ends at anchors whose two characters the edit did not touch, the
tokens outside the window stay valid. A window is encoded with one character of context on each side.
Its tokenization must also split at both anchors; if it does not, the window grows to the next
anchor outwards. The whole text is the last resort.
"""

from __future__ import annotations

import string
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass

from inference.tokenizer import CodeTokenizer
from kv_cache.edits import TextEdit

_LETTERS = frozenset(string.ascii_letters)
_DIGITS = frozenset(string.digits)
_PUNCTUATION = frozenset(string.punctuation)
_VISIBLE = frozenset(chr(c) for c in range(0x21, 0x7F))  # printable ASCII other than space


def _is_anchor(before: str, after: str) -> bool:
    """Whether no pre-tokenizer match can span these two adjacent characters.

    Kept to ASCII, where Python and the tokenizer's regex engine agree on what is a letter or space:
    - a letter, then a non-letter: the letter run ends (contractions such as 's end with their letters);
    - a digit, then a non-digit: the digit (Qwen2) or digit run (GPT-2) ends, and no rule glues
      a digit to what follows it;
    - a line break, then a visible character: whitespace runs end at the break, and nothing glues
      a line break to what follows it;
    - punctuation, then a space or tab: the punctuation run ends, and a space glues only to what follows.
    """
    if before in _LETTERS:
        return after < "\x80" and after not in _LETTERS
    if before in _DIGITS:
        return after < "\x80" and after not in _DIGITS
    if before in ("\r", "\n"):
        return after in _VISIBLE
    return before in _PUNCTUATION and after in (" ", "\t")


@dataclass(frozen=True)
class TokenSplice:
    """Old tokens [start, stop) are replaced by `ids`; positions after them shift by `delta`."""

    start: int
    stop: int
    ids: tuple[int, ...]

    @property
    def delta(self) -> int:
        return len(self.ids) - (self.stop - self.start)

    def apply(self, ids: Sequence[int]) -> list[int]:
        """The old id sequence with this splice applied."""
        return [*ids[: self.start], *self.ids, *ids[self.stop :]]


@dataclass
class TokenizedText:
    """A text and its tokenization, kept in sync by apply_edit.

    starts[i] is the offset of the character holding token i's first byte. A character split over
    several byte tokens gives each of them its own start, so starts is non-decreasing (the convention
    of the tokenizer's offsets).
    """

    text: str
    ids: list[int]
    starts: list[int]

    @classmethod
    def encode(cls, text: str, tokenizer: CodeTokenizer) -> TokenizedText:
        ids, spans = tokenizer.encode_with_offsets(text)
        return cls(text, ids, [start for start, _ in spans])


def _anchored(doc: TokenizedText, position: int) -> bool:
    return 0 < position < len(doc.text) and _is_anchor(doc.text[position - 1], doc.text[position])


def _anchor_before(doc: TokenizedText, position: int) -> int:
    """Last token starting at an anchor strictly before `position`, so that both characters around the
    anchor come before it; else token 0."""
    index = bisect_left(doc.starts, position) - 1
    while index > 0 and not _anchored(doc, doc.starts[index]):
        index -= 1
    return max(index, 0)


def _anchor_after(doc: TokenizedText, position: int) -> int:
    """First token starting at an anchor strictly after `position`, so that both characters around the
    anchor come at or after it; else len(ids), the end of the text."""
    index = bisect_left(doc.starts, position + 1)
    while index < len(doc.ids) and not _anchored(doc, doc.starts[index]):
        index += 1
    return index


def _offset_of(doc: TokenizedText, index: int) -> int:
    """Character offset where token `index` starts; the text's length for index len(ids)."""
    return doc.starts[index] if index < len(doc.ids) else len(doc.text)


@dataclass(frozen=True)
class _Window:
    """A re-tokenized stretch of the edited text, replacing old tokens [first, stop)."""

    ids: list[int]
    starts: list[int]
    left_held: bool  # the window's own tokenization splits at its left anchor
    right_held: bool


def _retokenize(doc: TokenizedText, new_text: str, first: int, stop: int, delta: int,
                tokenizer: CodeTokenizer) -> _Window:
    """Encode new_text between the anchors at old tokens `first` and `stop`, plus one character of
    context on each side (the character after an anchor steers the pieces before it)."""
    left = _offset_of(doc, first) if first else 0
    right = _offset_of(doc, stop) + delta
    at_end = stop == len(doc.ids)
    lo = max(left - 1, 0)
    hi = len(new_text) if at_end else right + 1
    ids, spans = tokenizer.encode_with_offsets(new_text[lo:hi])
    starts = [lo + start for start, _ in spans]
    keep_from = bisect_left(starts, left)
    keep_to = len(ids) if at_end else bisect_left(starts, right)
    left_held = keep_from == 0 or lo + spans[keep_from - 1][1] <= left
    right_held = at_end or keep_to == 0 or lo + spans[keep_to - 1][1] <= right
    return _Window(ids[keep_from:keep_to], starts[keep_from:keep_to], left_held, right_held)


def apply_edit(doc: TokenizedText, edit: TextEdit, tokenizer: CodeTokenizer) -> TokenSplice:
    """Apply `edit` to doc (text, ids and starts) and return the minimal splice of the old ids.

    Raises ValueError, leaving doc unchanged, when the edit does not fit the text.
    """
    new_text, delta = edit.apply(doc.text), edit.delta
    first, stop = _anchor_before(doc, edit.start), _anchor_after(doc, edit.end)
    while True:
        window = _retokenize(doc, new_text, first, stop, delta, tokenizer)
        if window.left_held and window.right_held:
            break
        if not window.left_held:
            first = _anchor_before(doc, _offset_of(doc, first))
        if not window.right_held:
            stop = _anchor_after(doc, _offset_of(doc, stop))

    old, new = doc.ids[first:stop], window.ids
    prefix = _common_prefix(old, new)
    suffix = _common_prefix(old[prefix:][::-1], new[prefix:][::-1])
    splice = TokenSplice(first + prefix, stop - suffix, tuple(new[prefix : len(new) - suffix]))

    doc.text = new_text
    doc.ids[splice.start : splice.stop] = splice.ids
    if delta:
        doc.starts[stop:] = [start + delta for start in doc.starts[stop:]]
    doc.starts[first:stop] = window.starts
    return splice


def apply_edits(doc: TokenizedText, edits: Sequence[TextEdit], tokenizer: CodeTokenizer) -> list[TokenSplice]:
    """Apply edits in order, each to the result of the previous one (LSP semantics), one splice each.

    All ranges are checked before the first edit is applied, so a bad edit leaves doc unchanged.
    """
    length = len(doc.text)
    for edit in edits:
        edit.check_fits(length)
        length += edit.delta
    return [apply_edit(doc, edit, tokenizer) for edit in edits]


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)
