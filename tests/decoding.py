"""Prompts and decodes for tests that exercise the decoders without a document."""

from __future__ import annotations

import numpy as np

from inference.generate import (
    SINGLE_LINE,
    DecodeCache,
    DecodeRequest,
    GenerationResult,
    StopRule,
    greedy_decode,
    prefill,
    vocabulary,
)
from inference.model_store import LoadedModel
from inference.prompt import Prompt, healed_prompt
from inference.tokenizer import CodeTokenizer


def fim(tokenizer: CodeTokenizer, prefix: str, suffix: str, *, heal: bool = True) -> Prompt:
    """<|fim_prefix|>prefix<|fim_suffix|>suffix<|fim_middle|> with the prefix's last token healed (the bare
    prefix for a model without FIM tokens)."""
    ids = tokenizer.encode(prefix)
    head = healed_prompt(tokenizer, ids) if heal else Prompt(ids, b"")
    sp = tokenizer.specials
    if sp.fim_prefix is None or sp.fim_suffix is None or sp.fim_middle is None:
        return head
    return Prompt([sp.fim_prefix, *head.ids, sp.fim_suffix, *tokenizer.encode(suffix), sp.fim_middle], head.healed)


def before_cursor(tokenizer: CodeTokenizer, prompt: Prompt) -> list[int]:
    """The ids of a `fim` prompt's prefix (the code before the cursor, healed bytes left out): what a decoder
    takes as its history and prompt-lookup context."""
    sp = tokenizer.specials
    return prompt.ids[1:prompt.ids.index(sp.fim_suffix)] if sp.fim_suffix in prompt.ids else list(prompt.ids)


def start(model: LoadedModel, ids: list[int], room: int = 256) -> tuple[DecodeCache, object]:
    """A decode cache holding the prefill of `ids`, with `room` rows to spare, and the last id's logits."""
    cache = DecodeCache.empty(model.config, len(ids) + room)
    return cache, prefill(model.decoder, cache, ids)


def start_past_hidden_rows(model: LoadedModel, ids: list[int], hidden: list[int],
                           room: int = 256) -> tuple[DecodeCache, object]:
    """Like `start`, but the second half of `ids` follows rows of `hidden` that it does not see, at the positions
    right after the first half: a document's rows after the cursor, as BufferCache.lend leaves them."""
    cache = DecodeCache.empty(model.config, len(ids) + len(hidden) + room)
    head = len(ids) // 2
    if head:
        prefill(model.decoder, cache, ids[:head])
    position, first = cache.position, cache.length
    prefill(model.decoder, cache, hidden)
    cache.hide(first, cache.length)
    cache.position = position
    return cache, prefill(model.decoder, cache, ids[head:])


def greedy(model: LoadedModel, prompt: Prompt, max_tokens: int = 64, stop: StopRule | None = SINGLE_LINE, *,
           tokenizer: CodeTokenizer | None = None) -> GenerationResult:
    """Greedy decoding after `prompt` from a fresh cache, ending at `tokenizer`'s stop tokens (default the
    model's; tests.fixtures.never_ending has none)."""
    cache, logits = start(model, prompt.ids, max_tokens + 8)
    request = DecodeRequest(max_tokens, stop, prompt.healed)
    return greedy_decode(model.decoder, vocabulary(tokenizer or model.tokenizer), cache, logits, request)


def logits_after(decoder, rows, tail: list[int]):
    """Logits of the last of `tail` fed after all of a BufferCache's rows (which stay as they are)."""
    position = int(rows.positions[-1]) + 1 if len(rows) else 0  # of a token appended after the last row
    cache, _ = rows.lend(len(rows), len(tail), position)
    return prefill(decoder, cache, tail)


def empty_past(decoder) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Past keys and values of no rows, per layer [kv, 0, hd], for calling the graph directly."""
    cfg = decoder.config
    empty = np.zeros((cfg.n_kv_heads, 0, cfg.head_dim), np.float32)
    return [empty] * cfg.n_layers, [empty] * cfg.n_layers
