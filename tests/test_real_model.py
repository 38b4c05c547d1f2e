"""The real default model (Qwen2.5-Coder-0.5B): fetched, verified and converted on first use, then cached."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from inference.config import config_from_gguf
from inference.fetch import cache_root, resolve_gguf
from inference.generate import DecodeCache, decode_one_token
from inference.reference import reference_forward
from inference.registry import DEFAULT_MODEL
from inference.runtime import causal_bias
from inference.weights import load_weights
from tests.decoding import empty_past, fim, greedy, start
from tests.fixtures import cpython_text

pytestmark = pytest.mark.real_model

REPO = Path(__file__).resolve().parents[1]

AVERAGE = '''def average(values: list[float]) -> float:
    """Arithmetic mean of values."""
    total = sum(values)
    return\x20
'''


def _real_code_ids(model, n: int) -> list[int]:
    text = cpython_text("textwrap.py")
    return model.tokenizer.encode(text)[:n]


def test_greedy_tokens_match_numpy_reference_for_32_steps(real_model_fp32):
    reader = gguf.GGUFReader(resolve_gguf(DEFAULT_MODEL, cache_root(), progress=False))
    config = config_from_gguf(reader)
    weights = load_weights(reader, config)
    del reader
    decoder = real_model_fp32.decoder
    ids = _real_code_ids(real_model_fp32, 48)
    cache, logits = start(real_model_fp32, ids, room=32)
    past_k, past_v = empty_past(decoder)
    n = len(ids)
    ref_logits, ref_k, ref_v = reference_forward(weights, config, np.array(ids)[:, None], np.ones((n, 1), np.float32),
                                                 np.arange(n), causal_bias(0, n), past_k, past_v, np.array([n - 1]))
    ours, theirs = [], []
    for step in range(32):
        ours.append(int(np.argmax(logits)))
        theirs.append(int(np.argmax(ref_logits[-1])))
        token = ours[-1]
        logits = decode_one_token(decoder, cache, token)
        pos = n + step
        ref_logits, new_k, new_v = reference_forward(
            weights, config, np.array([[token]]), np.ones((1, 1), np.float32), np.array([pos]),
            np.zeros((1, pos + 1), np.float32), ref_k, ref_v, np.array([0]))
        ref_k = [np.concatenate([a, b], 1) for a, b in zip(ref_k, new_k)]
        ref_v = [np.concatenate([a, b], 1) for a, b in zip(ref_v, new_v)]
    assert ours == theirs


@pytest.mark.parametrize("pieces", [2, 7])
def test_default_quantization_is_chunk_invariant_on_real_code(real_model, pieces):
    decoder = real_model.decoder
    ids = np.array(_real_code_ids(real_model, 300))

    def encode(n_pieces: int) -> np.ndarray:
        """Logits of every position, each chunk attending to the rows before it in a preallocated decode cache."""
        cache, logits = DecodeCache.empty(real_model.config, len(ids)), []
        for chunk in np.array_split(ids, n_pieces):
            out = cache.forward(decoder, chunk, np.arange(cache.position, cache.position + len(chunk)),
                                logits_index=np.arange(len(chunk)))
            cache.write(out.keys, out.values)
            cache.position += len(chunk)
            logits.append(out.logits)
        return np.concatenate(logits)

    whole, chunked = encode(1), encode(pieces)
    assert np.abs(whole - chunked).max() < 1e-3
    assert (whole.argmax(-1) == chunked.argmax(-1)).all()


def test_completion_of_a_return_statement_is_sensible(real_model):
    prompt = fim(real_model.tokenizer, AVERAGE.rstrip("\n"), "\n")
    text = greedy(real_model, prompt, max_tokens=16).drafts[0].text
    assert "len(values)" in text and "total" in text


def test_token_healing_avoids_the_extra_space_after_indentation(real_model):
    prefix = "def fibonacci(n):\n    if n < 2:\n        return n\n    "
    healed = fim(real_model.tokenizer, prefix, "\n")
    text = greedy(real_model, healed, max_tokens=16).drafts[0].text
    assert text.strip() and not text[0].isspace()


def test_readme_example_prints_a_real_completion():
    """The README's first command, on the example file it names."""
    assert (REPO / "examples" / "average.py").read_text() == AVERAGE
    run = subprocess.run([sys.executable, "-m", "lsp_server.cli", "--quiet", "--cache-dir", str(cache_root()),
                          "complete", "examples/average.py:4:12", "--json"], capture_output=True, text=True,
                         timeout=600, cwd=REPO)
    assert run.returncode == 0, run.stderr
    draft = json.loads(run.stdout)["drafts"][0]
    assert "len(values)" in draft["text"] and draft["score"] <= 0.0
