"""Next-line quality per language: the syntax rules against the text rules, on real code, through LSP.

Sources: a few pinned files per language from npm, Debian and PyPI archives (bench/language_sources.py names
them). Targets: lines of real code (not blank, not only closing brackets and punctuation, not a comment or a
docstring, not inside a block comment or multi-line string), drawn with a fixed seed per language, `--limit` per
language. A target line is emptied after its indentation.

A real `superpie serve` with its default settings (no saved buffers) opens each file twice: under its languageId
(the syntax rules apply) and, as the baseline in the same run, under "plaintext" at another URI, the path plus
`.text-rules` (the server would take the language from the file's extension): the text rules apply. Both documents
are encoded before the file's first target, and the server is quiet again (the restored rows refreshed) before
each target, so that both documents answer from the same rows and what differs is the rules alone; without it
near-ties between drafts went one way or the other with the idle work's timing (`--no-settle`: not waited for,
so cold answers from the 256 tokens before the cursor). Per target and document: a didChange that empties the line, an Invoked inline request at its
cursor written with it, the first item's text, and a didChange that restores the line. The two documents take
turns, target by target (which one goes first alternates).

Reported per language and rules (`rules` / `text`): exact match of the first line (stripped) against the real
line, its mean edit similarity (difflib ratio), suffix duplications (the completion, or its first line, ends with
what follows the cursor or repeats the next line: `inference.syntax.finish.repeated_suffix`, with the file's
language for both documents), lines whose bracket balance ((), [] and {} opened minus closed, outside strings and
comments) differs from the real line's (and how many of those agree with the real line up to the first bracket of
either: the same call or clause, closed differently; the others are another statement), empty answers and the latency p50 (from the write to the answer).

    superpie bench languages [--data DIR] [--limit N] [--json OUT] [--model M] [--cache DIR] [--no-settle]
"""

from __future__ import annotations

import argparse
import asyncio
import difflib
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.cold import Target, _emptied, first_line
from bench.engine import machine_info, save_results
from bench.language_sources import (
    LANGUAGES,
    SOURCES,
    SourceFile,
    default_data,
    load_sources,
)
from bench.lsp import INVOKED, BenchServer, Keystroke, percentile, split_lines
from inference.registry import DEFAULT_MODEL
from inference.syntax.finish import repeated_suffix
from inference.syntax.languages import language_of
from inference.syntax.lexer import CodeState, advance, is_word
from lsp_server.engine_process import text_digest

DEFAULT_JSON = Path(__file__).parent / "results" / "languages.json"
DEFAULT_LIMIT = 25
SEED = 0
MODES = ("rules", "text")  # the file's languageId, then "plaintext" (the baseline)
BRACKETS = ("()", "[]", "{}")
# The baseline's URI: a path without the file's extension, which the server would take for the language when the id
# is "plaintext" (a query would keep it)
TEXT_RULES_SUFFIX = ".text-rules"


# -- targets --------------------------------------------------------------------------------------------------------

def target_lines(text: str, language: str) -> list[int]:
    """0-based lines of real code to complete: something word-like on them, starting and ending in code (not in a
    block comment or multi-line string), not a comment or a docstring."""
    lex = language_of(language).lexicon
    markers = (*lex.line_comments, *(lex.block_comment[:1] if lex.block_comment else ()), *lex.multiline_quotes)
    state, out = CodeState(), []
    for i, line in enumerate(split_lines(text)):
        before = state
        state, _ = advance(lex, line, state)
        content = line.strip()
        if (before.in_code and state.in_code and any(is_word(ch) for ch in content)
                and not content.startswith(markers)):
            out.append(i)
    return out


def language_targets(files: list[SourceFile], limit: int, seed: int = SEED) -> list[Target]:
    """`limit` target lines drawn from the files' candidates with a fixed seed (a smaller limit takes a prefix of a
    larger one's draw), in file and line order; `Target.source` is the language."""
    candidates = [(k, i) for k, f in enumerate(files) for i in target_lines(f.text, f.language)]
    random.Random(seed).shuffle(candidates)
    targets = []
    for k, i in sorted(candidates[:limit]):
        text = files[k].text
        lines = split_lines(text)
        line = lines[i].rstrip("\n")
        offset = sum(len(x) for x in lines[:i])
        targets.append(_emptied(files[k].language, files[k].name, text, offset, line[:len(line) - len(line.lstrip())],
                                line))
    return targets


# -- measures -------------------------------------------------------------------------------------------------------

def _code_brackets(line: str, language: str) -> list[int]:
    """Where the line's brackets are, outside its strings and comments."""
    lex = language_of(language).lexicon
    state, at, out = CodeState(), 0, []
    for i, ch in enumerate(line):
        if ch not in "()[]{}":
            continue
        state, _ = advance(lex, line, state, at, i)
        if state.in_code:
            out.append(i)
        state, _ = advance(lex, line, state, i, i + 1)
        at = i + 1
    return out


