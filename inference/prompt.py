"""A prompt's token ids and the bytes token healing backed off from its end."""

from __future__ import annotations

from dataclasses import dataclass

from inference.tokenizer import CodeTokenizer


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    healed: bytes  # bytes of the prefix's last token, backed off for the model to re-choose


def healed_prompt(tokenizer: CodeTokenizer, ids: list[int]) -> Prompt:
    """The ids with their last token backed off, for the model to re-choose (see inference/healing.py)."""
    if not ids:
        return Prompt([], b"")
    return Prompt(ids[:-1], tokenizer.token_bytes()[ids[-1]])
