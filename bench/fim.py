"""FIM layout benchmark: is a prompt built from the document's cached rows as good as a fresh FIM prompt?

For each target line of the edits dataset (see shared/data/edits/README.md), the line is deleted after
its indentation (the user is about to type it; a PIE edit of the cached document) and three prompts
predict it greedily, all from the same cached prefix rows:

- `borrowed`: superpie's layout (kv_cache/document.py): `<|fim_suffix|>` is encoded and the cached rows of
  the following tokens are re-rotated to follow it;
- `fresh`: the suffix tokens are encoded after `<|fim_suffix|>` as a plain FIM prompt would (the reference);
- `prefix`: no suffix at all, the prompt ends with the text before the cursor.

Targets are visited from the bottom of the file up, so each one's prefix rows are exact.

    python -m bench.fim [--data FILE] [--limit N] [--json OUT] [--model M] [--cache DIR]
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.engine import machine_info, peak_rss_mb
from bench.pie import DEFAULT_DATA, edits_parser, format_table, load_records, report
from inference.generate import DecodeRequest, greedy_decode, prefill, vocabulary
from inference.model_store import LoadedModel, load_model
from inference.registry import DEFAULT_MODEL
from inference.syntax.finish import finish
from inference.syntax.stop import SyntaxStop
from kv_cache.edits import TextEdit
from lsp_server.completer import Completer
from lsp_server.completion import CacheSettings, CompletionOptions

LAYOUTS = ("borrowed", "fresh", "prefix")
DEFAULT_JSON = Path(__file__).parent / "results" / "fim.json"
MAX_TOKENS = 24
URI = "file:///bench.py"


class LayoutPredictor:
    """The three prompts of one cursor, each decoded greedily to the end of the line: `borrowed` and `prefix`
    are the editor's pipeline (the Completer) with the layout forced, `fresh` the reference prompt."""

    def __init__(self, model: LoadedModel) -> None:
        self.model = model

    def suggest(self, completer: Completer, cursor: int, layout: str) -> str:
        options = CompletionOptions(max_tokens=MAX_TOKENS, drafts=1, scope="single", speculative=False,
                                    layout=layout)
        suggestions = completer.complete(URI, cursor, options).suggestions
        return suggestions[0].text if suggestions else ""

    def fresh(self, completer: Completer, cursor: int) -> tuple[str, float]:
        """The prefix rows, then `<|fim_suffix|>` and the suffix encoded now: (suggestion, prompt seconds)."""
        t0 = time.perf_counter()
        tok, decoder = self.model.tokenizer, self.model.decoder
        ctx = completer.docs[URI].context(cursor, with_suffix=False, room=MAX_TOKENS + 512)
        suffix = tok.encode(ctx.suffix)[:completer.docs[URI].budget.suffix]
        logits = prefill(decoder, ctx.cache, [tok.specials.fim_suffix, *suffix, tok.specials.fim_middle])
        prompt_s = time.perf_counter() - t0
        request = DecodeRequest(MAX_TOKENS, completer_stop(ctx.prefix, ctx.suffix), ctx.healed)
        result = greedy_decode(decoder, vocabulary(tok), ctx.cache, logits, request)
        return finish(result.drafts[0].text, ctx.prefix, ctx.suffix), prompt_s

    def predict(self, completer: Completer, cursor: int) -> tuple[dict[str, str], dict[str, float]]:
        borrowed = self.suggest(completer, cursor, "fim")
        borrowed_s = completer.stats()["recent_timings"][-1]["context_s"]
        fresh, fresh_s = self.fresh(completer, cursor)
        predictions = {"borrowed": borrowed, "fresh": fresh, "prefix": self.suggest(completer, cursor, "prefix")}
        return predictions, {"borrowed_s": borrowed_s, "fresh_s": fresh_s}


def completer_stop(prefix: str, suffix: str) -> SyntaxStop:
    """The stop rule the Completer uses for these benchmarks' single-line requests."""
    return SyntaxStop(prefix, suffix, "single", "python")


@dataclass
class LineToType:
    """One target line deleted after its indentation: the document as the user sees it before typing it."""

    target: dict[str, Any]
    cursor: int
    expected: str  # the deleted text
    edit_s: float  # seconds the deletion took (a PIE edit)


