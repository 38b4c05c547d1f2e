"""Shared fixtures: a tiny synthetic model (seconds) and the real default model (fetched once, cached)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from inference.fetch import cache_root
from inference.model_store import LoadedModel, load_model
from inference.synthetic import write_tiny_gguf
from tests.fixtures import vocab_texts

collect_ignore = ["data"]  # fixture sources, some named test_*.py


def pytest_report_header() -> str:
    """The CPU in the header: the tiny model's outputs and all timings differ between AVX2 and AVX-512."""
    from bench.engine import cpu_description

    cpu = cpu_description()
    return f"cpu: {cpu['cpu']}, {os.cpu_count()} cores, {' '.join(cpu['cpu_features'])}"


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("superpie-cache")


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("tiny") / "tiny-qwen2.gguf", vocab_texts())


@pytest.fixture(scope="session")
def tiny_llama_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("tiny") / "tiny-llama.gguf", vocab_texts(), architecture="llama", seed=1)


@pytest.fixture(scope="session")
def tiny_model(tiny_gguf: Path, tiny_cache: Path) -> LoadedModel:
    """The tiny model in the default quantization."""
    return load_model(str(tiny_gguf), cache=tiny_cache, progress=False)


@pytest.fixture(scope="session")
def tiny_model_fp32(tiny_gguf: Path, tiny_cache: Path) -> LoadedModel:
    return load_model(str(tiny_gguf), "fp32", cache=tiny_cache, progress=False)


@pytest.fixture(scope="session")
def real_model() -> LoadedModel:
    """The default model from the user's model cache (SUPERPIE_CACHE overrides it): fetched once, then reused."""
    return load_model(cache=cache_root(), progress=bool(os.environ.get("SUPERPIE_TEST_PROGRESS")))


@pytest.fixture(scope="session")
def real_model_fp32() -> LoadedModel:
    return load_model(quantization="fp32", cache=cache_root(), progress=False)
