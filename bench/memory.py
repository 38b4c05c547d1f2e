"""Memory with ten open documents: what the server and its engine hold, and what the KV rows are of it.

- `served`: for each `idleRows` setting, fp32 (the baseline), fp16 and int8, a fresh `superpie serve`
  opens the same documents, asks for a suggestion in each one in turn (so each is the document in use once and
  its rows are built), waits until the idle work stops, and reads `superpie.stats`: RSS of the server and of the
  engine, the KV cache's bytes and tokens. The ratio of the two runs is the figure to compare across machines.
- `arena`: the model alone under ONNX Runtime's memory settings, each in its own process, twice: the default (the
  CPU arena on, memory patterns off), the arena off, and memory patterns on. RSS and its peak after encoding a
  2,048-token document and decoding 64 tokens after it, and the decode's tokens per second.

Documents are this repository's own Python sources, cut at a line near `--tokens` tokens (the model's
tokenizer counts), so every machine has them.

    python -m bench.memory [--model M] [--cache DIR] [--json OUT] [--documents N] [--tokens T]
                           [--parts served,arena] [--idle-rows fp32,fp16,int8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.engine import machine_info, write_json
from bench.lsp import BenchServer, lsp_position
from inference.registry import DEFAULT_MODEL

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_JSON = Path(__file__).parent / "results" / "memory.json"
PARTS = ("served", "arena")
IDLE_ROWS = ("fp32", "fp16", "int8")  # the baseline first
SETTINGS = {"drafts": 1, "automaticDrafts": 1, "maxTokens": 16, "scope": "single", "prefetch": False}
INVOKED = 1
POLL_S = 1.0  # well above the worker's idle delay (lsp_server/worker.py IDLE_DELAY_S)
ARENA_TOKENS, ARENA_DECODE, ARENA_CHUNK = 2048, 64, 256


def documents(tokenizer: Any, count: int, tokens: int) -> list[tuple[str, str]]:
    """(uri, text) of the `count` largest sources here with at least `tokens` tokens, each cut at the end of
    the line where its `tokens`-th token falls."""
    sources = sorted((p for d in ("inference", "kv_cache", "lsp_server", "bench", "tests")
                      for p in (ROOT / d).rglob("*.py")), key=lambda p: -p.stat().st_size)
    picked = []
    for path in sources:
        text = path.read_text()
        ids = tokenizer.encode(text)
        if len(ids) < tokens:
            continue
        cut = len(tokenizer.decode(ids[:tokens]))
        end = text.find("\n", cut)
        picked.append((f"file:///memory/{path.relative_to(ROOT)}", text[:end + 1 if end >= 0 else len(text)]))
        if len(picked) == count:
            return picked
    raise ValueError(f"only {len(picked)} sources here have {tokens} tokens, not {count}")


# -- served ---------------------------------------------------------------------------------------------------------

async def _served_run(model: str, cache: Path | None, docs: list[tuple[str, str]], idle_rows: str,
                      log: Any) -> dict[str, Any]:
    server = await BenchServer.start(f"idleRows {idle_rows}", model=model, cache=cache, refresh="idle", log=log,
                                     settings={**SETTINGS, "idleRows": idle_rows})
    try:
        await server.wait_ready()
        t0 = time.perf_counter()
        for uri, text in docs:
            doc = await server.open(uri, text)
            cursor = text.rfind("\n", 0, len(text) // 2) + 1  # the start of a line halfway down
            await server.client.request("textDocument/inlineCompletion", {
                "textDocument": {"uri": doc.uri}, "position": lsp_position(text, cursor),
                "context": {"triggerKind": INVOKED}})
        cache_stats = await _until_built(server)
        stats = await server.stats()
        engine = stats["server"]["engine"]
        return {"idle_rows": idle_rows, "seconds": round(time.perf_counter() - t0, 1),
                "rss_mb": stats["server"]["rss_mb"], "server_rss_mb": stats["server"]["server_rss_mb"],
                "engine_rss_mb": engine["rss_mb"], "kv_mb": round(cache_stats["cache_bytes"] / 2**20, 1),
                "cached_tokens": cache_stats["cached_tokens"], "buffers": cache_stats["buffers_in_memory"],
                "evictions": cache_stats["evictions"], "bytes_per_token": cache_stats["bytes_per_token"],
                "rss_minus_kv_mb": round(stats["server"]["rss_mb"] - cache_stats["cache_bytes"] / 2**20, 1)}
    finally:
        await server.client.close()


async def _until_built(server: BenchServer, timeout: float = 900) -> dict[str, Any]:
    """The cache statistics once no document has tokens left to encode or stale rows, and the cached tokens stopped
    changing. It asks once a second: a question is a job, and idle work waits for a pause in the jobs."""
    deadline, previous = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        await asyncio.sleep(POLL_S)
        cache = await server.cache_stats()
        if not cache["encoding"] and not cache["stale_rows"] and cache["cached_tokens"] == previous:
            return cache
        previous = cache["cached_tokens"]
    raise TimeoutError(f"the documents' rows were still being built after {timeout:.0f} s")


def measure_served(model: str, cache: Path | None, docs: list[tuple[str, str]],
                   idle_rows_runs: tuple[str, ...] = IDLE_ROWS) -> dict[str, Any]:
    runs = {}
    with tempfile.TemporaryFile("w+") as log:
        try:
            for idle_rows in idle_rows_runs:
                runs[idle_rows] = asyncio.run(_served_run(model, cache, docs, idle_rows, log))
                print(f"  idleRows {idle_rows}: {runs[idle_rows]}", file=sys.stderr, flush=True)
        except Exception:
            log.seek(0)
            sys.stderr.write(log.read()[-4000:])
            raise
    base = runs["fp32"]
    return {"documents": len(docs), "runs": runs,
            "ratios": {name: {"rss": round(run["rss_mb"] / base["rss_mb"], 3),
                              "kv": round(run["kv_mb"] / base["kv_mb"], 3)} for name, run in runs.items()}}


# -- arena ----------------------------------------------------------------------------------------------------------

ARENA_VARIANTS = {"default": (True, False), "arena off": (False, False), "patterns on": (True, True)}


def arena_probe(model: str, cache: Path | None, variant: str) -> dict[str, Any]:
    """In this process: the model under ARENA_VARIANTS[variant], a 2,048-token encode and 64 decoded tokens."""
    arena, mem_pattern = ARENA_VARIANTS[variant]
    import numpy as np

    from bench.engine import peak_rss_mb
    from inference.convert import load_config
    from inference.converted import MODEL_FILE
    from inference.model_store import prepare_model
    from inference.runtime import Decoder
    from lsp_server.engine_process import rss_mb

    model_dir = prepare_model(model, cache=cache, progress=False)
    cfg = load_config(model_dir)
    decoder = Decoder(model_dir / MODEL_FILE, cfg, arena=arena, mem_pattern=mem_pattern)
    shape = (cfg.n_kv_heads, ARENA_TOKENS + ARENA_DECODE, cfg.head_dim)
    keys = [np.zeros(shape, np.float32) for _ in range(cfg.n_layers)]
    values = [np.zeros(shape, np.float32) for _ in range(cfg.n_layers)]
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, ARENA_TOKENS + ARENA_DECODE)

    def step(start: int, stop: int) -> None:
        out = decoder.forward(ids[start:stop], np.arange(start, stop), [k[:, :start] for k in keys],
                              [v[:, :start] for v in values])
        for buf, new in zip(keys + values, out.keys + out.values):
            buf[:, start:stop] = new

    t0 = time.perf_counter()
    for start in range(0, ARENA_TOKENS, ARENA_CHUNK):
        step(start, start + ARENA_CHUNK)
    t1 = time.perf_counter()
    for position in range(ARENA_TOKENS, ARENA_TOKENS + ARENA_DECODE):
        step(position, position + 1)
    t2 = time.perf_counter()
    kv_mb = sum(a.nbytes for a in keys + values) / 2**20
    return {"variant": variant, "rss_mb": rss_mb(), "peak_rss_mb": round(peak_rss_mb(), 1), "kv_mb": round(kv_mb, 1),
            "encode_s": round(t1 - t0, 2), "decode_tok_s": round(ARENA_DECODE / (t2 - t1), 1)}


def measure_arena(model: str, cache: Path | None) -> dict[str, Any]:
    runs = {}
    for variant in [*ARENA_VARIANTS] * 2:  # twice each, interleaved: the machine's noise shows in the spread
        command = [sys.executable, "-m", "bench.memory", "--model", model, "--arena-probe", variant,
                   *(["--cache", str(cache)] if cache else [])]
        result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT).stdout)
        runs.setdefault(variant, []).append(result)
        print(f"  {variant}: {result}", file=sys.stderr, flush=True)
    return runs


# -- the run --------------------------------------------------------------------------------------------------------

def format_table(summary: dict[str, Any]) -> str:
    lines = []
    served = summary.get("served")
    if served:
        lines += ["| idleRows | RSS MB | server MB | engine MB | KV MB | RSS − KV MB | tokens | buffers | evictions |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, run in served["runs"].items():
            lines.append(f"| {name} | {run['rss_mb']:.0f} | {run['server_rss_mb']:.0f} | {run['engine_rss_mb']:.0f} "
                         f"| {run['kv_mb']:.0f} | {run['rss_minus_kv_mb']:.0f} | {run['cached_tokens']} "
                         f"| {run['buffers']} | {run['evictions']} |")
        lines.append("\nagainst fp32 idle rows, same run: " + ", ".join(
            f"{name} RSS {r['rss']:.3f} KV {r['kv']:.3f}" for name, r in served["ratios"].items() if name != "fp32"))
        lines.append("")
    arena = summary.get("arena")
    if arena:
        lines += ["| ONNX Runtime memory | RSS MB | peak RSS MB | encode 2,048 s | decode tok/s |",
                  "|---|---:|---:|---:|---:|"]
        for name, runs in arena.items():
            for run in runs:
                lines.append(f"| {name} | {run['rss_mb']:.0f} | {run['peak_rss_mb']:.0f} | {run['encode_s']:.2f} "
                             f"| {run['decode_tok_s']:.1f} |")
    return "\n".join(lines)


def run_memory_bench(model: str = DEFAULT_MODEL, *, cache: Path | None = None, json_out: Path | None = None,
                     parts: tuple[str, ...] = PARTS, count: int = 10, tokens: int = 2000,
                     idle_rows: tuple[str, ...] = IDLE_ROWS) -> dict[str, Any]:
    t0 = time.perf_counter()
    summary: dict[str, Any] = {"machine": machine_info(), "settings": SETTINGS}
    if "served" in parts:
        from inference.converted import TOKENIZER_FILE
        from inference.model_store import prepare_model
        from inference.tokenizer import tokenizer_from_metadata

        model_dir = prepare_model(model, cache=cache, progress=sys.stderr.isatty())
        tokenizer = tokenizer_from_metadata(json.loads((model_dir / TOKENIZER_FILE).read_text()))
        docs = documents(tokenizer, count, tokens)
        summary["served"] = measure_served(model, cache, docs, idle_rows)
        summary["served"]["document_uris"] = [uri for uri, _ in docs]
    if "arena" in parts:
        summary["arena"] = measure_arena(model, cache)
    summary["wall_s"] = round(time.perf_counter() - t0, 1)
    machine = summary["machine"]
    print(f"memory: {machine['cpu']}, {machine['cpus']} cores, {', '.join(machine['cpu_features'])}")
    print(format_table(summary))
    write_json(summary, json_out or DEFAULT_JSON)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="superpie bench memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--documents", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=2000, help="tokens per document")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    parser.add_argument("--idle-rows", default=",".join(IDLE_ROWS),
                        help="the served runs' idleRows, comma-separated; fp32 (the baseline) first")
    parser.add_argument("--arena-probe", choices=tuple(ARENA_VARIANTS), help=argparse.SUPPRESS)  # one run, a child
    args = parser.parse_args(argv)
    if args.arena_probe:
        print(json.dumps(arena_probe(args.model, args.cache, args.arena_probe)))
        return 0
    parts = tuple(p for p in args.parts.split(",") if p)
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts: {', '.join(sorted(unknown))}")
    idle_rows = tuple(r for r in args.idle_rows.split(",") if r)
    if not idle_rows or idle_rows[0] != "fp32" or set(idle_rows) - set(IDLE_ROWS):
        parser.error(f"--idle-rows: fp32 first, then any of {', '.join(IDLE_ROWS[1:])}")
    run_memory_bench(args.model, cache=args.cache, json_out=args.json, parts=parts, count=args.documents,
                     tokens=args.tokens, idle_rows=idle_rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
