"""K/V rows as int8 symbols with one scale per token: how saved files (persist.py) and idle caches in memory
("int8" idle rows, buffer_cache.py) hold them in a quarter of fp32's bytes.

A token's scale is the largest magnitude of its row over all kv heads of one layer, so a symbol times
scale / levels is within half a step of the value it stands for.
"""

from __future__ import annotations

import numpy as np

FLOAT16_SAFE = 60000.0  # larger scales are kept as float32


def token_scales(rows: np.ndarray) -> np.ndarray:
    """Per-token scale [n] of rows [kv, n, hd], as float16 rounded up so every |x| / scale stays ≤ 1."""
    amax = np.abs(rows).max(axis=(0, 2)).astype(np.float32)
    dtype = np.float16 if amax.max(initial=0) < FLOAT16_SAFE else np.float32
    scales = amax.astype(dtype)
    low = scales.astype(np.float32) < amax
    scales[low] = np.nextafter(scales[low], dtype(np.inf))
    return scales


def quantize_rows(rows: np.ndarray, scales: np.ndarray, levels: int) -> np.ndarray:
    """Symbols [kv * hd, n] int8 in [-levels, levels] for rows [kv, n, hd] and per-token scales [n]."""
    channels = rows.transpose(0, 2, 1).reshape(-1, rows.shape[1])  # [kv * hd, n]
    safe = np.where(scales > 0, scales, 1).astype(np.float32)
    return np.clip(np.rint(channels * (levels / safe)), -levels, levels).astype(np.int8)


def dequantize_rows(symbols: np.ndarray, scales: np.ndarray, levels: int, shape: tuple[int, int]) -> np.ndarray:
    """Rows [kv, n, hd] float32 back from symbols [kv * hd, n] and scales [n]; `shape` is (kv, hd)."""
    n = symbols.shape[1]
    channels = symbols.astype(np.float32) * (scales.astype(np.float32) / levels)  # [kv * hd, n]
    return np.ascontiguousarray(channels.reshape(*shape, n).transpose(0, 2, 1))
