"""Quantization schemes: every weight matrix, projections and lm_head alike, gets the scheme's bits and block."""

from __future__ import annotations

import gguf
import onnx
import pytest

from inference.config import ModelConfig, config_from_gguf
from inference.graph import build_graph
from inference.quantize import QUANTIZATIONS, quantize_model
from inference.weights import load_weights


def _graph(path) -> tuple[ModelConfig, onnx.ModelProto]:
    reader = gguf.GGUFReader(path)
    config = config_from_gguf(reader)
    weights = load_weights(reader, config)
    return config, build_graph(config, weights.embedding, weights.layers, weights.final_norm, weights.lm_head)


@pytest.mark.parametrize("name", sorted(QUANTIZATIONS))
def test_every_weight_matmul_is_quantized_as_the_scheme_says(tiny_gguf, name):
    scheme = QUANTIZATIONS[name]
    config, model = _graph(tiny_gguf)
    model = quantize_model(model, scheme)
    weights = {init.name for init in model.graph.initializer}
    left = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights]
    quantized = {n.name: {a.name: a.i for a in n.attribute if a.name in ("bits", "block_size")}
                 for n in model.graph.node if n.op_type == "MatMulNBits"}
    if scheme.bits is None:
        assert not quantized and "lm_head" in left
        return
    assert not left  # no fp32 weight matrix is left behind
    assert len(quantized) == 4 * config.n_layers + 1  # qkv, o, gate_up and down per layer, and the lm_head
    assert all(attrs == {"bits": scheme.bits, "block_size": scheme.block_size} for attrs in quantized.values())
