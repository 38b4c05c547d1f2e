"""The completion pipeline over a document's own rows: decodes write in place, a keystroke's forward serves
the completion after it, and healing restores whole words."""

from __future__ import annotations

from bisect import bisect_left

import numpy as np
import pytest

from inference.drafting import Recycler
from inference.generate import DecodeRequest, completion_text, greedy_decode, vocabulary
from inference.speculative import Drafter, forked_decode, speculative_decode
from inference.superposed import beam_decode
from kv_cache.document import HEAL_TOKENS, DocumentCache
from kv_cache.edits import TextEdit
from kv_cache.store import BufferStore
from lsp_server.completer import uses_suffix
from tests.decoding import start
from tests.fixtures import cpython_text, never_ending

SOURCE = cpython_text("shlex.py")


def _doc(model, text: str) -> DocumentCache:
    store = BufferStore(1024, None, "test", decoder=model.decoder)
    return DocumentCache("file:///a.py", text, model.decoder, model.tokenizer, store)


def _rows(doc: DocumentCache) -> list[np.ndarray]:
    keys, values = doc.cache().past()
    return [a.copy() for a in keys + values]


DECODERS = {
    "greedy": lambda d, v, c, lg, r: greedy_decode(d, v, c, lg, r),
    "speculative": lambda d, v, c, lg, r: speculative_decode(d, v, c, lg, r, Drafter(Recycler(v.healer.vocab_size))),
    "beam": lambda d, v, c, lg, r: beam_decode(d, v, c, lg, r, 3),
    "forked": lambda d, v, c, lg, r: forked_decode(d, v, c, lg, r, Drafter(Recycler(v.healer.vocab_size)), 3),
}


@pytest.mark.parametrize("method", DECODERS)
def test_decoding_writes_its_rows_in_place_after_the_documents_rows(tiny_model, method):
    """Every step writes into the same buffers (the document's), after its rows, which never change."""
    doc = _doc(tiny_model, SOURCE[:3000])
    cursor = SOURCE.index("\n", 2000)
    ctx = doc.context(cursor, with_suffix=False, room=3 * 16 + 8)
    buffers, first = ctx.cache.keys, ctx.cache.length
    before, n_rows = _rows(doc), len(doc.cache())
    seen: list[int] = []

    def cancelled(text: str) -> bool:  # asked before every forward
        assert ctx.cache.keys is buffers and all(a is b for a, b in zip(ctx.cache.keys, buffers))
        seen.append(ctx.cache.length)
        return False

    vocab = vocabulary(never_ending(tiny_model.tokenizer))
    DECODERS[method](tiny_model.decoder, vocab, ctx.cache, ctx.logits, DecodeRequest(16, None, ctx.healed, cancelled))
    assert len(seen) >= 3 and seen == sorted(seen) and seen[0] == first and ctx.cache.length > seen[-1]
    assert buffers[0] is doc.cache().past()[0][0].base  # the document's buffers, not a copy
    assert len(doc.cache()) == n_rows
    for a, b in zip(_rows(doc), before):
        np.testing.assert_array_equal(a, b)


def test_a_keystrokes_own_forward_serves_the_completion_after_it(tiny_model_fp32):
    """Typing a line character by character, the prompt's logits come from the edit: no forward of its own."""
    model = tiny_model_fp32
    text = SOURCE[:2500]
    cursor = text.index("\n", 1500) + 1
    doc = _doc(model, text[:cursor] + "\n" + text[cursor:])
    doc.ensure_rows()
    typed = "    total = len(values) + offset"
    for i, ch in enumerate(typed):
        doc.apply([TextEdit(cursor + i, cursor + i, ch)])
        ctx = doc.context(cursor + i + 1, with_suffix=False)
        if i:  # the first keystroke's line start: the row before it was written by the original encode
            assert ctx.encoded == 0, f"a forward was needed after typing {typed[:i + 1]!r}"
        _, expected = start(model, [model.tokenizer.specials.fim_prefix, *doc.ids[:ctx.prefix_rows - 1]])
        np.testing.assert_allclose(ctx.logits, expected, rtol=0, atol=1e-4)


def _word_cursors(text: str) -> list[int]:
    """Every cursor with a word character before it (inside or at the end of a word)."""
    return [i for i in range(1, len(text)) if text[i - 1].isalnum() or text[i - 1] == "_"]


