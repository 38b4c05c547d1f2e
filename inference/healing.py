"""Token healing: back the prompt up by its last token and let the model re-choose it.

A prompt that ends inside what the model would write as one token (typically indentation: Qwen
writes "    return" as "   " + " return") otherwise makes it add one space too many.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np


class TokenHealer:
    """Index over the vocabulary's byte strings for 'which tokens agree with these pending bytes'."""

    def __init__(self, token_bytes: Sequence[bytes], special_ids: frozenset[int]) -> None:
        usable = [(b, i) for i, b in enumerate(token_bytes) if b and i not in special_ids]
        usable.sort()
        self._sorted = [b for b, _ in usable]
        self._ids = np.array([i for _, i in usable], dtype=np.int64)
        # leading ASCII whitespace of each sorted token (bytes.lstrip strips what bytes.isspace accepts)
        self._space_run = np.array([len(b) - len(b.lstrip()) for b in self._sorted], dtype=np.int64)
        self._by_bytes = {b: i for b, i in usable}
        self._bytes = token_bytes
        self.vocab_size = len(token_bytes)

    def allowed(self, pending: bytes) -> np.ndarray:
        """Ids whose bytes start with `pending` or are a proper prefix of it.

        Whitespace the user typed is a decision (indentation): a token may not extend it with more
        whitespace, or the model re-indents the line to its own liking (measured on real edits).
        """
        lo = bisect.bisect_left(self._sorted, pending)
        hi = bisect.bisect_left(self._sorted, pending + b"\xff" * 8)
        longer = self._ids[lo:hi]
        if pending.isspace():  # those in [lo, hi) start with it: keep the ones whose whitespace ends there
            longer = longer[self._space_run[lo:hi] == len(pending)]
        shorter = [self._by_bytes[pending[:n]] for n in range(1, len(pending)) if pending[:n] in self._by_bytes]
        return np.concatenate([longer, np.array(shorter, dtype=np.int64)])

    def mask(self, pending: bytes) -> np.ndarray:
        """Additive logit mask [vocab]: 0 where allowed, -inf elsewhere."""
        mask = np.full(self.vocab_size, -np.inf, dtype=np.float32)
        mask[self.allowed(pending)] = 0.0
        return mask

    def consume(self, pending: bytes, token: int) -> bytes:
        """Pending bytes left after emitting `token` (empty once healed)."""
        emitted = self._bytes[token]
        return pending[len(emitted):] if pending.startswith(emitted) else b""
