"""Decoding benchmark: speculative vs greedy speed, k drafts (superposed, batched) vs one, syntax stopping.

Completion points come from the edits dataset (shared/data/edits/README.md): the file after the commit
is opened as a DocumentCache, and each target line is deleted after its indentation (a PIE edit), as if
the user were about to type it. From the same cached rows, with the prefix layout the server uses at the
end of a line:

- single-line (syntax scope "single"): one greedy draft, k superposed drafts and k batched (beam) drafts,
  scored by exact match of draft 1 and of the best of k against the real line;
- multi-line (scope "multi", 48 tokens): greedy and speculative, timed; their token ids must be equal;
- every final draft is checked for a repeated suffix and for brackets left unbalanced on its line.

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
from bench.pie import DEFAULT_DATA, edits_parser, format_table, load_records, report
from inference.fetch import cache_root
from inference.model_store import LoadedModel, load_model
from inference.ngram import NgramModel
from inference.registry import DEFAULT_MODEL
from inference.syntax.finish import repeated_suffix
from lsp_server.completer import Completer, CompletionOptions, CompletionOutcome

DEFAULT_JSON = Path(__file__).parent / "results" / "decode.json"
LINE_TOKENS = 24
MULTI_TOKENS = 48


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


class DecodeRunner:
    """Every decoder at one cursor, through the editor's pipeline (the Completer) with its options forced."""

    def __init__(self, model: LoadedModel, k: int, ngram: NgramModel) -> None:
        self.model, self.k, self.ngram = model, k, ngram

    def _timed(self, completer: Completer, cursor: int, method: str, **options: Any) -> CompletionOutcome:
        completer.draft_method = method
        return completer.complete(URI, cursor, CompletionOptions(layout="prefix", **options))

    def target(self, completer: Completer, cursor: int) -> dict[str, Any]:
        completer.ngram = self.ngram
        out: dict[str, Any] = {}
        single = {"max_tokens": LINE_TOKENS, "scope": "single", "speculative": False}
        runs = {"greedy": self._timed(completer, cursor, "batched", drafts=1, **single),
                "superposed": self._timed(completer, cursor, "superposed", drafts=self.k, **single),
                "batched": self._timed(completer, cursor, "batched", drafts=self.k, **single)}
        for name, outcome in runs.items():
            out[f"{name}_s"] = outcome.timings["total_s"]
        out["drafts"] = {name: [s.text for s in outcome.suggestions] for name, outcome in runs.items()}
        multi = {"max_tokens": MULTI_TOKENS, "scope": "multi", "drafts": 1}
        slow = self._timed(completer, cursor, "batched", speculative=False, **multi)
        fast = self._timed(completer, cursor, "batched", speculative=True, **multi)
        out["multi_greedy_s"], out["multi_speculative_s"] = slow.timings["total_s"], fast.timings["total_s"]
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


def _hit(draft: str, expected: str) -> bool:
    return draft.strip() == expected.strip()