def open_after(model: LoadedModel, record: dict[str, Any]) -> Completer:
    """A Completer with the record's file after its commit open as URI, all its rows encoded."""
    completer = Completer(model, cache=CacheSettings(budget_mb=4096))
    completer.open(URI, record["after"], "python")
    completer.docs[URI].ensure_rows()
    return completer


def lines_to_type(completer: Completer, record: dict[str, Any]) -> Iterator[LineToType]:
    """Each target line deleted in turn, bottom up (so every prefix's rows stay exact), and put back when the
    caller asks for the next one."""
    for target in sorted(record["targets"], key=lambda t: -t["offset"]):
        cursor = target["offset"] + len(target["indent"])
        removed = target["text"][len(target["indent"]):]
        t0 = time.perf_counter()
        completer.change(URI, [TextEdit(cursor, cursor + len(removed), "")])
        yield LineToType(target, cursor, removed, time.perf_counter() - t0)
        completer.change(URI, [TextEdit(cursor, cursor, removed)])


def bench_record(predictor: LayoutPredictor, record: dict[str, Any]) -> dict[str, Any]:
    completer = open_after(predictor.model, record)
    targets = []
    for line in lines_to_type(completer, record):
        predictions, seconds = predictor.predict(completer, line.cursor)
        targets.append({"line": line.target["line"], "expected": line.expected, "predictions": predictions,
                        "edit_s": line.edit_s, **seconds})
    return {"commit": record["commit"], "path": record["path"], "tokens": len(completer.docs[URI].ids),
            "targets": targets}


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    targets = [t for r in records for t in r["targets"]]
    if not targets:
        return {"n": len(records), "n_targets": 0}

    def rate(hit) -> float:
        return sum(map(hit, targets)) / len(targets)

    summary: dict[str, Any] = {"n": len(records), "n_targets": len(targets)}
    for layout in LAYOUTS:
        summary[f"em_{layout}"] = rate(lambda t, m=layout: t["predictions"][m].strip() == t["expected"].strip())
    summary["agree_borrowed_fresh"] = rate(lambda t: t["predictions"]["borrowed"] == t["predictions"]["fresh"])
    for key in ("borrowed_s", "fresh_s", "edit_s"):
        summary[f"{key[:-2]}_ms_median"] = statistics.median(t[key] for t in targets) * 1e3
    summary["context_ratio_median"] = statistics.median(t["borrowed_s"] / t["fresh_s"] for t in targets)
    return summary


TABLE_COLUMNS = ("n", "n_targets", "em_borrowed", "em_fresh", "em_prefix", "agree_borrowed_fresh",
                 "borrowed_ms_median", "fresh_ms_median", "context_ratio_median", "edit_ms_median")


def run_fim_bench(model: str = DEFAULT_MODEL, *, data: Path = DEFAULT_DATA, limit: int | None = 20,
                  json_out: Path | None = None, cache: Path | None = None) -> dict[str, Any]:
    records = load_records(data, limit)
    loaded = load_model(model, cache=cache, progress=sys.stderr.isatty())
    if loaded.tokenizer.specials.fim_suffix is None:
        raise SystemExit(f"{model} has no FIM tokens: nothing to compare")
    predictor = LayoutPredictor(loaded)
    t0 = time.perf_counter()
    results = []
    for index, record in enumerate(records, 1):
        results.append(bench_record(predictor, record))
        hits = {m: sum(t["predictions"][m].strip() == t["expected"].strip() for t in results[-1]["targets"])
                for m in LAYOUTS}
        print(f"[{index}/{len(records)}] {record['commit'][:10]} {results[-1]['tokens']} tok | em {hits}",
              file=sys.stderr, flush=True)
    overall = summarize(results)
    summary = {"model": model, "data": str(data), "limit": limit, "max_tokens": MAX_TOKENS,
               "machine": machine_info(), "wall_s": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb(),
               **overall, "records": results}
    report(summary, f"FIM layout benchmark: {model}, {len(results)} records of {data.name}",
           format_table({"all": overall}, TABLE_COLUMNS), json_out or DEFAULT_JSON)
    return summary


def main(argv: list[str] | None = None) -> int:
    args = edits_parser("python -m bench.fim", __doc__, DEFAULT_JSON, 20).parse_args(argv)
    run_fim_bench(args.model, data=args.data, limit=args.limit, json_out=args.json_out, cache=args.cache)
    return 0


if __name__ == "__main__":
    sys.exit(main())
