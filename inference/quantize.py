"""Weight-only quantization schemes for the decoder's matrix multiplications (ONNX Runtime MatMulNBits)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import onnx


@dataclass(frozen=True)
class Quantization:
    """A named scheme; `bits=None` keeps fp32 weights."""

    name: str
    bits: int | None
    block_size: int = 32
    accuracy_level: int = 4  # MatMulNBits compute type: 4 = int8 activations
    description: str = ""


QUANTIZATIONS: dict[str, Quantization] = {
    q.name: q
    for q in (
        Quantization("fp32", None, description="fp32 weights: the reference"),
        # accuracy level 4 = int8 activations on VNNI; level 0 measured 100x slower per decode step
        # (ORT 1.31 has no fast fp32-activation kernel for 8-bit weights). Chunk invariance holds
        # because the graph's attention is one MatMul over Concat(past, new) (tests prove it).
        Quantization("q8", 8, 32, 4, "8-bit weights (block 32), int8 compute: the default"),
        Quantization("q4", 4, 32, 4, "4-bit weights (block 32), int8 compute: smaller, lower quality"),
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
