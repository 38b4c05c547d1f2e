"""Fault isolation: what the engine process costs and what it buys, through `superpie serve` over stdio.

- `pipe`: one job's round trip between the server and an engine process (no model: the job is an edit to a
  document the engine does not hold), and the size of a keystroke's didChange message as pickled on the pipe.
- `hover`: hover latency while another document decodes a long suggestion. The hover is at a cursor whose
  suggestions the session already holds, so it never waits for the model: what it measures is whether the
  event loop answers while the model runs. Run it against a tree without the engine process (the model on a
  thread of the server) for the before figure (`--label` names the run).
- `faults`: `--faults N` times, a decode is interrupted by a real signal to the engine: SIGKILL (a crash or an
  out-of-memory kill) and SIGSTOP (a hung step: the watchdog must notice) in turn. For each: the answer to the
  request in flight (an empty list, never a JSON-RPC error), the time from the signal to the first good answer
  in another document, and whether the server's and the engine's text of both documents still equal the
  client's.

Documents are this repository's own Python sources, so every machine has them.

    python -m bench.isolation [--model M] [--cache DIR] [--json OUT] [--faults N] [--hovers N]
                              [--engine-timeout S] [--parts pipe,hover,faults] [--label L]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pickle
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.engine import machine_info, write_json
from bench.lsp import LspError, OpenDocument, lsp_position
from inference.registry import DEFAULT_MODEL
from lsp_server.engine_process import text_digest

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_JSON = Path(__file__).parent / "results" / "isolation.json"
DECODING_DOC = ROOT / "kv_cache" / "document.py"
OTHER_DOC = ROOT / "lsp_server" / "session.py"
PARTS = ("pipe", "hover", "faults")
INVOKED = 1
SETTINGS = {"scope": "multi", "maxTokens": 256, "drafts": 1, "automaticDrafts": 1, "prefetch": False}
PIPE_JOBS = 2000


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _cursor_in_body(text: str, fraction: float) -> int:
    """The end of the first line past `fraction` of the file that opens an indented block's next line."""
    lines = text.splitlines(keepends=True)
    offset = 0
    for index, line in enumerate(lines):
        if index >= fraction * len(lines) and line.rstrip().endswith(":"):
            return offset + len(line)
        offset += len(line)
    return len(text)


# -- pipe -----------------------------------------------------------------------------------------------------------

def measure_pipe(jobs: int = PIPE_JOBS) -> dict[str, Any]:
    from kv_cache.edits import TextEdit
    from lsp_server.engine_process import EngineConfig, EngineProcess

    engine = EngineProcess(EngineConfig(None, None, "cpu", None), hang_timeout_s=60,
                           on_event=lambda *a: None, on_exit=lambda reason: None)
    edits = [TextEdit(1234, 1234, "x")]
    try:
        engine.submit("change", "file:///warm.py", edits, kind="change").future.result(60)
        times = []
        for _ in range(jobs):
            t0 = time.perf_counter()
            engine.submit("change", "file:///bench.py", edits, kind="change").future.result(10)
            times.append(1e6 * (time.perf_counter() - t0))
    finally:
        engine.join()
    message = ("job", 1, "change", ("file:///home/user/project/module.py", edits), "change", False, False)
    return {"jobs": jobs, "round_trip_us_p50": _quantile(times, 0.5), "round_trip_us_p99": _quantile(times, 0.99),
            "change_message_bytes": len(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))}


# -- a served server ----------------------------------------------------------------------------------------------

