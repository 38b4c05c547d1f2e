"""The decoding benchmark end to end on the tiny model, on the synthetic records of test_bench_pie."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.decode import brackets_balanced, run_decode_bench
from inference.generate import first_line
from tests.test_bench_pie import write_records
from tests.test_ngram import use_fixture_sources

KEYS = ("speedup_speculative", "identical_outputs", "methods", "suffix_duplications", "n", "machine")
METHODS = ("greedy", "superposed", "beam", "sampled", "forked")
METHOD_KEYS = ("time_vs_greedy", "em_draft1", "em_best_of_k", "distinct_first_lines")


def test_decode_bench_on_tiny_model(tiny_gguf: Path, tiny_cache: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    use_fixture_sources(monkeypatch)  # the n-gram base table
    data = tmp_path / "edits.jsonl.gz"
    write_records(data)
    out = tmp_path / "decode.json"
    run_decode_bench(str(tiny_gguf), data=data, json_out=out, cache=tiny_cache, k=3)

    summary = json.loads(out.read_text())
    for key in KEYS:
        assert key in summary, key
    assert summary["n"] == 5 and summary["n_records"] == 3
    assert summary["identical_outputs"] == 1.0  # speculative decoding is lossless
    assert summary["speedup_speculative"] > 0
    assert set(summary["methods"]) == set(METHODS)
    for name, method in summary["methods"].items():
        assert set(METHOD_KEYS) <= set(method), name
        assert method["time_vs_greedy"] > 0 and method["em_best_of_k"] >= method["em_draft1"]
    assert summary["methods"]["greedy"]["time_vs_greedy"] == 1.0
    for target in (t for r in summary["records"] for t in r["targets"]):
        assert len(target["drafts"]["greedy"]) <= 1
        for name in METHODS[1:]:
            assert len(target["drafts"][name]) <= 3, name
            assert all(first_line(d)[1] is False for d in target["drafts"][name])  # leading blank lines kept
    out = capsys.readouterr().out
    assert "| all | 5 |" in out and all(f"| {name} |" in out for name in METHODS)


@pytest.mark.parametrize(("line", "balanced"), [
    ("x = f(a, [1, 2])", True),
    ("x = f(a, [1, 2)", False),
    ("print(')')", True),  # brackets inside strings do not count
    ("y = (", False),
    ("z = 1)  # (", False),
])
def test_brackets_balanced(line: str, balanced: bool) -> None:
    assert brackets_balanced(line) is balanced
