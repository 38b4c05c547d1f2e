"""Engine benchmark: speed, memory and quality of quantizations (the default one unless told) against fp32.

Decode is timed after 256, 1k and 2k cached rows held in preallocated buffers that each step reads as views and
writes in place, so a step's cost grows with the past only through attention. Each quantization is first
prepared (fetched, converted) in one subprocess (`--prepare QUANT`), then measured in another (`--one QUANT`),
so peak RSS is per model and free of the converter's, and a crash or an out-of-memory kill stays contained.
The parent prints a markdown table and writes a JSON summary. Machines are noisy: compare only ratios against
the baseline measured in the same run (`other_processes_cores` says how busy the machine was meanwhile).

    python -m bench.engine [--json OUT] [--model M] [--cache DIR] [--quick] [--quantizations Q ...] [--rounds N]
                           [--profile] [--quiet-s S] [--speed-sources F ...] [--quality-source F]
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
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from inference.config import ModelConfig
from inference.graph import LM_HEAD
from inference.model_store import LoadedModel, load_model, prepare_model
from inference.quantize import DEFAULT_QUANTIZATION, QUANTIZATIONS
from inference.registry import DEFAULT_MODEL
from inference.runtime import Decoder, StepOutput, causal_bias

BASELINE = "fp32"
DEFAULT_JSON = Path(__file__).parent / "results" / "engine.json"
SPEED_SOURCES = ("difflib.py", "textwrap.py", "heapq.py")  # real code, same on every machine with this Python
QUALITY_SOURCE = "argparse.py"
PREFILL_SIZES, QUICK_PREFILL_SIZES = (256, 1024, 2048), (256,)
DECODE_PASTS, QUICK_DECODE_PASTS = (256, 1024, 2048), (256, 1024)  # decode runs against this many cached rows
PAST = 1024  # verification runs against this many cached rows; `decode_tok_s` is the decode figure at it
VERIFY_SIZES = (1, 4, 8, 16)
PREFILL_CHUNK = 512  # as the decoders prefill
QUALITY_CHUNK = 256  # logits for every position are [chunk, vocab]: bound that memory
PROFILE_STEPS, PROFILE_WARMUP = 24, 3
QUIET_CORES = 0.08  # a block of steps is timed on a quiet machine when other processes used less than this
QUIET_BLOCK, QUIET_STEPS = 4, 24  # steps per quiet block; quiet steps wanted per past
PROJECTIONS = ("qkv", "o", "gate_up", "down")  # the graph's weight MatMuls per layer (inference/graph.py)
ATTENTION_OPS = {"FusedMatMul": "attention: scores q k^T", "MatMul": "attention: probs @ V",
                 "Softmax": "attention: softmax"}  # what is left of these ops once the weight MatMuls are named


class Rows:
    """Preallocated per-layer key/value buffers [kv, capacity, hd], used the way a decode cache uses them: each
    forward's past is the row slice `buf[:, :length]` (a view) and its new rows are written in place, so what is
    timed is the engine and not a cache's copies."""

    def __init__(self, config: ModelConfig, capacity: int) -> None:
        shape = (config.n_kv_heads, capacity, config.head_dim)
        self.keys = [np.zeros(shape, np.float32) for _ in range(config.n_layers)]
        self.values = [np.zeros(shape, np.float32) for _ in range(config.n_layers)]
        self.length = 0

    def forward(self, decoder: Decoder, ids: np.ndarray, *, bias: np.ndarray | None = None,
                logits_index: np.ndarray | None = None, write: bool = True) -> StepOutput:
        """`ids` [S] at positions length.., after rows [0, length); `write` appends their rows."""
        n, seq = self.length, len(ids)
        out = decoder.forward(ids, np.arange(n, n + seq), [k[:, :n] for k in self.keys],
                              [v[:, :n] for v in self.values], bias=bias, logits_index=logits_index)
        if write:
            for buf, new in zip(self.keys + self.values, out.keys + out.values):
                buf[:, n:n + seq] = new
            self.length += seq
        return out


