"""The cold-start benchmark end to end on the tiny model: a real server answers freshly opened files from a short
window, and the in-process comparison of short and full windows reports its measures."""

from __future__ import annotations

import json
from pathlib import Path

from bench.cold import run_cold_bench
from kv_cache.document import WindowBudget
from tests.test_bench_pie import write_records


def test_cold_bench_on_tiny_model(tiny_gguf: Path, tiny_cache: Path, tmp_path: Path, capsys) -> None:
    data = write_records(tmp_path / "edits.jsonl.gz")
    out = tmp_path / "cold.json"
    run_cold_bench(str(tiny_gguf), cache=tiny_cache, json_out=out, data=data, files=3, per_file=2, sizes=(8, 64),
                   delay_s=0.0, idle_steps=1, stdlib=0, large=False, min_bytes=0)
    summary = json.loads(out.read_text())
    served = summary["served"]
    assert served["files"] == 1 and served["p50_s"] > 0  # the synthetic records share one path
    budget = WindowBudget()
    assert all(0 < row["window_tokens"] <= budget.first + budget.first_suffix + 2 for row in summary["served_rows"])
    windows = summary["windows"]
    assert set(windows) == {f"{name} ({source})" for name in ("full", "8", "64") for source in ("dev", "all")}
    assert windows["full (all)"]["agrees_with_full"] == 1.0
    for group in windows.values():
        assert group["n"] == 2 and 0.0 <= group["exact"] <= 1.0 and 0.0 <= group["agrees_with_full"] <= 1.0
        assert group["p50_s"] > 0
    assert summary["machine"]["cpus"] and summary["idle_steps"] == 1
    assert "| full (dev) |" in capsys.readouterr().out
