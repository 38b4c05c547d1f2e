"""The LSP latency benchmark: its keystroke plan, and a run end to end through `superpie serve` on the tiny model."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from bench.lsp import CASES, FAR_CHARS, BenchServer, lsp_position, plan_file, run_lsp_bench, split_lines
from tests.fixtures import cpython_text


def test_plan_puts_every_keystroke_on_its_own_line_and_the_far_edit_far_above() -> None:
    name, text = "textwrap.py", cpython_text("textwrap.py")
    plan = plan_file(name, text, repeats=3)
    assert [k.case for k in plan.keystrokes] == [c for c in CASES for _ in range(3)]
    assert len({k.line for k in plan.keystrokes}) == 9  # distinct lines: the typed-through cache never answers
    original = split_lines(text)
    current = plan.opened
    for key in plan.keystrokes:
        current = current[:key.start] + key.new_text + current[key.end:]
        line_start, line_end = current.rfind("\n", 0, key.cursor) + 1, current.find("\n", key.cursor)
        assert current[key.cursor:line_end] == "", key  # nothing after the cursor on its line
        if key.case == "far_edit":
            assert key.cursor - key.start >= FAR_CHARS
        else:
            assert key.cursor == key.start + len(key.new_text)
        if key.case == "line_end":  # a half-typed line gets the next character of the real one
            typed = current[line_start:key.cursor]
            assert original[key.line].startswith(typed) and len(typed.strip()) < len(original[key.line].strip())


def test_positions_are_utf16_code_units() -> None:
    text = "a = 1\nb = '😀é' + c\n"
    assert lsp_position(text, text.index("+")) == {"line": 1, "character": 10}  # the emoji counts 2, not 1
    assert lsp_position(text, len(text)) == {"line": 2, "character": 0}


def test_lsp_bench_on_tiny_model(tiny_gguf: Path, tiny_cache: Path, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "lsp.json"
    run_lsp_bench(str(tiny_gguf), json_out=out, cache=tiny_cache,
                  sources=[("textwrap.py", cpython_text("textwrap.py"))], repeats=2)

    summary = json.loads(out.read_text())
    assert summary["settings"]["refresh"] == "idle" and summary["settings"]["gap_ms"] == 150
    assert len(summary["machine"]["load_avg_before"]) == 3 and len(summary["machine"]["load_avg_after"]) == 3
    for case in CASES:
        result = summary["results"][case]
        for mode in ("pie", "full"):
            assert result[mode]["n"] == 2
            assert 0 < result[mode]["p50_ms"] <= result[mode]["p90_ms"]
            assert set(result[mode]["server_median"]) >= {"context_ms", "decode_ms", "generated_tokens", "other_ms"}
        assert result["pie_over_full"]["p50"] > 0 and 0 <= result["pie_over_full"]["same_suggestion"] <= 1
        assert summary["goal"]["cases"][case]["met"] == (result["pie"]["p50_ms"] <= 200)
    assert len(summary["samples"]) == len(CASES) * 2 * 2
    assert all(s["server"] is not None for s in summary["samples"])  # each keystroke ran the model once
    for mode in ("pie", "full"):
        assert summary["server"][mode]["counters"].get("typed_through", 0) == 0
    assert "| line_end | pie | 2 |" in capsys.readouterr().out


def test_quiet_waits_for_the_idle_steps_to_build_the_window(tiny_gguf: Path, tiny_cache: Path, tmp_path: Path) -> None:
    """A cold request encodes a short window and leaves the rest to idle steps. Each stats poll is a job that holds
    those steps off, so `wait_quiet` must poll slower than they start, or it reports quiet with the window unbuilt
    (the typing benchmark's line starts then paid for the window: 3.3 s instead of 0.4)."""
    text = "".join(f"def f{i}(x):\n    return x * {i} + {i * i}\n" for i in range(300))

    async def run() -> dict:
        with open(tmp_path / "server.log", "w") as log:
            server = await BenchServer.start("pie", model=str(tiny_gguf), cache=tiny_cache, refresh="idle", log=log,
                                             settings={})
            try:
                await server.wait_ready()
                doc = await server.open("file:///quiet.py", text)
                await server.complete(doc, len(text))
                assert (await server.cache_stats())["encoding"], "the request should have left a window to build"
                await server.wait_quiet()
                return await server.cache_stats()
            finally:
                await server.client.close()

    cache = asyncio.run(run())
    assert cache["encoding"] == {} and cache["stale_rows"] == 0