def prefill(decoder: Decoder, rows: Rows, ids: Sequence[int]) -> None:
    for start in range(0, len(ids), PREFILL_CHUNK):
        rows.forward(decoder, np.asarray(ids[start:start + PREFILL_CHUNK], dtype=np.int64))


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


def measure_prefill(model: LoadedModel, ids: list[int], sizes: tuple[int, ...]) -> dict[str, float]:
    """Prompt tokens per second of one prefill per size (chunks of PREFILL_CHUNK), after a short warm-up."""
    prefill(model.decoder, Rows(model.config, 32), ids[:32])
    result = {}
    for size in sizes:
        rows = Rows(model.config, size)
        t0 = time.perf_counter()
        prefill(model.decoder, rows, ids[:size])
        result[f"prefill_tok_s_{size}"] = size / (time.perf_counter() - t0)
    return result


def measure_decode(decoder: Decoder, rows: Rows, pasts: Sequence[int], next_ids: list[int],
                   quiet_s: float = 0.0) -> dict[str, float]:
    """Median single-token step (forward + in-place row write) after each number of cached rows.

    `rows` holds at least max(pasts) rows of real code. The rows [0, P) of a longer prefill are those of a
    prefill of P tokens (causal attention), so each past truncates to P; the longest goes first, so the rows a
    step overwrites are never read by a later one. With `quiet_s`, each past also gets up to that many seconds
    to time steps while no other process uses the CPUs (`decode_quiet_*`, see quiet_steps)."""
    ms: dict[int, float] = {}
    quiet: dict[int, list[float]] = {}
    for past in sorted(pasts, reverse=True):
        rows.length = past
        times = [timed_step(decoder, rows, token) for token in next_ids]
        ms[past] = statistics.median(times[1:])  # the first step after a truncation warms caches
        if quiet_s > 0:
            quiet[past] = quiet_steps(decoder, rows, past, next_ids[:QUIET_BLOCK + 1], quiet_s)
    result: dict[str, float] = {"decode_tok_s": 1e3 / ms[PAST]}
    for past in sorted(pasts):
        result[f"decode_tok_s_{past}"] = 1e3 / ms[past]
        result[f"decode_ms_{past}"] = ms[past]
    # what each cached row adds to a step: attention (and its Concat) only, when nothing else copies the past
    result["decode_us_per_row"] = (ms[max(pasts)] - ms[min(pasts)]) * 1e3 / (max(pasts) - min(pasts))
    result["decode_steps"] = len(next_ids) - 1
    for past in sorted(quiet):
        result[f"decode_quiet_steps_{past}"] = len(quiet[past])
        if quiet[past]:
            result[f"decode_quiet_tok_s_{past}"] = 1e3 / statistics.median(quiet[past])
    return result


def timed_step(decoder: Decoder, rows: Rows, token: int) -> float:
    """ms of one decode step: the forward after the rows and the write of its row."""
    t0 = time.perf_counter()
    rows.forward(decoder, np.array([token]))
    return (time.perf_counter() - t0) * 1e3


def quiet_steps(decoder: Decoder, rows: Rows, past: int, tokens: list[int], budget_s: float) -> list[float]:
    """Step times (ms) after `past` rows, from blocks during which other processes used the CPUs less than
    QUIET_CORES, waiting for such moments for at most `budget_s`: on a shared machine these are the figures
    of the machine itself. Empty off Linux (no /proc/stat) or when no moment was quiet."""
    kept: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(kept) < QUIET_STEPS and time.perf_counter() < deadline and cpu_mark() is not None:
        idle = cpu_mark()
        time.sleep(0.3)
        if other_cores(idle) > QUIET_CORES:
            continue
        mark = cpu_mark()
        rows.length = past
        block = [timed_step(decoder, rows, token) for token in tokens]
        if other_cores(mark) <= QUIET_CORES:
            kept += block[1:]  # the first step after the truncation warms caches
    return kept


