"""Repository-level next lines: completions with context from the other open files against without, through LSP.

Targets (bench/crossfile_sources.py): lines of `requests` (its pinned sdist) and of packages of the Python standard
library that use a name defined in another file of the same package and not in their own, drawn with a fixed seed
and emptied after their indentation. For each target, the files that define those names are open as other tabs,
next to the target's file.

Two real `superpie serve` processes with the default settings, except `crossFileContext` (off in one, on in the
other, with `crossFileTokens` = `--tokens`), take turns target by target (which one answers first alternates). Both
hold the same documents; before each target both are quiet again (windows encoded, stale rows refreshed), so what
differs is the context alone. Per target and server: a didChange that empties the line and an Invoked inline
request in one write, the first item's text, a didChange that restores the line.

Reported per package group (requests, stdlib) and overall: exact match of the first line (stripped) and its mean
edit similarity (difflib ratio), with and without; the latency from the write to the answer (p50, p90) and its
ratio on / off in this run; the chunks and tokens of context the server placed; the servers' RSS at the end.

The approximation and its ceiling (`--agreement N`, in this process, on N targets drawn evenly): at each target
that gets context, the server's prompt with borrowed rows, the same token ids encoded fresh (the context's, then
the document's) and the document alone, on the server's model and quantization: how often borrowed and fresh agree
on the next token (argmax) and on the greedy first line, and the exact first lines of all three. Fresh is what
this context could give if every row of the prompt had seen it. A fourth prompt, `oracle`, is fresh too, with the
chunks a perfect choice would take: those defining the names the target line itself uses.

    superpie bench crossfile [--data DIR] [--limit N] [--tokens N] [--agreement N] [--no-served] [--json OUT]
                             [--model M]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.crossfile_sources import CrossTarget, PackageFile, crossfile_targets, load_package_files, sources_info
from bench.cold import first_line
from bench.engine import machine_info, save_results
from bench.languages import similarity
from bench.lsp import INVOKED, BenchServer, Keystroke, percentile
from inference.generate import DecodeCache, prefill
from inference.registry import DEFAULT_MODEL
from inference.syntax.definitions import code_chunks
from inference.syntax.languages import language_of
from kv_cache.crossfile import MAX_CHUNK_TOKENS

DEFAULT_JSON = Path(__file__).parent / "results" / "crossfile.json"
DEFAULT_LIMIT = 120
DEFAULT_TOKENS = 512
DEFAULT_AGREEMENT = 40
MODES = ("off", "on")
URI_ROOT = "file:///crossfile"


def uri_of(file: PackageFile) -> str:
    """Under a folder per package, so the prompt's path headers read like the package's own (`requests/models.py`)."""
    return f"{URI_ROOT}/{file.package}/{file.path}"


def measure(text: str, target: CrossTarget) -> dict[str, Any]:
    predicted, expected = first_line(text), target.target.expected.strip()
    return {"first_line": text.split("\n", 1)[0], "exact": predicted == expected,
            "similarity": round(similarity(predicted, expected), 4)}


def summarize(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per group (requests, stdlib, all) and mode: n, exact, similarity, latency p50/p90, context tokens."""
    out: dict[str, dict[str, Any]] = {}
    for group in ("requests", "stdlib", "all"):
        mine = [r for r in rows if group == "all" or r["package"].split("/")[0] == group]
        if not mine:
            continue
        out[group] = {}
        for mode in MODES:
            part = [r for r in mine if r["mode"] == mode]
            latencies = [r["latency_ms"] for r in part]
            out[group][mode] = {"n": len(part), "exact": round(statistics.mean(r["exact"] for r in part), 4),
                                "similarity": round(statistics.mean(r["similarity"] for r in part), 4),
                                "p50_ms": round(percentile(latencies, 0.5), 1),
                                "p90_ms": round(percentile(latencies, 0.9), 1),
                                "context_tokens": round(statistics.mean(r["context_tokens"] for r in part), 1)}
        on, off = out[group]["on"], out[group]["off"]
        out[group]["exact_points"] = round(100 * (on["exact"] - off["exact"]), 1)
        out[group]["p50_ratio"] = round(on["p50_ms"] / off["p50_ms"], 3) if off["p50_ms"] else None
    return out