def summarize(records: list[dict[str, Any]], k: int) -> dict[str, Any]:
    ts = [t for r in records for t in r["targets"]]
    if not ts:
        return {"n": 0, "n_records": len(records)}

    def rate(pred) -> float:
        return sum(map(pred, ts)) / len(ts)

    def first(t: dict[str, Any], name: str) -> str:
        return t["drafts"][name][0] if t["drafts"][name] else ""

    greedy_tok_s = sum(t["multi_tokens"] for t in ts) / sum(t["multi_greedy_s"] for t in ts)
    spec_tok_s = sum(t["multi_tokens"] for t in ts) / sum(t["multi_speculative_s"] for t in ts)
    histogram = Counter(round(t["accepted_per_tree_step"]) for t in ts)
    return {
        "n": len(ts), "n_records": len(records), "k": k,
        "greedy_tok_s": greedy_tok_s, "speculative_tok_s": spec_tok_s,
        "speedup_speculative": spec_tok_s / greedy_tok_s,
        "identical_outputs": rate(lambda t: t["identical"]),
        "accepted_per_tree_step_mean": statistics.mean(t["accepted_per_tree_step"] for t in ts),
        "accepted_histogram": {str(a): c for a, c in sorted(histogram.items())},
        "greedy_ms_median": statistics.median(t["greedy_s"] for t in ts) * 1e3,
        "superposed_time_ratio": sum(t["superposed_s"] for t in ts) / sum(t["greedy_s"] for t in ts),
        "batched_time_ratio": sum(t["batched_s"] for t in ts) / sum(t["greedy_s"] for t in ts),
        "em_greedy": rate(lambda t: _hit(first(t, "greedy"), t["expected"])),
        "em_draft1": rate(lambda t: _hit(first(t, "superposed"), t["expected"])),
        "em_best_of_k": rate(lambda t: any(_hit(d, t["expected"]) for d in t["drafts"]["superposed"])),
        "em_batched_draft1": rate(lambda t: _hit(first(t, "batched"), t["expected"])),
        "em_batched_best_of_k": rate(lambda t: any(_hit(d, t["expected"]) for d in t["drafts"]["batched"])),
        "drafts_per_target_superposed": statistics.mean(len(t["drafts"]["superposed"]) for t in ts),
        "suffix_duplications": sum(t["suffix_duplications"] for t in ts),
        "unbalanced_brackets": sum(t["unbalanced"] for t in ts),
    }


TABLE_COLUMNS = ("n", "speedup_speculative", "identical_outputs", "accepted_per_tree_step_mean",
                 "superposed_time_ratio", "batched_time_ratio", "em_greedy", "em_draft1", "em_best_of_k",
                 "em_batched_draft1", "em_batched_best_of_k", "suffix_duplications", "unbalanced_brackets")


def run_decode_bench(model: str = DEFAULT_MODEL, *, data: Path = DEFAULT_DATA, limit: int | None = 12,
                     json_out: Path | None = None, cache: Path | None = None, k: int = 3) -> dict[str, Any]:
    records = load_records(data, limit)
    loaded = load_model(model, cache=cache, progress=sys.stderr.isatty())
    ngram = NgramModel.for_tokenizer(loaded.tokenizer, cache or cache_root())
    runner = DecodeRunner(loaded, k, ngram)
    t0 = time.perf_counter()
    results = []
    for index, record in enumerate(records, 1):
        results.append(bench_record(runner, record))
        last = summarize(results[-1:], k)
        print(f"[{index}/{len(records)}] {record['commit'][:10]} {results[-1]['tokens']} tok | "
              f"speedup {last.get('speedup_speculative', 0):.2f} em greedy/draft1/best "
              f"{last.get('em_greedy', 0):.2f}/{last.get('em_draft1', 0):.2f}/{last.get('em_best_of_k', 0):.2f}",
              file=sys.stderr, flush=True)
    overall = summarize(results, k)
    summary = {"model": model, "data": str(data), "limit": limit, "line_tokens": LINE_TOKENS,
               "multi_tokens": MULTI_TOKENS, "machine": machine_info(), "wall_s": time.perf_counter() - t0,
               "peak_rss_mb": peak_rss_mb(), **overall, "records": results}
    report(summary, f"decode benchmark: {model}, {overall['n']} completion points in {len(results)} records of "
           f"{data.name}", format_table({"all": overall}, TABLE_COLUMNS), json_out or DEFAULT_JSON)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = edits_parser("python -m bench.decode", __doc__, DEFAULT_JSON, 12)
    parser.add_argument("--k", type=int, default=3, help="drafts for superposed and batched decoding")
    args = parser.parse_args(argv)
    run_decode_bench(args.model, data=args.data, limit=args.limit, json_out=args.json_out, cache=args.cache,
                     k=args.k)
    return 0


if __name__ == "__main__":
    sys.exit(main())
