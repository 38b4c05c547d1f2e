"""DocumentCache: the window of rows follows edits and cursors, refresh makes rows exact, FIM context."""

from __future__ import annotations

import random

import numpy as np
import pytest

from tests.decoding import start
from kv_cache.buffer_cache import BufferCache
from kv_cache.document import DocumentCache, WindowBudget
from kv_cache.edits import TextEdit
from kv_cache.store import BufferStore
from tests.fixtures import cpython_text

SOURCE = cpython_text("textwrap.py")


def _doc(model, text: str, budget: WindowBudget = WindowBudget(), mode: str = "pie") -> DocumentCache:
    store = BufferStore(1024, None, "test", decoder=model.decoder)
    return DocumentCache("file:///a.py", text, model.decoder, model.tokenizer, store, mode=mode, budget=budget)


def _drain_refresh(doc: DocumentCache) -> None:
    while doc.refresh_step():
        pass


def _assert_matches_fresh_encode(model, doc: DocumentCache) -> None:
    """Rows hold [fim_prefix] + the window's tokens, at positions 0..n-1, equal to a fresh encode."""
    rows = doc.cache()
    expected_ids = [model.tokenizer.specials.fim_prefix, *doc.ids[doc.lo:doc.hi]]
    assert rows.ids.tolist() == expected_ids
    assert rows.positions.tolist() == list(range(len(expected_ids)))
    fresh = BufferCache(model.decoder)
    fresh.encode(expected_ids)
    for a, b in zip(rows.past()[0] + rows.past()[1], fresh.past()[0] + fresh.past()[1]):
        np.testing.assert_allclose(a, b, atol=2e-4, rtol=0)


def _random_edit(rng: random.Random, text: str) -> TextEdit:
    start = rng.randrange(len(text) + 1)
    end = min(len(text), start + rng.choice([0, 0, 1, 5, 40]))
    insert = rng.choice(["", "x", "    return value\n", "é", "\n", "(a, b)", "\r\n\t# comment ü\n"])
    return TextEdit(start, end, insert)


def test_rows_follow_random_edits_and_refresh_makes_them_exact(tiny_model_fp32):
    rng = random.Random(5)
    doc = _doc(tiny_model_fp32, SOURCE[:2500])
    doc.ensure_rows()
    for _ in range(12):
        doc.apply([_random_edit(rng, doc.text) for _ in range(1)])
        assert doc.ids == tiny_model_fp32.tokenizer.encode(doc.text)
    assert doc.stale_rows() > 0
    _drain_refresh(doc)
    assert doc.stale_rows() == 0
    _assert_matches_fresh_encode(tiny_model_fp32, doc)


def test_multi_place_edit_in_one_change(tiny_model_fp32):
    doc = _doc(tiny_model_fp32, SOURCE[:1500])
    doc.ensure_rows()
    # LSP order: each edit's offsets refer to the text after the previous edits.
    doc.apply([TextEdit(1200, 1210, "pass\n"), TextEdit(100, 100, "import os\n"), TextEdit(10, 20, "")])
    assert doc.ids == tiny_model_fp32.tokenizer.encode(doc.text)
    _drain_refresh(doc)
    _assert_matches_fresh_encode(tiny_model_fp32, doc)


def test_window_moves_with_the_cursor_and_stays_within_budget(tiny_model_fp32):
    budget = WindowBudget(prefix=96, suffix=32, slack=32)
    doc = _doc(tiny_model_fp32, SOURCE[:8000], budget)
    n = len(doc.ids)
    assert n > 600
    for cursor_char in (7000, 7300, 200, 4000, 3900, len(doc.text)):
        ctx = doc.context(cursor_char)
        rows = doc.cache()
        assert len(rows) <= 1 + budget.prefix + budget.suffix + 2 * budget.slack
        cursor_token = int(np.searchsorted(doc.doc.starts, cursor_char))
        assert doc.lo <= max(0, cursor_token - budget.prefix) + budget.slack
        assert ctx.prefix == doc.text[:cursor_char]
        assert rows.ids.tolist()[1:] == doc.ids[doc.lo:doc.hi]
    _drain_refresh(doc)
    _assert_matches_fresh_encode(tiny_model_fp32, doc)