class Served:
    """One `superpie serve` driven over JSON-RPC (bench.lsp's client), with the helpers the parts share."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self.client = server.client

    @classmethod
    async def start(cls, model: str, cache: Path | None, log: Any, args: tuple[str, ...] = ()) -> Served:
        from bench.lsp import BenchServer

        server = await BenchServer.start("isolation", model=model, cache=cache, refresh="idle", log=log,
                                         settings=dict(SETTINGS), args=args)
        await server.wait_ready()
        return cls(server)

    async def stats(self, uri: str | None = None) -> dict[str, Any]:
        return await self.client.request("workspace/executeCommand",
                                         {"command": "superpie.stats", "arguments": [uri] if uri else []})

    def inline(self, doc: OpenDocument, cursor: int) -> asyncio.Future:
        params = {"textDocument": {"uri": doc.uri}, "position": lsp_position(doc.text, cursor),
                  "context": {"triggerKind": INVOKED}}
        return asyncio.ensure_future(self.client.request("textDocument/inlineCompletion", params))

    async def hover(self, doc: OpenDocument, cursor: int) -> float:
        t0 = time.perf_counter()
        await self.client.request("textDocument/hover", {"textDocument": {"uri": doc.uri},
                                                         "position": lsp_position(doc.text, cursor)})
        return 1000 * (time.perf_counter() - t0)

    async def edit(self, doc: OpenDocument, offset: int, text: str) -> None:
        change = {"range": {"start": lsp_position(doc.text, offset), "end": lsp_position(doc.text, offset)},
                  "text": text}
        doc.text = doc.text[:offset] + text + doc.text[offset:]
        doc.version += 1
        await self.client.send(self.client.notification("textDocument/didChange", {
            "textDocument": {"uri": doc.uri, "version": doc.version}, "contentChanges": [change]}))

    async def until_decoding(self, uri: str, pending: asyncio.Future, steps: int = 2, timeout: float = 120) -> bool:
        """Until the server reports the request in flight for `uri` `steps` decode steps in (False: it finished
        first)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not pending.done():
            if (await self.stats())["server"]["worker"]["decoding"].get(uri, 0) >= steps:
                return True
            await asyncio.sleep(0.01)
        return False

    async def in_sync(self, doc: OpenDocument, timeout: float = 120) -> bool:
        """The server's and the engine's copy of `doc` equal the client's (once the engine is free to say)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            document = (await self.stats(doc.uri))["document"]
            if document["cache_sha256"] is not None:
                return document["sha256"] == document["cache_sha256"] == text_digest(doc.text)
            await asyncio.sleep(0.05)
        return False


# -- hover ----------------------------------------------------------------------------------------------------------

async def measure_hover(served: Served, rounds: int) -> dict[str, Any]:
    decoding_text, other_text = DECODING_DOC.read_text(), OTHER_DOC.read_text()
    decoding = await served.server.open("file:///isolation/decoding.py", decoding_text)
    other = await served.server.open("file:///isolation/other.py", other_text)
    hover_at = _cursor_in_body(other_text, 0.5)
    await served.inline(other, hover_at)  # the session now holds suggestions at the hover's cursor
    idle = [await served.hover(other, hover_at) for _ in range(50)]
    during: list[float] = []
    decode_rounds = 0
    for index in range(rounds):
        pending = served.inline(decoding, _cursor_in_body(decoding_text, 0.3 + 0.5 * index / max(rounds, 1)))
        if not await served.until_decoding(decoding.uri, pending):
            continue
        decode_rounds += 1
        while not pending.done():
            during.append(await served.hover(other, hover_at))
        await pending
    return {"idle_hovers": len(idle), "idle_p50_ms": _quantile(idle, 0.5), "idle_p99_ms": _quantile(idle, 0.99),
            "decodes": decode_rounds, "hovers": len(during), "p50_ms": _quantile(during, 0.5),
            "p99_ms": _quantile(during, 0.99), "max_ms": max(during, default=None)}


# -- faults ---------------------------------------------------------------------------------------------------------

async def _first_good_answer(served: Served, doc: OpenDocument, restarts: int, timeout: float = 300) -> int:
    """Requests at the end of `doc` until one is answered by a new engine's model; the errors seen meanwhile."""
    deadline = time.monotonic() + timeout
    errors = 0
    while time.monotonic() < deadline:
        server = (await served.stats())["server"]
        if server["engine"]["restarts"] >= restarts and server["model_state"] == "ready":
            before = server["counters"].get("completions", 0)
            try:
                await served.inline(doc, len(doc.text))
            except LspError:
                errors += 1
                continue
            if (await served.stats())["server"]["counters"].get("completions", 0) > before:
                return errors
        await asyncio.sleep(0.02)
    raise TimeoutError("no good answer after the fault")


