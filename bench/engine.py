"""Engine benchmark: speed, memory and quality of the default quantization against the fp32 baseline.

Each quantization is first prepared (fetched, converted) in one subprocess (`--prepare QUANT`), then
measured in another (`--one QUANT`), so peak RSS is per model and free of the converter's, and a crash or
an out-of-memory kill stays contained. The parent prints a markdown table and writes a JSON summary. Machines
are noisy: compare only ratios against the baseline measured in the same run.

    python -m bench.engine [--json OUT] [--model M] [--cache DIR] [--quick] [--speed-sources F ...] [--quality-source F]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import sysconfig
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from inference.generate import KVRows, prefill
from inference.model_store import LoadedModel, load_model, prepare_model
from inference.quantize import DEFAULT_QUANTIZATION
from inference.registry import DEFAULT_MODEL
from inference.runtime import Decoder, causal_bias

BASELINE = "fp32"
DEFAULT_JSON = Path(__file__).parent / "results" / "engine.json"
SPEED_SOURCES = ("difflib.py", "textwrap.py", "heapq.py")  # real code, same on every machine with this Python
QUALITY_SOURCE = "argparse.py"
PREFILL_SIZES, QUICK_PREFILL_SIZES = (256, 1024, 2048), (256,)
PAST = 1024  # decode and verification run against this many cached tokens
VERIFY_SIZES = (1, 4, 8, 16)
QUALITY_CHUNK = 256  # logits for every position are [chunk, vocab]: bound that memory


def stdlib_paths(*names: str) -> list[Path]:
    """Standard-library sources: deterministic real code without shipping a corpus."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return [stdlib / name for name in names]


def code_tokens(model: LoadedModel, paths: Sequence[Path], count: int) -> list[int]:
    """The first `count` tokens of the concatenated sources; fails loudly rather than benchmark a shorter prompt."""
    ids = model.tokenizer.encode("".join(path.read_text(encoding="utf-8") for path in paths))
    if len(ids) < count:
        names = ", ".join(path.name for path in paths)
        raise RuntimeError(f"{names} give only {len(ids)} tokens, the benchmark needs {count}")
    return ids[:count]


def measure_prefill(decoder: Decoder, ids: list[int], sizes: tuple[int, ...]) -> dict[str, float]:
    """Prompt tokens per second of one `prefill` call per size, after a short warm-up prompt."""
    prefill(decoder, ids[:32])
    result = {}
    for size in sizes:
        t0 = time.perf_counter()
        prefill(decoder, ids[:size])
        result[f"prefill_tok_s_{size}"] = size / (time.perf_counter() - t0)
    return result


def measure_decode(decoder: Decoder, rows: KVRows, next_ids: list[int]) -> dict[str, float]:
    """Median single-token forward at ~PAST cached tokens, appending rows as a real decode loop does.

    Only the forward is timed: how rows are stored is the KV cache's business, not the engine's.
    """
    rows = KVRows(list(rows.keys), list(rows.values))  # appending replaces the lists' arrays, never mutates
    times = []
    for token in next_ids:
        t0 = time.perf_counter()
        out = decoder.forward(np.array([token]), np.array([rows.length]), rows.keys, rows.values)
        times.append(time.perf_counter() - t0)
        rows.append(out.keys, out.values)
    step = statistics.median(times)
    return {"decode_ms": step * 1e3, "decode_tok_s": 1.0 / step, "decode_steps": len(times)}


def measure_verify(decoder: Decoder, rows: KVRows, draft: list[int], runs: int) -> dict[str, float]:
    """Cost of checking k drafted tokens in ONE forward (logits at every position), relative to k = 1.

    This is what speculative decoding pays per step; a flat curve means drafts are nearly free to verify.
    """
    result: dict[str, float] = {}
    for k in VERIFY_SIZES:
        ids = np.asarray(draft[:k])
        positions = np.arange(rows.length, rows.length + k)
        bias = causal_bias(rows.length, k)
        index = np.arange(k)
        decoder.forward(ids, positions, rows.keys, rows.values, bias=bias, logits_index=index)  # warm-up
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            decoder.forward(ids, positions, rows.keys, rows.values, bias=bias, logits_index=index)
            times.append(time.perf_counter() - t0)
        result[f"verify{k}_ms"] = statistics.median(times) * 1e3
    for k in VERIFY_SIZES[1:]:
        result[f"verify{k}_over_verify1"] = result[f"verify{k}_ms"] / result["verify1_ms"]
    return result