def test_edits_outside_the_window_move_it_without_touching_rows(tiny_model_fp32):
    doc = _doc(tiny_model_fp32, SOURCE[:8000], WindowBudget(prefix=96, suffix=32, slack=32))
    doc.context(6000)
    lo, hi, before = doc.lo, doc.hi, doc.cache().ids.tolist()
    doc.apply([TextEdit(0, 0, "import sys\nimport os\n")])  # far above the window
    assert doc.cache().ids.tolist() == before and doc.stale_rows() == 0
    assert doc.lo > lo and doc.hi - doc.lo == hi - lo
    assert doc.cache().ids.tolist()[1:] == doc.ids[doc.lo:doc.hi]


def test_context_at_end_of_document_equals_a_fresh_fim_prompt(tiny_model_fp32):
    """With nothing after the cursor no row is borrowed, so the logits are a fresh encode's."""
    model, text = tiny_model_fp32, SOURCE[:1200]
    doc = _doc(model, text)
    ctx = doc.context(len(text))
    sp = model.tokenizer.specials
    kept = doc.ids[doc.lo:doc.lo + ctx.prefix_rows - 1]  # the window's tokens before the healed ones
    assert model.tokenizer.decode(kept).encode() + ctx.healed == text[doc.doc.starts[doc.lo]:].encode()
    _, expected = start(model, [sp.fim_prefix, *kept, sp.fim_suffix, sp.fim_middle])
    np.testing.assert_allclose(ctx.logits, expected, atol=1e-4)


@pytest.mark.parametrize("cursor", [0, 37, 500, 1199])
def test_context_borrows_suffix_rows_at_the_right_positions(tiny_model_fp32, cursor):
    model, text = tiny_model_fp32, SOURCE[:1200]
    doc = _doc(model, text)
    ctx = doc.context(cursor)
    assert ctx.reused + ctx.encoded == ctx.cache.position  # every visible row has the next position: no gap
    assert ctx.prefix + ctx.suffix == text
    healed = ctx.healed.decode("utf-8")
    assert ctx.prefix.endswith(healed)
    # The prefix rows are exact: they equal a fresh encode of [fim_prefix] + the window's prefix tokens.
    prefix_ids = doc.ids[doc.lo:doc.lo + ctx.prefix_rows - 1]
    assert model.tokenizer.decode(prefix_ids) + healed == ctx.prefix[doc.doc.starts[doc.lo]:] if doc.lo < len(
        doc.ids) else True
    if prefix_ids:
        fresh, _ = start(model, [model.tokenizer.specials.fim_prefix, *prefix_ids])
        np.testing.assert_allclose(ctx.cache.keys[0][:, :fresh.length], fresh.keys[0][:, :fresh.length], atol=2e-4)


def test_second_request_at_the_same_cursor_reuses_the_prompt_rows(tiny_model_fp32):
    """The FIM prompt's rotated suffix rows are built once per edit, not once per request."""
    doc = _doc(tiny_model_fp32, SOURCE[:1200])
    first = doc.context(500)
    again = doc.context(500)
    assert first.encoded > 0 and again.encoded == 0
    np.testing.assert_array_equal(again.logits, first.logits)
    assert again.cache.length == first.cache.length and again.cache.position == first.cache.position
    doc.apply([TextEdit(100, 100, "x")])
    assert doc.context(501).encoded > 0  # an edit voids them


def test_context_rejects_a_cursor_outside_the_text(tiny_model):
    doc = _doc(tiny_model, "x = 1\n")
    with pytest.raises(ValueError, match="outside"):
        doc.context(7)


def test_bad_edit_leaves_text_and_rows_alone(tiny_model):
    doc = _doc(tiny_model, "x = 1\n")
    doc.ensure_rows()
    before = doc.cache().ids.tolist()
    with pytest.raises(ValueError):
        doc.apply([TextEdit(0, 1, "y"), TextEdit(3, 99, "")])
    assert doc.text == "x = 1\n" and doc.cache().ids.tolist() == before


