"""One document's KV cache, updated on every edit instead of rebuilt (Positional Integrity Encoding).

An edit replaces old rows [start, stop) with m new tokens. PIE drops the removed rows, encodes only the
new tokens against the unchanged prefix, and re-rotates the keys of the later rows by the position shift
delta = m - (stop - start). The later rows keep hidden states computed before the edit, so they are marked
stale: their K/V may differ from a full re-encode (a background refresh can fix them later).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from inference.generate import PREFILL_CHUNK, DecodeCache, grow_rows
from inference.runtime import Decoder, StepOutput
from kv_cache.choices import IDLE_ROWS, SPLICE_MODES
from kv_cache.rotation import rerotate_keys
from kv_cache.row_codec import dequantize_rows, quantize_rows, token_scales

INT8_LEVELS = 127  # "int8" idle rows (kv_cache/choices.py IDLE_ROWS)
# Rows whose next-token logits are kept from the forward that wrote them: the last few typed. Healing backs
# off at most KEPT_LOGITS - 1 tokens (document.HEAL_TOKENS), so the row before them is among these.
KEPT_LOGITS = 5


def check_idle_rows(rows: str) -> str:
    """`rows` if it is one of IDLE_ROWS, else ValueError."""
    if rows not in IDLE_ROWS:
        raise ValueError(f"unknown idle row type {rows!r} (expected one of {', '.join(IDLE_ROWS)})")
    return rows


@dataclass(frozen=True)
class PromptRows:
    """Prompt rows a decode wrote after the document's rows (see BufferCache.lend), kept for the next
    request at the same cursor: `key` names the prompt, `length`/`position` where it ended, `logits` after it."""

    key: tuple
    revision: int
    length: int
    position: int
    logits: np.ndarray


class SpliceLike(Protocol):
    """Old tokens [start, stop) replaced by `ids` (kv_cache.splice.TokenSplice has this shape)."""

    start: int
    stop: int
    ids: Sequence[int]


@dataclass(frozen=True)
class SpliceStats:
    mode: str
    dropped: int  # old rows removed
    inserted: int  # new tokens
    encoded: int  # rows run through the model: the inserted ones, or the whole document in "full" mode
    rotated: int  # rows whose keys were re-rotated
    forward_s: float
    rotate_s: float
    total_s: float


class BufferCache:
    """Rows of one document: K/V per layer, token ids, RoPE positions and staleness, in preallocated buffers.

    Row i is the document's token i. In "pie" mode positions stay 0..n-1; "conflict-fast" leaves them
    duplicated or gapped (it is a baseline, not meant to be mixed with "pie" on one cache).
    """

    def __init__(self, decoder: Decoder, capacity: int = 1024) -> None:
        cfg = decoder.config
        self.decoder = decoder
        self._head_dim, self._theta = cfg.head_dim, cfg.rope_theta
        self._length = 0
        capacity = max(capacity, 1)
        shape = (cfg.n_kv_heads, capacity, cfg.head_dim)
        self._keys = [np.empty(shape, np.float32) for _ in range(cfg.n_layers)]  # per layer [kv, capacity, hd]
        self._values = [np.empty(shape, np.float32) for _ in range(cfg.n_layers)]
        self._ids = np.empty(capacity, np.int64)  # [capacity]
        self._positions = np.empty(capacity, np.int64)  # [capacity]: the position each row's key encodes
        self._stale = np.empty(capacity, bool)  # [capacity]: K/V may differ from a full re-encode
        self.revision = 0  # counts changes to the rows; a lent decode cache's prompt rows are valid for one
        self._logits: dict[int, np.ndarray] = {}  # row -> next-token logits [vocab] after rows [0, row]
        self.prompt_rows: PromptRows | None = None
        self._idle = "fp32"  # how make_idle keeps the K/V: fp32 is awake
        self._packed: list[tuple[np.ndarray, np.ndarray]] = []  # "int8": per layer, keys then values, (symbols, scales)

    # -- read access -------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._length

    @property
    def capacity(self) -> int:
        return self._ids.shape[0]

    @property
    def ids(self) -> np.ndarray:
        """Token ids [n] (a copy)."""
        return self._ids[: self._length].copy()

    @property
    def positions(self) -> np.ndarray:
        """RoPE position each row's key currently encodes [n] (a copy)."""
        return self._positions[: self._length].copy()

    @property
    def stale(self) -> np.ndarray:
        """[n] True where a row's K/V were computed against a left context that has since changed (a copy)."""
        return self._stale[: self._length].copy()

    @property
    def nbytes(self) -> int:
        """Bytes held by the preallocated buffers (the whole capacity, not just the rows in use)."""
        arrays = [*self._keys, *self._values, *(a for pair in self._packed for a in pair), self._ids, self._positions,
                  self._stale]
        return sum(a.nbytes for a in arrays)

    def past(self, upto: int | None = None) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Views of the keys and values of rows [0, upto) per layer [kv, upto, hd]: the past for a forward
        (fp32: an idle cache's come back first)."""
        self._wake()
        upto = self._length if upto is None else upto
        return [k[:, :upto] for k in self._keys], [v[:, :upto] for v in self._values]

    def rows(self, start: int, stop: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Views of the keys and values of rows [start, stop) per layer [kv, stop - start, hd]."""
        self._wake()
        return [k[:, start:stop] for k in self._keys], [v[:, start:stop] for v in self._values]

    def copy_rows(self, start: int, stop: int) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
        """fp32 copies of the keys and values of rows [start, stop) per layer [kv, n, hd], and their positions [n],
        read without waking an idle cache (only these rows are converted back from its int8 or fp16)."""
        positions = self._positions[start:stop].copy()
        if self._idle == "int8":
            cfg = self.decoder.config
            shape = (cfg.n_kv_heads, cfg.head_dim)
            layers = [dequantize_rows(symbols[:, start:stop], scales[start:stop], INT8_LEVELS, shape)
                      for symbols, scales in self._packed]
            return layers[:cfg.n_layers], layers[cfg.n_layers:], positions
        return ([k[:, start:stop].astype(np.float32) for k in self._keys],
                [v[:, start:stop].astype(np.float32) for v in self._values], positions)

    def logits_at(self, row: int) -> tuple[np.ndarray, bool]:
        """Next-token logits [vocab] after rows [0, row], and whether they had to be computed.

        The forward that wrote a row (an edit's splice, an encode, a refresh) keeps its logits, so the
        completion right after a keystroke needs no forward of its own. Otherwise the row is refreshed in
        place: re-encoded against the rows before it, which also makes it exact when they are.
        """
        if row in self._logits:
            return self._logits[row], False
        self.refresh(row, row + 1)
        return self._logits[row], True

    def lend(self, visible: int, room: int, position: int, prompt: tuple | None = None,
             prompt_size: int = 0) -> tuple[DecodeCache, np.ndarray | None]:
        """A decode cache over these buffers: rows [0, visible) seen, the rest hidden, new rows written after
        the last row into spare capacity (at least `room` rows, grown here if needed, never by the decode).

        With `prompt`, the key of prompt rows kept by `keep_prompt` since the last change, the cache resumes
        after them and their logits come back; otherwise they are void (this decode writes over them) and
        `prompt_size` more rows are reserved for the caller to write them again.
        """
        self._wake()
        kept = self.prompt_rows
        if kept is None or prompt is None or kept.key != prompt or kept.revision != self.revision \
                or kept.length + room > self.capacity:
            kept = None
        self.prompt_rows = None
        self._reserve(self._length + room + (0 if kept else prompt_size))
        cache = DecodeCache(self._keys, self._values, self._length, position)
        cache.hide(visible, self._length)
        if kept is None:
            return cache, None
        self.prompt_rows = kept
        cache.length, cache.position = kept.length, kept.position
        return cache, kept.logits

    def keep_prompt(self, key: tuple, cache: DecodeCache, logits: np.ndarray) -> None:
        """Remember that `cache` (lent by `lend`) now ends with the prompt `key`, whose last logits are these."""
        self.prompt_rows = PromptRows(key, self.revision, cache.length, cache.position, logits)

    def _keep_logits(self, first: int, logits: np.ndarray) -> None:
        """Keep the logits [n, vocab] of rows first.. (just written); the lowest rows give way."""
        for j, row_logits in enumerate(logits):
            self._logits[first + j] = row_logits
        while len(self._logits) > KEPT_LOGITS:
            del self._logits[min(self._logits)]

    def _changed(self, first_row: int) -> None:
        """Rows from `first_row` on were rewritten or moved: logits after them and lent prompt rows are void."""
        self.revision += 1
        self.prompt_rows = None
        for row in [r for r in self._logits if r >= first_row]:
            del self._logits[row]

    @classmethod
    def from_rows(cls, decoder: Decoder, ids: np.ndarray, positions: np.ndarray, stale: np.ndarray,
                  keys: Sequence[np.ndarray], values: Sequence[np.ndarray]) -> BufferCache:
        """A cache holding exactly these rows (e.g. read back from disk), with no spare capacity.

        ids, positions, stale: [n]; keys, values: per layer [kv, n, hd], keys already rotated to `positions`.
        """
        cfg = decoder.config
        n = len(ids)
        shape = (cfg.n_kv_heads, n, cfg.head_dim)
        if len(keys) != cfg.n_layers or len(values) != cfg.n_layers or any(
                a.shape != shape for a in (*keys, *values)) or not len(positions) == len(stale) == n:
            raise ValueError(f"rows do not fit the model: expected {cfg.n_layers} layers of {shape}")
        cache = cls(decoder, capacity=n)
        cache._write(0, np.asarray(ids, np.int64), np.asarray(positions, np.int64), list(keys), list(values),
                     stale=False)
        cache._stale[:n] = stale
        cache._length = n
        return cache

    # -- updates -----------------------------------------------------------------------------------------

    def encode(self, ids: Sequence[int]) -> None:
        """Replace the cache by a fresh prefill of `ids` at positions 0..n-1, in chunks like generate.prefill."""
        ids = np.asarray(ids, dtype=np.int64)
        self._wake()
        self._changed(0)
        self._length = 0
        self._reserve(len(ids))
        for start in range(0, len(ids), PREFILL_CHUNK):
            chunk = ids[start:start + PREFILL_CHUNK]
            positions = np.arange(start, start + len(chunk))
            out = self._forward(chunk, positions, start)
            self._write(start, chunk, positions, out.keys, out.values, stale=False)
            self._length = start + len(chunk)
            self._keep_logits(self._length - 1, out.logits[-1:])

    def refresh(self, start: int, stop: int) -> int:
        """Re-encode rows [start, stop) in place against the rows before them, at their current positions.

        Exact (identical to a fresh encode) when no row before `start` is stale; their staleness is then
        cleared. Rows after `stop` stay stale: they were computed from the old rows. Returns rows encoded.
        """
        stop = min(stop, self._length)
        if not 0 <= start < stop:
            return 0
        self._wake()
        ids, positions = self._ids[start:stop].copy(), self._positions[start:stop].copy()
        out = self._forward(ids, positions, start)
        self._changed(start)
        self._write(start, ids, positions, out.keys, out.values, stale=bool(self._stale[:start].any()))
        self._keep_logits(stop - 1, out.logits[-1:])
        return stop - start

    def apply(self, splice: SpliceLike, mode: str = "pie") -> SpliceStats:
        return self.apply_splice(splice.start, splice.stop, splice.ids, mode)

    def apply_splice(self, start: int, stop: int, ids: Sequence[int], mode: str = "pie") -> SpliceStats:
        """Replace rows [start, stop) by the tokens `ids`; `mode` is "pie", "conflict-fast" or "full"."""
        if mode not in SPLICE_MODES:
            raise ValueError(f"unknown splice mode {mode!r} (expected one of {', '.join(SPLICE_MODES)})")
        n = self._length
        if not 0 <= start <= stop <= n:
            raise ValueError(f"splice [{start}, {stop}) is outside the {n} cached rows")
        t0 = time.perf_counter()
        self._wake()
        new = np.asarray(ids, dtype=np.int64)
        m = len(new)
        if mode == "full":
            self.encode(np.concatenate([self._ids[:start], new, self._ids[stop:n]]))
            total = time.perf_counter() - t0
            return SpliceStats(mode, stop - start, m, self._length, 0, total, 0.0, total)
        if m == 0 and start == stop:
            return SpliceStats(mode, 0, 0, 0, 0, 0.0, 0.0, 0.0)

        # The forward only reads the prefix [0, start), which nothing below moves: run it first so a
        # failure leaves the cache untouched.
        forward_s = 0.0
        if m:
            positions = np.arange(start, start + m)
            # logits for the last few new rows: typing re-tokenizes the word at the cursor, and its completion
            # needs the logits after the token before that word, often the splice's second-to-last row
            out = self._forward(new, positions, start, logits_for=min(m, KEPT_LOGITS))
            forward_s = time.perf_counter() - t0
        self._changed(start)

        delta = m - (stop - start)
        later, tail = start + m, n - stop  # later rows move from [stop, n) to [later, later + tail)
        self._reserve(n + delta)
        self._move_rows(stop, n, later)
        if m:
            self._write(start, new, positions, out.keys, out.values, stale=bool(self._stale[:start].any()))
            self._keep_logits(start + m - len(out.logits), out.logits)
        self._length = n + delta

        t1 = time.perf_counter()
        rotated = tail if mode == "pie" and delta else 0
        if rotated:
            for keys in self._keys:
                rerotate_keys(keys[:, later:later + tail], delta, self._head_dim, self._theta, in_place=True)
            self._positions[later:later + tail] += delta
        rotate_s = time.perf_counter() - t1
        self._stale[later:later + tail] = True
        return SpliceStats(mode, stop - start, m, m, rotated, forward_s, rotate_s, time.perf_counter() - t0)

    # -- buffer management -------------------------------------------------------------------------------

    def make_idle(self, rows: str) -> None:
        """Shrink the buffers to the rows in use and keep K/V as `rows` (one of IDLE_ROWS) until the next edit or
        decode, so an idle cache holds (and `nbytes` counts) only that. Then they come back as fp32 (wake), with the
        rounding of fp16 or int8: the rows are not re-encoded."""
        check_idle_rows(rows)
        n = max(self._length, 1)
        if n == self.capacity and self._idle == rows:
            return
        self._wake()
        self.prompt_rows = None  # they lived in the capacity being freed
        self._logits.clear()  # an idle cache: its next completion can afford one forward
        if rows == "int8":
            for layer in (*self._keys, *self._values):
                scales = token_scales(layer[:, :n])
                self._packed.append((quantize_rows(layer[:, :n], scales, INT8_LEVELS), scales))
            self._keys, self._values = [], []
        else:
            dtype = np.float16 if rows == "fp16" else np.float32
            self._keys = [k[:, :n].astype(dtype) for k in self._keys]
            self._values = [v[:, :n].astype(dtype) for v in self._values]
        self._idle = rows
        self._ids, self._positions, self._stale = (a[:n].copy() for a in (self._ids, self._positions, self._stale))

    def _wake(self) -> None:
        """K/V back in fp32 for a forward, an edit or a read, if make_idle kept them in another type."""
        if self._idle == "int8":
            cfg = self.decoder.config
            shape = (cfg.n_kv_heads, cfg.head_dim)
            layers = [dequantize_rows(symbols, scales, INT8_LEVELS, shape) for symbols, scales in self._packed]
            self._keys, self._values = layers[:cfg.n_layers], layers[cfg.n_layers:]
            self._packed = []
        elif self._idle == "fp16":
            self._keys = [k.astype(np.float32) for k in self._keys]
            self._values = [v.astype(np.float32) for v in self._values]
        self._idle = "fp32"

    def _reserve(self, rows: int) -> None:
        """Make room for `rows` rows, at least doubling, so growth costs amortized O(1) per row."""
        if rows <= self.capacity:
            return
        capacity, n = max(rows, 2 * self.capacity), self._length
        self.prompt_rows = None  # they are not copied
        self._keys = [grow_rows(k, capacity, n) for k in self._keys]
        self._values = [grow_rows(v, capacity, n) for v in self._values]
        self._ids, self._positions, self._stale = (grow_rows(a, capacity, n)
                                                   for a in (self._ids, self._positions, self._stale))

    def _move_rows(self, src: int, src_stop: int, dst: int) -> None:
        """Move rows [src, src_stop) to start at `dst` in every buffer (numpy copies overlapping slices safely)."""
        count = src_stop - src
        if count == 0 or src == dst:
            return
        for buf in (*self._keys, *self._values):
            buf[:, dst:dst + count] = buf[:, src:src_stop]
        for arr in (self._ids, self._positions, self._stale):
            arr[dst:dst + count] = arr[src:src_stop]

    def _forward(self, ids: np.ndarray, positions: np.ndarray, start: int, logits_for: int = 1) -> StepOutput:
        """Encode `ids` after rows [0, start) (read in place, not copied), with logits for the last few."""
        index = np.arange(len(ids) - logits_for, len(ids), dtype=np.int64)
        return self.decoder.forward(ids, positions, *self.past(start), logits_index=index)

    def _write(self, start: int, ids: np.ndarray, positions: np.ndarray, keys: list[np.ndarray],
               values: list[np.ndarray], *, stale: bool) -> None:
        stop = start + len(ids)
        for buf, rows in zip(self._keys, keys):
            buf[:, start:stop] = rows
        for buf, rows in zip(self._values, values):
            buf[:, start:stop] = rows
        self._ids[start:stop] = ids
        self._positions[start:stop] = positions
        self._stale[start:stop] = stale