def measure_quality(decoder: Decoder, ids: list[int]) -> dict[str, Any]:
    """Perplexity of real code and the argmax at every position (the parent compares argmaxes across runs)."""
    rows = KVRows(*decoder.empty_past())
    nll: list[np.ndarray] = []
    argmax: list[int] = []
    for start in range(0, len(ids), QUALITY_CHUNK):
        chunk = np.asarray(ids[start:start + QUALITY_CHUNK], dtype=np.int64)
        positions = np.arange(rows.length, rows.length + len(chunk))
        out = decoder.forward(chunk, positions, rows.keys, rows.values, logits_index=np.arange(len(chunk)))
        rows.append(out.keys, out.values)
        # NLL = log-normalizer - target logit: one [chunk, vocab] temporary where log-softmax needs several
        top = out.logits.max(axis=1)
        log_norm = top + np.log(np.exp(out.logits - top[:, None]).sum(axis=1))
        targets = np.asarray(ids[start + 1:start + 1 + len(chunk)])  # the next token; none after the last
        nll.append(log_norm[:len(targets)] - out.logits[np.arange(len(targets)), targets])
        argmax.extend(int(i) for i in out.logits.argmax(axis=1))
    mean_nll = float(np.concatenate(nll).astype(np.float64).mean())
    return {"perplexity": math.exp(mean_nll), "quality_tokens": len(ids), "argmax": argmax}


def peak_rss_mb() -> float:
    """Peak resident memory of this process (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def bench_prepare(model_name: str, quantization: str, *, cache: Path | None) -> dict[str, float]:
    """Fetch and convert (a cache hit when done before); the `--prepare` subprocess, so the converter's
    memory never counts as the model's."""
    t0 = time.perf_counter()
    prepare_model(model_name, quantization, cache=cache, progress=sys.stderr.isatty())
    return {"prepare_s": time.perf_counter() - t0, "prepare_peak_rss_mb": peak_rss_mb()}


def bench_one(model_name: str, quantization: str, *, cache: Path | None, quick: bool,
              speed_sources: Sequence[Path] | None = None, quality_source: Path | None = None) -> dict[str, Any]:
    """Every measurement for one prepared quantization; runs inside the `--one` subprocess.

    The code measured defaults to SPEED_SOURCES and QUALITY_SOURCE of this Python's standard library.
    peak_rss_mb is taken before the quality pass: serving never asks for logits at 256 positions at once.
    """
    model = load_model(model_name, quantization, cache=cache, progress=False)
    decoder = model.decoder
    sizes = QUICK_PREFILL_SIZES if quick else PREFILL_SIZES
    decode_steps, verify_runs = (16, 5) if quick else (32, 9)
    speed_sources = speed_sources or stdlib_paths(*SPEED_SOURCES)
    quality_source = quality_source or stdlib_paths(QUALITY_SOURCE)[0]
    ids = code_tokens(model, speed_sources, max(max(sizes), PAST + max(decode_steps, max(VERIFY_SIZES))))
    result: dict[str, Any] = {
        "quantization": quantization,
        "threads": decoder.session.get_session_options().intra_op_num_threads,
        "providers": decoder.providers,
        "load_s": model.timings["load_s"],
        "speed_sources": [str(path) for path in speed_sources],  # figures compare only on the same code
        "quality_source": str(quality_source),
    }
    result.update(measure_prefill(decoder, ids, sizes))
    rows, _ = prefill(decoder, ids[:PAST])
    result["past_tokens"] = rows.length
    result.update(measure_decode(decoder, rows, ids[PAST:PAST + decode_steps]))
    result.update(measure_verify(decoder, rows, ids[PAST:], verify_runs))
    result["peak_rss_mb"] = peak_rss_mb()
    result.update(measure_quality(decoder, code_tokens(model, [quality_source], 256 if quick else 1024)))
    result["quality_peak_rss_mb"] = peak_rss_mb()
    return result


def source_args(speed_sources: Sequence[Path] | None, quality_source: Path | None) -> list[str]:
    """The command-line options that hand the code to measure to a `--one` subprocess (none: the defaults)."""
    args = ["--speed-sources", *map(str, speed_sources)] if speed_sources else []
    return args + (["--quality-source", str(quality_source)] if quality_source is not None else [])


def run_child(mode: str, model: str, quantization: str, *, cache: Path | None, quick: bool,
              extra: Sequence[str] = ()) -> dict[str, Any]:
    """`--prepare` or `--one` in a fresh interpreter; its stdout's last line is the JSON result."""
    command = [sys.executable, "-m", "bench.engine", mode, quantization, "--model", model]
    command += ["--cache", str(cache)] if cache is not None else []
    command += ["--quick"] if quick else []
    command += extra
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True)  # stderr passes through (progress, errors)
    if done.returncode != 0:
        raise SystemExit(f"bench engine: {mode} {quantization} failed (exit {done.returncode})")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_quantization(model: str, quantization: str, *, cache: Path | None, quick: bool,
                       sources: Sequence[str] = ()) -> dict[str, Any]:
    """Preparation, then measurements (of the code `sources` names, see source_args), each in its own process."""
    prepared = run_child("--prepare", model, quantization, cache=cache, quick=quick)
    return {**prepared, **run_child("--one", model, quantization, cache=cache, quick=quick, extra=sources)}