def bracket_balance(line: str, language: str) -> tuple[int, ...]:
    """Per kind of bracket, ( [ {, how many the line opens minus how many it closes, outside its strings and
    comments."""
    balance = dict.fromkeys("([{", 0)
    for i in _code_brackets(line, language):
        for opener, closer in BRACKETS:
            balance[opener] += (line[i] == opener) - (line[i] == closer)
    return tuple(balance.values())


def same_start(line: str, expected: str, language: str) -> bool:
    """The two lines agree up to the first bracket of either (the same call, subscript or clause: where the syntax
    rules decide what is closed; a different statement is the model's choice, not theirs)."""
    line, expected = line.strip(), expected.strip()
    firsts = [(b[0] if b else len(x)) for x in (line, expected) for b in [_code_brackets(x, language)]]
    return line[:firsts[0] + 1] == expected[:firsts[1] + 1]


def similarity(a: str, b: str) -> float:
    return difflib.SequenceMatcher(None, a, b).ratio()


def duplicates_suffix(text: str, target: Target) -> bool:
    """The completion, whole or its first line, ends with what the text after the cursor starts with, or its last
    line is the next line."""
    prefix, suffix = target.text[:target.cursor], target.text[target.cursor:]
    return any(part and repeated_suffix(part, prefix, suffix, target.source)
               for part in {text, text.split("\n", 1)[0]})


def measure(text: str, target: Target) -> dict[str, Any]:
    """One answer against the real line."""
    predicted, expected = first_line(text), target.expected.strip()
    first = text.split("\n", 1)[0]
    mismatch = bracket_balance(first, target.source) != bracket_balance(target.expected, target.source)
    return {"first_line": first, "exact": predicted == expected,
            "similarity": round(similarity(predicted, expected), 4), "duplicated": duplicates_suffix(text, target),
            "bracket_mismatch": mismatch, "bracket_mismatch_same_start": mismatch and same_start(
                first, target.expected, target.source),
            "empty": not text.strip()}


