"""Greedy FIM completion: prompts, token healing, stopping, and the decode cache it writes in place."""

from __future__ import annotations

import numpy as np
import pytest

from inference.generate import DecodeCache, DecodeRequest, completion_text, first_line, greedy_decode, prefill, \
    vocabulary
from inference.healing import TokenHealer
from tests.decoding import fim, greedy, start
from tests.fixtures import never_ending


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


@pytest.mark.parametrize("pending", [b" ", b"  ", b"    ", b"\t", b"\n", b"\n    ", b" \t\r\x0b\x0c"])
def test_healer_keeps_exactly_the_tokens_that_end_typed_whitespace(tiny_model, pending):
    """Against the rule spelled out over the whole vocabulary: a longer token's next byte is not whitespace."""
    healer = _healer(tiny_model)
    token_bytes = tiny_model.tokenizer.token_bytes()
    stop = tiny_model.tokenizer.specials.stop
    expected = {i for i, b in enumerate(token_bytes) if b and i not in stop and (
        b.startswith(pending) and not b[len(pending):len(pending) + 1].isspace()
        or len(b) < len(pending) and pending.startswith(b))}
    assert set(healer.allowed(pending).tolist()) == expected


def test_healer_consumes_pending_bytes(tiny_model):
    healer = _healer(tiny_model)
    space = tiny_model.tokenizer.encode(" ")[0]
    assert healer.consume(b"  ", space) == b" "
    assert healer.consume(b" ", space) == b""


def test_prompt_backs_off_the_last_token(tiny_model):
    """The FIM prompt the decoder tests build (tests/decoding.py): the prefix's last token is healed."""
    tok = tiny_model.tokenizer
    prompt = fim(tok, "def f(x):\n    ", "\n")
    sp = tok.specials
    assert prompt.healed == tok.token_bytes()[tok.encode("def f(x):\n    ")[-1]]
    assert prompt.ids[0] == sp.fim_prefix and prompt.ids[-1] == sp.fim_middle
    middle = prompt.ids.index(sp.fim_suffix)
    assert tok.decode(prompt.ids[1:middle]).encode() + prompt.healed == b"def f(x):\n    "


def test_completion_starts_with_the_healed_bytes_and_returns_what_follows(tiny_model):
    prompt = fim(tiny_model.tokenizer, "import os\nimport sys\nimp", "")
    draft = greedy(tiny_model, prompt, max_tokens=8, stop=None).drafts[0]
    generated = b"".join(tiny_model.tokenizer.token_bytes()[i] for i in draft.token_ids)
    assert generated.startswith(prompt.healed)
    assert draft.text == completion_text(generated[len(prompt.healed):])


def test_token_budget_is_respected(tiny_model):
    """Nothing else ends this decode (no end-of-text, no stop rule): it takes the whole budget, no more."""
    model = tiny_model
    tok = never_ending(model.tokenizer)
    prompt = fim(tok, "def f(", ")")
    cache, logits = start(model, prompt.ids)
    result = greedy_decode(model.decoder, vocabulary(tok), cache, logits, DecodeRequest(5, None, prompt.healed))
    assert len(result.drafts[0].token_ids) == 5


def test_single_line_completion_has_no_newline_after_its_text(tiny_model):
    prompt = fim(tiny_model.tokenizer, "x = [\n    1,\n    2,\n", "]\n")
    result = greedy(tiny_model, prompt, max_tokens=48)
    assert first_line(result.drafts[0].text)[1] is False  # blank lines before the code are kept, none after it


def test_greedy_equals_argmax_of_a_full_recompute(tiny_model):
    """Incremental decoding through the cache picks the same tokens as re-encoding everything each step."""
    prompt = fim(tiny_model.tokenizer, "for i in range(10):\n    print(", "", heal=False)
    result = greedy(tiny_model, prompt, max_tokens=12, stop=None)
    ids = list(prompt.ids)
    for token in result.drafts[0].token_ids:
        _, logits = start(tiny_model, ids, room=0)
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


