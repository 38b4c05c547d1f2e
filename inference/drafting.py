"""Drafts for speculative decoding without a second model: prompt lookup and token recycling.

Both guess the next tokens cheaply; the target model checks every guess (inference/speculative.py), so a
bad guess costs verification time, never correctness.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

RECYCLER_TOP_K = 8
LOOKUP_MAX_NGRAM = 16  # longer matches predict better: 95% of next tokens right at 16 (measured on stdlib code)


@dataclass(frozen=True)
class Continuation:
    """Tokens that followed an earlier occurrence of the sequence's last `matched` tokens."""

    tokens: list[int]
    matched: int  # n-gram length that matched: longer matches are more trustworthy


def _matches_by_length(seq: np.ndarray, suffix: np.ndarray, stop: int) -> list[np.ndarray]:
    """For n = 1, 2, ...: where suffix[-n:] occurs in seq, as the indices of its last tokens.

    Entry n-1 holds the indices e (ascending) with seq[e-n+1 : e+1] == suffix[-n:] and e < stop, so the
    continuation starts at e + 1. Each longer match filters the shorter one's hits: one scan in all.
    """
    ends = np.flatnonzero(seq[:stop] == suffix[-1])
    found = []
    for n in range(1, len(suffix) + 1):
        if n > 1:
            ends = ends[ends >= n - 1]
            ends = ends[seq[ends - (n - 1)] == suffix[-n]]
        if len(ends) == 0:
            break
        found.append(ends)
    return found


def lookup_continuations(context: np.ndarray, corpus: Sequence[np.ndarray], *, length: int, count: int = 2,
                         max_ngram: int = LOOKUP_MAX_NGRAM) -> list[Continuation]:
    """Prompt lookup: continuations of the context's last n tokens found earlier in the context or in the
    corpus (other buffers), longest n first, then the most recent occurrence first (code repeats what it
    just wrote). At most `count` continuations, each with a different first token.
    """
    suffix = context[-max_ngram:]
    # the context itself: any earlier occurrence whose continuation lies inside the context
    sources = [(context, _matches_by_length(context, suffix, len(context) - 1))]
    sources += [(seq, _matches_by_length(seq, suffix, len(seq) - 1)) for seq in corpus]
    longest = max((len(found) for _, found in sources), default=0)
    result: list[Continuation] = []
    firsts: set[int] = set()
    for n in range(longest, 0, -1):
        for seq, found in sources:
            if len(found) < n:
                continue
            for end in found[n - 1][::-1]:
                first = int(seq[end + 1])
                if first in firsts:
                    continue
                firsts.add(first)
                result.append(Continuation([int(t) for t in seq[end + 1:end + 1 + length]], n))
                if len(result) >= count:
                    return result
    return result


def top_tokens(logits: np.ndarray, k: int) -> np.ndarray:
    """[n, k] ids of the k largest logits per row [n, vocab], best first.

    Only the few logits near each row's maximum are sorted: a full partition of a 151,936-wide row costs
    milliseconds, which a verification step pays for every tree node.
    """
    best = logits.max(axis=1, keepdims=True)  # [n, 1]
    margin = 4.0
    near = logits >= best - margin
    while (np.count_nonzero(near, axis=1) < k).any() and np.isfinite(margin):
        margin = margin * 4 if margin < 1e6 else np.inf
        near = logits >= best - margin
    top = np.empty((logits.shape[0], k), dtype=np.int32)
    for row in range(logits.shape[0]):
        ids = np.flatnonzero(near[row])
        if len(ids) > 4 * k:  # a flat row: thousands can be near its maximum, and sorting them all costs ms
            ids = np.sort(ids[np.argpartition(-logits[row, ids], k - 1)[:k]])
        top[row] = ids[np.argsort(-logits[row, ids], kind="stable")[:k]]
    return top


class Recycler:
    """Token recycling: for every token, the top-k successors the model predicted the last time that token
    was verified (the adjacency matrix of the Token Recycling paper). It is never reset: a warm matrix from
    earlier completions, or an earlier run, drafts well from the first step.
    """

    def __init__(self, vocab_size: int, top_k: int = RECYCLER_TOP_K) -> None:
        # successors: [vocab, top_k] int32, best first; -1 where the model has not been seen after a token
        self.successors = np.full((vocab_size, top_k), -1, dtype=np.int32)

    @property
    def top_k(self) -> int:
        return self.successors.shape[1]

    @property
    def vocab_size(self) -> int:
        return self.successors.shape[0]

    def update(self, tokens: np.ndarray, logits: np.ndarray) -> None:
        """Record the top-k of each verified node's logits [n, vocab] as the successors of its token [n]
        (accepted or not: a rejected node's prediction is still the model's view after that token)."""
        self.successors[np.asarray(tokens)] = top_tokens(logits, self.top_k)

    def save(self, path: Path) -> None:
        """Write as .npy, atomically, so a crash never leaves a half-written matrix for the next start."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            np.save(f, self.successors)
        os.chmod(tmp, 0o600)  # it is learnt from the user's code, like the saved KV caches beside it
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path, vocab_size: int | None = None) -> Recycler:
        """Read a matrix written by save(); one of another vocabulary is refused rather than drafting junk."""
        successors = np.load(Path(path), allow_pickle=False)
        if successors.ndim != 2 or successors.dtype != np.int32:
            raise ValueError(f"{path}: not a recycler matrix ({successors.dtype}, shape {successors.shape})")
        if vocab_size is not None and successors.shape[0] != vocab_size:
            raise ValueError(f"{path}: matrix is for a vocabulary of {successors.shape[0]}, not {vocab_size}")
        recycler = cls(successors.shape[0], successors.shape[1])
        recycler.successors = successors
        return recycler
