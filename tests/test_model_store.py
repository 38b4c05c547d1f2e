"""Converted models are cached by converter version: a change to the graph or to a scheme must come with a new one."""

from __future__ import annotations

import dataclasses
import hashlib

import gguf
from onnx import helper, numpy_helper

from inference.config import config_from_gguf
from inference.convert import graph_embedding
from inference.converted import CONVERTER_VERSION, converted_dir
from inference.graph import build_graph
from inference.quantize import QUANTIZATIONS, get_quantization
from inference.weights import load_weights

# CONVERTER_VERSION -> fingerprint of what it converts to (see _conversion_fingerprint)
FINGERPRINTS = {"5": "b426a156ae69d849"}


def _conversion_fingerprint(path) -> str:
    """The tiny model's graph (nodes, inputs, outputs, small constants such as shapes; not the weights) and
    every registered scheme's parameters."""
    reader = gguf.GGUFReader(path)
    config = config_from_gguf(reader)
    w = load_weights(reader, config)
    digest = hashlib.sha256()
    for scheme in QUANTIZATIONS.values():
        fields = dataclasses.asdict(scheme)
        fields.pop("description")
        digest.update(repr(sorted(fields.items())).encode())
        embedding = graph_embedding(reader, scheme, w.embedding)
        _graph_fingerprint(digest, build_graph(config, embedding, w.layers, w.final_norm, w.lm_head).graph)
    return digest.hexdigest()[:16]


def _graph_fingerprint(digest, graph) -> None:
    for node in graph.node:
        attributes = sorted((a.name, repr(helper.get_attribute_value(a))) for a in node.attribute)
        digest.update(repr((node.op_type, list(node.input), list(node.output), attributes)).encode())
    for value in [*graph.input, *graph.output]:
        dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
        digest.update(repr((value.name, value.type.tensor_type.elem_type, dims)).encode())
    for init in graph.initializer:
        if len(init.dims) <= 1 and numpy_helper.to_array(init).size <= 8:
            digest.update(init.name.encode() + numpy_helper.to_array(init).tobytes())
        digest.update(repr((init.name, init.data_type, list(init.dims))).encode())


def test_a_conversion_change_comes_with_a_new_converter_version(tiny_gguf):
    """Otherwise the model cache would keep serving models converted the old way."""
    assert FINGERPRINTS.get(CONVERTER_VERSION) == _conversion_fingerprint(tiny_gguf), (
        "the graph or a quantization scheme changed: bump CONVERTER_VERSION in inference/converted.py and record "
        f"{_conversion_fingerprint(tiny_gguf)!r} for it in FINGERPRINTS")


def test_the_cache_directory_names_the_converter_version_and_scheme(tmp_path):
    path = converted_dir(tmp_path, "ab" * 32, get_quantization("q8"))
    assert path.name == f"{'ab' * 8}-v{CONVERTER_VERSION}-q8"
