"""Quantization schemes: every weight matrix, projections and lm_head alike, gets the scheme's bits and block."""

from __future__ import annotations

import gguf
import onnx
import pytest

import numpy as np
from gguf.constants import GGMLQuantizationType

from inference.config import ModelConfig, config_from_gguf
from inference.convert import graph_embedding
from inference.graph import build_graph
from inference.quantize import QUANTIZATIONS, BlockedEmbedding, quantize_model
from inference.runtime import Decoder
from inference.synthetic import write_tiny_gguf
from inference.weights import load_weights
from tests.decoding import empty_past
from tests.fixtures import vocab_texts


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


def _logits(config: ModelConfig, model: onnx.ModelProto, path, ids: np.ndarray) -> np.ndarray:
    onnx.save_model(model, str(path))
    decoder = Decoder(path, config)
    return decoder.forward(ids, np.arange(len(ids)), *empty_past(decoder), logits_index=np.arange(len(ids))).logits


@pytest.mark.parametrize("stored", ["Q8_0", "Q5_0", "Q4_0"])
def test_an_embedding_stored_in_scaled_integer_blocks_is_kept_as_them_losslessly(tmp_path, stored):
    """The default model's GGUF stores its embedding table as Q5_0: int8 blocks from its own scales give the graph
    the same embeddings bit for bit, in a quarter of the fp32 table's bytes."""
    path = write_tiny_gguf(tmp_path / "tiny.gguf", vocab_texts(), embedding_type=GGMLQuantizationType[stored])
    reader = gguf.GGUFReader(path)
    config = config_from_gguf(reader)
    w = load_weights(reader, config)
    blocks = graph_embedding(reader, QUANTIZATIONS["q8"], w.embedding)
    assert isinstance(blocks, BlockedEmbedding) and blocks.codes.dtype == np.int8
    assert blocks.codes.nbytes + blocks.scales.nbytes < 0.3 * w.embedding.nbytes
    ids = np.random.default_rng(0).integers(0, config.vocab_size, 24)
    graphs = {name: build_graph(config, table, w.layers, w.final_norm, w.lm_head)
              for name, table in (("fp32", w.embedding), ("blocks", blocks))}
    fp32, blocked = (_logits(config, graphs[name], tmp_path / f"{name}.onnx", ids) for name in ("fp32", "blocks"))
    np.testing.assert_array_equal(blocked, fp32)


def test_an_fp32_embedding_gets_blocks_within_half_a_step(tiny_gguf):
    """Without scales from the GGUF, each block's largest magnitude over 127 is its step: no value moves by more
    than half of it. The fp32 scheme keeps the table as it is."""
    reader = gguf.GGUFReader(tiny_gguf)
    table = load_weights(reader, config_from_gguf(reader)).embedding
    assert graph_embedding(reader, QUANTIZATIONS["fp32"], table) is table
    blocks = graph_embedding(reader, QUANTIZATIONS["q8"], table)
    back = (blocks.codes * blocks.scales).reshape(table.shape)
    steps = np.repeat(blocks.scales[..., 0], 32, axis=1)
    assert np.all(np.abs(back - table) <= steps / 2 * (1 + 1e-6))
    assert np.abs(blocks.codes).max() == 127
