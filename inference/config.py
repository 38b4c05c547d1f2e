"""Hyper-parameters of a decoder-only transformer, read from GGUF metadata."""

from __future__ import annotations

from dataclasses import dataclass

import gguf

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")


class UnsupportedModel(ValueError):
    """The GGUF file describes a model this converter cannot build."""


@dataclass(frozen=True)
class ModelConfig:
    """Everything the graph builder and the numpy reference need to agree on."""

    architecture: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_ffn: int
    vocab_size: int
    rope_theta: float
    rms_eps: float
    context_length: int
    qkv_bias: bool
    tied_embeddings: bool

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def group_size(self) -> int:
        """Query heads that share one key/value head (grouped-query attention)."""
        return self.n_heads // self.n_kv_heads

    def kv_bytes_per_token(self, itemsize: int = 4) -> int:
        """Bytes one token occupies in the KV cache across all layers (keys and values)."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * itemsize


def _field(reader: gguf.GGUFReader, key: str, default: object = None) -> object:
    field = reader.fields.get(key)
    if field is None:
        if default is None:
            raise UnsupportedModel(f"GGUF metadata lacks {key!r}")
        return default
    return field.contents()


def config_from_gguf(reader: gguf.GGUFReader) -> ModelConfig:
    """Read the hyper-parameters; refuse architectures and RoPE variants we cannot rotate exactly."""
    arch = str(_field(reader, "general.architecture"))
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModel(
            f"unsupported GGUF architecture {arch!r} (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    scaling = reader.fields.get(f"{arch}.rope.scaling.type")
    if scaling is not None and scaling.contents() not in ("none",):
        raise UnsupportedModel(f"RoPE scaling {scaling.contents()!r} is not supported")
    names = {t.name for t in reader.tensors}
    n_heads = int(_field(reader, f"{arch}.attention.head_count"))
    d_model = int(_field(reader, f"{arch}.embedding_length"))
    rope_dims = int(_field(reader, f"{arch}.rope.dimension_count", d_model // n_heads))
    if rope_dims != d_model // n_heads:
        raise UnsupportedModel("partial rotary embeddings are not supported")
    vocab = len(reader.fields["tokenizer.ggml.tokens"].data) if "tokenizer.ggml.tokens" in reader.fields else None
    if vocab is None:
        raise UnsupportedModel("GGUF file has no tokenizer vocabulary")
    return ModelConfig(
        architecture=arch,
        n_layers=int(_field(reader, f"{arch}.block_count")),
        d_model=d_model,
        n_heads=n_heads,
        n_kv_heads=int(_field(reader, f"{arch}.attention.head_count_kv", n_heads)),
        d_ffn=int(_field(reader, f"{arch}.feed_forward_length")),
        vocab_size=vocab,
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        rms_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon")),
        context_length=int(_field(reader, f"{arch}.context_length", 4096)),
        qkv_bias="blk.0.attn_q.bias" in names,
        tied_embeddings="output.weight" not in names,
    )