def test_empty_document_completes_from_the_marker(tiny_model):
    doc = _doc(tiny_model, "")
    ctx = doc.context(0)
    assert ctx.healed == b"" and ctx.logits is not None and ctx.cache.position == 3  # prefix, suffix, middle
    doc.apply([TextEdit(0, 0, "def f():\n")])
    assert doc.context(len(doc.text)).prefix == "def f():\n"


def test_rows_follow_edits_made_before_the_first_encode(tiny_model_fp32):
    doc = _doc(tiny_model_fp32, SOURCE[:600])
    doc.apply([TextEdit(0, 0, "# header\n")])
    doc.context(300)
    _assert_matches_fresh_encode(tiny_model_fp32, doc)


def test_prefix_layout_ends_the_prompt_before_the_healed_tokens(tiny_model_fp32):
    model, text = tiny_model_fp32, SOURCE[:1200]
    doc = _doc(model, text)
    ctx = doc.context(500, with_suffix=False)
    fim = doc.context(500)
    assert ctx.prefix_rows == fim.prefix_rows and ctx.healed == fim.healed
    assert ctx.cache.position == ctx.prefix_rows  # the marker and the kept prefix tokens, then the output
    _, expected = start(model, [model.tokenizer.specials.fim_prefix, *doc.ids[doc.lo:doc.lo + ctx.prefix_rows - 1]])
    np.testing.assert_allclose(ctx.logits, expected, atol=1e-4)


# -- cold starts: answer from a short window, grow it at idle, restore what was saved -------------------------------

COLD = WindowBudget(prefix=96, suffix=32, slack=32, first=24, first_suffix=8)


def test_a_cold_request_encodes_only_the_tokens_near_its_cursor(tiny_model_fp32):
    doc = _doc(tiny_model_fp32, SOURCE[:8000], COLD)
    cursor = 6000
    ctx = doc.context(cursor)
    cursor_token = int(np.searchsorted(doc.doc.starts, cursor))
    assert ctx.logits is not None and ctx.prefix == doc.text[:cursor]
    assert 0 < ctx.built <= COLD.first + COLD.first_suffix + 2  # + the marker, + the token the cursor splits
    assert doc.lo >= cursor_token - COLD.first - 1 and doc.lo > doc.target_lo  # the rest is left to idle steps
    assert doc.pending_tokens() > 0
    assert doc.window()["rows"] == doc.hi - doc.lo < doc.window()["window"]


def test_growing_the_window_backwards_then_refreshing_equals_a_fresh_encode(tiny_model_fp32):
    doc = _doc(tiny_model_fp32, SOURCE[:8000], COLD)
    doc.context(6000)
    short_lo = doc.lo
    steps = 0
    while doc.encode_step(max_tokens=8):
        steps += 1
    assert doc.pending_tokens() == 0 and doc.lo == doc.target_lo < short_lo and steps > 2
    assert doc.stale_rows() > 0  # the rows after each inserted chunk moved: PIE re-rotated them
    _drain_refresh(doc)
    _assert_matches_fresh_encode(tiny_model_fp32, doc)


def test_growing_follows_edits_made_while_the_window_grows(tiny_model_fp32):
    doc = _doc(tiny_model_fp32, SOURCE[:8000], COLD)
    doc.context(6000)
    doc.encode_step(max_tokens=8)
    doc.apply([TextEdit(5900, 5900, "x = 1\n"), TextEdit(10, 10, "# top\n")])  # in the rows, and far above them
    doc.context(6010)
    assert doc.ids == tiny_model_fp32.tokenizer.encode(doc.text)
    while doc.encode_step(max_tokens=8):
        pass
    _drain_refresh(doc)
    _assert_matches_fresh_encode(tiny_model_fp32, doc)


