"""The PIE benchmark end to end on the tiny model, on synthetic records in the edits dataset's format."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path
from typing import Any

import pytest

from bench.pie import cached_rows_before, hunk_edits, run_pie_bench
from kv_cache.splice import TokenizedText

BEFORE = [
    "import os\n",
    "\n",
    "\n",
    "def total(values):\n",
    "    result = 0\n",
    "    for value in values:\n",
    "        result += value\n",
    "    return result\n",
    "\n",
    "\n",
    "def mean(values):\n",
    "    if not values:\n",
    "        return 0.0\n",
    "    return total(values) / len(values)\n",
    "\n",
    "\n",
    "def home():\n",
    "    return os.path.expanduser('~')\n",
]
KEYS = ("n", "n_targets", "em_pie", "em_full", "em_conflict", "agree_pie_full", "agree_conflict_full",
        "update_ratio_median", "update_ratio_median_conflict", "update_ratio_median_2000plus", "peak_rss_mb",
        "update_ms_median_pie", "update_ms_median_conflict-fast", "update_ms_median_full")


def record(after: list[str], hunks: list[tuple[int, int, int, int]], target_lines: list[int],
           kind: str) -> dict[str, Any]:
    """A record as the dataset stores it: texts, 0-based end-exclusive hunks, and targets with offsets."""
    targets = []
    for line in target_lines:
        text = after[line].rstrip("\n")
        indent = text[: len(text) - len(text.lstrip())]
        targets.append({"line": line, "text": text, "indent": indent, "offset": sum(map(len, after[:line])),
                        "role": "after_last_hunk"})
    keys = ("before_start_line", "before_end_line", "after_start_line", "after_end_line")
    return {"repo": "example/synthetic", "commit": f"{len(after):040d}", "parent": "0" * 40, "path": "stats.py",
            "before": "".join(BEFORE), "after": "".join(after), "hunks": [dict(zip(keys, h)) for h in hunks],
            "kind": kind, "n_hunks": len(hunks), "targets": targets}


def records() -> list[dict[str, Any]]:
    appended = [*BEFORE, "    # home directory\n"]  # an edit at the very end: rows before it never change
    replaced = [*BEFORE]
    replaced[4] = "    result = 0.0\n"
    replaced[12] = "        return float('nan')\n"
    deleted = BEFORE[:14] + BEFORE[15:]
    return [
        record(appended, [(18, 18, 18, 19)], [13, 17], "insert"),
        record(replaced, [(4, 5, 4, 5), (12, 13, 12, 13)], [13, 5], "replace"),
        record(deleted, [(14, 15, 14, 14)], [15], "delete"),
    ]


def write_records(path: Path) -> Path:
    """The synthetic records as a gzipped JSON-lines file, the dataset's format."""
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(rec) + "\n" for rec in records())
    return path


def test_hunks_become_edits_that_rebuild_after() -> None:
    for rec in records():
        text = rec["before"]
        for edit in hunk_edits(rec):
            text = edit.apply(text)
        assert text == rec["after"]


def test_cached_rows_stop_before_a_token_straddling_the_offset() -> None:
    doc = TokenizedText("ab\ncd", [1, 2, 4], [0, 1, 4])
    assert cached_rows_before(doc, 3) == 1  # token 1 spans [1, 4): it straddles offset 3
    assert cached_rows_before(doc, 4) == 2
    assert cached_rows_before(TokenizedText("é\n", [7, 8, 9], [0, 0, 1]), 1) == 2  # both byte tokens of é


def test_pie_bench_on_tiny_model(tiny_gguf: Path, tiny_cache: Path, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "edits.jsonl.gz"
    write_records(data)
    out = tmp_path / "pie.json"
    run_pie_bench(str(tiny_gguf), data=data, json_out=out, cache=tiny_cache)

    summary = json.loads(out.read_text())
    for key in KEYS:
        assert key in summary, key
    assert summary["n"] == 3 and summary["n_targets"] == 5
    for key in ("em_pie", "em_full", "em_conflict", "agree_pie_full", "agree_conflict_full"):
        assert 0.0 <= summary[key] <= 1.0, key
    for key in ("update_ratio_median", "update_ratio_median_conflict"):
        assert 0.0 < summary[key] < math.inf, key
    assert summary["update_ratio_median_2000plus"] is None  # no synthetic buffer reaches 2,000 tokens
    assert set(summary["groups"]) == {"all", "kind=insert", "kind=replace", "kind=delete", "n_hunks=1", "n_hunks=2"}

    end_edit = summary["records"][0]
    assert summary["groups"]["kind=insert"]["agree_pie_full"] == 1.0
    assert all(t["predictions"]["pie"] == t["predictions"]["full"] for t in end_edit["targets"])

    printed = capsys.readouterr().out
    assert "| group | n | n_targets | em_pie |" in printed and "| kind=delete |" in printed
    assert str(out) in printed


def test_update_time_plot_has_one_dot_per_record_and_mode() -> None:
    from bench.plot import update_time_svg

    summary = {"records": [{"tokens": 100 * i, "update_s": {"pie": 0.01 * i, "conflict-fast": 0.01, "full": i}}
                           for i in range(1, 6)]}
    svg = update_time_svg(summary)
    assert svg.startswith("<svg") and svg.rstrip().endswith("</svg>")
    assert svg.count("<circle") == 5 * 3 + 3  # dots plus the legend
    with pytest.raises(ValueError, match="no records"):
        update_time_svg({"records": []})


def test_cold_plot_has_one_dot_per_file_and_version() -> None:
    from bench.plot import cold_answer_svg

    def served(latencies: list[float]) -> dict[str, Any]:
        return {"served_rows": [{"bytes": 2000 * (i + 1), "latency_s": s} for i, s in enumerate(latencies)]}

    svg = cold_answer_svg(served([12.0, 5.0, 30.0]), served([1.0, 0.5, 2.0]))
    assert svg.startswith("<svg") and svg.count("<circle") == 3 + 3 + 2  # dots plus the legend
    assert ">main<" in svg and ">now<" in svg


def test_typing_plot_has_one_dot_per_pause_and_engine() -> None:
    from bench.plot import typing_pauses_svg

    def engine(latencies: list[float]) -> dict[str, Any]:
        return {"lines": [{"pauses": [{"latency_ms": ms} for ms in latencies[i:i + 2]]}
                          for i in range(0, len(latencies), 2)]}

    main = {"engines": {"superpie": engine([300.0, 5.0, 250.0, 8.0])}}
    now = {"engines": {"superpie": engine([280.0, 3.0, 240.0, 2.0]), "llama.cpp": engine([2900.0, 3100.0])}}
    svg = typing_pauses_svg(main, now)
    assert svg.startswith("<svg") and svg.count("<circle") == 4 + 4 + 2 + 3  # dots plus the legend
    assert all(f">{name}<" in svg for name in ("main", "now", "llama.cpp"))
