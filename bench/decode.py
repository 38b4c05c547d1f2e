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
from bench.fim import lines_to_type, open_after
from bench.pie import DEFAULT_DATA, edits_parser, format_table, load_records, report
from inference.drafting import Recycler
from inference.fetch import cache_root
from inference.generate import GenerationResult, greedy_complete
from inference.healing import TokenHealer
from inference.model_store import LoadedModel, load_model
from inference.ngram import NgramModel
from inference.prompt import Prompt
from inference.registry import DEFAULT_MODEL
from inference.speculative import speculative_complete
from inference.superposed import batched_complete, superposed_complete
from inference.syntax import SyntaxStop, finish, repeated_suffix
from kv_cache.document import CursorContext

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
    """All decoders on one cursor context; shares the healer, the recycler and the n-gram model."""

    def __init__(self, model: LoadedModel, k: int, ngram: NgramModel) -> None:
        self.model, self.k, self.ngram = model, k, ngram
        self.healer = TokenHealer(model.tokenizer.token_bytes(), model.tokenizer.specials.stop)
        self.recycler = Recycler(model.config.vocab_size)

    def _timed(self, decode, ctx: CursorContext, **kwargs: Any) -> tuple[GenerationResult, float]:
        t0 = time.perf_counter()
        result = decode(self.model.decoder, self.model.tokenizer, Prompt(ctx.tail, ctx.healed), rows=ctx.rows,
                        position=ctx.position, healer=self.healer, **kwargs)
        return result, time.perf_counter() - t0

    def target(self, ctx: CursorContext, corpus: list[int]) -> dict[str, Any]:
        single = SyntaxStop(ctx.prefix, ctx.suffix, "single")
        out: dict[str, Any] = {}
        greedy, out["greedy_s"] = self._timed(greedy_complete, ctx, max_tokens=LINE_TOKENS, stop=single)
        sup, out["superposed_s"] = self._timed(superposed_complete, ctx, k=self.k, max_tokens=LINE_TOKENS,
                                               stop=single.fresh(), ngram=self.ngram)
        beam, out["batched_s"] = self._timed(batched_complete, ctx, k=self.k, max_tokens=LINE_TOKENS,
                                             stop=single.fresh())
        out["drafts"] = {name: [finish(d.text, ctx.prefix, ctx.suffix) for d in result.drafts]
                         for name, result in (("greedy", greedy), ("superposed", sup), ("batched", beam))}
        multi = SyntaxStop(ctx.prefix, ctx.suffix, "multi")
        slow, out["multi_greedy_s"] = self._timed(greedy_complete, ctx, max_tokens=MULTI_TOKENS, stop=multi)
        fast, out["multi_speculative_s"] = self._timed(speculative_complete, ctx, max_tokens=MULTI_TOKENS,
                                                       stop=multi.fresh(), lookup_corpus=[corpus],
                                                       recycler=self.recycler)
        out["multi_tokens"] = len(slow.drafts[0].token_ids)
        out["identical"] = slow.drafts[0].token_ids == fast.drafts[0].token_ids
        steps = fast.timings.get("tree_steps", 0.0) + fast.timings.get("single_steps", 0.0)
        out["accepted_per_tree_step"] = (fast.timings.get("accepted_drafts", 0.0) / fast.timings["tree_steps"]
                                         if fast.timings.get("tree_steps") else 0.0)
        out["forwards_speculative"] = steps
        out["multi_drafts"] = {"greedy": finish(slow.drafts[0].text, ctx.prefix, ctx.suffix)}
        return out


def bench_record(runner: DecodeRunner, record: dict[str, Any]) -> dict[str, Any]:
    doc = open_after(runner.model, record)
    targets = []
    for line in lines_to_type(doc, record):
        runner.ngram.add_document("buffer", doc.ids)
        ctx = doc.context(line.cursor, with_suffix=False)
        result = runner.target(ctx, list(doc.ids))
        runner.ngram.remove_document("buffer")
        line_prefix = ctx.prefix[ctx.prefix.rfind("\n") + 1:]
        line_suffix = ctx.suffix.split("\n", 1)[0]
        finals = [*(d for drafts in result["drafts"].values() for d in drafts), *result["multi_drafts"].values()]
        result["suffix_duplications"] = sum(bool(repeated_suffix(d, ctx.prefix, ctx.suffix)) for d in finals)
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
