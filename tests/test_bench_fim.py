"""The FIM layout benchmark end to end on the tiny model, on the synthetic records of test_bench_pie."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.fim import run_fim_bench
from inference.generate import first_line
from tests.test_bench_pie import write_records


def test_fim_bench_on_tiny_model(tiny_gguf: Path, tiny_cache: Path, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "edits.jsonl.gz"
    write_records(data)
    out = tmp_path / "fim.json"
    run_fim_bench(str(tiny_gguf), data=data, json_out=out, cache=tiny_cache)

    summary = json.loads(out.read_text())
    assert summary["n"] == 3 and summary["n_targets"] == 5
    for key in ("em_borrowed", "em_fresh", "em_prefix", "agree_borrowed_fresh"):
        assert 0.0 <= summary[key] <= 1.0, key
    assert summary["borrowed_ms_median"] > 0 and summary["fresh_ms_median"] > 0
    for rec in summary["records"]:
        lines = [t["line"] for t in rec["targets"]]
        assert lines == sorted(lines, reverse=True)  # bottom up, so every prefix is exact
        for target in rec["targets"]:
            assert set(target["predictions"]) == {"borrowed", "fresh", "prefix"}
            assert first_line(target["predictions"]["borrowed"])[1] is False  # leading blank lines are kept
    assert "| all | 3 | 5 |" in capsys.readouterr().out
