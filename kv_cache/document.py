"""One open document: its text, tokens and a window of KV rows, kept in step with every edit.

The FIM layout. Qwen completes `<|fim_prefix|>prefix<|fim_suffix|>suffix<|fim_middle|>`. The rows hold
`<|fim_prefix|>` followed by the document's tokens in order (a window of them for long files), so that:

- typing anywhere is a splice of those rows (PIE: encode the new tokens, re-rotate the later keys);
- a completion at any cursor needs no re-encode: the prompt's prefix is rows [0, cursor), then
  `<|fim_suffix|>` (plus the part of a token the cursor splits) is encoded, then the rows of the next
  suffix tokens are reused with their keys rotated to follow it, and `<|fim_middle|>` is fed last;
- moving the cursor only changes which rows are borrowed.

The borrowed suffix rows were computed without `<|fim_suffix|>` before them: the same approximation as a
one-token PIE insertion. bench/pie.py measures the layout against a full FIM encode and the prefix-only
prompt. For models without FIM tokens the rows are the document alone and the prompt is the prefix.

The window. Files longer than the token budget keep rows for a window of tokens [lo, hi) around the
cursor. It moves with PIE as well: rows far before the cursor are dropped and the rest shifted down,
tokens that come into view before it are inserted after the marker, tokens after it are appended.

Cold starts. A request in a document without rows near its cursor does not wait for the whole window: it
encodes the `first` tokens before the cursor (and `first_suffix` after it for a FIM prompt) and answers from
those. If idle steps had already encoded the top of the file (they start there at didOpen) and the window starts
at the top, those rows are kept as the window's head: the rows are `marker + doc[0:head] + doc[lo:hi]`, the
tokens in between are missing, and positions run on. The file's start (imports, definitions) is worth more to
an early answer than more of the nearest lines (bench/cold.py). Idle steps then grow the window to its target
[target_lo, target_hi): backwards in chunks inserted before the row of `lo` (PIE re-rotates the rows after
them, which become stale, as after an edit) until the gap is closed, then forwards; refresh makes them exact.
A reopened document restores the longest prefix of its rows that was saved (BufferStore.restore).

Staleness. After a splice the later rows keep K/V computed from the old text; `refresh_step` re-encodes
them left to right in small chunks when there is nothing better to do.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from inference.generate import DecodeCache, prefill
from inference.runtime import Decoder
from inference.tokenizer import CodeTokenizer
from kv_cache.buffer_cache import KEPT_LOGITS, BufferCache, SpliceStats
from kv_cache.edits import TextEdit
from kv_cache.rotation import rerotate_keys
from kv_cache.splice import TokenizedText, TokenSplice, apply_edits
from kv_cache.store import BufferStore

if TYPE_CHECKING:  # crossfile.py builds on this module
    from kv_cache.crossfile import ContextRows

HEAL_TOKENS = KEPT_LOGITS - 1  # most tokens healing backs off inside a word
HISTORY_TOKENS = 16  # document tokens before the cursor that n-gram contexts may need
ENCODE_CHUNK = 32  # tokens per idle step: a request waits for at most one chunk (~0.3 s on 2 cores)


@dataclass(frozen=True)
class WindowBudget:
    """How many tokens of context the rows keep around the cursor."""

    prefix: int = 2048  # tokens before the cursor
    suffix: int = 256  # tokens after it that the prompt borrows
    slack: int = 512  # the window moves in steps this big, so typing does not shift it every token
    first: int = 256  # tokens before the cursor a request encodes before answering in a cold document
    first_suffix: int = 32  # and after it (bench/cold.py measures early answers against full windows)


@dataclass
class CursorContext:
    """What a decoder needs to complete at a cursor: the prompt's rows in `cache` and the logits after it."""

    cache: DecodeCache | None  # None (and logits None) when there is nothing to complete from
    logits: np.ndarray | None  # [vocab]: the next token's logits after the prompt
    healed: bytes  # the text between the last whole prefix token and the cursor, for token healing
    prefix: str  # the document before / after the cursor (for stopping rules)
    suffix: str
    prefix_rows: int  # rows[:prefix_rows] are the prompt's prefix (marker included)
    reused: int  # rows taken from the cache
    encoded: int  # tokens run through the model to build the prompt after the document's rows
    history: list[int] = field(default_factory=list)  # the last document tokens before the healed ones
    built: int = 0  # window tokens the request encoded (a cold document's first `first` + `first_suffix`)


