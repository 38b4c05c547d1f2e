"""The typing benchmark: its lines, pauses and scores; the llama.vscode-style peer client against a stub `/infill`
server that always answers the rest of the real line; and the whole run, superpie on the tiny model beside it."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from bench.pie import load_records
from bench.typing import (CONTEXT, PAUSE_KINDS, PEER, SUPERPIE, LlamaVscodeConfig, LlamaVscodeTypist, accepted_line,
                          mid_pause, plan_lines, run_typing_bench, similarity, summarize, type_lines)
from tests.test_bench_pie import records, write_records


def test_mid_line_pause_is_the_first_word_end_past_40_percent() -> None:
    assert mid_pause("return total(values) / len(values)") == 19  # "return total(values" | ") / len(values)"
    assert mid_pause("x = compute(a, b)") == 11  # 40% is 7 characters: "x = com", the word ends at 11
    assert mid_pause("pass") == 2  # no word end before the line's end: ceil(40%)
    assert mid_pause(")") == 1


def test_lines_come_bottom_up_per_record_and_stop_at_the_limit() -> None:
    recs = records()
    lines = plan_lines(recs, 4)
    assert len(lines) == 4
    assert [ln.record for ln in lines] == sorted(ln.record for ln in lines)
    for ln in lines:
        after = recs[ln.record]["after"]
        assert after[ln.cursor:ln.cursor + len(ln.expected)] == ln.expected
        assert ln.text.endswith(ln.expected) and 0 < ln.mid_pause <= len(ln.expected)
    first = [ln.line for ln in lines if ln.record == 0]
    assert first == sorted(first, reverse=True)


def test_accepted_line_applies_the_range_and_keeps_the_first_line() -> None:
    text = "def f():\n    ret\n    pass\n"
    cursor = text.index("ret") + 3
    assert accepted_line(text, cursor, "urn 1\n    x") == "    return 1"
    assert accepted_line(text, cursor, "return 2", cursor - 3, cursor) == "    return 2"
    assert accepted_line(text, cursor, "") == "    ret"


def test_similarity_scores_only_what_the_suggestion_wrote() -> None:
    typed = "    result = "
    assert similarity("    result = 0", "    result = 0", typed) == 1.0
    assert similarity(typed, "    result = total(values)", typed) == 0.0  # nothing suggested: nothing similar
    assert 0.8 <= similarity("    result = total(value)", "    result = total(values)", typed) < 1.0


def check_invariants(summary: dict[str, Any], name: str, n_lines: int) -> None:
    result = summary["results"][name]
    assert result["lines"] == n_lines and result["pauses"] == 2 * n_lines
    assert 0.0 <= result["keep_up"] <= 1.0
    assert result["answered"] + result["late"] + result["cancelled"] + result["errors"] == result["keystrokes"]
    assert result["pause_p50_ms"] <= result["pause_p90_ms"]
    assert 0.0 <= result["exact"] <= result["similar"] <= 1.0
    for line in summary["engines"][name]["lines"]:
        assert [p["kind"] for p in line["pauses"]] == list(PAUSE_KINDS)
        assert line["keystrokes"] == len(line["expected"]) - 1  # all but the one that reaches the mid-line pause
        for pause in line["pauses"]:
            assert pause["latency_ms"] > 0 and pause["status"] in ("items", "empty", "error")
            assert not pause["exact"] or pause["similar"]


class OracleInfill(BaseHTTPRequestHandler):
    """POST /infill: the rest of the real line after `input_prefix + prompt` (a perfect model); records bodies."""

    texts: list[str] = []
    bodies: list[dict[str, Any]] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).bodies.append(body)
        content = ""
        typed = body["input_prefix"] + body["prompt"]
        for text in self.texts:
            if body["n_predict"] and text.startswith(typed):
                content = text[len(typed):].split("\n", 1)[0]
                break
        reply = json.dumps({"content": content, "timings": {"prompt_n": 1, "prompt_ms": 1.0}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def oracle_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), OracleInfill)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_peer_client_drives_infill_as_llama_vscode_does(oracle_url: str, tmp_path: Path) -> None:
    recs = load_records(write_records(tmp_path / "edits.jsonl.gz"))
    OracleInfill.texts, OracleInfill.bodies = [r["after"] for r in recs], []
    lines = plan_lines(recs, 4)
    peer = LlamaVscodeTypist(oracle_url, LlamaVscodeConfig(debounce_s=0.0, poll_s=0.001))

    async def run() -> list:
        try:
            runs, warm = await type_lines(peer, lines, recs, 0.0)
            assert len(warm) == len({ln.record for ln in lines})
            return runs
        finally:
            await peer.close()

    runs = asyncio.run(run())
    result = summarize(runs)
    assert result["pauses"] == 8 and 0.0 <= result["keep_up"] <= 1.0
    assert result["exact"] == 1.0  # the prompt, the indentation handling and the cache all line up with the text
    assert peer.counters.completions >= len(lines) and peer.counters.http_errors == 0
    assert peer.counters.cache_hits > 0  # the mid-line pause is answered from the line-start suggestion
    completions = [b for b in OracleInfill.bodies if b["n_predict"]]
    for body in completions:
        assert body["id_slot"] == 0 and body["cache_prompt"] is True and body["n_predict"] == 128
        assert body["samplers"] == ["top_k", "top_p", "infill"] and body["t_max_predict_ms"] == 500
        assert isinstance(body["input_extra"], list) and body["input_prefix"].endswith("\n")
    assert any(b["prompt"] == "" and b.get("n_indent") for b in completions)  # a line start: indentation left out


def test_typing_bench_on_tiny_model_side_by_side(tiny_gguf: Path, tiny_cache: Path, tmp_path: Path, oracle_url: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    data = write_records(tmp_path / "edits.jsonl.gz")
    OracleInfill.texts, OracleInfill.bodies = [r["after"] for r in load_records(data)], []
    out = tmp_path / "typing.json"
    run_typing_bench(str(tiny_gguf), data=data, limit=3, against=oracle_url, json_out=out, cache=tiny_cache,
                     interval_s=0.0, peer_config=LlamaVscodeConfig(debounce_s=0.0, poll_s=0.001))

    summary = json.loads(out.read_text())
    assert list(summary["results"]) == [SUPERPIE, PEER]
    for name in (SUPERPIE, PEER):
        check_invariants(summary, name, 3)
        files = {ln["record"] for ln in summary["lines"]}
        assert len(summary["engines"][name]["server"]["warm_up_ms"]) == len(files)
    assert summary["results"][PEER]["exact"] == 1.0
    assert summary["machine"]["cpu"] and summary["interval_ms"] == 0
    assert "| pauses | 6 | 6 |" in capsys.readouterr().out


def test_typing_bench_with_cross_file_context_types_into_both_servers(tiny_gguf: Path, tiny_cache: Path,
                                                                      tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """--cross-file: the same lines typed into a server without and one with crossFileContext, both with the other
    tabs open (one of them has a typed record's path)."""
    data = write_records(tmp_path / "edits.jsonl.gz")
    recs = load_records(data)
    tabs = {f"file:///bench/{recs[0]['path']}": recs[0]["before"],
            "file:///bench/pkg/shapes.py": "def circle_area(radius):\n    return 3.14 * radius * radius\n"}
    monkeypatch.setattr("bench.typing.package_tabs", lambda: tabs)
    out = tmp_path / "typing.json"
    run_typing_bench(str(tiny_gguf), data=data, limit=3, json_out=out, cache=tiny_cache, interval_s=0.0,
                     cross_file=256)
    summary = json.loads(out.read_text())
    assert list(summary["results"]) == [SUPERPIE, CONTEXT] and summary["cross_file_tokens"] == 256
    for name in (SUPERPIE, CONTEXT):
        check_invariants(summary, name, 3)
    assert summary["engines"][CONTEXT]["server"]["settings"] == {"crossFileContext": True, "crossFileTokens": 256}
    assert summary["engines"][SUPERPIE]["server"]["settings"] == {"crossFileContext": False}
