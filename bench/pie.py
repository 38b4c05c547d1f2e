"""PIE benchmark: does a KV cache updated across real edits still predict the next line as a fresh one does?

Each record of the edits dataset (see shared/data/edits/README.md) is a file before and after one small
commit. The file before is encoded once; that cache is copied for "pie" and "conflict-fast", the commit is
replayed on them as editor edits (token splices), and "full" re-encodes the file after it. Each mode then
predicts the dataset's target lines greedily from its own rows, with token healing, and the benchmark
reports exact match, agreement with "full", and how much cheaper the update was than a full re-encode.
"pie-fp16" and "pie-int8" predict from pie's rows after they went idle in fp16 or int8 and came back (as the
store keeps a document the user is not in): their exact match and agreement with "pie" measure what that costs.

    python -m bench.pie [--data FILE] [--limit N] [--json OUT] [--model M] [--cache DIR]
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import statistics
import sys
import time
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from bench.engine import machine_info, peak_rss_mb, save_results
from inference.generate import SINGLE_LINE, DecodeRequest, greedy_decode, prefill, vocabulary
from inference.model_store import LoadedModel, load_model
from inference.prompt import healed_prompt
from inference.registry import DEFAULT_MODEL
from kv_cache.buffer_cache import BufferCache
from kv_cache.edits import TextEdit
from kv_cache.splice import TokenizedText, apply_edits

MODES = ("pie", "conflict-fast", "full")
IDLE_MODES = {"pie-fp16": "fp16", "pie-int8": "int8"}  # pie's rows after going idle so (as the store keeps them)
PREDICTED = (*MODES, *IDLE_MODES)
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "edits" / "edits-dev.jsonl.gz"
DEFAULT_JSON = Path(__file__).parent / "results" / "pie.json"
MAX_TOKENS = 24  # one line of code; longer lines are rare and would only add decode time
LONG_BUFFER = 2000  # tokens: where a full re-encode starts to hurt
EDIT_HEADROOM = 512  # spare rows, so an edit never doubles (and copies) the cache buffers


def load_records(path: Path, limit: int | None = None) -> list[dict[str, Any]]:
    """The first `limit` records of a JSON-lines file, gzipped or not, in file order."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    return records[:limit] if limit is not None else records


def line_starts(text: str) -> list[int]:
    """Offset of each line (git's lines: split on "\\n", terminator kept), plus the text's length at the end."""
    starts = [0] + [i + 1 for i, char in enumerate(text) if char == "\n"]
    return starts if starts[-1] == len(text) else [*starts, len(text)]


def hunk_edits(record: dict[str, Any]) -> list[TextEdit]:
    """The commit as editor edits, last hunk first, so each edit's offsets in `before` are still valid."""
    before, after = line_starts(record["before"]), line_starts(record["after"])
    edits = []
    for hunk in reversed(record["hunks"]):
        text = record["after"][after[hunk["after_start_line"]]:after[hunk["after_end_line"]]]
        edits.append(TextEdit(before[hunk["before_start_line"]], before[hunk["before_end_line"]], text))
    return edits


def cached_rows_before(doc: TokenizedText, offset: int) -> int:
    """How many of the document's tokens end at or before `offset` (the token after them may straddle it).

    The byte tokens of one character share its start: they are kept or dropped together, so the tail
    re-tokenized from the first dropped token's start never repeats a byte.
    """
    ends = [*doc.starts[1:], len(doc.text)]
    k = bisect_right(ends, offset)
    if 0 < k < len(doc.ids) and doc.starts[k] == doc.starts[k - 1]:
        k = bisect_left(doc.starts, doc.starts[k])
    return k


class LinePredictor:
    """Greedy next-line prediction from a prefix of a BufferCache's rows, leaving the cache untouched."""

    def __init__(self, model: LoadedModel) -> None:
        self.model = model
        self.vocab = vocabulary(model.tokenizer)

    def prompt_ids(self, doc: TokenizedText, offset: int, indent: str) -> tuple[int, list[int]]:
        """(k, ids): the prompt after[:offset] + indent as the document's first k tokens plus a re-tokenized tail."""
        k = cached_rows_before(doc, offset)
        tail_start = doc.starts[k] if k < len(doc.ids) else len(doc.text)
        tail = self.model.tokenizer.encode(doc.text[tail_start:offset] + indent)
        return k, [*doc.ids[:k], *tail]

    def predict(self, cache: BufferCache, k: int, ids: list[int]) -> str:
        """Heal the prompt's last token, reuse cache rows [0, k) (at most all but the last fed token), decode one line.

        The rows are used as the mode left them: their positions too, so "conflict-fast" keeps its gaps.
        """
        head = healed_prompt(self.model.tokenizer, ids)
        ids, healed = head.ids, head.healed
        if not ids:
            raise ValueError("a prompt needs at least two tokens")
        reuse = min(k, len(ids) - 1)
        position = int(cache.positions[reuse - 1]) + 1 if reuse else 0
        rows, _ = cache.lend(reuse, len(ids) - reuse + MAX_TOKENS, position)
        logits = prefill(self.model.decoder, rows, ids[reuse:])
        request = DecodeRequest(MAX_TOKENS, SINGLE_LINE, healed)
        return greedy_decode(self.model.decoder, self.vocab, rows, logits, request).drafts[0].text


