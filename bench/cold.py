"""Cold start: the first suggestion in a freshly opened file, and how good answers from a short window are.

A cold document has no rows. Its first request encodes only `WindowBudget.first` tokens before the cursor (and
`first_suffix` after it) and answers; idle steps then grow the window backwards with PIE (kv_cache/document.py).

Targets are the dev set's next lines (../shared/data/edits/, the file after its commit, the line emptied after
its indentation), one file per path of 2–40 KB, plus Python standard-library modules of that size with lines
chosen by a fixed seed (benchmark input only; the tests read fixtures).

1. **Served** (the user's view): a real `superpie serve` over stdio with its default settings and no saved
   buffers. Each file is opened under a new URI, and an Automatic inline request at its first target follows
   `--delay-s` (1 s) after didOpen, while idle steps are encoding the top of the file. The latency runs from the
   request to its answer. Last, a file of ~2 MB (standard-library modules joined) is opened the same way.
2. **Early vs full window** (in process, the same Completer the server runs, no idle steps): at every target,
   the cold answer with a short window of each `--sizes` and with the whole window encoded first (what a cold
   request cost before: the baseline, timed in the same run), each `--idle-steps` idle steps after opening the
   file (the rows they build at the top of the file stay as the window's head). Reported: exact match against the real line,
   agreement of each early answer with the full-window answer, and the time to the answer.

    python -m bench.cold [--model M] [--cache DIR] [--json OUT] [--files N] [--targets N] [--sizes 128,256,512]
                         [--delay-s S] [--no-served] [--no-windows]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.engine import machine_info, peak_rss_mb, save_results
from bench.lsp import (AUTOMATIC, REQUEST_TIMEOUT_S, STDLIB, BenchServer, code_lines, lsp_position,
                       multiline_string_lines)
from bench.pie import DEFAULT_DATA, format_table, load_records
from inference.model_store import load_model
from inference.registry import DEFAULT_MODEL
from kv_cache.document import WindowBudget
from lsp_server.completer import Completer
from lsp_server.options import ServerOptions

DEFAULT_JSON = Path(__file__).parent / "results" / "cold.json"
MIN_BYTES, MAX_BYTES = 2_000, 40_000
LARGE_BYTES = 2_000_000
STDLIB_FILES = ("textwrap.py", "shlex.py", "heapq.py", "contextlib.py", "json/encoder.py", "argparse.py",
                "dataclasses.py", "functools.py", "configparser.py", "csv.py", "bisect.py", "fileinput.py")
SEED = 16
GOAL_P50_S, GOAL_P90_S, GOAL_LARGE_S = 2.0, 4.0, 4.0


@dataclass(frozen=True)
class Target:
    """A line to complete: `text` is the file with the line emptied after its indentation, the cursor there."""

    source: str  # "dev" or "stdlib"
    name: str
    text: str
    cursor: int
    expected: str  # the emptied line's content


def _emptied(source: str, name: str, text: str, offset: int, indent: str, line: str) -> Target:
    cursor = offset + len(indent)
    removed = line[len(indent):]
    return Target(source, name, text[:cursor] + text[cursor + len(removed):], cursor, removed)


def dev_targets(data: Path, files: int, per_file: int, min_bytes: int = MIN_BYTES) -> list[Target]:
    """The dev set's next lines, from the largest version of each file path of `min_bytes`–MAX_BYTES."""
    largest: dict[str, dict[str, Any]] = {}
    for record in load_records(data):
        size = len(record["after"].encode())
        if min_bytes <= size <= MAX_BYTES and record["targets"] and size > len(
                largest.get(record["path"], {}).get("after", "").encode()):
            largest[record["path"]] = record
    targets = []
    for path in sorted(largest)[:files]:
        record = largest[path]
        for t in [t for t in record["targets"] if t["text"].strip()][:per_file]:
            targets.append(_emptied("dev", path, record["after"], t["offset"], t["indent"], t["text"]))
    return targets


