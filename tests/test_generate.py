"""Greedy FIM completion: prompts, token healing, stopping."""

from __future__ import annotations

import numpy as np
import pytest

from inference.generate import KVRows, completion_text, first_line, greedy_complete, prefill
from inference.healing import TokenHealer
from inference.prompt import Prompt, fim_prompt


def _healer(model) -> TokenHealer:
    return TokenHealer(model.tokenizer.token_bytes(), model.tokenizer.specials.stop)


def test_healer_allows_longer_tokens_and_shorter_prefixes(tiny_model):
    healer = _healer(tiny_model)
    token_bytes = tiny_model.tokenizer.token_bytes()
    allowed = {token_bytes[i] for i in healer.allowed(b"de")}
    assert b"d" in allowed  # a proper prefix: healing continues with the rest
    expected = {b for i, b in enumerate(token_bytes) if b and i not in tiny_model.tokenizer.specials.stop
                and (b.startswith(b"de") or b"de".startswith(b))}
    assert allowed == expected
    assert any(len(b) > 2 for b in allowed)  # e.g. "def": completing a word is the point of healing


def test_healer_never_extends_typed_indentation(tiny_model):
    healer = _healer(tiny_model)
    token_bytes = tiny_model.tokenizer.token_bytes()
    allowed = {token_bytes[i] for i in healer.allowed(b"  ")}
    assert b" " in allowed
    assert not any(b.startswith(b"   ") or b.startswith(b"  \n") for b in allowed)


def test_healer_consumes_pending_bytes(tiny_model):
    healer = _healer(tiny_model)
    space = tiny_model.tokenizer.encode(" ")[0]
    assert healer.consume(b"  ", space) == b" "
    assert healer.consume(b" ", space) == b""


def test_prompt_backs_off_the_last_token(tiny_model):
    tok = tiny_model.tokenizer
    prompt = fim_prompt(tok, "def f(x):\n    ", "\n")
    sp = tok.specials
    assert prompt.healed == tok.token_bytes()[tok.encode("def f(x):\n    ")[-1]]
    assert prompt.ids[0] == sp.fim_prefix and prompt.ids[-1] == sp.fim_middle
    middle = prompt.ids.index(sp.fim_suffix)
    assert tok.decode(prompt.ids[1:middle]).encode() + prompt.healed == b"def f(x):\n    "


def test_prompt_keeps_the_text_nearest_the_cursor(tiny_model):
    prompt = fim_prompt(tiny_model.tokenizer, "x = 1\n" * 5000, "y = 2\n" * 5000, max_prefix_tokens=50,
                        max_suffix_tokens=20)
    sp = tiny_model.tokenizer.specials
    assert len(prompt.ids) <= 50 + 20 + 3
    middle = prompt.ids.index(sp.fim_suffix)
    assert tiny_model.tokenizer.decode(prompt.ids[middle + 1:-1]).startswith("y = 2")


def test_completion_starts_with_the_healed_bytes_and_returns_what_follows(tiny_model):
    prompt = fim_prompt(tiny_model.tokenizer, "import os\nimport sys\nimp", "")
    result = greedy_complete(tiny_model.decoder, tiny_model.tokenizer, prompt, max_tokens=8, stop=None)
    draft = result.drafts[0]
    generated = b"".join(tiny_model.tokenizer.token_bytes()[i] for i in draft.token_ids)
    assert generated.startswith(prompt.healed)
    assert draft.text == completion_text(generated[len(prompt.healed):])


def test_token_budget_is_respected(tiny_model):
    prompt = fim_prompt(tiny_model.tokenizer, "def f(", ")")
    result = greedy_complete(tiny_model.decoder, tiny_model.tokenizer, prompt, max_tokens=5, stop=None)
    assert len(result.drafts[0].token_ids) <= 5


def test_single_line_completion_has_no_newline_after_its_text(tiny_model):
    prompt = fim_prompt(tiny_model.tokenizer, "x = [\n    1,\n    2,\n", "]\n")
    result = greedy_complete(tiny_model.decoder, tiny_model.tokenizer, prompt, max_tokens=48)
    assert first_line(result.drafts[0].text)[1] is False  # blank lines before the code are kept, none after it


def test_greedy_equals_argmax_of_a_full_recompute(tiny_model):
    """Incremental decoding through the cache picks the same tokens as re-encoding everything each step."""
    prompt = fim_prompt(tiny_model.tokenizer, "for i in range(10):\n    print(", "", heal=False)
    result = greedy_complete(tiny_model.decoder, tiny_model.tokenizer, prompt, max_tokens=12, stop=None)
    ids = list(prompt.ids)
    for token in result.drafts[0].token_ids:
        _, logits = prefill(tiny_model.decoder, ids, KVRows(*tiny_model.decoder.empty_past()))
        assert int(np.argmax(logits)) == token
        ids.append(token)


@pytest.mark.parametrize(("text", "expected"), [
    ("x = 1", ("x = 1", False)),
    ("x = 1\ny = 2", ("x = 1", True)),
    ("x\r\ny", ("x", True)),
    ("\n    return x\n", ("\n    return x", True)),
    ("\n    \n    return x\nz", ("\n    \n    return x", True)),  # blank lines before the code are kept
    ("  \n  ", ("  \n  ", False)),
])
def test_single_line_policy_cuts_after_the_first_line_of_code(text, expected):
    assert first_line(text) == expected


def test_decoding_can_continue_a_cache_without_changing_it(tiny_model):
    tok, decoder = tiny_model.tokenizer, tiny_model.decoder
    ids = tok.encode("import os\nimport sys\n\ndef main():\n")
    rows, _ = prefill(decoder, ids[:-3])
    before = [k.copy() for k in rows.keys]
    continued = greedy_complete(decoder, tok, Prompt(ids[-3:], b""), max_tokens=6, stop=None, rows=rows)
    fresh = greedy_complete(decoder, tok, Prompt(ids, b""), max_tokens=6, stop=None)
    assert continued.drafts[0].token_ids == fresh.drafts[0].token_ids
    assert all((a == b).all() for a, b in zip(before, rows.keys)) and rows.length == len(ids) - 3


def test_completion_text_drops_an_unfinished_character_at_the_end():
    assert completion_text("é".encode()[:1]) == ""
    assert completion_text(b"ab" + "é".encode()[:1]) == "ab"
    assert completion_text("aé".encode()) == "aé"
    assert completion_text(b"a\xffb") == "a\ufffdb"  # invalid bytes inside stay visible