def copy_cache(cache: BufferCache) -> BufferCache:
    """An independent copy of the rows, sharing the decoder (one ONNX session for every mode)."""
    return copy.deepcopy(cache, memo={id(cache.decoder): cache.decoder})


def timed_encode(cache: BufferCache, ids: list[int]) -> float:
    """Seconds for a fresh prefill: the whole update cost of "full" mode."""
    t0 = time.perf_counter()
    cache.encode(ids)
    return time.perf_counter() - t0


def updated_caches(model: LoadedModel, record: dict[str, Any]) -> tuple[TokenizedText, dict[str, BufferCache],
                                                                        dict[str, float], dict[str, Any], int]:
    """Replay the commit on every mode's cache: (document after, caches, update seconds, their split into
    forward and re-rotation for the splicing modes, tokens before)."""
    doc = TokenizedText.encode(record["before"], model.tokenizer)
    base = BufferCache(model.decoder, capacity=len(doc.ids) + EDIT_HEADROOM)
    base.encode(doc.ids)
    tokens_before = len(doc.ids)
    splices = apply_edits(doc, hunk_edits(record), model.tokenizer)
    if doc.text != record["after"]:
        raise ValueError(f"{record['commit'][:10]}: hunks do not turn 'before' into 'after'")
    caches = {mode: copy_cache(base) for mode in ("pie", "conflict-fast")}
    stats = {mode: [caches[mode].apply(splice, mode) for splice in splices] for mode in caches}
    seconds = {mode: sum(s.total_s for s in stats[mode]) for mode in caches}
    parts = {mode: {field: sum(getattr(s, field) for s in stats[mode])
                    for field in ("forward_s", "rotate_s", "inserted", "rotated")} for mode in caches}
    for mode, rows in IDLE_MODES.items():
        caches[mode] = copy_cache(caches["pie"])
        caches[mode].make_idle(rows)  # as the store keeps a document the user is not in
    caches["full"] = base  # the rows before the edit are no longer needed: re-encode in place
    seconds["full"] = timed_encode(base, doc.ids)
    return doc, caches, seconds, parts, tokens_before


def bench_record(model: LoadedModel, predictor: LinePredictor, record: dict[str, Any]) -> dict[str, Any]:
    """Update costs and every target's prediction in every mode, for one record."""
    doc, caches, seconds, parts, tokens_before = updated_caches(model, record)
    targets = []
    for target in record["targets"]:
        k, ids = predictor.prompt_ids(doc, target["offset"], target["indent"])
        predictions = {mode: predictor.predict(caches[mode], k, ids) for mode in PREDICTED}
        targets.append({"line": target["line"], "role": target["role"],
                        "expected": target["text"][len(target["indent"]):], "predictions": predictions})
    return {"commit": record["commit"], "path": record["path"], "kind": record["kind"],
            "n_hunks": record["n_hunks"], "tokens": tokens_before, "update_s": seconds, "update_parts": parts,
            "targets": targets}


def exact_match(target: dict[str, Any], mode: str) -> bool:
    return target["predictions"][mode].strip() == target["expected"].strip()


def agrees_with_full(target: dict[str, Any], mode: str) -> bool:
    return target["predictions"][mode] == target["predictions"]["full"]


def agrees_with_pie(target: dict[str, Any], mode: str) -> bool:
    return target["predictions"][mode] == target["predictions"]["pie"]


def target_rate(records: list[dict[str, Any]], hit: Callable[[dict[str, Any], str], bool], mode: str) -> float | None:
    """Share of all targets of these records for which `hit` holds; None when there are no targets."""
    hits = [hit(t, mode) for r in records for t in r["targets"]]
    return sum(hits) / len(hits) if hits else None


