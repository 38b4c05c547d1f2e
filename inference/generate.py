"""Decode state and the steps every decoder shares: `prefill`, `decode_one_token`, and greedy decoding.

A decode attends to rows in a `DecodeCache`: preallocated per-layer buffers that it writes in place. The
buffers are usually a document's (kv_cache.BufferCache lends them): the document's rows come first, those
the prompt does not include are hidden by the attention bias, and the decode writes its own rows into the
spare capacity after them. Nothing is copied per token and the document's rows are never changed.
"""

from __future__ import annotations

import codecs
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from inference.config import ModelConfig
from inference.healing import TokenHealer
from inference.runtime import NEG_INF, Decoder, StepOutput, causal_bias
from inference.tokenizer import CodeTokenizer

PREFILL_CHUNK = 512  # bounds the [chunk, past + chunk] mask and lets callers interleave other work


def never(text: str = "") -> bool:
    """The `cancelled` of a decode nothing can cancel."""
    return False


def grow_rows(old: np.ndarray, capacity: int, used: int) -> np.ndarray:
    """A copy of `old` with `capacity` rows along its row axis (axis 1 of [kv, rows, hd], else axis 0); rows
    past `used` are left unset."""
    axis = 1 if old.ndim == 3 else 0
    shape = list(old.shape)
    shape[axis] = capacity
    new = np.empty(shape, old.dtype)
    if axis:
        new[:, :used] = old[:, :used]
    else:
        new[:used] = old[:used]
    return new


