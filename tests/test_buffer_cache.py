"""The per-buffer KV cache: PIE re-rotation and splices, checked against fresh encodes of the tiny model."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from kv_cache.buffer_cache import BufferCache
from kv_cache.rotation import rerotate_keys
from inference.generate import prefill
from tests.decoding import empty_past, logits_after
from tests.decoding import start as fresh_prefill
from tests.fixtures import cpython_text

DOC_TOKENS = 240
INSERTED = "    return value + 1\n"  # text of the inserted tokens


@pytest.fixture(scope="module")
def source_ids(tiny_model) -> list[int]:
    text = cpython_text("textwrap.py")
    return tiny_model.tokenizer.encode(text)


@pytest.fixture(scope="module")
def doc(source_ids) -> list[int]:
    return source_ids[:DOC_TOKENS]


@pytest.fixture(scope="module")
def new_ids(tiny_model) -> list[int]:
    return tiny_model.tokenizer.encode(INSERTED)


def _splice(case: str, new_ids: list[int]) -> tuple[int, int, list[int]]:
    """(start, stop, ids) for the named edit of a DOC_TOKENS-token document."""
    return {
        "insertion": (100, 100, new_ids),
        "deletion": (100, 130, []),
        "replacement": (100, 110, new_ids[:4]),
        "at_start": (0, 3, new_ids),
        "at_end": (DOC_TOKENS, DOC_TOKENS, new_ids),
    }[case]


CASES = ["insertion", "deletion", "replacement", "at_start", "at_end"]


def _cache(model, ids: list[int], capacity: int = 1024) -> BufferCache:
    cache = BufferCache(model.decoder, capacity)
    cache.encode(ids)
    return cache


def _snapshot(cache: BufferCache) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Copies of the rows (past() gives views, which later edits would change under the test)."""
    keys, values = cache.past()
    return [k.copy() for k in keys], [v.copy() for v in values]


