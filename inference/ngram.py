"""Token n-gram counts (orders 2..4) for re-scoring superposed drafts (BRIEF §1.2 step 4).

A table is two pairs of sorted numpy arrays per order: `keys`/`counts` for (context, next token) and
`contexts`/`totals` for the context alone. A key holds the context's hash in its high bits and the next
token in its low bits, so every continuation of a context is one contiguous run and a lookup is one
`searchsorted`. Nothing is pickled: the base table is a plain .npz.

Counts come from two places:
- the base table, built once per tokenizer from Python standard library sources (real code that every
  machine has) and cached under `<model cache>/ngram/<tokenizer hash>.npz`;
- an overlay of documents (open buffers, workspace files), added and removed one document at a time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import sysconfig
import tempfile
import time
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from inference.tokenizer import CodeTokenizer

log = logging.getLogger(__name__)

ORDERS = (2, 3, 4)
# λ per order n = 2, 3, 4: SPD's n ≤ 4 setting (params/p15_d3_ngram4_mixed.json). Not normalised on purpose:
# the sum (0.2) only shifts log p_ng by a constant, and a missing context contributes nothing.
DEFAULT_WEIGHTS = (0.01, 0.04, 0.15)
FORMAT_VERSION = 1
BASE_BUDGET_BYTES = 4_000_000  # stdlib source read for the base table: ~1M Qwen tokens, built in ~10 s on 2 cores
MAX_FILE_BYTES = 64_000  # per file, so a few huge modules do not crowd out the rest
_SKIPPED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "__pycache__", "pydoc_data"})
_PROBE = "def probe(self, x: int) -> None:\n    return {'a': [x ** 2 for x in range(10)]}  # ok\n"

_MIX_A = np.uint64(0x9E3779B97F4A7C15)
_MIX_B = np.uint64(0xBF58476D1CE4E5B9)


def token_bits(vocab_size: int) -> int:
    """Low bits of a key that hold the next token."""
    return max(1, (vocab_size - 1).bit_length())


def context_keys(windows: np.ndarray, bits: int) -> np.ndarray:
    """[n, c] context token ids -> [n] uint64 context keys below 2**(64 - bits).

    One-token contexts are the token itself (exact); longer ones are hashed, and the 46 bits left for
    Qwen make a collision between two of a million contexts a ~1% event that merges two rare rows.
    """
    windows = np.asarray(windows, dtype=np.uint64)
    if windows.shape[1] == 1:
        return windows[:, 0].copy()
    h = np.full(windows.shape[0], windows.shape[1], dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(windows.shape[1]):
            h = (h ^ windows[:, j]) * _MIX_A
            h ^= h >> np.uint64(29)
        h *= _MIX_B
        h ^= h >> np.uint64(32)
    return h >> np.uint64(bits)


def _lookup(sorted_keys: np.ndarray, values: np.ndarray, query: np.ndarray) -> np.ndarray:
    """values at `query` keys, 0 where a key is absent."""
    if sorted_keys.size == 0:
        return np.zeros(query.shape, dtype=np.int64)
    idx = np.minimum(np.searchsorted(sorted_keys, query), sorted_keys.size - 1)
    return np.where(sorted_keys[idx] == query, values[idx].astype(np.int64), 0)


def _add_sorted(keys: np.ndarray, counts: np.ndarray, other_keys: np.ndarray,
                other_counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Merge two sorted unique key/count arrays, summing counts (negative counts subtract); zeros dropped."""
    idx = np.searchsorted(keys, other_keys)
    present = np.zeros(other_keys.shape, dtype=bool)
    inside = idx < keys.size
    present[inside] = keys[idx[inside]] == other_keys[inside]
    merged_counts = counts.astype(np.int64, copy=True)
    merged_counts[idx[present]] += other_counts[present]
    merged_keys = np.insert(keys, idx[~present], other_keys[~present])
    merged_counts = np.insert(merged_counts, idx[~present], other_counts[~present])
    keep = merged_counts != 0
    return merged_keys[keep], merged_counts[keep]