def _lent_buffers(model, capacity: int) -> tuple[list[np.ndarray], list[np.ndarray], DecodeCache]:
    """Buffers the test owns (NaN until written) and an empty DecodeCache over them."""
    cfg = model.config
    shape = (cfg.n_kv_heads, capacity, cfg.head_dim)
    keys = [np.full(shape, np.nan, np.float32) for _ in range(cfg.n_layers)]
    values = [np.full(shape, np.nan, np.float32) for _ in range(cfg.n_layers)]
    return keys, values, DecodeCache(keys, values, 0, 0)


def test_decoding_writes_after_the_rows_it_was_lent_without_changing_them(tiny_model):
    """A cache over someone else's buffers (as BufferCache.lend makes): the prompt continues its rows, the
    decode writes its rows in place after them, into the same buffers, and leaves the lent rows bit-identical."""
    model = tiny_model
    tok, decoder = never_ending(model.tokenizer), model.decoder
    ids = tok.encode("import os\nimport sys\n\ndef main():\n")
    keys, values, lent = _lent_buffers(model, len(ids) + 16)
    prefill(decoder, lent, ids[:-3])
    logits = prefill(decoder, lent, ids[-3:])  # the prompt continues the lent rows
    length = lent.length
    before = [buf[:, :length].copy() for buf in keys + values]
    continued = greedy_decode(decoder, vocabulary(tok), lent, logits, DecodeRequest(6, None))
    fresh_cache, fresh_logits = start(model, ids)
    fresh = greedy_decode(decoder, vocabulary(tok), fresh_cache, fresh_logits, DecodeRequest(6, None))
    assert continued.drafts[0].token_ids == fresh.drafts[0].token_ids and len(fresh.drafts[0].token_ids) == 6
    assert all(a is b for a, b in zip(lent.keys + lent.values, keys + values))  # written in place, not moved
    assert all(np.array_equal(buf[:, :length], old) for buf, old in zip(keys + values, before))
    assert lent.length == lent.position == length + 5  # every token but the last was fed
    assert all(np.array_equal(a[:, :lent.length], b[:, :lent.length])
               for a, b in zip(lent.keys + lent.values, fresh_cache.keys + fresh_cache.values))


def test_a_decode_that_outgrows_the_lent_buffers_moves_to_its_own(tiny_model):
    """Past the capacity the cache grows into buffers of its own: the lender's are not resized and their rows
    stay as they were, and the output is the same as with room to spare."""
    model = tiny_model
    tok, decoder = never_ending(model.tokenizer), model.decoder
    ids = tok.encode("def f(x):\n    return x\n")
    keys, values, lent = _lent_buffers(model, len(ids) + 2)
    logits = prefill(decoder, lent, ids)
    before = [buf[:, :len(ids)].copy() for buf in keys + values]
    grown = greedy_decode(decoder, vocabulary(tok), lent, logits, DecodeRequest(8, None))
    roomy = greedy_decode(decoder, vocabulary(tok), *start(model, ids), DecodeRequest(8, None))
    assert grown.drafts[0].token_ids == roomy.drafts[0].token_ids and len(roomy.drafts[0].token_ids) == 8
    assert lent.capacity >= len(ids) + 7 and all(a is not b for a, b in zip(lent.keys, keys))
    assert all(buf.shape == (model.config.n_kv_heads, len(ids) + 2, model.config.head_dim) for buf in keys + values)
    assert all(np.array_equal(buf[:, :len(ids)], old) for buf, old in zip(keys + values, before))


def test_completion_text_drops_an_unfinished_character_at_the_end():
    assert completion_text("é".encode()[:1]) == ""
    assert completion_text(b"ab" + "é".encode()[:1]) == "ab"
    assert completion_text("aé".encode()) == "aé"
    assert completion_text(b"a\xffb") == "a\ufffdb"  # invalid bytes inside stay visible
