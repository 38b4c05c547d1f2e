"""Decoding benchmark: speculative vs greedy speed, k drafts by each draft method vs one, syntax stopping.

Completion points come from the edits dataset (shared/data/edits/README.md): the file after the commit
is opened as a DocumentCache, and each target line is deleted after its indentation (a PIE edit), as if
the user were about to type it. From the same cached rows, with the prefix layout the server uses at the
end of a line:

- single-line (syntax scope "single"): one greedy draft, then k drafts by each draft method (superposed, beam,
  sampled: the paper's baseline), each scored by exact match of draft 1 and of the best of k against the real
  line, by how many distinct first lines it offers, and by its wall time against the greedy draft at the same
  point (the sums' ratio);
- multi-line (scope "multi", 48 tokens): greedy and speculative, timed; their token ids must be equal;
- every final draft is checked for a repeated suffix and for brackets left unbalanced on its line;
- one more greedy draft per idle row type (fp16, int8) comes from the rows after they went idle so and came back,
  as the store keeps a document the user is not in: its agreement with greedy's measures what that costs.

The lookup corpus and the n-gram overlay are the buffer as it is (the target line removed).

    python -m bench.decode [--data FILE] [--limit N] [--json OUT] [--model M] [--cache DIR] [--k K]
"""

from __future__ import annotations

import io
import statistics
import sys
import time
import tokenize
from collections import Counter
from pathlib import Path
from typing import Any

from bench.engine import machine_info, peak_rss_mb
from bench.fim import URI, lines_to_type, open_after
from bench.pie import DEFAULT_DATA, copy_cache, edits_parser, format_table, load_records, report
from inference.fetch import cache_root
from inference.model_store import LoadedModel, load_model
from inference.ngram import NgramModel
from inference.registry import DEFAULT_MODEL
from inference.syntax.finish import repeated_suffix
from kv_cache.choices import IDLE_ROWS as ALL_IDLE_ROWS
from lsp_server.completer import Completer
from lsp_server.completion import DRAFT_METHODS, CompletionOptions, CompletionOutcome

DEFAULT_JSON = Path(__file__).parent / "results" / "decode.json"
LINE_TOKENS = 24
MULTI_TOKENS = 48
DEFAULT_LIMIT = 24  # records: the dev set's first 24 hold 100 target lines, so one hit is 1 point


def brackets_balanced(line: str) -> bool:
    """Whether Python's tokenizer finds every bracket of this line closed (strings and comments ignored)."""
    depth = 0
    try:
        for tok in tokenize.generate_tokens(io.StringIO(line.strip() + "\n").readline):
            if tok.type == tokenize.OP and tok.string in "([{":
                depth += 1
            elif tok.type == tokenize.OP and tok.string in ")]}":
                depth -= 1
                if depth < 0:
                    return False
    except (tokenize.TokenError, SyntaxError, IndentationError):
        return False
    return depth == 0


def decode_seconds(outcome: CompletionOutcome) -> float:
    """A request's time once its prompt is built: the first request after an edit also builds the prompt's
    tail, which would bias whichever method runs first at a point (the edit itself is not in total_s)."""
    return outcome.timings["total_s"] - outcome.timings["context_s"]


IDLE_ROWS = tuple(rows for rows in ALL_IDLE_ROWS if rows != "fp32")  # fp32 idle rows are greedy's own