def _assert_rows_equal(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def _encode_at(model, ids: list[int], first_position: int):
    decoder = model.decoder
    return decoder.forward(np.array(ids), np.arange(first_position, first_position + len(ids)), *empty_past(decoder))


class RecordingDecoder:
    """Passes forwards through and records (new tokens, their positions, past rows) of each."""

    def __init__(self, decoder) -> None:
        self.config = decoder.config
        self._decoder = decoder
        self.calls: list[tuple[int, list[int], int]] = []

    def forward(self, ids, positions, past_keys, past_values, **kwargs):
        self.calls.append((len(ids), [int(p) for p in positions], past_keys[0].shape[1]))
        return self._decoder.forward(ids, positions, past_keys, past_values, **kwargs)


# -- re-rotation -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("delta", [-50, 7, 300])
def test_rerotated_keys_equal_keys_encoded_at_shifted_positions(tiny_model_fp32, doc, delta):
    # Shifting the whole sequence keeps relative positions, so hidden states (and values) are unchanged.
    cfg = tiny_model_fp32.config
    base, shifted = _encode_at(tiny_model_fp32, doc, 0), _encode_at(tiny_model_fp32, doc, delta)
    for layer in range(cfg.n_layers):
        rotated = rerotate_keys(base.keys[layer], delta, cfg.head_dim, cfg.rope_theta)
        np.testing.assert_allclose(rotated, shifted.keys[layer], rtol=0, atol=1e-4)
        np.testing.assert_allclose(base.values[layer], shifted.values[layer], rtol=0, atol=1e-4)


def test_per_row_deltas_rotate_each_row_by_its_own_delta(tiny_model, doc):
    cfg = tiny_model.config
    keys = _encode_at(tiny_model, doc, 0).keys[1]
    deltas = np.random.default_rng(0).integers(-400, 400, keys.shape[1])
    rotated = rerotate_keys(keys, deltas, cfg.head_dim, cfg.rope_theta)
    for row in (0, 17, keys.shape[1] - 1):
        one = rerotate_keys(keys[:, row:row + 1], int(deltas[row]), cfg.head_dim, cfg.rope_theta)
        np.testing.assert_array_equal(rotated[:, row:row + 1], one)


def test_large_delta_stays_accurate(tiny_model, doc):
    cfg = tiny_model.config
    keys = _encode_at(tiny_model, doc, 0).keys[0]
    delta = 10_000_000  # a float32 angle would be off by ~0.6 rad here
    reference = rerotate_keys(keys.astype(np.float64), delta, cfg.head_dim, cfg.rope_theta)
    np.testing.assert_allclose(rerotate_keys(keys, delta, cfg.head_dim, cfg.rope_theta), reference, atol=1e-5)


def test_in_place_rotation_writes_through_a_buffer_view(tiny_model, doc):
    cfg = tiny_model.config
    buffer = np.zeros((cfg.n_kv_heads, 300, cfg.head_dim), np.float32)
    keys = _encode_at(tiny_model, doc, 0).keys[0]
    buffer[:, 10:10 + len(doc)] = keys
    rerotate_keys(buffer[:, 10:10 + len(doc)], -3, cfg.head_dim, cfg.rope_theta, in_place=True)
    np.testing.assert_array_equal(buffer[:, 10:10 + len(doc)], rerotate_keys(keys, -3, cfg.head_dim, cfg.rope_theta))
    assert not buffer[:, :10].any() and not buffer[:, 10 + len(doc):].any()


def test_in_place_drift_after_1000_rotations_is_small(tiny_model, doc):
    cfg = tiny_model.config
    original = _encode_at(tiny_model, doc, 0).keys[1]
    keys = original.copy()
    deltas = np.random.default_rng(1).integers(-500, 501, 1000)
    for delta in deltas:
        rerotate_keys(keys, int(delta), cfg.head_dim, cfg.rope_theta, in_place=True)
    once = rerotate_keys(original.astype(np.float64), int(deltas.sum()), cfg.head_dim, cfg.rope_theta)
    drift = np.abs(keys - once).max() / np.abs(once).max()
    assert drift < 1e-5  # measured 3.0e-6 (2.8e-6 for the fp32 model)


# -- encode ------------------------------------------------------------------------------------------------


def test_encode_matches_prefill(tiny_model, doc):
    cache = _cache(tiny_model, doc)
    rows, _ = fresh_prefill(tiny_model, list(doc))
    _assert_rows_equal(cache.past()[0], rows.past()[0])
    _assert_rows_equal(cache.past()[1], rows.past()[1])
    assert cache.ids.tolist() == doc and len(cache) == len(doc)
    np.testing.assert_array_equal(cache.positions, np.arange(len(doc)))
    assert int(cache.positions[-1]) + 1 == len(doc) and not cache.stale.any()


def test_encoding_beyond_the_initial_capacity_grows_the_buffers(tiny_model, source_ids):
    ids = source_ids[:600]  # also more than one prefill chunk
    cache = _cache(tiny_model, ids, capacity=16)
    assert cache.capacity >= 600
    rows, _ = fresh_prefill(tiny_model, list(ids))
    _assert_rows_equal(cache.past()[0], rows.past()[0])
    _assert_rows_equal(cache.past()[1], rows.past()[1])
    row_arrays = 8 + 8 + 1  # id, position, stale flag
    assert cache.nbytes == cache.capacity * (tiny_model.config.kv_bytes_per_token() + row_arrays)


def test_insertion_beyond_capacity_grows_the_buffers(tiny_model, doc, source_ids):
    cache = _cache(tiny_model, doc[:10], capacity=12)
    small = cache.nbytes
    cache.apply_splice(5, 5, source_ids[:50])
    assert len(cache) == 60 and cache.capacity >= 60 and cache.nbytes > small
    assert cache.ids.tolist() == doc[:5] + source_ids[:50] + doc[5:10]


# -- pie splices -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_pie_keeps_rows_before_the_edit_bit_identical(tiny_model, doc, new_ids, case):
    start, stop, ids = _splice(case, new_ids)
    cache = _cache(tiny_model, doc)
    keys, values = cache.past(start)
    cache.apply_splice(start, stop, ids)
    _assert_rows_equal(cache.past(start)[0], keys)
    _assert_rows_equal(cache.past(start)[1], values)


@pytest.mark.parametrize("case", CASES)
def test_pie_inserted_rows_equal_a_full_encode(tiny_model, doc, new_ids, case):
    start, stop, ids = _splice(case, new_ids)
    pie, full = _cache(tiny_model, doc), _cache(tiny_model, doc)
    pie.apply_splice(start, stop, ids)
    full.apply_splice(start, stop, ids, mode="full")
    _assert_rows_equal(pie.past(start + len(ids))[0], full.past(start + len(ids))[0])
    _assert_rows_equal(pie.past(start + len(ids))[1], full.past(start + len(ids))[1])


@pytest.mark.parametrize("case", CASES)
def test_pie_rotates_later_keys_by_delta_and_keeps_their_values(tiny_model, doc, new_ids, case):
    start, stop, ids = _splice(case, new_ids)
    cfg = tiny_model.config
    cache = _cache(tiny_model, doc)
    keys, values = _snapshot(cache)
    stats = cache.apply_splice(start, stop, ids)
    delta = len(ids) - (stop - start)
    later_keys, later_values = (
        [a[:, start + len(ids):] for a in rows] for rows in cache.past()
    )
    assert stats.rotated == len(doc) - stop
    _assert_rows_equal(later_keys, [rerotate_keys(k[:, stop:], delta, cfg.head_dim, cfg.rope_theta) for k in keys])
    _assert_rows_equal(later_values, [v[:, stop:] for v in values])


@pytest.mark.parametrize("case", CASES)
def test_pie_keeps_positions_and_ids_in_document_order(tiny_model, doc, new_ids, case):
    start, stop, ids = _splice(case, new_ids)
    cache = _cache(tiny_model, doc)
    cache.apply_splice(start, stop, ids)
    expected = doc[:start] + ids + doc[stop:]
    assert cache.ids.tolist() == expected
    np.testing.assert_array_equal(cache.positions, np.arange(len(expected)))
    assert int(cache.positions[-1]) + 1 == len(expected)


@pytest.mark.parametrize("case", CASES)
def test_pie_marks_only_later_rows_stale(tiny_model, doc, new_ids, case):
    start, stop, ids = _splice(case, new_ids)
    cache = _cache(tiny_model, doc)
    cache.apply_splice(start, stop, ids)
    np.testing.assert_array_equal(np.flatnonzero(cache.stale), np.arange(start + len(ids), len(cache)))


def test_pie_encodes_only_the_inserted_tokens_against_the_prefix(tiny_model, doc, new_ids):
    recorder = RecordingDecoder(tiny_model.decoder)
    cache = BufferCache(recorder)
    cache.encode(doc)
    recorder.calls.clear()
    stats = cache.apply_splice(100, 110, new_ids)
    assert recorder.calls == [(len(new_ids), list(range(100, 100 + len(new_ids))), 100)]
    assert (stats.dropped, stats.inserted, stats.encoded) == (10, len(new_ids), len(new_ids))


def test_pure_deletion_runs_no_forward(tiny_model, doc):
    recorder = RecordingDecoder(tiny_model.decoder)
    cache = BufferCache(recorder)
    cache.encode(doc)
    recorder.calls.clear()
    stats = cache.apply_splice(100, 130, [])
    assert recorder.calls == [] and stats.encoded == 0 and stats.forward_s == 0.0


def test_pie_edit_at_the_end_gives_the_logits_of_full(tiny_model, doc, new_ids):
    pie, full = _cache(tiny_model, doc), _cache(tiny_model, doc)
    pie.apply_splice(len(doc) - 5, len(doc), new_ids)
    full.apply_splice(len(doc) - 5, len(doc), new_ids, mode="full")
    assert not pie.stale.any()
    np.testing.assert_array_equal(logits_after(tiny_model.decoder, pie, doc[:1]),
                                  logits_after(tiny_model.decoder, full, doc[:1]))


def test_successive_pie_edits_rotate_surviving_rows_by_their_total_shift(tiny_model, doc, new_ids):
    cfg = tiny_model.config
    cache = _cache(tiny_model, doc)
    original_keys, original_values = _snapshot(cache)
    survivors = np.arange(len(doc))  # current row of each original row; -1 once deleted
    for start, stop, ids in [(200, 200, new_ids), (30, 45, new_ids[:3]), (120, 124, []), (0, 0, new_ids[:2])]:
        old = survivors.copy()
        survivors[(old >= start) & (old < stop)] = -1
        survivors[old >= stop] += len(ids) - (stop - start)
        cache.apply_splice(start, stop, ids)
    np.testing.assert_array_equal(cache.positions, np.arange(len(cache)))
    kept = np.flatnonzero(survivors >= 0)
    rows = survivors[kept]
    for layer in range(cfg.n_layers):
        expected = rerotate_keys(original_keys[layer][:, kept], rows - kept, cfg.head_dim, cfg.rope_theta)
        np.testing.assert_allclose(cache.past()[0][layer][:, rows], expected, rtol=0, atol=1e-5)
        np.testing.assert_array_equal(cache.past()[1][layer][:, rows], original_values[layer][:, kept])


def test_rows_inserted_after_stale_rows_are_stale(tiny_model, doc, new_ids):
    cache = _cache(tiny_model, doc)
    cache.apply_splice(50, 50, new_ids)
    cache.apply_splice(150, 150, new_ids[:2])
    assert cache.stale[150:152].all() and not cache.stale[:50 + len(new_ids)].any()


# -- the other modes ---------------------------------------------------------------------------------------


def test_conflict_fast_leaves_later_keys_and_positions_untouched(tiny_model, doc, new_ids):
    cache = _cache(tiny_model, doc)
    keys, values = _snapshot(cache)
    stats = cache.apply_splice(100, 110, new_ids, mode="conflict-fast")
    later = 100 + len(new_ids)
    _assert_rows_equal([k[:, later:] for k in cache.past()[0]], [k[:, 110:] for k in keys])
    _assert_rows_equal([v[:, later:] for v in cache.past()[1]], [v[:, 110:] for v in values])
    np.testing.assert_array_equal(cache.positions[later:], np.arange(110, len(doc)))
    np.testing.assert_array_equal(cache.positions[:later], np.arange(later))
    assert stats.rotated == 0 and cache.stale[later:].all() and not cache.stale[:later].any()


def test_full_equals_a_fresh_encode_of_the_new_ids(tiny_model, doc, new_ids):
    cache = _cache(tiny_model, doc)
    stats = cache.apply_splice(100, 110, new_ids, mode="full")
    fresh = _cache(tiny_model, doc[:100] + new_ids + doc[110:])
    _assert_rows_equal(cache.past()[0], fresh.past()[0])
    _assert_rows_equal(cache.past()[1], fresh.past()[1])
    np.testing.assert_array_equal(cache.ids, fresh.ids)
    np.testing.assert_array_equal(cache.positions, fresh.positions)
    assert not cache.stale.any() and stats.encoded == len(fresh)


# -- lending rows to a decode, kept logits and the API edges -----------------------------------------------


def test_a_lent_decode_writes_after_the_rows_and_never_changes_them(tiny_model, doc, new_ids):
    cache = _cache(tiny_model, doc)
    keys, values = _snapshot(cache)
    lent, _ = cache.lend(len(cache), len(new_ids), int(cache.positions[-1]) + 1)
    prefill(tiny_model.decoder, lent, new_ids)
    assert lent.keys[0] is cache.past()[0][0].base  # the rows went into the cache's own buffers
    assert lent.length == len(doc) + len(new_ids) and len(cache) == len(doc) and cache.ids.tolist() == doc
    _assert_rows_equal(cache.past()[0], keys)
    _assert_rows_equal(cache.past()[1], values)


def test_a_lent_prefill_equals_encoding_ids_and_tail_from_scratch(tiny_model, doc, new_ids):
    cache = _cache(tiny_model, doc)
    _, logits = fresh_prefill(tiny_model, doc + new_ids)
    np.testing.assert_array_equal(logits_after(tiny_model.decoder, cache, new_ids), logits)


def test_hidden_rows_are_not_attended(tiny_model, doc, new_ids):
    """A decode that hides the rows after a prefix sees exactly that prefix."""
    cache = _cache(tiny_model, doc)
    lent, _ = cache.lend(100, len(new_ids), 100)
    _, expected = fresh_prefill(tiny_model, doc[:100] + new_ids)
    np.testing.assert_allclose(prefill(tiny_model.decoder, lent, new_ids), expected, rtol=0, atol=1e-4)


def test_the_logits_of_an_edits_last_row_are_kept_without_a_forward(tiny_model, doc, new_ids):
    recorder = RecordingDecoder(tiny_model.decoder)
    cache = BufferCache(recorder)
    cache.encode(doc)
    cache.apply_splice(len(doc), len(doc), new_ids)
    recorder.calls.clear()
    kept, computed = cache.logits_at(len(cache) - 1)
    assert recorder.calls == [] and not computed
    _, expected = fresh_prefill(tiny_model, doc + new_ids)
    np.testing.assert_array_equal(kept, expected)
    earlier, computed = cache.logits_at(50)  # no forward left these: one row is re-encoded
    assert computed and len(recorder.calls) == 1
    np.testing.assert_array_equal(earlier, fresh_prefill(tiny_model, doc[:51])[1])


def test_an_edit_voids_the_kept_logits_of_the_rows_it_changes(tiny_model, doc, new_ids):
    cache = _cache(tiny_model, doc)
    cache.logits_at(40)
    cache.logits_at(80)
    cache.apply_splice(60, 60, new_ids[:1])
    assert not cache.logits_at(40)[1]  # before the edit: still valid
    assert cache.logits_at(80)[1]


def test_apply_takes_a_token_splice_object(tiny_model, doc, new_ids):
    cache = _cache(tiny_model, doc)
    stats = cache.apply(SimpleNamespace(start=100, stop=110, ids=new_ids))
    assert cache.ids.tolist() == doc[:100] + new_ids + doc[110:] and stats.rotated == len(doc) - 110


@pytest.mark.parametrize("splice", [(5, 4, []), (0, DOC_TOKENS + 1, []), (-1, 0, [])])
def test_splice_outside_the_rows_is_rejected(tiny_model, doc, splice):
    cache = _cache(tiny_model, doc)
    with pytest.raises(ValueError):
        cache.apply_splice(*splice)


def test_unknown_mode_is_rejected(tiny_model, doc):
    with pytest.raises(ValueError):
        _cache(tiny_model, doc).apply_splice(0, 0, [1], mode="lazy")


def test_empty_splice_changes_nothing(tiny_model, doc):
    cache = _cache(tiny_model, doc)
    keys, _ = cache.past()
    stats = cache.apply_splice(100, 100, [])
    _assert_rows_equal(cache.past()[0], keys)
    assert not cache.stale.any() and stats.encoded == stats.rotated == 0