def _assert_healing_keeps_every_character(model, doc: DocumentCache, cursor: int) -> None:
    ctx = doc.context(cursor, with_suffix=uses_suffix("auto", doc.text, cursor), room=32)
    healed = ctx.healed.decode("utf-8")
    kept = ctx.prefix[:len(ctx.prefix) - len(healed)]
    assert ctx.prefix.endswith(healed)
    word = len(ctx.prefix) - len(ctx.prefix.rstrip("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_"))
    capped = bisect_left(doc.doc.starts, cursor) - bisect_left(doc.doc.starts, len(kept)) == HEAL_TOKENS
    # The prompt stops before the word: no part of it is left as a prompt token the model never saw split.
    assert len(healed) >= word or capped, f"{ctx.prefix[-20:]!r}: healed {healed!r}"
    vocab = vocabulary(never_ending(model.tokenizer))
    request = DecodeRequest(len(ctx.healed) + 4, None, ctx.healed)
    draft = greedy_decode(model.decoder, vocab, ctx.cache, ctx.logits, request).drafts[0]
    produced = b"".join(vocab.token_bytes[t] for t in draft.token_ids)
    assert produced.startswith(ctx.healed)  # the model re-wrote exactly what was typed
    # typed text + suggestion == the text before the healed tokens + what the model produced
    assert ctx.prefix + draft.text == kept + completion_text(produced)


def test_every_cursor_in_a_word_heals_without_dropping_or_repeating_a_character(tiny_model):
    text = SOURCE[:1200]
    doc = _doc(tiny_model, text)
    for cursor in _word_cursors(text):
        _assert_healing_keeps_every_character(tiny_model, doc, cursor)


@pytest.mark.real_model
def test_real_model_heals_words_without_dropping_or_repeating_a_character(real_model):
    text = cpython_text("textwrap.py")[:3000]
    doc = _doc(real_model, text)
    cursors = _word_cursors(text)
    for cursor in cursors[::len(cursors) // 12][:12]:
        _assert_healing_keeps_every_character(real_model, doc, cursor)


@pytest.mark.real_model
def test_real_model_completes_a_half_typed_name_without_a_typo(real_model):
    """The report: after "Hea" the suggestion made "HeadeValue" of HeaderValue (the prompt kept "He" as a
    token and healed only "a"). With the word healed whole, the name is completed as it is defined."""
    before = "import typing as t\n\nHeaderValue = t.Union[str, int]\n\n\ndef parse(value: "
    for typed in ("H", "He", "Hea", "Head", "Heade"):
        doc = _doc(real_model, before + typed + "\n")
        ctx = doc.context(len(before) + len(typed), with_suffix=False, room=8)
        vocab = vocabulary(real_model.tokenizer)
        draft = greedy_decode(real_model.decoder, vocab, ctx.cache, ctx.logits,
                              DecodeRequest(6, None, ctx.healed)).drafts[0]
        assert (typed + draft.text).startswith("HeaderValue"), typed + draft.text


@pytest.mark.parametrize("with_suffix", [False, True])
@pytest.mark.parametrize("inserted", ["alue = 1", "(x)\n    return x", "é"])
def test_context_after_an_insertion_is_the_context_of_the_edited_text(tiny_model_fp32, with_suffix, inserted):
    """A prefetch's prompt (as if `inserted` were typed) equals the prompt after really typing it (a PIE
    edit of the same rows), and the document is left as it was."""
    model = tiny_model_fp32
    text = SOURCE[:1500]
    cursor = text.index("\n", 900)
    doc, typed = _doc(model, text), _doc(model, text)
    for d in (doc, typed):
        d.ensure_rows()
        d.apply([TextEdit(cursor, cursor, "v")])
    typed.apply([TextEdit(cursor + 1, cursor + 1, inserted)])
    before = _rows(doc)
    virtual = doc.context(cursor + 1, with_suffix=with_suffix, inserted=inserted)
    real = typed.context(cursor + 1 + len(inserted), with_suffix=with_suffix)
    assert (virtual.prefix, virtual.suffix, virtual.healed) == (real.prefix, real.suffix, real.healed)
    np.testing.assert_allclose(virtual.logits, real.logits, rtol=0, atol=1e-4)
    assert doc.text == text[:cursor] + "v" + text[cursor:]
    for a, b in zip(_rows(doc), before):
        np.testing.assert_array_equal(a, b)
