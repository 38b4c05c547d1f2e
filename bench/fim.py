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

import numpy as np

from bench.engine import machine_info, peak_rss_mb
from bench.pie import DEFAULT_DATA, edits_parser, format_table, load_records, report
from inference.generate import KVRows, greedy_complete
from inference.healing import TokenHealer
from inference.model_store import LoadedModel, load_model
from inference.prompt import Prompt
from inference.registry import DEFAULT_MODEL
from kv_cache.document import CursorContext, DocumentCache
from kv_cache.edits import TextEdit
from kv_cache.store import BufferStore

LAYOUTS = ("borrowed", "fresh", "prefix")
DEFAULT_JSON = Path(__file__).parent / "results" / "fim.json"
MAX_TOKENS = 24


def first_rows(rows: KVRows, n: int) -> KVRows:
    return KVRows([k[:, :n] for k in rows.keys], [v[:, :n] for v in rows.values])


class LayoutPredictor:
    """The three prompts of one cursor context, each decoded greedily to the end of the line."""

    def __init__(self, model: LoadedModel) -> None:
        self.model = model
        self.healer = TokenHealer(model.tokenizer.token_bytes(), model.tokenizer.specials.stop)

    def decode(self, rows: KVRows, tail: list[int], position: int, healed: bytes) -> str:
        result = greedy_complete(self.model.decoder, self.model.tokenizer, Prompt(tail, healed),
                                 max_tokens=MAX_TOKENS, healer=self.healer, rows=rows, position=position)
        return result.drafts[0].text

    def fresh_suffix(self, ctx: CursorContext, suffix_tokens: int) -> tuple[KVRows, int, float]:
        """The prefix rows plus `<|fim_suffix|>` and the suffix encoded now: (rows, next position, seconds)."""
        t0 = time.perf_counter()
        sp = self.model.tokenizer.specials
        ids = [sp.fim_suffix, *self.model.tokenizer.encode(ctx.suffix)[:suffix_tokens]]
        rows = first_rows(ctx.rows, ctx.prefix_rows)
        out = self.model.decoder.forward(np.asarray(ids), np.arange(ctx.prefix_rows, ctx.prefix_rows + len(ids)),
                                         rows.keys, rows.values)
        rows.append(out.keys, out.values)
        return rows, ctx.prefix_rows + len(ids), time.perf_counter() - t0

    def predict(self, doc: DocumentCache, cursor: int) -> tuple[dict[str, str], dict[str, float]]:
        t0 = time.perf_counter()
        ctx = doc.context(cursor)
        borrowed_s = time.perf_counter() - t0
        fresh_rows, fresh_position, fresh_s = self.fresh_suffix(ctx, doc.budget.suffix)
        sp = self.model.tokenizer.specials
        plain = doc.context(cursor, with_suffix=False)
        predictions = {
            "borrowed": self.decode(ctx.rows, ctx.tail, ctx.position, ctx.healed),
            "fresh": self.decode(fresh_rows, [sp.fim_middle], fresh_position, ctx.healed),
            "prefix": self.decode(plain.rows, plain.tail, plain.position, plain.healed),
        }
        return predictions, {"borrowed_s": borrowed_s, "fresh_s": fresh_s}


@dataclass
class LineToType:
    """One target line deleted after its indentation: the document as the user sees it before typing it."""

    target: dict[str, Any]
    cursor: int
    expected: str  # the deleted text
    edit_s: float  # seconds the deletion took (a PIE edit)


def open_after(model: LoadedModel, record: dict[str, Any]) -> DocumentCache:
    """The record's file after its commit, with all its rows encoded."""
    store = BufferStore(4096, None, "bench", decoder=model.decoder)
    doc = DocumentCache("file:///bench.py", record["after"], model.decoder, model.tokenizer, store)
    doc.ensure_rows()
    return doc


def lines_to_type(doc: DocumentCache, record: dict[str, Any]) -> Iterator[LineToType]:
    """Each target line deleted in turn, bottom up (so every prefix's rows stay exact), and put back when the
    caller asks for the next one."""
    for target in sorted(record["targets"], key=lambda t: -t["offset"]):
        cursor = target["offset"] + len(target["indent"])
        removed = target["text"][len(target["indent"]):]
        t0 = time.perf_counter()
        doc.apply([TextEdit(cursor, cursor + len(removed), "")])
        yield LineToType(target, cursor, removed, time.perf_counter() - t0)
        doc.apply([TextEdit(cursor, cursor, removed)])


def bench_record(predictor: LayoutPredictor, record: dict[str, Any]) -> dict[str, Any]:
    doc = open_after(predictor.model, record)
    targets = []
    for line in lines_to_type(doc, record):
        predictions, seconds = predictor.predict(doc, line.cursor)
        targets.append({"line": line.target["line"], "expected": line.expected, "predictions": predictions,
                        "edit_s": line.edit_s, **seconds})
    return {"commit": record["commit"], "path": record["path"], "tokens": len(doc.ids), "targets": targets}


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
