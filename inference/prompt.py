"""Prompts for completion at a cursor: fill-in-the-middle when the model has FIM tokens."""

from __future__ import annotations

from dataclasses import dataclass

from inference.tokenizer import CodeTokenizer

MAX_PREFIX_TOKENS = 1536
MAX_SUFFIX_TOKENS = 256
_CHARS_PER_TOKEN_BOUND = 8  # clip text before tokenizing so a huge file costs no more than a small one


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    healed: bytes  # bytes of the prefix's last token, backed off for the model to re-choose


def healed_prompt(tokenizer: CodeTokenizer, ids: list[int]) -> Prompt:
    """The ids with their last token backed off, for the model to re-choose (see inference/healing.py)."""
    if not ids:
        return Prompt([], b"")
    return Prompt(ids[:-1], tokenizer.token_bytes()[ids[-1]])


def fim_prompt(tokenizer: CodeTokenizer, prefix: str, suffix: str, *, heal: bool = True,
               max_prefix_tokens: int = MAX_PREFIX_TOKENS, max_suffix_tokens: int = MAX_SUFFIX_TOKENS) -> Prompt:
    """<|fim_prefix|>prefix<|fim_suffix|>suffix<|fim_middle|>, or the bare prefix for models without FIM.

    The prefix keeps its end and the suffix its start: the text next to the cursor matters most.
    """
    prefix = prefix[-max_prefix_tokens * _CHARS_PER_TOKEN_BOUND:]
    suffix = suffix[: max_suffix_tokens * _CHARS_PER_TOKEN_BOUND]
    prefix_ids = tokenizer.encode(prefix)[-max_prefix_tokens:]
    head = healed_prompt(tokenizer, prefix_ids) if heal else Prompt(prefix_ids, b"")
    prefix_ids, healed = head.ids, head.healed
    sp = tokenizer.specials
    if sp.fim_prefix is None or sp.fim_suffix is None or sp.fim_middle is None:
        return Prompt(prefix_ids, healed)
    suffix_ids = tokenizer.encode(suffix)[:max_suffix_tokens]
    return Prompt([sp.fim_prefix, *prefix_ids, sp.fim_suffix, *suffix_ids, sp.fim_middle], healed)