def test_reopened_text_restores_its_saved_prefix_and_encodes_only_the_rest(tiny_model_fp32, tmp_path):
    model = tiny_model_fp32
    store = BufferStore(1024, tmp_path, "test", decoder=model.decoder)
    original = SOURCE[:1500]
    first = DocumentCache("file:///a.py", original, model.decoder, model.tokenizer, store)
    first.ensure_rows()
    store.close("file:///a.py")  # the editor closed it: the rows go to disk
    changed = original[:1200] + "    return None\n" + original[1200:]  # the file changed further down
    doc = DocumentCache("file:///a.py", changed, model.decoder, model.tokenizer, store)
    kept = next(i for i, (a, b) in enumerate(zip(first.ids, doc.ids)) if a != b)  # tokens before the change
    restored = doc.encode_step()
    assert restored == 1 + kept and store.stats().restores == 1  # the marker and the unchanged tokens
    encoded = 0
    while step := doc.encode_step():
        encoded += step
    assert encoded == len(doc.ids) - kept
    assert doc.cache().ids.tolist() == [model.tokenizer.specials.fim_prefix, *doc.ids]


def _gapped(model, text: str = SOURCE[:8000]) -> tuple[DocumentCache, int]:
    """A document whose idle steps encoded its first 32 tokens, then a request 100 tokens down (its window
    starts at the top, so those rows stay as the head, and the request encodes its own `first` tokens)."""
    doc = _doc(model, text, COLD)
    assert doc.encode_step(max_tokens=16) and doc.encode_step(max_tokens=16)  # marker + 16, then 16 more
    cursor = doc.doc.starts[100]
    return doc, cursor


def test_a_cold_request_keeps_the_rows_idle_steps_built_at_the_top(tiny_model_fp32):
    model = tiny_model_fp32
    doc, cursor = _gapped(model)
    ctx = doc.context(cursor)
    assert doc.head == 32 and doc.lo > doc.head and ctx.built <= COLD.first + COLD.first_suffix + 2
    fim_prefix = model.tokenizer.specials.fim_prefix
    assert doc.cache().ids.tolist()[:ctx.prefix_rows] == [fim_prefix, *doc.ids[:32], *doc.ids[doc.lo:doc.lo +
                                                                                                ctx.prefix_rows - 33]]
    assert ctx.reused + ctx.encoded == ctx.cache.position  # positions run on over the gap
    while doc.encode_step(max_tokens=8):
        pass
    assert doc.head == 0 and doc.lo == 0 and doc.pending_tokens() == 0  # the gap closed
    _drain_refresh(doc)
    _assert_matches_fresh_encode(model, doc)


@pytest.mark.parametrize("seed", range(4))
def test_edits_while_the_gap_is_open_keep_text_and_rows_in_step(tiny_model_fp32, seed):
    """Edits anywhere (head, gap, window, after it) interleaved with idle steps: the rows always hold the ids
    of the head and the window, and once built and refreshed they equal a fresh encode."""
    model, rng = tiny_model_fp32, random.Random(seed)
    doc, cursor = _gapped(model, SOURCE[:3000])
    doc.context(cursor)
    fim_prefix = model.tokenizer.specials.fim_prefix
    for _ in range(6):
        doc.apply([_random_edit(rng, doc.text)])
        assert doc.ids == model.tokenizer.encode(doc.text)
        rows = doc.cache()
        if rows is not None:
            assert rows.ids.tolist() == [fim_prefix, *doc.ids[:doc.head], *doc.ids[doc.lo:doc.hi]]
        doc.encode_step(max_tokens=8)
    while doc.encode_step(max_tokens=8):
        pass
    _drain_refresh(doc)
    _assert_matches_fresh_encode(model, doc)


def test_rows_lost_while_the_gap_is_open_are_rebuilt_without_the_head(tiny_model_fp32):
    """An evicted document whose rows cannot be read back (no saved file) starts its rows again from `lo`: the
    head it had is not assumed to be there."""
    model = tiny_model_fp32
    doc, cursor = _gapped(model)
    doc.context(cursor)
    assert doc.head
    doc.store.drop(doc.uri)  # what eviction does without a persist directory
    assert doc.encode_step()
    assert doc.cache().ids.tolist() == [model.tokenizer.specials.fim_prefix, *doc.ids[:doc.head],
                                        *doc.ids[doc.lo:doc.hi]]
    while doc.encode_step(max_tokens=8):
        pass
    _drain_refresh(doc)
    _assert_matches_fresh_encode(model, doc)