class DecodeRunner:
    """Every decoder at one cursor, through the editor's pipeline (the Completer) with its options forced."""

    def __init__(self, model: LoadedModel, k: int, ngram: NgramModel) -> None:
        self.model, self.k, self.ngram = model, k, ngram

    def _timed(self, completer: Completer, cursor: int, **options: Any) -> CompletionOutcome:
        return completer.complete(URI, cursor, CompletionOptions(layout="prefix", **options))

    def _after_idle(self, completer: Completer, cursor: int, idle_rows: str, **options: Any) -> str:
        """Draft 1 from the document's rows after they went idle as `idle_rows` (as the store keeps a document the
        user is not in) and came back; the rows as they were are put back afterwards for the other runs."""
        rows = completer.store.peek(URI)
        completer.store.put(URI, copy_cache(rows))
        completer.store.peek(URI).make_idle(idle_rows)
        try:
            outcome = self._timed(completer, cursor, **options)
        finally:
            completer.store.put(URI, rows)
        return outcome.suggestions[0].text if outcome.suggestions else ""

    def target(self, completer: Completer, cursor: int) -> dict[str, Any]:
        completer.ngram = self.ngram
        out: dict[str, Any] = {}
        single = {"max_tokens": LINE_TOKENS, "scope": "single", "speculative": False}
        runs = {"greedy": self._timed(completer, cursor, drafts=1, **single)}
        for method in DRAFT_METHODS:
            runs[method] = self._timed(completer, cursor, drafts=self.k, draft_method=method, **single)
        for name, outcome in runs.items():
            out[f"{name}_s"] = decode_seconds(outcome)
            out[f"{name}_steps"] = outcome.timings.get("forward_steps", outcome.timings.get("generated_tokens", 0.0))
        out["drafts"] = {name: [s.text for s in outcome.suggestions] for name, outcome in runs.items()}
        for idle_rows in IDLE_ROWS:
            out[f"greedy_idle_{idle_rows}"] = self._after_idle(completer, cursor, idle_rows, drafts=1, **single)
        multi = {"max_tokens": MULTI_TOKENS, "scope": "multi", "drafts": 1}
        slow = self._timed(completer, cursor, speculative=False, **multi)
        fast = self._timed(completer, cursor, speculative=True, **multi)
        out["multi_greedy_s"], out["multi_speculative_s"] = decode_seconds(slow), decode_seconds(fast)
        out["multi_tokens"] = int(slow.timings["generated_tokens"])
        out["identical"] = [s.text for s in slow.suggestions] == [s.text for s in fast.suggestions]
        tree_steps = fast.timings.get("tree_steps", 0.0)
        out["accepted_per_tree_step"] = fast.timings.get("accepted_drafts", 0.0) / tree_steps if tree_steps else 0.0
        out["forwards_speculative"] = tree_steps + fast.timings.get("single_steps", 0.0)
        out["multi_drafts"] = {"greedy": slow.suggestions[0].text if slow.suggestions else ""}
        return out


def bench_record(runner: DecodeRunner, record: dict[str, Any]) -> dict[str, Any]:
    completer = open_after(runner.model, record)
    doc = completer.docs[URI]
    targets = []
    for line in lines_to_type(completer, record):
        result = runner.target(completer, line.cursor)
        prefix, suffix = doc.text[:line.cursor], doc.text[line.cursor:]
        line_prefix = prefix[prefix.rfind("\n") + 1:]
        line_suffix = suffix.split("\n", 1)[0]
        finals = [*(d for drafts in result["drafts"].values() for d in drafts), *result["multi_drafts"].values()]
        result["suffix_duplications"] = sum(bool(repeated_suffix(d, prefix, suffix)) for d in finals)
        result["unbalanced"] = (sum(not brackets_balanced(line_prefix + d.split("\n", 1)[0] + line_suffix)
                                    for drafts in result["drafts"].values() for d in drafts)
                                if brackets_balanced(line.target["text"]) else 0)
        targets.append({"line": line.target["line"], "expected": line.expected, **result})
    return {"commit": record["commit"], "path": record["path"], "tokens": len(doc.ids), "targets": targets}


def _first(drafts: dict[str, list[str]], method: str = "greedy") -> str:
    return drafts[method][0] if drafts[method] else ""


def _hit(draft: str, expected: str) -> bool:
    return draft.strip() == expected.strip()


def distinct_first_lines(drafts: list[str]) -> int:
    """What cycling shows: the drafts' first lines of code that differ (surrounding blanks ignored)."""
    return len({draft.strip().split("\n", 1)[0].strip() for draft in drafts})


def method_summary(ts: list[dict[str, Any]], name: str) -> dict[str, float]:
    """One decoding method over the targets: wall time against the greedy draft, exact match, distinct drafts."""
    def rate(pred) -> float:
        return sum(map(pred, ts)) / len(ts)

    draft1 = rate(lambda t: bool(t["drafts"][name]) and _hit(t["drafts"][name][0], t["expected"]))
    best = rate(lambda t: any(_hit(d, t["expected"]) for d in t["drafts"][name]))
    return {"time_vs_greedy": sum(t[f"{name}_s"] for t in ts) / sum(t["greedy_s"] for t in ts),
            "em_draft1": draft1, "em_best_of_k": best, "best_minus_draft1_points": 100 * (best - draft1),
            "distinct_first_lines": statistics.mean(distinct_first_lines(t["drafts"][name]) for t in ts)}