@dataclass
class CountTable:
    """Counts of one order. keys: [pairs] uint64 sorted, (context << bits) | next; contexts: [rows] sorted."""

    keys: np.ndarray
    counts: np.ndarray
    contexts: np.ndarray
    totals: np.ndarray

    @classmethod
    def empty(cls) -> CountTable:
        u, c = np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.int64)
        return cls(u, c, u.copy(), c.copy())

    @classmethod
    def from_sequences(cls, sequences: Iterable[np.ndarray], order: int, bits: int) -> CountTable:
        """Counts of every n-gram inside each sequence (none spans two sequences)."""
        c = order - 1
        parts = []
        for ids in sequences:
            ids = np.asarray(ids, dtype=np.uint64)
            if ids.size <= c:
                continue
            windows = np.lib.stride_tricks.sliding_window_view(ids, c + 1)  # [n, order]
            parts.append((context_keys(windows[:, :c], bits) << np.uint64(bits)) | windows[:, c])
        if not parts:
            return cls.empty()
        keys, counts = np.unique(np.concatenate(parts), return_counts=True)
        return cls._with_totals(keys, counts.astype(np.int64), bits)

    @classmethod
    def _with_totals(cls, keys: np.ndarray, counts: np.ndarray, bits: int) -> CountTable:
        ctx = keys >> np.uint64(bits)
        if ctx.size == 0:
            return cls(keys, counts, ctx, counts.copy())
        starts = np.flatnonzero(np.r_[True, ctx[1:] != ctx[:-1]])
        return cls(keys, counts, ctx[starts], np.add.reduceat(counts, starts))

    def plus(self, other: CountTable, sign: int = 1) -> CountTable:
        """This table with another's counts added (sign=+1) or taken away (sign=-1)."""
        keys, counts = _add_sorted(self.keys, self.counts, other.keys, sign * other.counts.astype(np.int64))
        contexts, totals = _add_sorted(self.contexts, self.totals, other.contexts,
                                       sign * other.totals.astype(np.int64))
        return CountTable(keys, counts, contexts, totals)

    def lookup(self, ctx: np.ndarray, tokens: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
        """(count of each (context, token) [k, n], total of each context [k]) for ctx [k], tokens [k, n]."""
        pairs = (ctx[:, None] << np.uint64(bits)) | np.asarray(tokens, dtype=np.uint64)
        return _lookup(self.keys, self.counts, pairs), _lookup(self.contexts, self.totals, ctx)


class NgramModel:
    """p_ng(v | context) = Σ_n λ_n c_n(ctx, v) / Σ_u c_n(ctx, u), skipping orders whose context is unseen.

    Counts are the base table's plus `overlay_weight` times the overlay's: local code is scarce but says
    more about the next token than the standard library does.
    """

    def __init__(self, vocab_size: int, base: dict[int, CountTable] | None = None, *,
                 weights: Sequence[float] = DEFAULT_WEIGHTS, overlay_weight: float = 1.0) -> None:
        if len(weights) != len(ORDERS):
            raise ValueError(f"one weight per order {ORDERS}, got {len(weights)}")
        self.vocab_size = vocab_size
        self.bits = token_bits(vocab_size)
        self.base = base or {n: CountTable.empty() for n in ORDERS}
        self.weights = tuple(weights)
        self.overlay_weight = overlay_weight
        self.overlay = {n: CountTable.empty() for n in ORDERS}
        self._documents: dict[str, dict[int, CountTable]] = {}

    @classmethod
    def from_sequences(cls, vocab_size: int, sequences: Sequence[Sequence[int]], **kwargs: object) -> NgramModel:
        """A model whose base table counts `sequences` (tests, or a corpus of your own)."""
        bits = token_bits(vocab_size)
        arrays = [np.asarray(s, dtype=np.int64) for s in sequences]
        return cls(vocab_size, {n: CountTable.from_sequences(arrays, n, bits) for n in ORDERS}, **kwargs)

    @classmethod
    def for_tokenizer(cls, tokenizer: CodeTokenizer, cache_dir: Path | None = None, *,
                      budget_bytes: int = BASE_BUDGET_BYTES, **kwargs: object) -> NgramModel:
        """The base table for this tokenizer: loaded from `cache_dir/ngram/`, else built from the stdlib and saved.

        cache_dir defaults to the model cache (inference.fetch.cache_root()).
        """
        if cache_dir is None:
            from inference.fetch import cache_root
            cache_dir = cache_root()
        identity = tokenizer_hash(tokenizer)
        path = Path(cache_dir) / "ngram" / f"{identity[:16]}.npz"
        base = load_base_table(path, identity, budget_bytes)
        if base is None:
            t0 = time.perf_counter()
            files = stdlib_sources(budget_bytes)
            sequences = [np.asarray(tokenizer.encode(text), dtype=np.int64) for text in _read_texts(files)]
            bits = token_bits(tokenizer.vocab_size)
            base = {n: CountTable.from_sequences(sequences, n, bits) for n in ORDERS}
            save_base_table(path, base, identity, budget_bytes,
                            source=f"python {sys.version.split()[0]} stdlib, {len(files)} files")
            log.info("built the n-gram base table from %d stdlib files in %.1f s", len(files),
                     time.perf_counter() - t0)
        return cls(tokenizer.vocab_size, base, **kwargs)

    # -- overlay -------------------------------------------------------------------------------------------

    def add_document(self, key: str, ids: Sequence[int]) -> None:
        """Count a document's n-grams in the overlay (replacing its previous counts, if any)."""
        self.remove_document(key)
        arrays = [np.asarray(ids, dtype=np.int64)]
        tables = {n: CountTable.from_sequences(arrays, n, self.bits) for n in ORDERS}
        self._documents[key] = tables
        self.overlay = {n: self.overlay[n].plus(tables[n]) for n in ORDERS}

    def remove_document(self, key: str) -> None:
        tables = self._documents.pop(key, None)
        if tables is not None:
            self.overlay = {n: self.overlay[n].plus(tables[n], -1) for n in ORDERS}

    @property
    def documents(self) -> list[str]:
        return list(self._documents)

    # -- probabilities ----------------------------------------------------------------------------------------

    def probs(self, context: Sequence[int], candidates: np.ndarray) -> np.ndarray:
        """p_ng of each candidate next token [n] after `context` (0 where no order has seen it)."""
        return self.probs_many([context], np.asarray(candidates)[None])[0]

    def probs_many(self, contexts: Sequence[Sequence[int]], candidates: np.ndarray) -> np.ndarray:
        """[k, n] p_ng for k contexts (one per draft), each with its own n candidate tokens."""
        candidates = np.asarray(candidates, dtype=np.int64)
        out = np.zeros(candidates.shape, dtype=np.float64)
        for order, weight in zip(ORDERS, self.weights):
            c = order - 1
            rows = [i for i, ctx in enumerate(contexts) if len(ctx) >= c]
            if not rows:
                continue
            windows = np.array([list(contexts[i][len(contexts[i]) - c:]) for i in rows], dtype=np.int64)
            ctx = context_keys(windows, self.bits)
            tokens = candidates[rows]
            counts, totals = self.base[order].lookup(ctx, tokens, self.bits)
            o_counts, o_totals = self.overlay[order].lookup(ctx, tokens, self.bits)
            counts = counts + self.overlay_weight * o_counts
            totals = totals + self.overlay_weight * o_totals
            seen = totals > 0
            safe = np.where(seen, totals, 1.0)[:, None]
            out[rows] += np.where(seen[:, None], weight * counts / safe, 0.0)
        return out


# -- the base table on disk -----------------------------------------------------------------------------------


def tokenizer_hash(tokenizer: CodeTokenizer) -> str:
    """SHA-256 of the vocabulary's bytes and of a probe's ids (which also catch a change of merges or splits)."""
    h = hashlib.sha256()
    for b in tokenizer.token_bytes():
        h.update(len(b).to_bytes(4, "little"))
        h.update(b)
    h.update(np.asarray(tokenizer.encode(_PROBE), dtype=np.int64).tobytes())
    return h.hexdigest()


def stdlib_sources(budget_bytes: int = BASE_BUDGET_BYTES, root: Path | None = None) -> list[Path]:
    """Python files of the standard library (tests and generated data left out), in a stable spread-out
    order (by a hash of the relative path, so the budget samples every package), up to `budget_bytes`."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if not _SKIPPED_DIRS.intersection(p.relative_to(root).parts[:-1])]
    files.sort(key=lambda p: zlib.crc32(p.relative_to(root).as_posix().encode()))
    chosen, used = [], 0
    for path in files:
        if used >= budget_bytes:
            break
        size = min(path.stat().st_size, MAX_FILE_BYTES)
        chosen.append(path)
        used += size
    return chosen


def _read_texts(files: Sequence[Path]) -> list[str]:
    texts = []
    for path in files:
        try:
            texts.append(path.read_bytes()[:MAX_FILE_BYTES].decode("utf-8", "ignore"))
        except OSError:
            continue
    return texts


def _metadata(identity: str, budget_bytes: int) -> dict[str, object]:
    return {"format": FORMAT_VERSION, "tokenizer": identity, "budget_bytes": budget_bytes,
            "max_file_bytes": MAX_FILE_BYTES}


def save_base_table(path: Path, tables: dict[int, CountTable], identity: str, budget_bytes: int, *,
                    source: str = "") -> None:
    """Write atomically; counts are stored as uint32 (uint16 where they fit)."""
    arrays: dict[str, np.ndarray] = {}
    for n, t in tables.items():
        arrays[f"keys{n}"] = t.keys
        arrays[f"counts{n}"] = _compact(t.counts)
        arrays[f"contexts{n}"] = t.contexts
        arrays[f"totals{n}"] = _compact(t.totals)
    meta = dict(_metadata(identity, budget_bytes), source=source)
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".ngram-", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _compact(counts: np.ndarray) -> np.ndarray:
    top = int(counts.max()) if counts.size else 0
    return counts.astype(np.uint16 if top < 2**16 else np.uint32)


def load_base_table(path: Path, identity: str, budget_bytes: int) -> dict[int, CountTable] | None:
    """The cached tables, or None when absent, unreadable, or built for another tokenizer or settings."""
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(data["meta"].tobytes().decode())
            if {k: meta.get(k) for k in ("format", "tokenizer", "budget_bytes", "max_file_bytes")} != \
                    _metadata(identity, budget_bytes):
                return None
            return {n: CountTable(data[f"keys{n}"], data[f"counts{n}"], data[f"contexts{n}"], data[f"totals{n}"])
                    for n in ORDERS}
    except (OSError, KeyError, ValueError):
        return None