def stdlib_targets(files: int, per_file: int, seed: int = SEED) -> list[Target]:
    """Lines of code (not prose, at least 12 characters) chosen with a fixed seed, in modules of MIN–MAX_BYTES."""
    rng, targets = random.Random(seed), []
    names = [n for n in STDLIB_FILES if MIN_BYTES <= (STDLIB / n).stat().st_size <= MAX_BYTES][:files]
    for name in names:
        text = (STDLIB / name).read_text(encoding="utf-8")
        lines = text.splitlines(keepends=True)
        starts = [0]
        for line in lines:
            starts.append(starts[-1] + len(line))
        for i in sorted(rng.sample(code_lines(lines, multiline_string_lines(text)), per_file)):
            line = lines[i].rstrip("\n")
            targets.append(_emptied("stdlib", name, text, starts[i], line[:len(line) - len(line.lstrip())], line))
    return targets


def large_target(seed: int = SEED) -> Target:
    """~2 MB of real Python (standard-library modules joined), a line near its middle."""
    parts, size = [], 0
    for path in sorted(STDLIB.glob("*.py")):
        if size >= LARGE_BYTES:
            break
        part = path.read_text(encoding="utf-8", errors="replace")
        parts.append(part)
        size += len(part.encode())
    text = "\n".join(parts)
    lines = text.splitlines(keepends=True)
    middle = [i for i in code_lines(lines, set()) if len(lines) // 3 < i < 2 * len(lines) // 3]
    i = random.Random(seed).choice(middle)
    offset = sum(len(line) for line in lines[:i])
    line = lines[i].rstrip("\n")
    return _emptied("large", f"stdlib joined, {len(text.encode()) / 1e6:.1f} MB", text, offset,
                    line[:len(line) - len(line.lstrip())], line)


def first_line(text: str) -> str:
    return text.split("\n", 1)[0].strip()


# -- 1. served: a real server, cold files ---------------------------------------------------------------------------

async def _served(model: str, cache: Path | None, targets: list[Target], delay_s: float) -> list[dict[str, Any]]:
    with tempfile.TemporaryFile("w+") as log:
        server = await BenchServer.start("pie", model=model, cache=cache, refresh="idle", log=log, settings={})
        try:
            await server.wait_ready()
            results = []
            for index, target in enumerate(targets):
                doc = await server.open(f"file:///cold/{index}/{Path(target.name).name}", target.text)
                # the count before this file's request, read now: a read just before the request would be a worker
                # job that the request no longer waits behind, where a user's request may wait for an idle chunk
                calls = (await server.cache_stats())["calls"]
                await asyncio.sleep(delay_s)  # the user looks for the line: idle steps encode meanwhile
                params = {"textDocument": {"uri": doc.uri}, "position": lsp_position(target.text, target.cursor),
                          "context": {"triggerKind": AUTOMATIC}}
                request, future = server.client.request_frame("textDocument/inlineCompletion", params)
                t0 = time.perf_counter()
                await server.client.send(request)
                result, received = await asyncio.wait_for(future, REQUEST_TIMEOUT_S)
                items = (result or {}).get("items") or []
                text = items[0]["insertText"] if items else ""
                timings = next(t for t in (await server.cache_stats())["recent_timings"] if t["call"] > calls)
                results.append({"source": target.source, "name": target.name, "bytes": len(target.text.encode()),
                                "latency_s": received - t0, "text": text,
                                "exact": first_line(text) == target.expected.strip(),
                                "window_tokens": timings.get("window_tokens")})
                print(f"served [{index + 1}/{len(targets)}] {target.name}: {received - t0:.2f} s "
                      f"{first_line(text)!r}", file=sys.stderr, flush=True)
                await server.close(doc)
            return results
        finally:
            await server.client.close()


# -- 2. early answers against full windows, in process ----------------------------------------------------------------

def _answer(completer: Completer, index: int, target: Target, idle_steps: int) -> tuple[str, float]:
    """The cold answer at the target (a new document, `idle_steps` idle steps after opening it), and the seconds
    to it."""
    uri = f"file:///cold/{index}.py"
    completer.open(uri, target.text, "python")
    for _ in range(idle_steps):  # what the server does between didOpen and the request
        completer.refresh_step()
    t0 = time.perf_counter()
    outcome = completer.complete(uri, target.cursor, ServerOptions().completion(drafts=1))
    seconds = time.perf_counter() - t0
    completer.close(uri)
    return (outcome.suggestions[0].text if outcome.suggestions else ""), seconds


def _windows(model_name: str, cache: Path | None, targets: list[Target], sizes: list[int],
             idle_steps: int) -> list[dict[str, Any]]:
    model = load_model(model_name, cache=cache, progress=sys.stderr.isatty())
    full = WindowBudget(first=LARGE_BYTES, first_suffix=LARGE_BYTES)  # a cold request encodes the whole window
    completers = {"full": Completer(model, window=full),
                  **{str(n): Completer(model, window=WindowBudget(first=n)) for n in sizes}}
    results = []
    for index, target in enumerate(targets):
        row: dict[str, Any] = {"source": target.source, "name": target.name, "expected": target.expected}
        for name, completer in completers.items():
            text, seconds = _answer(completer, index, target, idle_steps)
            row[name] = {"text": text, "seconds": seconds, "exact": first_line(text) == target.expected.strip()}
        for n in sizes:
            row[str(n)]["agrees"] = first_line(row[str(n)]["text"]) == first_line(row["full"]["text"])
        results.append(row)
        print(f"windows [{index + 1}/{len(targets)}] {target.name}: " + " ".join(
            f"{k}={v['seconds']:.2f}s{'*' if v['exact'] else ''}" for k, v in row.items() if isinstance(v, dict)),
            file=sys.stderr, flush=True)
    return results


# -- summary ---------------------------------------------------------------------------------------------------------

def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summarize_served(rows: list[dict[str, Any]]) -> dict[str, Any]:
    small = [r for r in rows if r["source"] != "large"]
    large = [r for r in rows if r["source"] == "large"]
    latencies = [r["latency_s"] for r in small]
    return {"files": len(small), "p50_s": _quantile(latencies, 0.5), "p90_s": _quantile(latencies, 0.9),
            "max_s": max(latencies, default=None), "exact": statistics.mean(r["exact"] for r in small) if small else None,
            "large_s": large[0]["latency_s"] if large else None, "large_bytes": large[0]["bytes"] if large else None}


def summarize_windows(rows: list[dict[str, Any]], sizes: list[int]) -> dict[str, dict[str, Any]]:
    out = {}
    for name in ["full", *map(str, sizes)]:
        for source in ("dev", "all"):
            picked = [r for r in rows if source == "all" or r["source"] == source]
            if not picked:
                continue
            cells = [r[name] for r in picked]
            seconds = [c["seconds"] for c in cells]
            out[f"{name} ({source})"] = {
                "n": len(cells), "exact": statistics.mean(c["exact"] for c in cells),
                "agrees_with_full": statistics.mean(c["agrees"] for c in cells) if name != "full" else 1.0,
                "p50_s": statistics.median(seconds), "p90_s": _quantile(seconds, 0.9),
                "full_over_this_p50": statistics.median(r["full"]["seconds"] for r in picked) / statistics.median(
                    seconds)}
    return out


def run_cold_bench(model: str = DEFAULT_MODEL, *, cache: Path | None = None, json_out: Path | None = None,
                   data: Path = DEFAULT_DATA, files: int = 20, per_file: int = 2, sizes: tuple[int, ...] = (128, 256, 512),
                   delay_s: float = 1.0, idle_steps: int = 7, served: bool = True, windows: bool = True,
                   stdlib: int | None = None, large: bool = True, min_bytes: int = MIN_BYTES) -> dict[str, Any]:
    """`stdlib`: standard-library modules to add (default: half of `files`); `large`: the ~2 MB file too."""
    stdlib = max(1, files // 2) if stdlib is None else stdlib
    targets = dev_targets(data, files, per_file, min_bytes) + (stdlib_targets(stdlib, per_file) if stdlib else [])
    summary: dict[str, Any] = {"model": model, "machine": machine_info(), "delay_s": delay_s, "idle_steps": idle_steps,
                               "default_window": asdict(WindowBudget()), "targets": len(targets)}
    t0 = time.perf_counter()
    if served:
        one_each = list({(t.source, t.name): t for t in reversed(targets)}.values())[::-1]  # one cold open per file
        rows = asyncio.run(_served(model, cache, [*one_each, *([large_target()] if large else [])], delay_s))
        summary["served"] = summarize_served(rows)
        summary["served_rows"] = rows
    if windows:
        rows = _windows(model, cache, targets, list(sizes), idle_steps)
        summary["windows"] = summarize_windows(rows, list(sizes))
        summary["window_rows"] = rows
    summary["wall_s"] = time.perf_counter() - t0
    summary["peak_rss_mb"] = peak_rss_mb()
    print(f"Cold start: {model}, {summary['machine'].get('cpu')} ({os.cpu_count()} cores)")
    if served:
        s = summary["served"]
        print(f"served, first answer {delay_s:.0f} s after didOpen, {s['files']} files of 2–40 KB: "
              f"p50 {s['p50_s']:.2f} s, p90 {s['p90_s']:.2f} s, max {s['max_s']:.2f} s (goal {GOAL_P50_S:.0f} / "
              f"{GOAL_P90_S:.0f} s); exact {s['exact']:.2f}" + (f"; {s['large_bytes'] / 1e6:.1f} MB file: "
              f"{s['large_s']:.2f} s (goal {GOAL_LARGE_S:.0f} s)" if large else ""))
    if windows:
        print(format_table(summary["windows"], ("n", "exact", "agrees_with_full", "p50_s", "p90_s",
                                                "full_over_this_p50")))
    path = json_out or DEFAULT_JSON
    save_results(summary, path)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cold", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--cache", type=Path, default=None, help="model cache (default: $SUPERPIE_CACHE)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--json", dest="json_out", type=Path, default=None, help=f"default: {DEFAULT_JSON}")
    parser.add_argument("--files", type=int, default=20, help="dev-set files (and half as many stdlib modules)")
    parser.add_argument("--targets", type=int, default=2, help="target lines per file")
    parser.add_argument("--sizes", default="128,256,512", help="short windows to compare, tokens before the cursor")
    parser.add_argument("--delay-s", type=float, default=1.0, help="from didOpen to the served request")
    parser.add_argument("--idle-steps", type=int, default=7,
                        help="in process: idle steps between opening and the request (32 tokens each; 7 take about "
                             "the 1 s of --delay-s on 2 cores)")
    parser.add_argument("--stdlib", type=int, default=None, help="standard-library modules (default: --files / 2)")
    parser.add_argument("--min-bytes", type=int, default=MIN_BYTES, help="smallest dev-set file")
    parser.add_argument("--no-large", dest="large", action="store_false", help="skip the ~2 MB file")
    parser.add_argument("--no-served", dest="served", action="store_false")
    parser.add_argument("--no-windows", dest="windows", action="store_false")
    args = parser.parse_args(argv)
    run_cold_bench(args.model, cache=args.cache, json_out=args.json_out, data=args.data, files=args.files,
                   per_file=args.targets, sizes=tuple(int(s) for s in args.sizes.split(",")), delay_s=args.delay_s,
                   idle_steps=args.idle_steps, served=args.served, windows=args.windows, stdlib=args.stdlib,
                   large=args.large, min_bytes=args.min_bytes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