def format_table(summary: dict[str, dict[str, Any]]) -> str:
    lines = ["| targets | n | exact (off / on) | + points | edit similarity (off / on) | p50 ms (off / on) | "
             "p50 on/off | p90 ms (off / on) | context tokens |", "|---|" + "---:|" * 8]
    for group, s in summary.items():
        off, on = s["off"], s["on"]
        lines.append(f"| {group} | {on['n']} | {off['exact']:.2f} / {on['exact']:.2f} | {s['exact_points']:+.1f} | "
                     f"{off['similarity']:.2f} / {on['similarity']:.2f} | {off['p50_ms']:.0f} / {on['p50_ms']:.0f} | "
                     f"{s['p50_ratio']:.2f} | {off['p90_ms']:.0f} / {on['p90_ms']:.0f} | {on['context_tokens']:.0f} |")
    return "\n".join(lines)


# -- the LSP run ----------------------------------------------------------------------------------------------------

class _Tabs:
    """The documents one server has open: the target's file and its defining files, the rest closed."""

    def __init__(self, server: BenchServer) -> None:
        self.server = server
        self.open: dict[str, Any] = {}

    async def show(self, files: list[PackageFile]) -> None:
        """Open these; close the files of other packages (a package's stay open: its next target may need them)."""
        wanted = {uri_of(f): f for f in files}
        package = f"{URI_ROOT}/{files[0].package}/"
        for uri in [u for u in self.open if not u.startswith(package)]:
            await self.server.close(self.open.pop(uri))
        for uri, file in wanted.items():
            if uri not in self.open:
                self.open[uri] = await self.server.open(uri, file.text, "python")


async def _context_of(server: BenchServer) -> float:
    """Tokens of context the server placed for its last completion (its timings)."""
    recent = (await server.cache_stats()).get("recent_timings") or [{}]
    return float(recent[-1].get("cross_file_tokens", 0.0))