def measure_verify(decoder: Decoder, rows: Rows, draft: list[int], runs: int) -> dict[str, float]:
    """Cost of checking k drafted tokens in ONE forward (logits at every position) after PAST rows, relative to
    k = 1. This is what speculative decoding pays per step; a flat curve means drafts are nearly free to verify."""
    rows.length = PAST
    result: dict[str, float] = {}
    for k in VERIFY_SIZES:
        ids, bias, index = np.asarray(draft[:k]), causal_bias(PAST, k), np.arange(k)
        rows.forward(decoder, ids, bias=bias, logits_index=index, write=False)  # warm-up
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            rows.forward(decoder, ids, bias=bias, logits_index=index, write=False)
            times.append(time.perf_counter() - t0)
        result[f"verify{k}_ms"] = statistics.median(times) * 1e3
    for k in VERIFY_SIZES[1:]:
        result[f"verify{k}_over_verify1"] = result[f"verify{k}_ms"] / result["verify1_ms"]
    return result


def measure_quality(model: LoadedModel, ids: list[int]) -> dict[str, Any]:
    """Perplexity of real code and the argmax at every position (the parent compares argmaxes across runs)."""
    rows = Rows(model.config, len(ids))
    nll: list[np.ndarray] = []
    argmax: list[int] = []
    for start in range(0, len(ids), QUALITY_CHUNK):
        chunk = np.asarray(ids[start:start + QUALITY_CHUNK], dtype=np.int64)
        out = rows.forward(model.decoder, chunk, logits_index=np.arange(len(chunk)))
        # NLL = log-normalizer - target logit: one [chunk, vocab] temporary where log-softmax needs several
        top = out.logits.max(axis=1)
        log_norm = top + np.log(np.exp(out.logits - top[:, None]).sum(axis=1))
        targets = np.asarray(ids[start + 1:start + 1 + len(chunk)])  # the next token; none after the last
        nll.append(log_norm[:len(targets)] - out.logits[np.arange(len(targets)), targets])
        argmax.extend(int(i) for i in out.logits.argmax(axis=1))
    mean_nll = float(np.concatenate(nll).astype(np.float64).mean())
    return {"perplexity": math.exp(mean_nll), "quality_tokens": len(ids), "argmax": argmax}


def op_kind(node: str, op: str, past_concats: set[str]) -> str:
    """What a node of the optimized graph does, for the profile: the weight matmuls by projection, attention's
    parts, and the rest. The quantizer names a node `qkv_12_Q8` after the MatMul `qkv_12` it replaces."""
    if node.startswith(LM_HEAD):
        return "lm_head"
    base, _, count = node.rsplit("_Q", 1)[0].rpartition("_")
    if base in PROJECTIONS and count.isdigit():
        return f"matmul {base}"
    if node in past_concats:
        return "attention: Concat(past, new)"
    return ATTENTION_OPS.get(op, "other ops")


