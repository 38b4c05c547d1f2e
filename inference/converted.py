"""Where a converted model lives and what its directory holds: importable without the converter's libraries
(the LSP process looks for a converted model before the engine loads it)."""

from __future__ import annotations

from pathlib import Path

from inference.quantize import Quantization

CONVERTER_VERSION = "5"  # 5: the embedding table in int8 blocks (inference/quantize.py BlockedEmbedding)
MODEL_FILE = "model.onnx"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"


def converted_dir(cache: Path, gguf_sha256: str, scheme: Quantization) -> Path:
    return cache / "converted" / f"{gguf_sha256[:16]}-v{CONVERTER_VERSION}-{scheme.name}"
