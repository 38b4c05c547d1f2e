"""GGUF -> ONNX conversion, cached by GGUF hash, converter version and quantization."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import gguf
import numpy as np
import onnx
from tqdm import tqdm

from inference.config import ModelConfig, config_from_gguf
from inference.converted import CONFIG_FILE, CONVERTER_VERSION, MODEL_FILE, TOKENIZER_FILE
from inference.graph import build_graph
from inference.quantize import EMBEDDING_BLOCK, BlockedEmbedding, Quantization, quantize_model
from inference.tokenizer import gguf_tokenizer_fields, tokenizer_from_metadata
from inference.weights import embedding, embedding_block_scales, head, iter_layers

def graph_embedding(reader: gguf.GGUFReader, scheme: Quantization,
                    table: np.ndarray) -> np.ndarray | BlockedEmbedding:
    """The embedding table as the scheme keeps it in the graph: fp32, or int8 blocks (lossless for a GGUF
    that stores it in scaled-integer blocks)."""
    if scheme.blocked_embedding and table.shape[1] % EMBEDDING_BLOCK == 0:
        return BlockedEmbedding.from_table(table, embedding_block_scales(reader))
    return table


def load_config(model_dir: Path) -> ModelConfig:
    return ModelConfig(**json.loads((model_dir / CONFIG_FILE).read_text())["config"])


def convert(gguf_path: Path, out_dir: Path, scheme: Quantization, *, gguf_sha256: str,
            progress: bool = True) -> Path:
    """Write model.onnx (+ external weights) and config.json into out_dir, atomically.

    The directory appears only when complete, so an interrupted conversion never leaves a model
    that loads but is wrong.
    """
    if (out_dir / CONFIG_FILE).exists():
        return out_dir
    reader = gguf.GGUFReader(gguf_path)
    config = config_from_gguf(reader)
    tokenizer_fields = gguf_tokenizer_fields(reader)
    tokenizer_from_metadata(tokenizer_fields)  # refuse an unsupported tokenizer before the slow part
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))
    try:
        bar = tqdm(total=config.n_layers + 3, desc=f"converting to ONNX ({scheme.name})", unit="step",
                   disable=not progress, leave=False)
        emb = embedding(reader)
        final_norm, lm_head = head(reader, config, emb)
        emb = graph_embedding(reader, scheme, emb)
        bar.update(1)

        def layers():
            for layer in iter_layers(reader, config):
                yield layer
                bar.update(1)

        graph = build_graph(config, emb, layers(), final_norm, lm_head)
        del emb, lm_head
        bar.set_postfix_str("quantizing")
        model = quantize_model(graph, scheme)
        bar.update(1)
        bar.set_postfix_str("saving")
        onnx.save_model(model, str(tmp / MODEL_FILE), save_as_external_data=True,
                        location=MODEL_FILE + ".data", size_threshold=1024)
        bar.update(1)
        bar.close()
        meta = {"config": asdict(config), "quantization": asdict(scheme), "gguf_sha256": gguf_sha256,
                "converter_version": CONVERTER_VERSION}
        (tmp / TOKENIZER_FILE).write_text(json.dumps(tokenizer_fields))
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
        try:
            os.replace(tmp, out_dir)
        except OSError:
            if not (out_dir / CONFIG_FILE).exists():
                raise
            shutil.rmtree(tmp)  # another process finished the same conversion first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
