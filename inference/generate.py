"""Greedy decoding of one completion: prefill, then one token per step, healing and stopping as it goes."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from inference.healing import TokenHealer
from inference.prompt import Prompt
from inference.runtime import Decoder
from inference.tokenizer import CodeTokenizer

PREFILL_CHUNK = 512  # bounds the [chunk, past + chunk] mask and lets callers interleave other work


@dataclass
class KVRows:
    """The rows of one sequence: keys/values per layer [kv_heads, rows, head_dim]."""

    keys: list[np.ndarray]
    values: list[np.ndarray]

    @property
    def length(self) -> int:
        return self.keys[0].shape[1]

    def append(self, keys: list[np.ndarray], values: list[np.ndarray]) -> None:
        self.keys = [np.concatenate([a, b], axis=1) for a, b in zip(self.keys, keys)]
        self.values = [np.concatenate([a, b], axis=1) for a, b in zip(self.values, values)]


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
    prompt_tokens: int = 0


def prefill(decoder: Decoder, ids: list[int], rows: KVRows | None = None,
            position: int | None = None) -> tuple[KVRows, np.ndarray]:
    """Encode ids after `rows` in chunks, from `position` (default: right after the rows); returns the rows
    and the logits of the last id."""
    if not ids:
        raise ValueError("prefill needs at least one token: its logits are the next token's")
    rows = rows or KVRows(*decoder.empty_past())
    logits = np.empty(0, dtype=np.float32)
    for start in range(0, len(ids), PREFILL_CHUNK):
        chunk = np.asarray(ids[start:start + PREFILL_CHUNK], dtype=np.int64)
        first = rows.length if position is None else position + start
        pos = np.arange(first, first + len(chunk))
        out = decoder.forward(chunk, pos, rows.keys, rows.values)
        rows.append(out.keys, out.values)
        logits = out.logits[-1]
    return rows, logits


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max()
    return shifted - np.log(np.exp(shifted).sum())


def first_line(text: str) -> tuple[str, bool]:
    """Single-line policy: (the completion cut before its first line break after some code, whether it
    reached one). Leading blank lines are kept: at the end of a line the suggestion starts on the next."""
    code = len(text) - len(text.lstrip())
    cut = text.find("\n", code)
    return (text, False) if cut < 0 else (text[:cut].rstrip("\r"), True)


class StopRule(Protocol):
    """Decides, while decoding, whether a completion is done (inference/syntax.py has the tree-sitter one)."""

    def cut(self, text: str) -> int | None:
        """How many characters of `text` (the completion so far) to keep if it is complete, else None."""


class SingleLine:
    """Stop at the end of the first line of code (see first_line)."""

    def cut(self, text: str) -> int | None:
        kept, done = first_line(text)
        return len(kept) if done else None


SINGLE_LINE = SingleLine()


def greedy_complete(decoder: Decoder, tokenizer: CodeTokenizer, prompt: Prompt, *, max_tokens: int = 64,
                    stop: StopRule | None = SINGLE_LINE, healer: TokenHealer | None = None,
                    rows: KVRows | None = None, position: int | None = None,
                    cancelled: Callable[[], bool] | None = None) -> GenerationResult:
    """Greedy decoding after `prompt`; with `rows`, the prompt continues that cache (copied, not changed),
    from RoPE `position` (default: right after the rows; a cache with gapped positions passes its own).

    `cancelled` is asked before every step; once it says yes, decoding stops and the timings say so.
    """
    t0 = time.perf_counter()
    if rows is not None:
        rows = KVRows(list(rows.keys), list(rows.values))  # append() rebinds, so the caller's rows stay
    rows, logits = prefill(decoder, prompt.ids, rows, position)
    next_position = (rows.length if position is None else position + len(prompt.ids))
    t1 = time.perf_counter()
    token_bytes = tokenizer.token_bytes()
    eos = tokenizer.specials.stop
    pending = prompt.healed
    healer = healer or (TokenHealer(token_bytes, eos) if pending else None)
    out_ids: list[int] = []
    logprob = 0.0
    text_bytes = b""
    stopped_early = False
    while len(out_ids) < max_tokens:
        if cancelled is not None and cancelled():
            stopped_early = True
            break
        logp = _log_softmax(logits + healer.mask(pending) if pending else logits)
        token = int(np.argmax(logp))
        if token in eos:
            break
        if pending:
            pending = healer.consume(pending, token)
        else:
            logprob += float(logp[token])
        out_ids.append(token)
        text_bytes += token_bytes[token]
        if stop is not None and not pending:
            cut = stop.cut(text_bytes[len(prompt.healed):].decode("utf-8", "replace"))
            if cut is not None:
                break
        out = decoder.forward(np.array([token]), np.array([next_position]), rows.keys, rows.values)
        rows.append(out.keys, out.values)
        logits = out.logits[-1]
        next_position += 1
    t2 = time.perf_counter()
    text = text_bytes[len(prompt.healed):].decode("utf-8", "replace")
    cut = stop.cut(text) if stop is not None else None
    text = text if cut is None else text[:cut]
    timings = {"prefill_s": t1 - t0, "decode_s": t2 - t1, "generated_tokens": float(len(out_ids)),
               "cancelled": float(stopped_early)}
    return GenerationResult([Draft(text, out_ids, logprob)], timings, len(prompt.ids))