class DecodeCache:
    """Rows [0, length) of per-layer key/value buffers [kv_heads, capacity, head_dim], some hidden.

    `position` is the RoPE position of the next row. Rows are written at `length` in place; a write past
    the capacity moves the rows to larger buffers of the cache's own (the lender's are never resized).
    """

    def __init__(self, keys: list[np.ndarray], values: list[np.ndarray], length: int, position: int) -> None:
        self.keys, self.values = keys, values  # per layer [kv, capacity, hd]
        self.length = length
        self.position = position
        self._bias = np.zeros(self.capacity, np.float32)  # [capacity]: 0 where a row is visible, else NEG_INF
        self._hidden = False

    @classmethod
    def empty(cls, config: ModelConfig, capacity: int) -> DecodeCache:
        shape = (config.n_kv_heads, max(capacity, 1), config.head_dim)
        keys = [np.empty(shape, np.float32) for _ in range(config.n_layers)]
        values = [np.empty(shape, np.float32) for _ in range(config.n_layers)]
        return cls(keys, values, 0, 0)

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[1]

    def hide(self, start: int, stop: int) -> None:
        """Rows [start, stop) stay in the buffers but no new row attends to them."""
        if stop > start:
            self._bias[start:stop] = NEG_INF
            self._hidden = True

    def past(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Views of rows [0, length) per layer [kv, length, hd] (each head's rows are contiguous)."""
        n = self.length
        return [k[:, :n] for k in self.keys], [v[:, :n] for v in self.values]

    def forward(self, decoder: Decoder, ids: np.ndarray, positions: np.ndarray, *,
                new_bias: np.ndarray | None = None, row_bias: np.ndarray | None = None,
                mix_weights: np.ndarray | None = None, logits_index: np.ndarray | None = None) -> StepOutput:
        """One forward of `ids` [S] (or [S, mix]) after the visible rows; nothing is written.

        new_bias [S, S]: how the new tokens see each other (causal by default); row_bias [S, length]: an extra
        mask over the cached rows for each new token (beams that must not see each other's rows).
        """
        seq = len(ids)
        bias = None
        if self._hidden or new_bias is not None or row_bias is not None:
            bias = np.empty((seq, self.length + seq), np.float32)
            bias[:, :self.length] = self._bias[:self.length]
            if row_bias is not None:
                bias[:, :self.length] += row_bias
            bias[:, self.length:] = causal_bias(0, seq) if new_bias is None else new_bias
        return decoder.forward(ids, positions, *self.past(), mix_weights=mix_weights, bias=bias,
                               logits_index=logits_index)

    def write(self, keys: list[np.ndarray], values: list[np.ndarray], rows: np.ndarray | None = None) -> None:
        """Append new rows (per layer [kv, S, hd]; only `rows` of them if given) at `length`, in place."""
        count = keys[0].shape[1] if rows is None else len(rows)
        self._reserve(self.length + count)
        start, stop = self.length, self.length + count
        for buf, new in zip(self.keys, keys):
            buf[:, start:stop] = new if rows is None else new[:, rows]
        for buf, new in zip(self.values, values):
            buf[:, start:stop] = new if rows is None else new[:, rows]
        self._bias[start:stop] = 0.0
        self.length = stop

    def _reserve(self, rows: int) -> None:
        if rows <= self.capacity:
            return
        capacity, n = max(rows, 2 * self.capacity), self.length
        self.keys = [grow_rows(k, capacity, n) for k in self.keys]
        self.values = [grow_rows(v, capacity, n) for v in self.values]
        self._bias = grow_rows(self._bias, capacity, n)  # a row's bias is set when it is written


def prefill(decoder: Decoder, cache: DecodeCache, ids: list[int]) -> np.ndarray:
    """Encode `ids` after the cache's rows in chunks, writing their rows; returns the last id's logits."""
    if not ids:
        raise ValueError("prefill needs at least one token: its logits are the next token's")
    logits = np.empty(0, dtype=np.float32)
    for start in range(0, len(ids), PREFILL_CHUNK):
        chunk = np.asarray(ids[start:start + PREFILL_CHUNK], dtype=np.int64)
        positions = np.arange(cache.position, cache.position + len(chunk))
        out = cache.forward(decoder, chunk, positions)
        cache.write(out.keys, out.values)
        cache.position += len(chunk)
        logits = out.logits[-1]
    return logits


def decode_one_token(decoder: Decoder, cache: DecodeCache, token: int) -> np.ndarray:
    """Feed one token at the next position, write its row; returns the next token's logits [vocab]."""
    out = cache.forward(decoder, np.array([token]), np.array([cache.position]))
    cache.write(out.keys, out.values)
    cache.position += 1
    return out.logits[-1]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max()
    return shifted - np.log(np.exp(shifted).sum())


def completion_text(data: bytes) -> str:
    """Generated bytes as text: a character still incomplete at the end is left out (the next token may
    finish it; at the end of decoding it is dropped rather than shown as U+FFFD)."""
    return codecs.getincrementaldecoder("utf-8")("replace").decode(data, final=False)


def first_line(text: str) -> tuple[str, bool]:
    """Single-line policy: (the completion cut before its first line break after some code, whether it
    reached one). Leading blank lines are kept: at the end of a line the suggestion starts on the next."""
    code = len(text) - len(text.lstrip())
    cut = text.find("\n", code)
    return (text, False) if cut < 0 else (text[:cut].rstrip("\r"), True)


class StopRule(Protocol):
    """Decides, while decoding, whether a completion is done (inference/syntax/stop.py has the tree-sitter one)."""

    def cut(self, text: str) -> int | None:
        """How many characters of `text` (the completion so far) to keep if it is complete, else None."""


class SingleLine:
    """Stop at the end of the first line of code (see first_line)."""

    def cut(self, text: str) -> int | None:
        kept, done = first_line(text)
        return len(kept) if done else None


SINGLE_LINE = SingleLine()


def cut_at_stop(text: str, stop: StopRule | None) -> str:
    cut = stop.cut(text) if stop is not None else None
    return text if cut is None else text[:cut]


@dataclass
class Draft:
    text: str
    token_ids: list[int]
    logprob: float  # sum over generated tokens

    @property
    def score(self) -> float:
        """Mean log-probability per token: comparable across drafts of different lengths."""
        return self.logprob / max(len(self.token_ids), 1)


@dataclass
class GenerationResult:
    drafts: list[Draft]
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class DecodeRequest:
    """What to decode after a prompt: how much, when to stop, which typed bytes to heal, when to give up."""

    max_tokens: int = 64
    stop: StopRule | None = SINGLE_LINE
    healed: bytes = b""  # the text between the prompt's last whole token and the cursor: output starts with it
    # asked before every forward with the text decoded so far ("" from decoders of several drafts); once true,
    # decoding returns what it has. The text lets a caller give up on a decode the user has typed past.
    cancelled: Callable[[str], bool] = never


@dataclass(frozen=True)
class Vocabulary:
    """The token facts every decoder needs: each id's bytes, the ids that end a completion, and healing."""

    token_bytes: list[bytes]
    eos: frozenset[int]
    healer: TokenHealer


_VOCABULARIES: weakref.WeakKeyDictionary[CodeTokenizer, Vocabulary] = weakref.WeakKeyDictionary()


def vocabulary(tokenizer: CodeTokenizer) -> Vocabulary:
    """The tokenizer's Vocabulary, built once (the healer's index sorts the whole vocabulary)."""
    vocab = _VOCABULARIES.get(tokenizer)
    if vocab is None:
        token_bytes, eos = tokenizer.token_bytes(), tokenizer.specials.stop
        vocab = _VOCABULARIES[tokenizer] = Vocabulary(token_bytes, eos, TokenHealer(token_bytes, eos))
    return vocab


@dataclass(frozen=True)
class Hesitation:
    """The runners-up at one step of a draft, and the draft's state before that step (where a fork starts)."""

    step: int  # tokens emitted before it
    emitted: int  # bytes emitted before it (healed bytes included)
    pending: bytes
    logprob: float
    tokens: tuple[int, ...]  # the next likeliest tokens after the one taken, best first
    logps: tuple[float, ...]


class Transcript:
    """One draft's emitted tokens under the rules greedy and speculative decoding share: healing, end of
    text, the stop rule and the token budget. With `runners_up` > 0 it also notes, at every step, that many
    tokens the model ranked next after the one taken (forked decoding branches there)."""

    def __init__(self, vocab: Vocabulary, request: DecodeRequest, runners_up: int = 0) -> None:
        self.vocab, self.request = vocab, request
        self.pending = request.healed
        self.ids: list[int] = []
        self.logprob = 0.0
        self.text_bytes = b""
        self.runners_up = runners_up
        self.hesitations: list[Hesitation] = []

    @property
    def full(self) -> bool:
        return len(self.ids) >= self.request.max_tokens

    def next_logp(self, logits: np.ndarray) -> np.ndarray:
        """Log-probabilities of the next token, restricted to the pending bytes while healing."""
        return log_softmax(logits + self.vocab.healer.mask(self.pending) if self.pending else logits)

    def take(self, token: int, logp: np.ndarray) -> bool:
        """Emit the greedy token; True when the completion is finished (end of text or the stop rule)."""
        if self.runners_up:
            top = np.argpartition(-logp, self.runners_up)[:self.runners_up + 1]
            top = [int(t) for t in top[np.argsort(-logp[top], kind="stable")]
                   if t != token and np.isfinite(logp[t])][:self.runners_up]  # healing masks some out
            self.hesitations.append(Hesitation(len(self.ids), len(self.text_bytes), self.pending, self.logprob,
                                               tuple(top), tuple(float(logp[t]) for t in top)))
        return self._emit(token, float(logp[token]))

    def forked(self, at: Hesitation, token: int, token_logp: float) -> tuple[Transcript, bool]:
        """A new transcript equal to this one before `at`, then `token` instead of the one taken there; and
        whether that token finishes it."""
        fork = Transcript(self.vocab, self.request)
        fork.ids = self.ids[:at.step]
        fork.text_bytes = self.text_bytes[:at.emitted]
        fork.pending, fork.logprob = at.pending, at.logprob
        return fork, fork._emit(token, token_logp)

    def _emit(self, token: int, token_logp: float) -> bool:
        if token in self.vocab.eos:
            return True
        if self.pending:
            self.pending = self.vocab.healer.consume(self.pending, token)
        else:
            self.logprob += token_logp
        self.ids.append(token)
        self.text_bytes += self.vocab.token_bytes[token]
        stop = self.request.stop
        return stop is not None and not self.pending and stop.cut(self.text) is not None

    @property
    def text(self) -> str:
        return completion_text(self.text_bytes[len(self.request.healed):])

    def draft(self) -> Draft:
        return Draft(cut_at_stop(self.text, self.request.stop), self.ids, self.logprob)


def greedy_decode(decoder: Decoder, vocab: Vocabulary, cache: DecodeCache, logits: np.ndarray,
                  request: DecodeRequest) -> GenerationResult:
    """The most likely token at every step, starting from the prompt's `logits`, one forward per token."""
    t0 = time.perf_counter()
    out = Transcript(vocab, request)
    stopped, _ = decode_transcript(decoder, cache, out, out.next_logp(logits), lambda logp: int(np.argmax(logp)))
    timings = {"decode_s": time.perf_counter() - t0, "generated_tokens": float(len(out.ids)),
               "cancelled": float(stopped)}
    return GenerationResult([out.draft()], timings)


def decode_transcript(decoder: Decoder, cache: DecodeCache, out: Transcript, logp: np.ndarray,
                      choose: Callable[[np.ndarray], int]) -> tuple[bool, int]:
    """One draft, a token `choose`n from each step's log-probabilities, until it stops, fills up or is cancelled.
    Returns (cancelled, forward steps)."""
    steps = 0
    while True:
        token = choose(logp)
        if out.take(token, logp) or out.full:
            return False, steps
        if out.request.cancelled(out.text):
            return True, steps
        logp = out.next_logp(decode_one_token(decoder, cache, token))
        steps += 1
