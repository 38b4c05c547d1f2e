"""A pure-numpy forward pass with the graph's exact interface, used by tests to check the ONNX graph."""

from __future__ import annotations

import numpy as np

from inference.config import ModelConfig
from inference.rope import apply_rope, cos_sin
from inference.weights import ModelWeights


def _rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def reference_forward(
    weights: ModelWeights,
    config: ModelConfig,
    ids: np.ndarray,  # [seq, mix]
    mix_weights: np.ndarray,  # [seq, mix]
    positions: np.ndarray,  # [seq]
    bias: np.ndarray,  # [seq, past + seq], additive
    past_keys: list[np.ndarray],  # per layer [kv_heads, past, head_dim]
    past_values: list[np.ndarray],
    logits_index: np.ndarray,  # [n]
) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """Returns (logits [n, vocab], new keys, new values per layer [kv_heads, seq, head_dim]), in float64 math."""
    hd, kvh, g = config.head_dim, config.n_kv_heads, config.group_size
    seq = ids.shape[0]
    x = (weights.embedding[ids].astype(np.float64) * mix_weights[..., None]).sum(axis=1)  # [seq, d]
    cos, sin = cos_sin(positions, hd, config.rope_theta)  # [seq, hd]
    new_keys, new_values = [], []
    for layer, past_k, past_v in zip(weights.layers, past_keys, past_values):
        h = _rms_norm(x, layer.attn_norm, config.rms_eps)
        q, k, v = h @ layer.wq, h @ layer.wk, h @ layer.wv
        if layer.bq is not None:
            q, k, v = q + layer.bq, k + layer.bk, v + layer.bv
        q = apply_rope(q.reshape(seq, config.n_heads, hd).transpose(1, 0, 2), cos, sin)  # [heads, seq, hd]
        k = apply_rope(k.reshape(seq, kvh, hd).transpose(1, 0, 2), cos, sin)  # [kv, seq, hd]
        v = v.reshape(seq, kvh, hd).transpose(1, 0, 2)
        new_keys.append(k.astype(np.float32))
        new_values.append(v.astype(np.float32))
        keys = np.concatenate([past_k, k], axis=1)  # [kv, past+seq, hd]
        values = np.concatenate([past_v, v], axis=1)
        keys, values = np.repeat(keys, g, axis=0), np.repeat(values, g, axis=0)
        scores = q @ keys.transpose(0, 2, 1) / np.sqrt(hd) + bias[None]
        attn = (_softmax(scores) @ values).transpose(1, 0, 2).reshape(seq, -1)
        x = x + attn @ layer.wo
        h = _rms_norm(x, layer.ffn_norm, config.rms_eps)
        gate = h @ layer.w_gate
        x = x + (gate / (1.0 + np.exp(-gate)) * (h @ layer.w_up)) @ layer.w_down
    x = _rms_norm(x[logits_index], weights.final_norm, config.rms_eps)
    return (x @ weights.lm_head).astype(np.float32), new_keys, new_values