def profile_decode(model: LoadedModel, rows: Rows, next_ids: list[int]) -> dict[str, float]:
    """Mean ms per decode step after PAST rows by kind of work, from ONNX Runtime's per-op trace.

    It runs in a session of its own, because tracing slows every op a little: these are shares of a step, the
    decode figures are measured without it. `between kernels` is the executor's own time (and the tracer's)."""
    graph = onnx.load(str(model.decoder.model_path), load_external_data=False).graph
    past_concats = {n.name for n in graph.node if n.op_type == "Concat" and any(i.startswith("past_") for i in n.input)}
    with tempfile.TemporaryDirectory() as tmp:
        decoder = Decoder(model.decoder.model_path, model.config, profile_prefix=str(Path(tmp) / "decode"))
        rows.length = PAST
        for token in next_ids[:PROFILE_WARMUP + PROFILE_STEPS]:
            rows.forward(decoder, np.array([token]), write=False)
        events = json.loads(Path(decoder.session.end_profiling()).read_text())
    runs = [e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"][PROFILE_WARMUP:]
    start = runs[0]["ts"]
    ms: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start:
            kind = op_kind(e["name"][:-len("_kernel_time")], e["args"]["op_name"], past_concats)
            ms[kind] = ms.get(kind, 0.0) + e["dur"] / 1e3 / len(runs)
    ms = dict(sorted(ms.items(), key=lambda item: -item[1]))
    ms["between kernels"] = sum(r["dur"] for r in runs) / 1e3 / len(runs) - sum(ms.values())
    ms["step (traced)"] = sum(r["dur"] for r in runs) / 1e3 / len(runs)
    return ms


def cpu_mark() -> tuple[float, float, float] | None:
    """(CPU seconds all processes have used, CPU seconds this one has, wall time) from /proc/stat, or None off
    Linux. Steal time counts as used: on a virtual machine it is another guest's."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    own = resource.getrusage(resource.RUSAGE_SELF)
    return ((user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK"), own.ru_utime + own.ru_stime,
            time.perf_counter())


def other_cores(since: tuple[float, float, float] | None) -> float:
    """How many cores other processes used on average since a cpu_mark (inf when unknown)."""
    now = cpu_mark()
    if since is None or now is None:
        return math.inf
    return max((now[0] - since[0]) - (now[1] - since[1]), 0.0) / max(now[2] - since[2], 1e-9)


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
              speed_sources: Sequence[Path] | None = None, quality_source: Path | None = None,
              profile: bool = False, quiet_s: float = 0.0) -> dict[str, Any]:
    """Every measurement for one prepared quantization; runs inside the `--one` subprocess.

    The code measured defaults to SPEED_SOURCES and QUALITY_SOURCE of this Python's standard library.
    peak_rss_mb is taken before the quality pass: serving never asks for logits at 256 positions at once.
    """
    model = load_model(model_name, quantization, cache=cache, progress=False)
    decoder = model.decoder
    started = cpu_mark()
    sizes = QUICK_PREFILL_SIZES if quick else PREFILL_SIZES
    pasts = QUICK_DECODE_PASTS if quick else DECODE_PASTS
    decode_steps, verify_runs = (9, 5) if quick else (33, 9)
    speed_sources = speed_sources or stdlib_paths(*SPEED_SOURCES)
    quality_source = quality_source or stdlib_paths(QUALITY_SOURCE)[0]
    longest = max(max(sizes), max(pasts))
    ids = code_tokens(model, speed_sources, longest + max(decode_steps, max(VERIFY_SIZES)))
    result: dict[str, Any] = {
        "quantization": quantization,
        "threads": decoder.session.get_session_options().intra_op_num_threads,
        "providers": decoder.providers,
        "load_s": model.timings["load_s"],
        "speed_sources": [str(path) for path in speed_sources],  # figures compare only on the same code
        "quality_source": str(quality_source),
    }
    result.update(measure_prefill(model, ids, sizes))
    rows = Rows(model.config, longest + decode_steps)
    prefill(decoder, rows, ids[:max(pasts)])
    result.update(measure_verify(decoder, rows, ids[PAST:], verify_runs))  # writes nothing: first
    result.update(measure_decode(decoder, rows, pasts, ids[max(pasts):max(pasts) + decode_steps], quiet_s))
    result["peak_rss_mb"] = peak_rss_mb()
    result.update(measure_quality(model, code_tokens(model, [quality_source], 256 if quick else 1024)))
    result["quality_peak_rss_mb"] = peak_rss_mb()
    if started is not None:  # a shared machine: how many cores others took while this ran
        result["other_processes_cores"] = other_cores(started)
    if profile:
        result["decode_profile_ms"] = profile_decode(model, rows, ids[PAST:])
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
                       extra: Sequence[str] = ()) -> dict[str, Any]:
    """Preparation, then measurements (`extra`: options for `--one`, see source_args), each in its own process."""
    prepared = run_child("--prepare", model, quantization, cache=cache, quick=quick)
    return {**prepared, **run_child("--one", model, quantization, cache=cache, quick=quick, extra=extra)}


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from several rounds: the median of each number (over the rounds that have it), the first
    round's everything else."""
    merged = dict(runs[0])
    for key in dict.fromkeys(k for run in runs for k in run):
        values = [run[key] for run in runs if key in run]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            merged[key] = statistics.median(values)
        else:
            merged.setdefault(key, values[0])
    return merged


def compare_quality(quantized: dict[str, Any], baseline: dict[str, Any]) -> dict[str, float]:
    """How often the quantized model's next-token choice matches fp32, and how much likelier code surprises it."""
    ours, theirs = np.asarray(quantized["argmax"]), np.asarray(baseline["argmax"])
    return {
        "top1_agreement": float((ours == theirs).mean()),
        "perplexity_ratio": quantized["perplexity"] / baseline["perplexity"],
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


def machine_info(load_before: Sequence[float] | None = None) -> dict[str, Any]:
    """The CPU and runtime; with `load_before` (os.getloadavg() at the run's start), the load averages before and
    now: the machines are shared."""
    import onnxruntime

    info = {"cpus": os.cpu_count(), **cpu_description(), "onnxruntime": onnxruntime.__version__,
            "python": sys.version.split()[0], "superpie_threads": os.environ.get("SUPERPIE_THREADS")}
    if load_before is not None:
        info.update(load_avg_before=[round(x, 2) for x in load_before],
                    load_avg_after=[round(x, 2) for x in os.getloadavg()])
    return info


def table_rows(runs: dict[str, dict[str, Any]]) -> list[str]:
    """The numeric metrics of any run, in the order measured."""
    skip = {"threads", "decode_steps", "quality_tokens", "decode_tok_s"}  # decode_tok_s: decode_tok_s_1024
    return [k for k in dict.fromkeys(k for run in runs.values() for k in run)
            if k not in skip and any(isinstance(run.get(k), (int, float)) for run in runs.values())]


def format_table(summary: dict[str, Any]) -> str:
    """One column per quantization and its ratio to the baseline measured in the same run."""
    runs = summary["runs"]
    baseline, others = runs[BASELINE], [name for name in runs if name != BASELINE]
    lines = ["| metric | " + " | ".join([BASELINE] + [f"{n} | {n}/{BASELINE}" for n in others]) + " |",
             "|---|---:|" + "---:|---:|" * len(others)]
    for key in table_rows(runs):
        a = baseline.get(key)
        cells = [f"{a:.2f}" if a is not None else "-"]
        for name in others:
            b = runs[name].get(key)
            cells.append("- | -" if b is None else f"{b:.2f} | {b / a:.2f}" if a else f"{b:.2f} | -")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    quality = summary["quality"]
    tokens = next(iter(quality.values()))["tokens"] if quality else 0
    for metric, label in (("top1_agreement", f"top1_agreement ({tokens} tokens)"),
                          ("perplexity_ratio", "perplexity_ratio")):
        lines.append(f"| {label} | | " + " | ".join(f" | {quality[n][metric]:.3f}" for n in others) + " |")
    return "\n".join(lines)


def format_profile(runs: dict[str, dict[str, Any]]) -> str:
    """ms per traced decode step after PAST rows, by kind of work, one column per quantization."""
    kinds = list(dict.fromkeys(kind for run in runs.values() for kind in run["decode_profile_ms"]))
    lines = [f"| decode step after {PAST} rows, traced (ms) | " + " | ".join(runs) + " |",
             "|---|" + "---:|" * len(runs)]
    for kind in kinds:
        lines.append(f"| {kind} | " + " | ".join(f"{run['decode_profile_ms'].get(kind, 0.0):.2f}"
                                                for run in runs.values()) + " |")
    return "\n".join(lines)


def write_json(summary: dict[str, Any], path: Path) -> None:
    """Atomic, so an interrupted run never leaves half a results file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    tmp.replace(path)


def save_results(summary: dict[str, Any], path: Path) -> None:
    """write_json, and say where."""
    write_json(summary, path)
    print(f"wrote {path}")


def run_engine_bench(model: str = DEFAULT_MODEL, *, json_out: Path | None = None, cache: Path | None = None,
                     quick: bool = False, speed_sources: Sequence[Path] | None = None,
                     quality_source: Path | None = None, quantizations: Sequence[str] = (DEFAULT_QUANTIZATION,),
                     rounds: int = 1, profile: bool = False, quiet_s: float = 0.0) -> dict[str, Any]:
    """Measure fp32 and each of `quantizations`, print the table, write the JSON; returns the summary.

    Each round measures every quantization once, in turn, so that a noisy machine disturbs them alike; the
    figures are medians over rounds. `speed_sources` (timed) and `quality_source` (perplexity) are the code
    measured; by default, this Python's standard library files SPEED_SOURCES and QUALITY_SOURCE (tests pass
    fixed files: every machine, same text). `profile` adds a traced decode step's time by kind of work;
    `quiet_s` gives each decode past up to that many seconds to be timed while no other process runs.
    """
    extra = source_args(speed_sources, quality_source) + (["--profile"] if profile else [])
    extra += ["--quiet-s", str(quiet_s)] if quiet_s > 0 else []
    names = [BASELINE] + [q for q in quantizations if q != BASELINE]
    measured: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for _ in range(rounds):
        for name in names:
            measured[name].append(bench_quantization(model, name, cache=cache, quick=quick, extra=extra))
    runs = {name: median_run(results) for name, results in measured.items()}
    quality = {name: compare_quality(runs[name], runs[BASELINE]) for name in names[1:]}
    for run in runs.values():
        run.pop("argmax")  # per-position data stays out of the summary
    summary = {
        "model": model,
        "quantization_default": DEFAULT_QUANTIZATION,
        "quick": quick,
        "rounds": rounds,
        "machine": machine_info(),
        "quality": quality,
        "runs": runs,
    }
    print(f"engine benchmark: {model}, {' vs '.join(names)}, {rounds} round(s){' (quick)' if quick else ''}")
    print(format_table(summary))
    if profile:
        print(format_profile(runs))
    path = json_out or DEFAULT_JSON
    save_results(summary, path)
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
    parser.add_argument("--quantizations", nargs="+", default=[DEFAULT_QUANTIZATION], choices=sorted(QUANTIZATIONS),
                        help=f"measured against {BASELINE} (default: {DEFAULT_QUANTIZATION})")
    parser.add_argument("--rounds", type=int, default=1, help="rounds over all quantizations; figures are medians")
    parser.add_argument("--profile", action="store_true", help="also trace a decode step: time by kind of op")
    parser.add_argument("--quiet-s", type=float, default=0.0, metavar="S",
                        help="on a shared machine: per decode past, wait up to S seconds for moments when no other "
                             "process runs and time steps then too (decode_quiet_tok_s_*)")
    internal = parser.add_mutually_exclusive_group()
    internal.add_argument("--prepare", metavar="QUANT", help="internal: fetch and convert one quantization")
    internal.add_argument("--one", metavar="QUANT", help="internal: measure one quantization, print its JSON")
    args = parser.parse_args(argv)
    if args.prepare:
        print(json.dumps(bench_prepare(args.model, args.prepare, cache=args.cache)))
    elif args.one:
        print(json.dumps(bench_one(args.model, args.one, cache=args.cache, quick=args.quick,
                                   speed_sources=args.speed_sources, quality_source=args.quality_source,
                                   profile=args.profile, quiet_s=args.quiet_s)))
    else:
        run_engine_bench(args.model, json_out=args.json_out, cache=args.cache, quick=args.quick,
                         speed_sources=args.speed_sources, quality_source=args.quality_source,
                         quantizations=args.quantizations, rounds=args.rounds, profile=args.profile,
                         quiet_s=args.quiet_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
