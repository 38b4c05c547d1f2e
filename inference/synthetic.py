"""A tiny random-weight model written as a real GGUF file, so tests run the whole converter in seconds."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
from gguf.constants import GGMLQuantizationType
from gguf.quants import quantize

from inference.tokenizer import tokenizer_metadata, train_tiny_vocab

TINY_LAYERS, TINY_D, TINY_HEADS, TINY_KV_HEADS, TINY_FFN, TINY_VOCAB = 2, 64, 4, 2, 128, 512


def write_tiny_gguf(path: Path, training_texts: list[str], *, architecture: str = "qwen2", seed: int = 0,
                    embedding_type: GGMLQuantizationType = GGMLQuantizationType.F32) -> Path:
    """A qwen2 (with q/k/v biases, untied head) or llama (tied embeddings) model in F32 tensors, but for the
    embedding table, stored as `embedding_type` (the default model's GGUF has a Q5_0 one).

    The vocabulary is trained on `training_texts`, which the caller passes so that the same files give the
    same model on every machine (the tests use their fixtures, not the host's standard library)."""
    rng = np.random.default_rng(seed)
    tokens, token_types, merges = train_tiny_vocab(training_texts, vocab_size=TINY_VOCAB)
    ids = {t: i for i, t in enumerate(tokens)}
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name("superpie-tiny")
    writer.add_block_count(TINY_LAYERS)
    writer.add_context_length(4096)
    writer.add_embedding_length(TINY_D)
    writer.add_feed_forward_length(TINY_FFN)
    writer.add_head_count(TINY_HEADS)
    writer.add_head_count_kv(TINY_KV_HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    specials = {"eos": ids["<|endoftext|>"], "bos": ids["<|endoftext|>"], "pad": ids["<|endoftext|>"]}
    for key, value in tokenizer_metadata(tokens, token_types, merges, "qwen2", specials).items():
        writer.add_key_value(key, value.value, value.type, value.sub_type)

    def tensor(name: str, *shape: int, scale: float = 0.2) -> None:  # shape is [out, in], numpy order
        writer.add_tensor(name, (rng.standard_normal(shape) * scale).astype(np.float32))

    vocab, d, hd = len(tokens), TINY_D, TINY_D // TINY_HEADS
    table = rng.standard_normal((vocab, d)).astype(np.float32)
    if embedding_type == GGMLQuantizationType.F32:
        writer.add_tensor("token_embd.weight", table)
    else:
        writer.add_tensor("token_embd.weight", quantize(table, embedding_type), raw_dtype=embedding_type)
    for i in range(TINY_LAYERS):
        p = f"blk.{i}."
        writer.add_tensor(p + "attn_norm.weight", (1 + 0.1 * rng.standard_normal(d)).astype(np.float32))
        writer.add_tensor(p + "ffn_norm.weight", (1 + 0.1 * rng.standard_normal(d)).astype(np.float32))
        tensor(p + "attn_q.weight", TINY_HEADS * hd, d)
        tensor(p + "attn_k.weight", TINY_KV_HEADS * hd, d)
        tensor(p + "attn_v.weight", TINY_KV_HEADS * hd, d)
        tensor(p + "attn_output.weight", d, TINY_HEADS * hd)
        if architecture == "qwen2":
            tensor(p + "attn_q.bias", TINY_HEADS * hd)
            tensor(p + "attn_k.bias", TINY_KV_HEADS * hd)
            tensor(p + "attn_v.bias", TINY_KV_HEADS * hd)
        tensor(p + "ffn_gate.weight", TINY_FFN, d)
        tensor(p + "ffn_up.weight", TINY_FFN, d)
        tensor(p + "ffn_down.weight", d, TINY_FFN)
    writer.add_tensor("output_norm.weight", np.ones(d, dtype=np.float32))
    if architecture == "qwen2":
        tensor("output.weight", vocab, d)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
