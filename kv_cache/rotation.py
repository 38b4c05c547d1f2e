"""PIE re-rotation: move cached keys to new RoPE positions without running the model.

Why it is exact: RoPE turns each pair (r, r + d/2) of a key by the angle p·inv_freq[r], and rotations of a
plane compose by adding angles, R(a)·R(b) = R(a + b). A key stored at position p therefore becomes the key
at position p + Δ after one more rotation by Δ, whatever p was; values carry no position and stay as they
are. The angle Δ·inv_freq is computed in float64 and only cos/sin are cast to float32, so a large |Δ| costs
no accuracy (a float32 angle would be off by ~|Δ|·6e-8 rad).

Drift: rotating fp32 keys in place rounds them once per rotation, and the errors add up like a random walk.
Measured on the tiny test model's keys (tests/test_buffer_cache.py): after 1,000 successive random
rotations in place (|Δ| ≤ 500), they differ from one float64 rotation by the total Δ by 2-3e-6 of their
largest magnitude (fp32 and int8 models). That is far below the int8 model's own noise, so keys can be
rotated in place on every edit.
"""

from __future__ import annotations

import numpy as np

from inference.rope import apply_rope, inverse_frequencies


def rotation_cos_sin(delta: int | np.ndarray, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """float32 cos/sin tables for a shift by `delta` ([head_dim], or [n, head_dim] for per-row deltas [n])."""
    inv_freq = inverse_frequencies(head_dim, theta).astype(np.float64)  # the graph's float32 frequencies
    angles = np.asarray(delta, dtype=np.float64)[..., None] * inv_freq
    angles = np.concatenate([angles, angles], axis=-1)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def rerotate_keys(keys: np.ndarray, delta: int | np.ndarray, head_dim: int, theta: float, *,
                  in_place: bool = False) -> np.ndarray:
    """Keys [kv_heads, n, head_dim] (after RoPE) moved by `delta` positions: an int, or one int per row [n].

    Delta may be negative. With `in_place`, `keys` (for example a view into a cache buffer) is overwritten
    and returned; otherwise a new array is returned.
    """
    if keys.shape[-1] != head_dim:
        raise ValueError(f"keys have head_dim {keys.shape[-1]}, expected {head_dim}")
    cos, sin = rotation_cos_sin(delta, head_dim, theta)  # broadcast over kv heads
    rotated = apply_rope(keys, cos, sin)
    if not in_place:
        return rotated
    keys[...] = rotated
    return keys