def summarize(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per language (and "all") and mode: n, exact, mean similarity, counts of duplications, bracket mismatches and
    empty answers, latency p50."""
    out: dict[str, dict[str, Any]] = {}
    for language in [*[lang for lang in LANGUAGES if any(r["language"] == lang for r in rows)], "all"]:
        out[language] = {}
        for mode in MODES:
            group = [r for r in rows if r["mode"] == mode and language in ("all", r["language"])]
            if not group:
                continue
            out[language][mode] = {
                "n": len(group), "exact": round(statistics.mean(r["exact"] for r in group), 4),
                "similarity": round(statistics.mean(r["similarity"] for r in group), 4),
                "duplicated": sum(r["duplicated"] for r in group),
                "bracket_mismatch": sum(r["bracket_mismatch"] for r in group),
                "bracket_mismatch_same_start": sum(r["bracket_mismatch_same_start"] for r in group),
                "empty": sum(r["empty"] for r in group),
                "p50_ms": round(percentile([r["latency_ms"] for r in group], 0.5), 1)}
    return out


def format_table(summary: dict[str, dict[str, Any]]) -> str:
    """Markdown, one row per language: each cell `rules / text`."""
    columns = (("n", "n", "{}"), ("exact", "exact", "{:.2f}"), ("similarity", "edit similarity", "{:.2f}"),
               ("duplicated", "suffix duplications", "{}"), ("bracket_mismatch", "bracket balance differs", "{}"),
               ("bracket_mismatch_same_start", "of which the same start", "{}"),
               ("empty", "empty", "{}"), ("p50_ms", "p50 ms", "{:.0f}"))
    lines = ["| language | " + " | ".join(f"{title} (rules / text)" for _, title, _ in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for language, modes in summary.items():
        cells = [" / ".join(fmt.format(modes[m][key]) if m in modes else "" for m in MODES) for key, _, fmt in columns]
        lines.append(f"| {language} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -- the run --------------------------------------------------------------------------------------------------------

async def _document(server: BenchServer, uri: str) -> dict[str, Any]:
    """What the server says of one open document (superpie.stats with its URI): its text's digest, its rules."""
    stats = await server.client.request("workspace/executeCommand", {"command": "superpie.stats", "arguments": [uri]})
    return stats.get("document") or {}


async def _run(model: str, cache: Path | None, files: list[SourceFile], targets: list[Target], settle: bool,
               log: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    server = await BenchServer.start("languages", model=model, cache=cache, refresh="idle", log=log, settings={})
    rows, settled, syntax, turn = [], {}, {}, 0
    try:
        await server.wait_ready()
        for file in files:
            mine = [t for t in targets if t.name == file.name]
            if not mine:
                continue
            uri = f"file:///languages/{file.name}"
            docs = {"rules": await server.open(uri, file.text, file.language),
                    "text": await server.open(uri + TEXT_RULES_SUFFIX, file.text, "plaintext")}
            syntax[file.name] = {mode: (await _document(server, doc.uri)).get("syntax") for mode, doc in docs.items()}
            if "text rules" not in (syntax[file.name]["text"] or "text rules"):
                raise AssertionError(f"{docs['text'].uri} got {syntax[file.name]['text']}, not the text rules")
            if settle:
                settled[file.name] = round(await server.wait_quiet(), 1)
            for target in mine:
                if settle:  # both documents back to fully refreshed rows: the modes then start from the same state
                    settled[file.name] = round(settled[file.name] + await server.wait_quiet(), 1)
                line = file.text.count("\n", 0, target.cursor)
                end = target.cursor + len(target.expected)
                turn += 1
                for mode in MODES[::-1] if turn % 2 == 0 else MODES:  # which one answers first alternates
                    doc = docs[mode]
                    key = Keystroke("languages", line, target.cursor, end, "", target.cursor)
                    latency, text = await server.keystroke(doc, key, trigger=INVOKED)
                    await server.client.send(server.change_frame(doc, target.cursor, target.cursor, target.expected))
                    rows.append({"language": file.language, "file": file.name, "line": line + 1, "mode": mode,
                                 "expected": target.expected, "text": text, "latency_ms": round(latency, 1),
                                 **measure(text, target)})
                    print(f"{file.language:10s} {mode:5s} {file.name}:{line + 1} {latency:6.0f} ms "
                          f"{'=' if rows[-1]['exact'] else ' '} {rows[-1]['first_line']!r}", file=sys.stderr,
                          flush=True)
            for doc in docs.values():
                if (await _document(server, doc.uri)).get("sha256") not in (text_digest(file.text), None):
                    raise AssertionError(f"{doc.uri}: the server's text is not the file after the restoring edits")
                await server.close(doc)
        info = {"settle_s": settled, "syntax": syntax, "server": (await server.stats())["server"]["counters"],
                "messages": server.client.messages}
        return rows, info
    finally:
        await server.client.close()


def run_languages_bench(model: str = DEFAULT_MODEL, *, cache: Path | None = None, data: Path | None = None,
                        json_out: Path | None = None, limit: int = DEFAULT_LIMIT,
                        languages: tuple[str, ...] = LANGUAGES, settle: bool = True,
                        files: list[SourceFile] | None = None) -> dict[str, Any]:
    """`files`: the sources to use instead of the pinned ones (tests)."""
    if limit < 1:
        raise ValueError("--limit must be at least 1")
    pinned = files is None
    files = load_sources(data or default_data(), languages) if files is None else files
    targets = [t for lang in languages for t in language_targets([f for f in files if f.language == lang], limit)]
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    with tempfile.NamedTemporaryFile("w", prefix="superpie-bench-languages-", suffix=".log", delete=False) as log:
        print(f"server log: {log.name}", file=sys.stderr)
        rows, info = asyncio.run(_run(model, cache, files, targets, settle, log))
    summary = {
        "model": model,
        "settings": {"limit": limit, "seed": SEED, "trigger": "invoked", "server_settings": "defaults",
                     "settle": settle, "baseline": "the same file under languageId plaintext (text rules)"},
        "machine": machine_info(load_before),
        "sources": [{k: v for k, v in asdict(s).items() if k != "root"} for s in SOURCES
                    if pinned and s.language in languages],
        "files": [{"language": f.language, "name": f.name, "bytes": len(f.text.encode()), "sha256": f.sha256,
                   "targets": sum(t.name == f.name for t in targets)} for f in files],
        "wall_s": round(time.perf_counter() - t0, 1),
        "results": summarize(rows),
        **info,
        "rows": rows,
    }
    print(f"Next line per language: {model}, {summary['machine'].get('cpu')} ({os.cpu_count()} cores), "
          f"{limit} target(s) per language, rules / text (plaintext, the baseline)")
    print(format_table(summary["results"]))
    path = json_out or DEFAULT_JSON
    save_results(summary, path)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="superpie bench languages", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--cache", type=Path, default=None, help="model cache (default: $SUPERPIE_CACHE)")
    parser.add_argument("--data", type=Path, default=None,
                        help="where the source archives and files go (default: $SUPERPIE_CACHE/bench-languages)")
    parser.add_argument("--limit", type=int, default=DEFAULT_LIMIT, help=f"targets per language ({DEFAULT_LIMIT})")
    parser.add_argument("--languages", default=",".join(LANGUAGES), help="comma-separated LSP language ids")
    parser.add_argument("--json", dest="json_out", type=Path, default=None, help=f"default: {DEFAULT_JSON}")
    parser.add_argument("--no-settle", dest="settle", action="store_false",
                        help="do not wait for each file's documents to be encoded before its targets")
    args = parser.parse_args(argv)
    languages = tuple(lang for lang in args.languages.split(",") if lang)
    if unknown := [lang for lang in languages if lang not in LANGUAGES]:
        parser.error(f"unknown language(s) {', '.join(unknown)}; known: {', '.join(LANGUAGES)}")
    run_languages_bench(args.model, cache=args.cache, data=args.data, json_out=args.json_out, limit=args.limit,
                        languages=languages, settle=args.settle)
    return 0


if __name__ == "__main__":
    sys.exit(main())
