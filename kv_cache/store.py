"""The open documents' KV caches under one memory budget: least recently used ones go to disk, and come back.

Only the cache in use (the most recently touched) keeps spare capacity for edits; idle caches are trimmed
to their rows, their K/V in fewer bytes, before anything is evicted, so the budget counts memory actually held.
On disk, the saved files are kept under their own cap, least recently written or restored deleted first
(kv_cache/persist.py).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from inference.runtime import Decoder
from kv_cache import persist
from kv_cache.buffer_cache import BufferCache, check_idle_rows
from kv_cache.choices import PERSIST_MAX_MB

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoreStats:
    bytes_used: int  # sum of the open caches' nbytes, and of rows copied out of them (held_elsewhere)
    buffers: int
    tokens: int  # rows in the open caches
    bytes_per_token: float
    evictions: int
    restores: int
    oversized: bool  # the cache in use alone exceeds the budget


class BufferStore:
    """BufferCaches by document URI, most recently used last."""

    def __init__(self, budget_mb: float, persist_dir: Path | None, model_id: str, *,
                 decoder: Decoder | None = None, persist_max_mb: float = PERSIST_MAX_MB,
                 idle_rows: str = "int8") -> None:
        """`decoder` runs restored caches; without one, the decoder of the first cache put is used.
        `persist_max_mb` caps the saved files in `persist_dir` (all models' files there count). `idle_rows`
        (of choices.IDLE_ROWS) is how the caches not in use keep their K/V (see BufferCache.make_idle)."""
        self.idle_rows = check_idle_rows(idle_rows)
        self.decoder = decoder
        self.budget_bytes = int(budget_mb * 2**20)
        self.persist_dir = Path(persist_dir) if persist_dir is not None else None
        self.persist_max_bytes = int(persist_max_mb * 2**20)
        self.model_id = model_id
        self._caches: OrderedDict[str, BufferCache] = OrderedDict()
        self._evictions = self._restores = 0
        self._oversized = False
        self.held_elsewhere = 0  # bytes of rows copied out of the caches and held by their user (cross-file context)

    def __contains__(self, uri: str) -> bool:
        return uri in self._caches

    def lru_order(self) -> list[str]:
        """URIs from least to most recently used."""
        return list(self._caches)

    @property
    def bytes_used(self) -> int:
        return sum(c.nbytes for c in self._caches.values()) + self.held_elsewhere

    def get(self, uri: str) -> BufferCache | None:
        """The open cache for `uri`, marked as in use; None if it is not in memory."""
        cache = self._caches.get(uri)
        if cache is not None and next(reversed(self._caches)) != uri:
            self.touch(uri)
            self.evict_to_budget()  # the cache that was in use is idle now
        return cache

    def peek(self, uri: str) -> BufferCache | None:
        """The open cache for `uri` without marking it as in use (for statistics and idle work)."""
        return self._caches.get(uri)

    def put(self, uri: str, cache: BufferCache) -> None:
        """Hold `cache` for `uri` as the one in use, then evict others to fit the budget."""
        self.decoder = self.decoder or cache.decoder
        self._caches[uri] = cache
        self.touch(uri)
        self.evict_to_budget()

    def touch(self, uri: str) -> None:
        self._caches.move_to_end(uri)

    def close(self, uri: str) -> None:
        """The document was closed: persist its cache (if enabled) and free it."""
        cache = self._caches.pop(uri, None)
        if cache is not None:
            self._persist(cache)

    def drop(self, uri: str) -> None:
        """Free the rows of `uri` without saving them (they are about to be rebuilt for other text)."""
        self._caches.pop(uri, None)

    def evict_to_budget(self) -> list[str]:
        """Trim idle caches, then persist and drop least recently used ones until within the budget.

        The cache in use is never evicted; if it alone exceeds the budget it stays and is flagged.
        Returns the evicted URIs.
        """
        for cache in list(self._caches.values())[:-1]:
            cache.make_idle(self.idle_rows)
        evicted = []
        while self.bytes_used > self.budget_bytes and len(self._caches) > 1:
            uri, cache = self._caches.popitem(last=False)
            self._persist(cache)
            self._evictions += 1
            evicted.append(uri)
        self._oversized = self.bytes_used > self.budget_bytes
        if self._oversized:
            log.warning("KV cache in use (%d bytes) exceeds the %d-byte budget", self.bytes_used,
                        self.budget_bytes)
        return evicted

    def restore(self, uri: str, ids: Sequence[int], *, newest: int = 4, hold: bool = True) -> BufferCache | None:
        """Reopen `uri` from disk with the rows of the longest prefix of `ids` that a persisted cache holds (at
        least persist.KEY_ROWS of them, or all of a shorter `ids`); then it is in use (with `hold`; without, the
        rows are only read, for a copy of some of them). Rows depend only on the tokens before them, so a file
        saved for this text before a change further down restores up to the change. Of the files that start like
        `ids`, the `newest` are looked at."""
        if self.persist_dir is None or self.decoder is None or not len(ids):
            return None
        ids = np.asarray(ids, np.int64)
        best, best_rows = None, 0
        for path in persist.candidates(self.persist_dir, self.model_id, ids)[:newest]:
            stored = persist.read(path, self.decoder, self.model_id)
            rows = 0 if stored is None else _common_prefix(stored.ids, ids)
            if rows > best_rows:
                best, best_rows = stored, rows
        if best is None or best_rows < min(persist.KEY_ROWS, len(ids)):
            return None
        cache = best.cache(best_rows)
        if cache is None:
            return None
        persist.touch(best.path)
        self._restores += 1
        if hold:
            self.put(uri, cache)
        return cache

    def stats(self) -> StoreStats:
        used, tokens = self.bytes_used, sum(len(c) for c in self._caches.values())
        return StoreStats(used, len(self._caches), tokens, used / tokens if tokens else 0.0, self._evictions,
                          self._restores, self._oversized)

    def prune_disk(self) -> None:
        """Delete the least recently used saved files until they fit `persist_max_bytes`."""
        if self.persist_dir is not None:
            persist.prune(self.persist_dir, self.persist_max_bytes)

    def _persist(self, cache: BufferCache) -> None:
        """Save the rows, then keep the directory within its cap. A disk that fails (full, read-only) costs the
        saved rows only: evicting and closing go on."""
        if self.persist_dir is None or not len(cache):
            return
        try:
            persist.save(cache, self.persist_dir, self.model_id)
            self.prune_disk()
        except OSError as err:
            log.warning("cannot save KV cache rows under %s: %s", self.persist_dir, err)


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n