def summarize(records: list[dict[str, Any]], k: int) -> dict[str, Any]:
    ts = [t for r in records for t in r["targets"]]
    if not ts:
        return {"n": 0, "n_records": len(records)}

    def rate(pred) -> float:
        return sum(map(pred, ts)) / len(ts)

    greedy_tok_s = sum(t["multi_tokens"] for t in ts) / sum(t["multi_greedy_s"] for t in ts)
    spec_tok_s = sum(t["multi_tokens"] for t in ts) / sum(t["multi_speculative_s"] for t in ts)
    histogram = Counter(round(t["accepted_per_tree_step"]) for t in ts)
    return {
        "n": len(ts), "n_records": len(records), "k": k,
        **{f"em_greedy_idle_{rows}": rate(lambda t, rows=rows: _hit(t[f"greedy_idle_{rows}"], t["expected"]))
           for rows in IDLE_ROWS},
        **{f"agree_idle_{rows}_greedy": rate(lambda t, rows=rows: t[f"greedy_idle_{rows}"] == _first(t["drafts"]))
           for rows in IDLE_ROWS},
        "greedy_tok_s": greedy_tok_s, "speculative_tok_s": spec_tok_s,
        "speedup_speculative": spec_tok_s / greedy_tok_s,
        "identical_outputs": rate(lambda t: t["identical"]),
        "accepted_per_tree_step_mean": statistics.mean(t["accepted_per_tree_step"] for t in ts),
        "accepted_histogram": {str(a): c for a, c in sorted(histogram.items())},
        "greedy_ms_median": statistics.median(t["greedy_s"] for t in ts) * 1e3,
        "methods": {name: method_summary(ts, name) for name in ("greedy", *DRAFT_METHODS)},
        "suffix_duplications": sum(t["suffix_duplications"] for t in ts),
        "unbalanced_brackets": sum(t["unbalanced"] for t in ts),
    }


TABLE_COLUMNS = ("n", "em_greedy_idle_fp16", "em_greedy_idle_int8", "agree_idle_fp16_greedy", "agree_idle_int8_greedy",
                 "speedup_speculative", "identical_outputs", "accepted_per_tree_step_mean", "suffix_duplications",
                 "unbalanced_brackets")
METHOD_COLUMNS = ("time_vs_greedy", "em_draft1", "em_best_of_k", "best_minus_draft1_points", "distinct_first_lines")


def run_decode_bench(model: str = DEFAULT_MODEL, *, data: Path = DEFAULT_DATA, limit: int | None = DEFAULT_LIMIT,
                     json_out: Path | None = None, cache: Path | None = None, k: int = 3) -> dict[str, Any]:
    records = load_records(data, limit)
    loaded = load_model(model, cache=cache, progress=sys.stderr.isatty())
    ngram = NgramModel.for_tokenizer(loaded.tokenizer, cache or cache_root())
    runner = DecodeRunner(loaded, k, ngram)
    t0 = time.perf_counter()
    results = []
    for index, record in enumerate(records, 1):
        results.append(bench_record(runner, record))
        done = summarize(results, k)
        hits = " ".join(f"{name} {m['em_draft1']:.2f}/{m['em_best_of_k']:.2f}"
                        for name, m in done.get("methods", {}).items())
        print(f"[{index}/{len(records)}] {record['commit'][:10]} {results[-1]['tokens']} tok | {done['n']} points | "
              f"em draft 1/best of k so far: {hits}", file=sys.stderr, flush=True)
    overall = summarize(results, k)
    summary = {"model": model, "data": str(data), "limit": limit, "line_tokens": LINE_TOKENS,
               "multi_tokens": MULTI_TOKENS, "machine": machine_info(), "wall_s": time.perf_counter() - t0,
               "peak_rss_mb": peak_rss_mb(), **overall, "records": results}
    tables = format_table({"all": overall}, TABLE_COLUMNS)
    if overall["n"]:
        tables += "\n\n" + format_table(overall["methods"], METHOD_COLUMNS).replace("| group |", "| method |", 1)
    report(summary, f"decode benchmark: {model}, {overall['n']} completion points in {len(results)} records of "
           f"{data.name}, k = {k}", tables, json_out or DEFAULT_JSON)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = edits_parser("python -m bench.decode", __doc__, DEFAULT_JSON, DEFAULT_LIMIT)
    parser.add_argument("--k", type=int, default=3, help="drafts per request for each draft method")
    args = parser.parse_args(argv)
    run_decode_bench(args.model, data=args.data, limit=args.limit, json_out=args.json_out, cache=args.cache,
                     k=args.k)
    return 0


if __name__ == "__main__":
    sys.exit(main())