async def measure_faults(served: Served, count: int) -> dict[str, Any]:
    decoding_text = DECODING_DOC.read_text()
    decoding = await served.server.open("file:///faults/decoding.py", decoding_text)
    other = await served.server.open("file:///faults/other.py", OTHER_DOC.read_text()[:3000])
    rows = []
    for index in range(count):
        sig = (signal.SIGKILL, signal.SIGSTOP)[index % 2]
        server = (await served.stats())["server"]
        pid, restarts = server["engine"]["pid"], server["engine"]["restarts"]
        await served.edit(other, 0, f"# before fault {index}\n")
        pending = served.inline(decoding, _cursor_in_body(decoding_text, 0.2 + 0.6 * index / count))
        if not await served.until_decoding(decoding.uri, pending):
            await pending
            rows.append({"signal": sig.name, "skipped": "the decode finished before the signal"})
            continue
        t0 = time.perf_counter()
        os.kill(pid, sig)
        await served.edit(other, 0, f"# typed while the engine was down {index}\n")
        try:
            answer = await pending
            in_flight = "empty" if not (answer or {}).get("items") else "items"
        except LspError as err:
            in_flight = f"error {err.code}"
        errors_after = await _first_good_answer(served, other, restarts + 1)
        seconds = time.perf_counter() - t0
        synced = await served.in_sync(decoding) and await served.in_sync(other)
        after = (await served.stats())["server"]["engine"]
        rows.append({"signal": sig.name, "in_flight": in_flight, "errors_after": errors_after,
                     "first_good_answer_s": round(seconds, 3), "in_sync": synced,
                     "restarts": after["restarts"] - restarts, "reason": after["last_loss"]})
        print(f"  {index + 1}/{count} {sig.name}: in flight {in_flight}, first good answer {seconds:.2f} s, "
              f"in sync {synced}", flush=True)
    done = [r for r in rows if "skipped" not in r]
    summary: dict[str, Any] = {"faults": count, "measured": len(done),
                               "restarts": sum(r["restarts"] for r in done),
                               "in_flight_errors": sum(r["in_flight"].startswith("error") for r in done),
                               "errors_after": sum(r["errors_after"] for r in done),
                               "out_of_sync": sum(not r["in_sync"] for r in done)}
    for name in ("SIGKILL", "SIGSTOP"):
        times = [r["first_good_answer_s"] for r in done if r["signal"] == name]
        summary[f"{name}_first_good_answer_s_p50"] = _quantile(times, 0.5)
        summary[f"{name}_first_good_answer_s_max"] = max(times, default=None)
    summary["rows"] = rows
    return summary


# -- the run --------------------------------------------------------------------------------------------------------

async def _run_served(model: str, cache: Path | None, parts: tuple[str, ...], faults: int, hovers: int,
                      engine_timeout: float, log: Any) -> dict[str, Any]:
    result: dict[str, Any] = {}
    if "hover" in parts:
        served = await Served.start(model, cache, log)
        try:
            result["hover"] = await measure_hover(served, hovers)
            result["hover"]["server_rss_mb"] = (await served.stats())["server"]["rss_mb"]
        finally:
            await served.client.close()
    if "faults" in parts:
        served = await Served.start(model, cache, log, ("--engine-timeout", f"{engine_timeout:g}"))
        try:
            result["faults"] = await measure_faults(served, faults)
        finally:
            await served.client.close()
    return result


def format_table(summary: dict[str, Any]) -> str:
    lines = ["| part | figure | value |", "|---|---|---:|"]
    for part in PARTS:
        for key, value in (summary.get(part) or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                lines.append(f"| {part} | {key} | {value:.3g} |" if isinstance(value, float) else
                             f"| {part} | {key} | {value} |")
    return "\n".join(lines)


def run_isolation_bench(model: str = DEFAULT_MODEL, *, cache: Path | None = None, json_out: Path | None = None,
                        parts: tuple[str, ...] = PARTS, faults: int = 20, hovers: int = 5,
                        engine_timeout: float = 5.0, label: str = "engine process") -> dict[str, Any]:
    t0 = time.perf_counter()
    summary: dict[str, Any] = {"label": label, "machine": machine_info(), "settings": SETTINGS,
                               "engine_timeout_s": engine_timeout}
    if "pipe" in parts:
        summary["pipe"] = measure_pipe()
    with tempfile.TemporaryFile("w+") as log:
        try:
            summary.update(asyncio.run(_run_served(model, cache, parts, faults, hovers, engine_timeout, log)))
        except Exception:
            log.seek(0)
            sys.stderr.write(log.read()[-4000:])
            raise
    summary["wall_s"] = round(time.perf_counter() - t0, 1)
    machine = summary["machine"]
    print(f"{label}: {machine['cpu']}, {machine['cpus']} cores, {', '.join(machine['cpu_features'])}")
    print(format_table(summary))
    write_json(summary, json_out or DEFAULT_JSON)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="superpie bench isolation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--faults", type=int, default=20, help="signals sent to the engine, SIGKILL and SIGSTOP")
    parser.add_argument("--hovers", type=int, default=5, help="long decodes to hover during")
    parser.add_argument("--engine-timeout", type=float, default=5.0, help="the server's --engine-timeout")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    parser.add_argument("--label", default="engine process")
    args = parser.parse_args(argv)
    parts = tuple(p for p in args.parts.split(",") if p)
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts: {', '.join(sorted(unknown))}")
    run_isolation_bench(args.model, cache=args.cache, json_out=args.json, parts=parts, faults=args.faults,
                        hovers=args.hovers, engine_timeout=args.engine_timeout, label=args.label)
    return 0


if __name__ == "__main__":
    sys.exit(main())
