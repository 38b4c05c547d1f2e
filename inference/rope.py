"""Rotary position embedding, rotate-half convention; shared by the graph, the reference and PIE."""

from __future__ import annotations

import numpy as np


def inverse_frequencies(head_dim: int, theta: float) -> np.ndarray:
    """inv_freq[r] = theta^(-2r/d), r < d/2, in float32 as the graph uses it."""
    return (1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)).astype(np.float32)


def cos_sin(positions: np.ndarray, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin tables [..., head_dim] for integer (possibly negative) positions; both halves share frequencies."""
    angles = positions.astype(np.float32)[..., None] * inverse_frequencies(head_dim, theta)
    angles = np.concatenate([angles, angles], axis=-1)
    return np.cos(angles), np.sin(angles)


def rotate_half(x: np.ndarray) -> np.ndarray:
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x: [..., tokens, head_dim]; cos/sin broadcast against it."""
    return x * cos + rotate_half(x) * sin
