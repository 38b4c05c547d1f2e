"""The engine benchmark end to end on the tiny model: both subprocesses run, the table prints, the JSON is complete."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from bench.engine import run_engine_bench
from tests.fixtures import CPYTHON

SPEED_SOURCES = [CPYTHON / "textwrap.py", CPYTHON / "heapq.py"]  # the fixtures have no difflib.py, the CLI's third
QUALITY_SOURCE = CPYTHON / "argparse.py"
REQUIRED = ("decode_tok_s", "decode_tok_s_256", "decode_tok_s_1024", "prefill_tok_s_256", "verify8_over_verify1",
            "peak_rss_mb", "load_s", "perplexity")


def test_quick_engine_bench_writes_complete_json(tiny_gguf: Path, tiny_cache: Path, tmp_path: Path,
                                                 capfd: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "engine.json"
    run_engine_bench(str(tiny_gguf), json_out=out, cache=tiny_cache, quick=True, speed_sources=SPEED_SOURCES,
                     quality_source=QUALITY_SOURCE, profile=True, quiet_s=0.5)

    summary = json.loads(out.read_text())
    assert summary["quantization_default"] == "q8"
    assert summary["machine"]["cpus"] > 0 and summary["machine"]["onnxruntime"]
    runs = summary["runs"]
    assert list(runs) == ["fp32", "q8"]
    for run in runs.values():
        for key in REQUIRED:
            value = run[key]
            assert isinstance(value, float) and math.isfinite(value) and value > 0, (run["quantization"], key, value)
        assert "argmax" not in run  # per-position data stays out of the summary
        assert run["speed_sources"] == [str(p) for p in SPEED_SOURCES]  # the fixtures, not the host's
        assert run["quality_source"] == str(QUALITY_SOURCE)
        assert run["decode_quiet_steps_256"] >= 0  # steps timed while no other process ran: none on a busy machine
        profile = run["decode_profile_ms"]  # a traced step by kind of work: the projections and attention named
        assert {"lm_head", "matmul gate_up", "attention: Concat(past, new)", "step (traced)"} <= set(profile)
    assert runs["fp32"]["quantization"] == "fp32" and runs["q8"]["quantization"] == "q8"
    quality = summary["quality"]["q8"]
    assert 0.0 <= quality["top1_agreement"] <= 1.0
    assert math.isfinite(quality["perplexity_ratio"]) and quality["perplexity_ratio"] > 0

    printed = capfd.readouterr().out
    assert "| metric | fp32 | q8 | q8/fp32 |" in printed
    assert "| decode_tok_s_1024 |" in printed and "top1_agreement" in printed
    assert "| decode step after 1024 rows, traced (ms) | fp32 | q8 |" in printed
    assert str(out) in printed