def update_ratio_median(records: Iterable[dict[str, Any]], mode: str) -> float | None:
    """Median over records of this mode's update time over a full re-encode's."""
    ratios = [r["update_s"][mode] / r["update_s"]["full"] for r in records]
    return statistics.median(ratios) if ratios else None


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The headline metrics for one group of records."""
    long = [r for r in records if r["tokens"] >= LONG_BUFFER]
    return {
        "n": len(records),
        "n_targets": sum(len(r["targets"]) for r in records),
        "em_pie": target_rate(records, exact_match, "pie"),
        "em_full": target_rate(records, exact_match, "full"),
        "em_conflict": target_rate(records, exact_match, "conflict-fast"),
        "em_pie_fp16": target_rate(records, exact_match, "pie-fp16"),
        "em_pie_int8": target_rate(records, exact_match, "pie-int8"),
        "agree_pie_fp16_pie": target_rate(records, agrees_with_pie, "pie-fp16"),
        "agree_pie_int8_pie": target_rate(records, agrees_with_pie, "pie-int8"),
        "agree_pie_full": target_rate(records, agrees_with_full, "pie"),
        "agree_conflict_full": target_rate(records, agrees_with_full, "conflict-fast"),
        "update_ratio_median": update_ratio_median(records, "pie"),
        "update_ratio_median_conflict": update_ratio_median(records, "conflict-fast"),
        "update_ratio_median_2000plus": update_ratio_median(long, "pie"),
        "n_2000plus": len(long),
        **{f"update_ms_median_{mode}": statistics.median(r["update_s"][mode] for r in records) * 1e3
           for mode in MODES},
    }


def grouped(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Summaries overall, by kind and by number of hunks (empty groups left out)."""
    groups = {"all": records}
    groups |= {f"kind={kind}": [r for r in records if r["kind"] == kind] for kind in ("insert", "delete", "replace")}
    groups |= {f"n_hunks={n}": [r for r in records if r["n_hunks"] == n] for n in (1, 2, 3)}
    return {name: summarize(group) for name, group in groups.items() if group}


TABLE_COLUMNS = ("n", "n_targets", "em_pie", "em_full", "em_conflict", "em_pie_fp16", "em_pie_int8",
                 "agree_pie_fp16_pie", "agree_pie_int8_pie", "agree_pie_full", "agree_conflict_full",
                 "update_ratio_median", "update_ratio_median_conflict", "update_ms_median_pie",
                 "update_ms_median_conflict-fast", "update_ms_median_full")


def format_cell(value: Any) -> str:
    if value is None:
        return "-"
    return str(value) if isinstance(value, int) else f"{value:.3f}" if value < 10 else f"{value:.0f}"


def format_table(groups: dict[str, dict[str, Any]], columns: Sequence[str] = TABLE_COLUMNS) -> str:
    lines = ["| group | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for name, summary in groups.items():
        lines.append(f"| {name} | " + " | ".join(format_cell(summary[c]) for c in columns) + " |")
    return "\n".join(lines)


def progress_line(index: int, total: int, result: dict[str, Any]) -> str:
    ms = " ".join(f"{mode}={result['update_s'][mode] * 1e3:.0f}ms" for mode in MODES)
    em = " ".join(f"{mode}={sum(exact_match(t, mode) for t in result['targets'])}" for mode in PREDICTED)
    return f"[{index}/{total}] {result['commit'][:10]} {result['kind']} {result['tokens']} tok | {ms} | em {em}"


def run_pie_bench(model: str = DEFAULT_MODEL, *, data: Path = DEFAULT_DATA, limit: int | None = None,
                  json_out: Path | None = None, cache: Path | None = None) -> dict[str, Any]:
    """Run every record, print the table, write the JSON; returns the summary."""
    records = load_records(data, limit)
    loaded = load_model(model, cache=cache, progress=sys.stderr.isatty())
    predictor = LinePredictor(loaded)
    t0 = time.perf_counter()
    results = []
    for index, record in enumerate(records, 1):
        results.append(bench_record(loaded, predictor, record))
        print(progress_line(index, len(records), results[-1]), file=sys.stderr, flush=True)
    groups = grouped(results)
    summary = {"model": model, "data": str(data), "limit": limit, "max_tokens": MAX_TOKENS,
               "machine": machine_info(), "wall_s": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb(),
               **groups["all"], "groups": groups, "records": results}
    report(summary, f"pie benchmark: {model}, {len(results)} records of {data.name}, peak RSS "
           f"{summary['peak_rss_mb']:.0f} MB", format_table(groups), json_out or DEFAULT_JSON)
    return summary


def edits_parser(prog: str, doc: str, default_json: Path, default_limit: int | None) -> argparse.ArgumentParser:
    """The options of every benchmark over the edits dataset: model, cache, data, limit, JSON output."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--cache", type=Path, default=None, help="model cache (default: $SUPERPIE_CACHE)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"edits, JSON lines (default: {DEFAULT_DATA})")
    parser.add_argument("--limit", type=int, default=default_limit,
                        help=f"only the first N records (default: {default_limit or 'all'})")
    parser.add_argument("--json", dest="json_out", type=Path, default=None, help=f"default: {default_json}")
    return parser


def report(summary: dict[str, Any], title: str, table: str, path: Path) -> None:
    """Print the title and table, write the JSON summary."""
    print(title)
    print(table)
    save_results(summary, path)


def main(argv: list[str] | None = None) -> int:
    args = edits_parser("python -m bench.pie", __doc__, DEFAULT_JSON, None).parse_args(argv)
    run_pie_bench(args.model, data=args.data, limit=args.limit, json_out=args.json_out, cache=args.cache)
    return 0


if __name__ == "__main__":
    sys.exit(main())
