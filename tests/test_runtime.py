"""The decoder's forward reads a preallocated cache's row slices in place and answers as for contiguous rows."""

from __future__ import annotations

import numpy as np

from inference.model_store import LoadedModel
from inference.runtime import _head_rows


def _buffers(model: LoadedModel, rows: int, capacity: int, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per-layer [kv, capacity, hd] buffers whose first `rows` rows are random and the rest NaN."""
    cfg, rng = model.config, np.random.default_rng(seed)

    def one() -> np.ndarray:
        buf = np.full((cfg.n_kv_heads, capacity, cfg.head_dim), np.nan, np.float32)
        buf[:, :rows] = rng.standard_normal((cfg.n_kv_heads, rows, cfg.head_dim))
        return buf

    return [one() for _ in range(cfg.n_layers)], [one() for _ in range(cfg.n_layers)]


def test_a_row_slice_of_a_buffer_is_fed_without_a_copy(tiny_model):
    keys, _ = _buffers(tiny_model, 10, 64)
    view = keys[0][:, :10]  # [kv, 10, hd], not contiguous across heads
    assert not view.flags.c_contiguous
    for head in range(view.shape[0]):
        fed = _head_rows(view, head)
        assert fed.shape == (1, 1, 10, tiny_model.config.head_dim)
        assert fed.flags.c_contiguous and np.shares_memory(fed, keys[0])


def test_row_slices_give_the_same_step_as_contiguous_rows(tiny_model):
    """Views of rows [0, P) of larger buffers (the rows after P are NaN, so reading them would show)."""
    past, seq = 12, 3
    keys, values = _buffers(tiny_model, past, 64)
    ids, positions = np.array([5, 9, 17]), np.arange(past, past + seq)
    sliced = tiny_model.decoder.forward(ids, positions, [k[:, :past] for k in keys], [v[:, :past] for v in values],
                                        logits_index=np.arange(seq))
    copied = tiny_model.decoder.forward(ids, positions, [k[:, :past].copy() for k in keys],
                                        [v[:, :past].copy() for v in values], logits_index=np.arange(seq))
    assert np.isfinite(sliced.logits).all()
    assert np.array_equal(sliced.logits, copied.logits)
    assert all(np.array_equal(a, b) for a, b in zip(sliced.keys + sliced.values, copied.keys + copied.values))
    assert sliced.keys[0].shape == (tiny_model.config.n_kv_heads, seq, tiny_model.config.head_dim)
