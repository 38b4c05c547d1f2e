"""Dequantized fp32 weights from a GGUF file, in the layout the graph and the reference use."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import gguf
import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from inference.config import ModelConfig, UnsupportedModel


@dataclass
class LayerWeights:
    """One transformer block. Matrices are [in, out] so that `x @ w` is the projection."""

    attn_norm: np.ndarray  # [d]
    wq: np.ndarray  # [d, heads*hd]
    wk: np.ndarray  # [d, kv_heads*hd]
    wv: np.ndarray  # [d, kv_heads*hd]
    wo: np.ndarray  # [heads*hd, d]
    bq: np.ndarray | None
    bk: np.ndarray | None
    bv: np.ndarray | None
    ffn_norm: np.ndarray  # [d]
    w_gate: np.ndarray  # [d, ffn]
    w_up: np.ndarray  # [d, ffn]
    w_down: np.ndarray  # [ffn, d]


@dataclass
class ModelWeights:
    embedding: np.ndarray  # [vocab, d]
    layers: list[LayerWeights]
    final_norm: np.ndarray  # [d]
    lm_head: np.ndarray  # [d, vocab]


def _unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's row permutation of Q/K (made for its interleaved RoPE) to get rotate-half order.

    w is [out, in]; within each head llama.cpp stores rows as (pair, half) instead of (half, pair).
    """
    out, inp = w.shape
    head_dim = out // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


class _TensorSource:
    def __init__(self, reader: gguf.GGUFReader) -> None:
        self._tensors = {t.name: t for t in reader.tensors}

    def get(self, name: str) -> np.ndarray:
        tensor = self._tensors.get(name)
        if tensor is None:
            raise UnsupportedModel(f"GGUF file lacks tensor {name!r}")
        array = dequantize(tensor.data, tensor.tensor_type)
        return np.ascontiguousarray(array, dtype=np.float32)

    def maybe(self, name: str) -> np.ndarray | None:
        return self.get(name) if name in self._tensors else None


def iter_layers(reader: gguf.GGUFReader, config: ModelConfig) -> Iterator[LayerWeights]:
    """Yield one block at a time so the converter never holds two copies of the whole model."""
    src = _TensorSource(reader)
    for i in range(config.n_layers):
        p = f"blk.{i}."
        wq, wk = src.get(p + "attn_q.weight"), src.get(p + "attn_k.weight")
        if config.architecture == "llama":
            wq = _unpermute_rope_rows(wq, config.n_heads)
            wk = _unpermute_rope_rows(wk, config.n_kv_heads)
        yield LayerWeights(
            attn_norm=src.get(p + "attn_norm.weight"),
            wq=np.ascontiguousarray(wq.T),
            wk=np.ascontiguousarray(wk.T),
            wv=np.ascontiguousarray(src.get(p + "attn_v.weight").T),
            wo=np.ascontiguousarray(src.get(p + "attn_output.weight").T),
            bq=src.maybe(p + "attn_q.bias"),
            bk=src.maybe(p + "attn_k.bias"),
            bv=src.maybe(p + "attn_v.bias"),
            ffn_norm=src.get(p + "ffn_norm.weight"),
            w_gate=np.ascontiguousarray(src.get(p + "ffn_gate.weight").T),
            w_up=np.ascontiguousarray(src.get(p + "ffn_up.weight").T),
            w_down=np.ascontiguousarray(src.get(p + "ffn_down.weight").T),
        )


def embedding(reader: gguf.GGUFReader) -> np.ndarray:
    return _TensorSource(reader).get("token_embd.weight")


# GGUF types whose blocks of 32 are a 16-bit scale d followed by small integers q, each value d * q
_SCALED_INTEGER_BLOCKS = (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q5_0, GGMLQuantizationType.Q8_0)


def embedding_block_scales(reader: gguf.GGUFReader) -> np.ndarray | None:
    """The scale d of every block of 32 of the embedding table [vocab, d / 32] when the GGUF stores it as
    d * (an integer in [-128, 127]); None for other types."""
    tensor = next(t for t in reader.tensors if t.name == "token_embd.weight")
    if tensor.tensor_type not in _SCALED_INTEGER_BLOCKS:
        return None
    block_bytes = GGML_QUANT_SIZES[tensor.tensor_type][1]
    raw = np.ascontiguousarray(tensor.data, dtype=np.uint8).reshape(-1, block_bytes)
    return raw[:, :2].copy().view(np.float16).astype(np.float32).reshape(int(tensor.shape[1]), -1)


def head(reader: gguf.GGUFReader, config: ModelConfig, embedding_matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(final_norm, lm_head [d, vocab]); tied models reuse the embedding matrix."""
    src = _TensorSource(reader)
    out = embedding_matrix if config.tied_embeddings else src.get("output.weight")
    return src.get("output_norm.weight"), np.ascontiguousarray(out.T)


def load_weights(reader: gguf.GGUFReader, config: ModelConfig) -> ModelWeights:
    """All weights at once (for the numpy reference and small models)."""
    emb = embedding(reader)
    final_norm, lm_head = head(reader, config, emb)
    return ModelWeights(emb, list(iter_layers(reader, config)), final_norm, lm_head)
