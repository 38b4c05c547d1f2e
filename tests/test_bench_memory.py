"""The memory benchmark end to end on the tiny model: real servers, one per idleRows setting, hold the same
documents, and idle rows in int8 take fewer KV bytes than in fp32."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.memory import main, run_memory_bench


def test_memory_bench_on_tiny_model(tiny_gguf: Path, tiny_cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "memory.json"
    run_memory_bench(str(tiny_gguf), cache=tiny_cache, json_out=out, parts=("served",), count=3, tokens=120,
                     idle_rows=("fp32", "int8"))
    served = json.loads(out.read_text())["served"]
    fp32, int8 = served["runs"]["fp32"], served["runs"]["int8"]
    assert served["documents"] == 3 and fp32["buffers"] == int8["buffers"] == 3
    assert fp32["cached_tokens"] == int8["cached_tokens"] >= 3 * 120  # every window built, the same in both
    assert int8["kv_mb"] < fp32["kv_mb"] and served["ratios"]["int8"]["kv"] < 1
    assert fp32["server_rss_mb"] > 0 and fp32["engine_rss_mb"] > 0
    assert fp32["rss_mb"] == pytest.approx(fp32["server_rss_mb"] + fp32["engine_rss_mb"], abs=1)


@pytest.mark.parametrize("idle_rows", ["fp16", "fp32,int3"])
def test_the_baseline_comes_first_and_idle_rows_are_known(idle_rows: str) -> None:
    with pytest.raises(SystemExit):
        main(["--idle-rows", idle_rows])
