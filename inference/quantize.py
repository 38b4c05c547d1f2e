"""Weight-only quantization schemes for the decoder's matrix multiplications (ONNX Runtime MatMulNBits)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import onnx


@dataclass(frozen=True)
class Quantization:
    """A named scheme; `bits=None` keeps fp32 weights."""

    name: str
    bits: int | None
    block_size: int = 32
    accuracy_level: int = 4  # MatMulNBits compute type: 4 = int8 activations
    description: str = ""

    @property
    def blocked_embedding(self) -> bool:
        """Whether the embedding table is kept as int8 blocks (see BlockedEmbedding) rather than fp32."""
        return self.bits is not None


EMBEDDING_BLOCK = 32


@dataclass(frozen=True)
class BlockedEmbedding:
    """The embedding table as int8 codes times one fp32 scale per block of 32: a quarter of the fp32 table.

    A Gather reads only the rows of the tokens at hand, but the pages around them come in too, so an fp32
    table (544 MB for Qwen2.5-Coder's 152k tokens) ends up resident once a few thousand distinct tokens were
    seen. GGUF types Q4_0, Q5_0 and Q8_0 store exactly this (a scale and small integers per block of 32), so
    from their scales the blocks are lossless: the graph's embeddings are bit-identical to the fp32 table's.
    """

    codes: np.ndarray  # int8 [vocab, d / 32, 32]
    scales: np.ndarray  # float32 [vocab, d / 32, 1]

    @classmethod
    def from_table(cls, table: np.ndarray, scales: np.ndarray | None = None) -> BlockedEmbedding:
        """`table` [vocab, d] in blocks of 32 along d; `scales` [vocab, d / 32] are the GGUF's own when every
        value is a scale times an int8 (then exact), else each block's largest magnitude over 127 is used."""
        vocab, dim = table.shape
        blocks = table.reshape(vocab, dim // EMBEDDING_BLOCK, EMBEDDING_BLOCK)
        if scales is not None:
            scales = scales.astype(np.float32)[..., None]
            codes = _codes(blocks, scales)
            if np.abs(codes).max() <= 127 and np.array_equal(codes * scales, blocks):
                return cls(codes.astype(np.int8), scales)
        scales = (np.abs(blocks).max(axis=-1) / 127).astype(np.float32)[..., None]
        return cls(np.clip(_codes(blocks, scales), -128, 127).astype(np.int8), scales)


def _codes(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """The nearest integers to blocks / scales (0 where a block's scale is 0)."""
    return np.rint(blocks / np.where(scales == 0, 1, scales))


# Changing a scheme changes the converted model: bump CONVERTER_VERSION (inference/converted.py) with it.
# Measured on Qwen2.5-Coder-0.5B, 2-core Xeon with AVX-512 VNNI, ORT 1.31 (figures in the README):
# - accuracy level 4 = int8 activations; level 0 (fp32 activations) has no fast 8-bit kernel (100x slower).
# - Only some block sizes keep the graph bit-identical however a sequence is chunked: for a single row, 8-bit
#   blocks of 128 and 4-bit blocks of 64 or more run another kernel whose sums differ (logits off by up to 0.8
#   one token at a time). 8-bit blocks of 32 or 64 and 4-bit blocks of 32 are exact.
# - Against fp32 on real code, int4 costs +5 to +7% perplexity and 90% top-1 agreement (int8: +0.1%, 98.6%):
#   the GGUF's weights are mostly 5-bit (Q5_0) and 4 bits lose one. An int8 lm_head with int4 layers, or int4
#   only in the lm_head (+1.7%, 94%) or only in gate_up (+2%, 93-95%), are in between in speed and quality.
QUANTIZATIONS: dict[str, Quantization] = {
    q.name: q
    for q in (
        Quantization("fp32", None, description="fp32 weights: the reference"),
        Quantization("q8", 8, 32, 4, "8-bit weights (block 32), int8 compute: the default"),
        Quantization("q4", 4, 32, 4, "4-bit weights (block 32), int8 compute: faster, lower quality"),
    )
}
DEFAULT_QUANTIZATION = "q8"


def get_quantization(name: str) -> Quantization:
    try:
        return QUANTIZATIONS[name]
    except KeyError:
        raise ValueError(f"unknown quantization {name!r} (known: {', '.join(QUANTIZATIONS)})") from None


def quantize_model(model: onnx.ModelProto, scheme: Quantization) -> onnx.ModelProto:
    """Replace every MatMul with a constant weight (projections and lm_head) by MatMulNBits."""
    if scheme.bits is None:
        return model
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    quantizer = MatMulNBitsQuantizer(
        model,
        bits=scheme.bits,
        block_size=scheme.block_size,
        is_symmetric=False,
        accuracy_level=scheme.accuracy_level,
        op_types_to_quantize=("MatMul",),
    )
    quantizer.process()
    return quantizer.model.model