async def _run(model: str, cache: Path | None, files: list[PackageFile], targets: list[CrossTarget], tokens: int,
               log: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    by_path = {(f.package, f.path): f for f in files}
    settings = {"off": {"crossFileContext": False}, "on": {"crossFileContext": True, "crossFileTokens": tokens}}
    servers = {m: await BenchServer.start(m, model=model, cache=cache, refresh="idle", log=log, settings=settings[m])
               for m in MODES}
    tabs = {m: _Tabs(s) for m, s in servers.items()}
    rows: list[dict[str, Any]] = []
    try:
        for server in servers.values():
            await server.wait_ready()
        for turn, cross in enumerate(targets):
            target = cross.target
            file = by_path[(target.source, target.name)]
            needed = [file, *(by_path[(target.source, p)] for p in cross.defining if (target.source, p) in by_path)]
            for mode in MODES:
                await tabs[mode].show(needed)
            for server in servers.values():
                await server.wait_quiet()
            line = file.text.count("\n", 0, target.cursor)
            for mode in MODES[::-1] if turn % 2 else MODES:
                server, doc = servers[mode], tabs[mode].open[uri_of(file)]
                key = Keystroke("crossfile", line, target.cursor, target.cursor + len(target.expected), "",
                                target.cursor)
                latency, text = await server.keystroke(doc, key, trigger=INVOKED)
                context = await _context_of(server)
                await server.client.send(server.change_frame(doc, target.cursor, target.cursor, target.expected))
                rows.append({"package": target.source, "file": target.name, "line": line + 1, "mode": mode,
                             "names": list(cross.names), "defining": list(cross.defining),
                             "expected": target.expected, "text": text, "latency_ms": round(latency, 1),
                             "context_tokens": context, **measure(text, cross)})
                print(f"{mode:3s} {target.name}:{line + 1} {latency:6.0f} ms ctx {context:4.0f} "
                      f"{'=' if rows[-1]['exact'] else ' '} {rows[-1]['first_line']!r}", file=sys.stderr, flush=True)
        memory = {}
        for mode, server in servers.items():
            stats = await server.stats()
            cache_stats = await server.cache_stats()
            memory[mode] = {"rss_mb": stats["server"]["rss_mb"], "kv_mb": round(cache_stats["cache_bytes"] / 2**20, 1),
                            "budget_mb": round(cache_stats["budget_bytes"] / 2**20, 1)}
        return rows, {"memory": memory}
    finally:
        for server in servers.values():
            await server.client.close()


# -- the approximation and the ceiling, in process ------------------------------------------------------------------

def in_process(model_name: str, cache: Path | None, files: list[PackageFile], targets: list[CrossTarget],
               tokens: int) -> dict[str, Any]:
    """On the server's model and quantization, one completer holding the documents as a server does (each
    target's line emptied by an edit, measured once the idle work is done, then restored). At each target that gets
    context, four prompts: the document alone (off), the server's prompt with borrowed rows, the same token ids
    encoded fresh (what the context could give if every row saw it), and the oracle's chunks encoded fresh (what a
    perfect choice could give). Reported: how often borrowed and fresh agree on the next token (argmax) and on the
    greedy first line, and the exact first lines of each."""
    from inference.model_store import load_model
    from kv_cache.edits import TextEdit
    from lsp_server.completer import Completer

    model = load_model(model_name, cache=cache, progress=False)
    completer = Completer(model)
    by_path = {(f.package, f.path): f for f in files}
    same_token = same_line = n = 0
    exact = {"off": 0, "borrowed": 0, "fresh": 0, "oracle": 0}
    for cross in targets:
        target = cross.target
        needed = {uri_of(f): f for f in [by_path[(target.source, target.name)], *(
            by_path[(target.source, p)] for p in cross.defining if (target.source, p) in by_path)]}
        for uri in [u for u in completer.docs if not u.startswith(f"{URI_ROOT}/{target.source}/")]:
            completer.close(uri)
        for uri, file in needed.items():
            if uri not in completer.docs:
                completer.open(uri, file.text, "python")
        uri = uri_of(by_path[(target.source, target.name)])
        end = target.cursor + len(target.expected)
        completer.change(uri, [TextEdit(target.cursor, end, "")])
        while completer.refresh_step():
            pass
        doc = completer.docs[uri]
        borrowed = completer.crossfile.rows_for(uri, target.cursor, completer.docs, completer.languages, tokens)
        if borrowed is not None:
            n += 1
            # an emptied line has nothing after the cursor: the server's "auto" layout is the prefix one
            off = doc.context(target.cursor, with_suffix=False, room=32)
            lines = {"off": _greedy_line(model, off.cache, off.logits)}
            ctx = doc.context(target.cursor, with_suffix=False, room=32, borrowed=borrowed)
            ids = [*borrowed.ids, *doc.cache().ids[:ctx.prefix_rows].tolist()]
            fresh = DecodeCache.empty(model.config, len(ids) + 32)
            fresh_logits = prefill(model.decoder, fresh, ids)
            same_token += int(np.argmax(ctx.logits) == np.argmax(fresh_logits))
            lines["borrowed"] = _greedy_line(model, ctx.cache, ctx.logits)
            lines["fresh"] = _greedy_line(model, fresh, fresh_logits)
            same_line += lines["borrowed"] == lines["fresh"]
            ids = [*_oracle_context(model.tokenizer, cross, by_path, tokens), *doc.cache().ids[:ctx.prefix_rows].tolist()]
            fresh = DecodeCache.empty(model.config, len(ids) + 32)
            lines["oracle"] = _greedy_line(model, fresh, prefill(model.decoder, fresh, ids))
            for kind, line in lines.items():
                exact[kind] += line.strip() == target.expected.strip()
            print(f"in process {target.name}: " + " | ".join(f"{k} {v.strip()!r}" for k, v in lines.items()),
                  file=sys.stderr, flush=True)
        completer.change(uri, [TextEdit(target.cursor, target.cursor, target.expected)])
    return {"targets": len(targets), "with_context": n,
            "next_token_agreement": round(same_token / n, 4) if n else None,
            "first_line_agreement": round(same_line / n, 4) if n else None,
            "exact": {kind: round(k / n, 4) if n else None for kind, k in exact.items()}}


def _oracle_context(tokenizer: Any, cross: CrossTarget, by_path: dict[tuple[str, str], PackageFile],
                    budget: int) -> list[int]:
    """The context a perfect choice would place: the chunks that define the names the target line itself uses (not
    known at a real cursor), in the same format and budget, each at most MAX_CHUNK_TOKENS."""
    python, ids, left = language_of("python"), [], budget
    for path in cross.defining:
        file = by_path.get((cross.target.source, path))
        if file is None:
            continue
        body: list[int] = []
        for chunk in code_chunks(python, file.text):
            if chunk.names & set(cross.names):
                chunk_ids = tokenizer.encode(file.text[chunk.start:chunk.stop] + "\n")[:MAX_CHUNK_TOKENS]
                if len(chunk_ids) > left:
                    break
                body += chunk_ids
                left -= len(chunk_ids)
        if body:
            ids += [tokenizer.specials.file_sep, *tokenizer.encode(path + "\n"), *body]
    return [*ids, tokenizer.specials.file_sep, *tokenizer.encode(cross.target.name + "\n")] if ids else []


def _greedy_line(model: Any, cache: DecodeCache, logits: np.ndarray, steps: int = 24) -> str:
    from inference.generate import decode_one_token

    out = []
    for _ in range(steps):
        token = int(np.argmax(logits))
        out.append(token)
        if "\n" in model.tokenizer.decode(out) or token in model.tokenizer.specials.stop:
            break
        logits = decode_one_token(model.decoder, cache, token)
    return model.tokenizer.decode(out).split("\n", 1)[0]


def run_crossfile_bench(model: str = DEFAULT_MODEL, *, cache: Path | None = None, data: Path | None = None,
                        json_out: Path | None = None, limit: int = DEFAULT_LIMIT, tokens: int = DEFAULT_TOKENS,
                        agreement_targets: int = DEFAULT_AGREEMENT, served: bool = True) -> dict[str, Any]:
    """`served`: the LSP run (without it, only the in-process phase)."""
    if limit < 1:
        raise ValueError("--limit must be at least 1")
    files = load_package_files(data)
    # the draw, in package order: a package's files are encoded once for all of its targets
    targets = sorted(crossfile_targets(files, limit), key=lambda t: (t.target.source, t.target.name, t.target.cursor))
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    info: dict[str, Any] = {"memory": None}
    if served:
        with tempfile.NamedTemporaryFile("w", prefix="superpie-bench-crossfile-", suffix=".log", delete=False) as log:
            print(f"server log: {log.name}", file=sys.stderr)
            rows, info = asyncio.run(_run(model, cache, files, targets, tokens, log))
    lsp_s = time.perf_counter() - t0
    approx = in_process(model, cache, files, targets[::max(len(targets) // agreement_targets, 1)][:agreement_targets],
                        tokens) if agreement_targets else None
    summary = {
        "model": model,
        "settings": {"limit": limit, "cross_file_tokens": tokens, "trigger": "invoked",
                     "server_settings": "defaults, crossFileContext off / on"},
        "machine": machine_info(load_before),
        "sources": sources_info(),
        "lsp_s": round(lsp_s, 1),
        "wall_s": round(time.perf_counter() - t0, 1),
        "results": summarize(rows),
        "agreement": approx,
        **info,
        "rows": rows,
    }
    print(f"Cross-file context: {model}, {summary['machine'].get('cpu')} ({os.cpu_count()} cores), {len(targets)} "
          f"targets, budget {tokens} tokens")
    if rows:
        print(format_table(summary["results"]))
    if approx and approx["with_context"]:
        print(f"in process, {approx['with_context']} of {approx['targets']} targets with context: borrowed rows vs a "
              f"fresh encode of the same prompt agree on the next token {approx['next_token_agreement']}, on the "
              f"greedy first line {approx['first_line_agreement']}; exact first lines {approx['exact']}")
    if info["memory"]:
        print(f"memory: {info['memory']}")
    save_results(summary, json_out or DEFAULT_JSON)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="superpie bench crossfile", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--cache", type=Path, default=None, help="model cache (default: $SUPERPIE_CACHE)")
    parser.add_argument("--data", type=Path, default=None,
                        help="where the requests sdist and its files go (default: $SUPERPIE_CACHE/bench-crossfile)")
    parser.add_argument("--limit", type=int, default=DEFAULT_LIMIT, help=f"targets ({DEFAULT_LIMIT})")
    parser.add_argument("--tokens", type=int, default=DEFAULT_TOKENS,
                        help=f"crossFileTokens of the server with context ({DEFAULT_TOKENS})")
    parser.add_argument("--agreement", type=int, default=DEFAULT_AGREEMENT,
                        help=f"targets (evenly drawn) for the in-process agreement of borrowed rows with a fresh "
                             f"encode ({DEFAULT_AGREEMENT}; 0: none)")
    parser.add_argument("--no-served", dest="served", action="store_false",
                        help="only the in-process phase, no LSP servers")
    parser.add_argument("--json", dest="json_out", type=Path, default=None, help=f"default: {DEFAULT_JSON}")
    args = parser.parse_args(argv)
    run_crossfile_bench(args.model, cache=args.cache, data=args.data, json_out=args.json_out, limit=args.limit,
                        tokens=args.tokens, agreement_targets=args.agreement, served=args.served)
    return 0


if __name__ == "__main__":
    sys.exit(main())