def compare_quality(default: dict[str, Any], baseline: dict[str, Any]) -> dict[str, float]:
    """How often the quantized model's next-token choice matches fp32, and how much likelier code surprises it."""
    ours, theirs = np.asarray(default.pop("argmax")), np.asarray(baseline.pop("argmax"))
    return {
        "top1_agreement": float((ours == theirs).mean()),
        "perplexity_ratio": default["perplexity"] / baseline["perplexity"],
        "tokens": len(ours),
    }


def cpu_description() -> dict[str, Any]:
    """CPU model and the vector extensions int8 kernels depend on: figures only compare on like CPUs."""
    model, flags = "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    return {"cpu": model, "cpu_features": sorted(flags & {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8"})}


def machine_info() -> dict[str, Any]:
    import onnxruntime

    return {"cpus": os.cpu_count(), **cpu_description(), "onnxruntime": onnxruntime.__version__,
            "python": sys.version.split()[0], "superpie_threads": os.environ.get("SUPERPIE_THREADS")}


def table_rows(baseline: dict[str, Any]) -> list[str]:
    """The numeric metrics, in the order measured."""
    skip = {"threads", "past_tokens", "decode_steps", "quality_tokens"}
    return [k for k, v in baseline.items() if isinstance(v, (int, float)) and k not in skip]


def format_table(summary: dict[str, Any]) -> str:
    baseline, default = summary["fp32"], summary["default"]
    name = summary["quantization_default"]
    lines = [f"| metric | {BASELINE} | {name} | {name}/{BASELINE} |", "|---|---:|---:|---:|"]
    for key in table_rows(baseline):
        a, b = baseline[key], default[key]
        ratio = f"{b / a:.2f}" if a else "-"
        lines.append(f"| {key} | {a:.2f} | {b:.2f} | {ratio} |")
    quality = summary["quality"]
    lines.append(f"| top1_agreement ({quality['tokens']} tokens) | | | {quality['top1_agreement']:.3f} |")
    lines.append(f"| perplexity_ratio | | | {quality['perplexity_ratio']:.3f} |")
    return "\n".join(lines)


def write_json(summary: dict[str, Any], path: Path) -> None:
    """Atomic, so an interrupted run never leaves half a results file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    tmp.replace(path)


def run_engine_bench(model: str = DEFAULT_MODEL, *, json_out: Path | None = None, cache: Path | None = None,
                     quick: bool = False, speed_sources: Sequence[Path] | None = None,
                     quality_source: Path | None = None) -> dict[str, Any]:
    """Measure fp32 then the default quantization, print the table, write the JSON; returns the summary.

    `speed_sources` (timed) and `quality_source` (perplexity) are the code measured; by default, this Python's
    standard library files SPEED_SOURCES and QUALITY_SOURCE (tests pass fixed files: every machine, same text).
    """
    sources = source_args(speed_sources, quality_source)
    baseline = bench_quantization(model, BASELINE, cache=cache, quick=quick, sources=sources)
    default = bench_quantization(model, DEFAULT_QUANTIZATION, cache=cache, quick=quick, sources=sources)
    summary = {
        "model": model,
        "quantization_default": DEFAULT_QUANTIZATION,
        "quick": quick,
        "machine": machine_info(),
        "quality": compare_quality(default, baseline),
        "fp32": baseline,
        "default": default,
    }
    print(f"engine benchmark: {model}, {BASELINE} vs {DEFAULT_QUANTIZATION}{' (quick)' if quick else ''}")
    print(format_table(summary))
    path = json_out or DEFAULT_JSON
    write_json(summary, path)
    print(f"wrote {path}")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.engine", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--cache", type=Path, default=None, help="model cache (default: $SUPERPIE_CACHE)")
    parser.add_argument("--json", dest="json_out", type=Path, default=None, help=f"default: {DEFAULT_JSON}")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and sizes (smoke test)")
    parser.add_argument("--speed-sources", type=Path, nargs="+", metavar="FILE",
                        help=f"code to time (default: the standard library's {', '.join(SPEED_SOURCES)})")
    parser.add_argument("--quality-source", type=Path, metavar="FILE",
                        help=f"code to measure perplexity on (default: the standard library's {QUALITY_SOURCE})")
    internal = parser.add_mutually_exclusive_group()
    internal.add_argument("--prepare", metavar="QUANT", help="internal: fetch and convert one quantization")
    internal.add_argument("--one", metavar="QUANT", help="internal: measure one quantization, print its JSON")
    args = parser.parse_args(argv)
    if args.prepare:
        print(json.dumps(bench_prepare(args.model, args.prepare, cache=args.cache)))
    elif args.one:
        print(json.dumps(bench_one(args.model, args.one, cache=args.cache, quick=args.quick,
                                   speed_sources=args.speed_sources, quality_source=args.quality_source)))
    else:
        run_engine_bench(args.model, json_out=args.json_out, cache=args.cache, quick=args.quick,
                         speed_sources=args.speed_sources, quality_source=args.quality_source)
    return 0


if __name__ == "__main__":
    sys.exit(main())