class DocumentCache:
    """A document's text and tokens (always current) and its KV rows (kept in a BufferStore under `uri`)."""

    def __init__(self, uri: str, text: str, decoder: Decoder, tokenizer: CodeTokenizer, store: BufferStore, *,
                 mode: str = "pie", budget: WindowBudget = WindowBudget()) -> None:
        self.uri = uri
        self.decoder, self.tokenizer, self.store = decoder, tokenizer, store
        self.mode, self.budget = mode, budget
        self.doc = TokenizedText.encode(text, tokenizer)
        sp = tokenizer.specials
        self.fim = None if None in (sp.fim_prefix, sp.fim_suffix, sp.fim_middle) else (
            sp.fim_prefix, sp.fim_suffix, sp.fim_middle)
        self._marker = 1 if self.fim else 0  # rows before the document's first token
        self.lo = self.hi = 0  # document tokens [lo, hi) have rows (once encoded up to hi)
        self.target_lo = self.target_hi = 0  # the window to grow to: [target_lo, lo) and [hi, target_hi) are to do
        self.head = 0  # with a gap, rows for doc[0:head] come before those for doc[lo:hi] (0 < head < lo)
        self._restore_tried = False  # saved rows are looked for once, by the first step that builds rows
        self.version = 0  # counts edits, for caches derived from the text
        self._restart(0)

    # -- state -------------------------------------------------------------------------------------------

    @property
    def text(self) -> str:
        return self.doc.text

    @property
    def ids(self) -> list[int]:
        return self.doc.ids

    def cache(self) -> BufferCache | None:
        """The rows, from memory or restored from disk; None if they must be rebuilt."""
        rows = self.store.get(self.uri)
        if rows is None and self.hi > self.lo:  # evicted: its file holds exactly these rows
            rows = self._restore(self.hi)
        return rows

    def _restore(self, upto: int) -> BufferCache | None:
        """The saved rows of the longest prefix of the head and the window [lo, upto) on disk (the window then ends
        there); without any, no rows and no head (the window is built again from `lo`)."""
        rows = self.store.restore(self.uri, self._row_ids(upto))
        if rows is None:
            self.hi, self.head = self.lo, 0
        else:
            self.hi = self.lo + len(rows) - self._base
        return rows

    def pending_tokens(self) -> int:
        """Tokens of the window that have no rows in memory (rows on disk count: they must be read back)."""
        rows = self.store.peek(self.uri)
        if rows is None:
            return self.target_hi - self.target_lo
        return self.lo - max(self.target_lo, self.head) + self.target_hi - self.hi

    def window(self) -> dict[str, int]:
        """How far the window is built, for statistics: tokens with rows, in the target window, in the text."""
        built = self.head + self.hi - self.lo if self.store.peek(self.uri) is not None else 0
        return {"rows": built, "window": self.target_hi - self.target_lo, "tokens": len(self.doc.ids)}

    def row_of(self, start: int, stop: int) -> int | None:
        """The row of document token `start` if the window has rows for all of tokens [start, stop), else None."""
        if self.head and stop <= self.head:
            return self._marker + start
        if self.lo <= start and stop <= self.hi:
            return self._row(start)
        return None

    def borrow_rows(self, start: int, stop: int) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray] | None:
        """Copies of the K/V of document tokens [start, stop) and their positions (BufferCache.copy_rows), for
        another document's prompt; read from disk if the rows were evicted, without bringing them back into memory.
        None when the window holds no rows for all of them."""
        first = self.row_of(start, stop)
        if first is None:
            return None
        rows = self.store.peek(self.uri)
        if rows is None and self.hi > self.lo:
            rows = self.store.restore(self.uri, self._row_ids(self.hi), hold=False)
        if rows is None or first + stop - start > len(rows):
            return None
        return rows.copy_rows(first, first + stop - start)

    def stale_rows(self) -> int:
        rows = self.store.peek(self.uri)
        return 0 if rows is None else int(rows.stale.sum())

    # -- edits -------------------------------------------------------------------------------------------

    def apply(self, edits: Sequence[TextEdit]) -> list[SpliceStats]:
        """Apply LSP-ordered edits to the text, tokens and rows. A bad range raises ValueError, nothing changed."""
        rows = self.cache()
        n_before = len(self.doc.ids)
        splices = apply_edits(self.doc, edits, self.tokenizer)
        self.version += 1
        stats = []
        for splice in splices:
            stats.extend(self._splice_rows(rows, splice, n_before))
            n_before += splice.delta
        if rows is None and splices:  # no rows yet: idle steps build them where the user is typing
            self.focus(splices[-1].start)
        return stats

    def _splice_rows(self, rows: BufferCache | None, splice: TokenSplice, n_before: int) -> list[SpliceStats]:
        """Follow one token splice in the window [lo, hi) and in the rows (if any)."""
        start, stop, delta = splice.start, splice.stop, splice.delta
        if rows is None:  # nothing to follow: `focus` rebuilds the window around the next cursor
            self.lo = self.hi = self.target_lo = self.target_hi = self.head = 0
            return []
        if self.head and start < self.lo:  # an edit in the head or the gap: the head goes, PIE shifts the rest
            self._drop_head(rows)
        if start < self.target_lo:  # before the window's target start: it moves, or begins at the edit
            self.target_lo = self.target_lo + delta if stop <= self.target_lo else start
        if stop <= self.lo and not (start == stop == self.lo and self.lo == 0):
            self.lo, self.hi, self.target_hi = self.lo + delta, self.hi + delta, self.target_hi + delta
            return []
        if start > self.hi or (start == self.hi and self.hi < n_before):
            # After the rows: only the part of the window not yet encoded can move.
            if start < self.target_hi:
                self.target_hi = max(self.hi, self.target_hi + delta)
            return []
        # Overlaps the rows (or touches their end at the end of the document).
        lo, hi = min(self.lo, start), max(self.hi, stop) + delta
        # Old tokens in [start, lo) or [hi, stop) have no rows: the inserted ids replace the rows in between.
        first, last = max(start, self.lo), min(stop, self.hi)
        stats = [rows.apply_splice(self._row(first), self._row(last), splice.ids, self.mode)]
        self.target_hi = max(self.target_hi + delta, hi)
        self.lo, self.hi = lo, hi
        self.target_lo = min(self.target_lo, lo)
        return stats

    # -- the window --------------------------------------------------------------------------------------

    @property
    def _base(self) -> int:
        """The row of token `lo`: after the marker and the head."""
        return self._marker + self.head

    def _row(self, token: int) -> int:
        """The row of a token in [lo, hi]."""
        return self._base + token - self.lo

    def _row_ids(self, upto: int) -> list[int]:
        """The ids the rows hold with the window ending at `upto`: the marker, the head, the window."""
        return ([self.fim[0]] if self.fim else []) + self.doc.ids[:self.head] + self.doc.ids[self.lo:upto]

    def _drop_head(self, rows: BufferCache) -> None:
        rows.apply_splice(self._marker, self._base, [], self.mode)
        self.head = 0

    def focus(self, cursor_token: int) -> None:
        """Set the window the cursor needs. Rows are built by `encode_step` (idle), `ensure` (what a request
        needs now) or `ensure_rows` (all of it); rows that do not reach the cursor's `first` tokens are dropped."""
        b = self.budget
        want_lo, want_hi = self._wanted(cursor_token)
        rows = self.cache()
        if rows is None and not self._restore_tried and self._target_lo(want_lo) == 0:
            self._restore_tried = True  # a text opened again: the start of its window may be on disk
            self.lo = self.head = 0
            rows = self._restore(self._target_hi(want_hi, 0))
        if rows is not None and self.head and self._target_lo(want_lo):  # the window no longer starts at the top
            self._drop_head(rows)
        if rows is None or max(want_lo, cursor_token - b.first) > self.hi or want_hi < self.lo:
            top = self.hi if rows is not None and not self.head and self.lo == 0 and \
                self._target_lo(want_lo) == 0 else 0  # rows [0, top) that the window will hold anyway
            self._restart(cursor_token)
            if top and top < self.lo:  # they stay as the head; the cursor's rows follow them
                self.head = top
            elif rows is not None:
                self.store.drop(self.uri)
            return
        if want_lo < self.target_lo or want_lo > self.target_lo + b.slack:
            self.target_lo = self._target_lo(want_lo)
        if self.target_lo > self.lo:  # drop rows far before the cursor; PIE shifts the rest down
            rows.apply_splice(self._base, self._row(self.target_lo), [], self.mode)
            self.lo = self.target_lo
        if self.hi > want_hi + b.slack:  # drop rows far after the cursor: nothing after them moves
            cut = want_hi + b.slack // 2
            rows.apply_splice(self._row(cut), len(rows), [], self.mode)
            self.hi = cut
        self.target_hi = max(self.hi, want_hi)

    def _wanted(self, cursor_token: int) -> tuple[int, int]:
        """The tokens [lo, hi) a prompt at the cursor uses: the whole document if it fits."""
        n, b = len(self.doc.ids), self.budget
        if n <= b.prefix + b.suffix + b.slack:
            return 0, n
        return max(0, cursor_token - b.prefix), min(n, cursor_token + b.suffix)

    def _target_lo(self, want_lo: int) -> int:
        return max(0, want_lo - self.budget.slack // 2) if want_lo else 0

    def _target_hi(self, want_hi: int, target_lo: int) -> int:
        b = self.budget
        return min(len(self.doc.ids), max(want_hi + b.slack // 2, target_lo + b.prefix + b.suffix))

    def _restart(self, cursor_token: int) -> None:
        """No rows: the window around the cursor, to be built from the cursor's `first` tokens outwards."""
        want_lo, want_hi = self._wanted(cursor_token)
        self.target_lo = self._target_lo(want_lo)
        self.target_hi = self._target_hi(want_hi, self.target_lo)
        self.lo = self.hi = max(self.target_lo, cursor_token - self.budget.first)
        self.head = 0

    def encode_step(self, max_tokens: int = ENCODE_CHUNK) -> int:
        """Build up to `max_tokens` of the window that has no rows yet: restore them, else start the rows, else
        grow them backwards (the chunk nearest the rows first), else forwards. Returns the rows gained."""
        rows = self.cache()
        if rows is None and not self._restore_tried and self.target_hi > self.lo:
            self._restore_tried = True  # a text opened again: the start of its window may be on disk
            if (rows := self._restore(self.target_hi)) is not None:
                return len(rows)
        if rows is None:
            return self._start_rows(min(self.target_hi, self.lo + max_tokens))
        if self.lo > max(self.target_lo, self.head):
            return self._grow_back(max(self.target_lo, self.lo - max_tokens), rows)
        return self._grow_forward(min(self.target_hi, self.hi + max_tokens), rows)

    def ensure(self, cursor_token: int, upto: int) -> tuple[BufferCache, int]:
        """The rows a request at `cursor_token` needs now, and how many it encoded: `first` tokens before it (less
        at the window's start) and the tokens up to `upto`; the rest of the window is left to idle steps."""
        b = self.budget
        rows, built = self.cache(), 0
        if rows is None:
            built = self._start_rows(min(self.target_hi, max(cursor_token, upto)))
            rows = self.cache()
        if rows is None:  # an empty document without a marker
            rows = BufferCache(self.decoder, capacity=16)
            self.store.put(self.uri, rows)
            return rows, built
        built += self._grow_back(max(self.target_lo, min(cursor_token - b.first, self.lo)), rows)
        built += self._grow_forward(min(self.target_hi, max(self.hi, upto)), rows)
        return rows, built

    def ensure_rows(self) -> BufferCache:
        """All of the window's rows, now."""
        while self.encode_step(self.budget.prefix + self.budget.suffix):
            pass
        return self.ensure(self.lo, self.lo)[0]

    def _start_rows(self, upto: int) -> int:
        """New rows: the marker and the window's tokens [lo, upto)."""
        self.hi, self.head = self.lo, 0
        first = self._row_ids(upto)
        if not first:
            return 0
        rows = BufferCache(self.decoder, capacity=self._marker + self.target_hi - self.target_lo + self.budget.slack)
        rows.encode(first)
        self.hi = upto
        self.store.put(self.uri, rows)
        return len(first)

    def _grow_back(self, new_lo: int, rows: BufferCache) -> int:
        """Insert the tokens [new_lo, lo) before the row of `lo` (after the head, if any): PIE re-rotates the rows
        after them, now stale. A closed gap makes the rows one run from the top again."""
        new_lo = max(new_lo, self.head)
        if new_lo >= self.lo:
            return 0
        rows.apply_splice(self._base, self._base, self.doc.ids[new_lo:self.lo], self.mode)
        grown, self.lo = self.lo - new_lo, new_lo
        if self.head and self.lo == self.head:
            self.lo = self.head = 0
        return grown

    def _grow_forward(self, new_hi: int, rows: BufferCache) -> int:
        """Append the tokens [hi, new_hi): an append moves no row, so it is exact in any mode."""
        if new_hi <= self.hi:
            return 0
        rows.apply_splice(len(rows), len(rows), self.doc.ids[self.hi:new_hi], "pie")
        grown, self.hi = new_hi - self.hi, new_hi
        return grown

    def refresh_step(self, max_tokens: int = ENCODE_CHUNK) -> int:
        """Re-encode up to `max_tokens` stale rows, the first ones first (exact, see BufferCache.refresh).

        Idle work: it does not make the document the most recently used one."""
        rows = self.store.peek(self.uri)
        if rows is None:
            return 0
        stale = np.flatnonzero(rows.stale)
        if not len(stale):
            return 0
        return rows.refresh(int(stale[0]), int(stale[0]) + max_tokens)

    # -- completion context ------------------------------------------------------------------------------

    def context(self, offset: int, *, with_suffix: bool = True, room: int = 0, inserted: str = "",
                borrowed: ContextRows | None = None) -> CursorContext:
        """The prompt at character `offset` over the document's own rows (lent, not copied), with room for
        `room` rows of decoding after it; with `inserted`, the prompt as if that text had been typed at
        `offset` (its tokens go after the rows, the document is not changed); with `borrowed`, other files'
        rows placed before the document's (kv_cache/crossfile.py).

        Prefix layout (no FIM tokens, or `with_suffix=False`): the prompt is the rows before the healed
        tokens, and its logits are those the edit's forward left for its last row (no forward at all right
        after a keystroke). With borrowed rows, they are written after the document's rows and the prompt's
        last token is fed again after them (its first row is hidden), so the next token sees them. FIM:
        `<|fim_suffix|>`, the split token's rest, the next suffix rows rotated to follow it, and `<|fim_middle|>`
        are written after the document's rows (and the borrowed ones). A second request at the same cursor with
        no edit in between reuses what was written.
        """
        if not 0 <= offset <= len(self.doc.text):
            raise ValueError(f"cursor offset {offset} is outside the document's {len(self.doc.text)} characters")
        starts, text = self.doc.starts, self.doc.text
        after = bisect_left(starts, offset)  # first token starting at or after the cursor
        if after < len(starts) and starts[after] == offset:
            split = ""  # the cursor sits between two tokens
        else:
            split = text[offset:starts[after] if after < len(starts) else len(text)]
        whole = heal_start(text, starts, offset, after)
        typed = text[starts[whole]:offset] if after else ""  # what healing backs off
        extra: list[int] = []  # prompt tokens of the inserted text, after the document's rows
        if inserted:
            tail = TokenizedText.encode(typed + inserted, self.tokenizer)
            cut = heal_start(tail.text, tail.starts, len(tail.text), len(tail.ids))
            extra, typed = tail.ids[:cut], tail.text[tail.starts[cut]:]
        healed = typed.encode("utf-8")
        self.focus(whole)
        suffix_rows = bool(self.fim) and with_suffix  # a prefix prompt needs no rows after the healed tokens
        rows, built = self.ensure(whole, after + self.budget.first_suffix if suffix_rows else whole)
        prefix_rows = self._row(max(whole, self.lo))
        prefix, suffix = text[:offset] + inserted, text[offset:]
        history = (self.doc.ids[max(0, whole - HISTORY_TOKENS):whole] + extra)[-HISTORY_TOKENS:]
        positions = rows.positions
        position = int(positions[prefix_rows - 1]) + 1 if prefix_rows else 0
        if borrowed is not None and not prefix_rows:
            borrowed = None  # nothing of the document to place them before
        if not self.fim or not with_suffix:
            if not prefix_rows and not extra:
                return CursorContext(None, None, healed, prefix, suffix, 0, 0, 0, history, built)
            if borrowed is not None:
                last = prefix_rows - 1  # fed again after the borrowed rows
                key = ("prefix", last, inserted, borrowed.key)
                cache, logits = rows.lend(last, room, int(positions[last]), prompt=key,
                                          prompt_size=len(borrowed) + 1 + len(extra))
                encoded = 0
                if logits is None:
                    cache.write(borrowed.keys, borrowed.values)
                    logits = prefill(self.decoder, cache, [int(rows.ids[last]), *extra])
                    rows.keep_prompt(key, cache, logits)
                    encoded = 1 + len(extra)
                return CursorContext(cache, logits, healed, prefix, suffix, prefix_rows, last + len(borrowed), encoded,
                                     history, built)
            if extra:
                cache, _ = rows.lend(prefix_rows, room + len(extra), position)
                logits = prefill(self.decoder, cache, extra)
                return CursorContext(cache, logits, healed, prefix, suffix, prefix_rows, prefix_rows, len(extra),
                                     history, built)
            logits, computed = rows.logits_at(prefix_rows - 1)
            cache, _ = rows.lend(prefix_rows, room, position)
            return CursorContext(cache, logits, healed, prefix, suffix, prefix_rows, prefix_rows, int(computed),
                                 history, built)
        first = self._row(max(after, self.lo))
        last = min(len(rows), first + self.budget.suffix) if after < self.hi else first
        head = [*extra, self.fim[1], *self.tokenizer.encode(split)] if split else [*extra, self.fim[1]]
        key = (prefix_rows, first, last, split, inserted, borrowed.key if borrowed is not None else None)
        lent = len(borrowed) if borrowed is not None else 0
        cache, logits = rows.lend(prefix_rows, room, position, prompt=key,
                                  prompt_size=lent + len(head) + last - first + 1)
        reused = prefix_rows + last - first + lent
        if logits is not None:
            return CursorContext(cache, logits, healed, prefix, suffix, prefix_rows, reused, 0, history, built)
        if borrowed is not None:
            cache.write(borrowed.keys, borrowed.values)
        prefill(self.decoder, cache, head)
        if last > first:
            keys, values = rows.rows(first, last)
            start = cache.length
            cache.write(keys, values)
            shift = cache.position + np.arange(last - first) - positions[first:last]
            cfg = self.decoder.config
            for k in cache.keys:
                rerotate_keys(k[:, start:cache.length], shift, cfg.head_dim, cfg.rope_theta, in_place=True)
            cache.position += last - first
        logits = prefill(self.decoder, cache, [self.fim[2]])
        rows.keep_prompt(key, cache, logits)
        return CursorContext(cache, logits, healed, prefix, suffix, prefix_rows, reused, len(head) + 1, history, built)


def heal_start(text: str, starts: Sequence[int], offset: int, after: int) -> int:
    """The first token healing backs off for a cursor at `offset` (`after`: the first token starting at or
    after it): the one holding the start of the word the cursor is in (at most HEAL_TOKENS back), else the
    last token before the cursor; a character split over byte tokens is backed off whole. Keeping part of
    a word as prompt tokens ("He" + "a" for "Hea") shows the model a tokenization it never saw, and it
    misspells the word."""
    if not after:
        return 0
    word = offset
    while word > 0 and _is_word_char(text[word - 1]):
        word -= 1
    first = after - 1 if word == offset else max(bisect_right(starts, word) - 1, after - HEAL_TOKENS, 0)
    return bisect_left(starts, starts[first])


def _is_word_char(ch: str) -> bool:
    return ch.isalnum() or ch == "_"
