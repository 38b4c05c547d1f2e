"""The `superpie` command line: complete at a position, manage models and saved buffers, run benchmarks."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from inference.fetch import ModelFetchError, cache_root, cached_gguf
from inference.quantize import DEFAULT_QUANTIZATION, QUANTIZATIONS
from inference.registry import DEFAULT_MODEL, MODELS, get_model
from kv_cache import persist
from lsp_server.cursor import InputError, parse_location, read_source, split_at
from lsp_server.engine_process import HANG_TIMEOUT_S
from lsp_server.options import MAX_DRAFTS, ServerOptions

BENCH_SUITES = ("engine", "pie", "fim", "decode", "lsp", "typing", "cold", "isolation", "memory", "languages", "crossfile")  # each a module bench.<suite> with main(argv)


def user_errors() -> tuple[type[Exception], ...]:
    """What a command reports as `superpie: error: ...`. The model's modules are imported only by the commands
    that load it (`serve` runs the model in its engine process and stays small without them)."""
    from inference.config import UnsupportedModel
    from inference.model_store import ModelLoadError
    from inference.runtime import ProviderUnavailable
    from inference.tokenizer import UnsupportedTokenizer

    return (InputError, ModelFetchError, ModelLoadError, ProviderUnavailable, UnsupportedModel, UnsupportedTokenizer,
            LookupError)


def _model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"registry name ({', '.join(MODELS)}) or path to a llama/qwen2 .gguf file")
    parser.add_argument("--quantization", default=DEFAULT_QUANTIZATION, choices=sorted(QUANTIZATIONS))
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default 2)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])


def cmd_complete(args: argparse.Namespace) -> int:
    """The editor's pipeline at one cursor: the same Completer and settings as `superpie serve`, so this
    prints the first suggestion an editor gets for an explicit (Invoked) request there."""
    from inference.model_store import load_model
    from lsp_server.completer import Completer

    path, line, column = parse_location(args.location)
    source = read_source(path)
    cursor = split_at(source, line, column)  # validate input before the slow model load
    settings = ServerOptions(model=args.model, quantization=args.quantization, max_tokens=args.max_tokens,
                             drafts=args.drafts, **({"scope": "multi"} if args.multi_line else {}))
    model = load_model(settings.model, settings.quantization, cache=args.cache_dir, progress=not args.quiet,
                       threads=args.threads, device=args.device)
    completer = Completer(model, cache=settings.cache_settings())
    uri = path.resolve().as_uri()
    completer.open(uri, source, "plaintext")  # the syntax rules go by the file's extension
    outcome = completer.complete(uri, len(cursor.prefix), settings.completion(settings.request_drafts(invoked=True)))
    if args.json:
        print(json.dumps({"drafts": [{"text": s.text, "score": s.score} for s in outcome.suggestions],
                          "timings": {**model.timings, **outcome.timings}}))
    elif outcome.suggestions:
        print(outcome.suggestions[0].text)
    return 0


def cmd_model(args: argparse.Namespace) -> int:
    from inference.model_store import prepare_model

    if args.action == "list":
        for name, spec in MODELS.items():
            state = "cached" if cached_gguf(spec, args.cache_dir) else "not fetched"
            default = " (default)" if name == DEFAULT_MODEL else ""
            print(f"{name}{default}\t{spec.architecture}\t{spec.gguf_size / 1e6:.0f} MB\t{state}\t{spec.description}")
        return 0
    if args.action == "fetch":
        model_dir = prepare_model(args.name, args.quantization, cache=args.cache_dir, progress=not args.quiet)
        print(model_dir)
        return 0
    spec = get_model(args.name)
    cached = cached_gguf(spec, args.cache_dir)
    print(json.dumps({
        "name": spec.name, "description": spec.description, "architecture": spec.architecture,
        "gguf_sha256": spec.gguf_sha256, "gguf_size": spec.gguf_size,
        "packages": [f"{p.package}=={p.version}" for p in spec.parts],
        "cached_gguf": str(cached) if cached else None,
    }, indent=2))
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    """The buffers `superpie serve` saves under the cache dir: how much they take, or delete them."""
    directory = persist.buffers_dir(args.cache_dir or cache_root())
    if args.action == "clear":
        removed = persist.clear(directory)
        for path in removed:
            print(path)
        print(f"removed {len(removed)} saved buffers from {directory}")
        return 0
    files, size = persist.usage(directory)
    print(json.dumps({
        "directory": str(directory), "files": files, "bytes": size,
        "max_bytes": int(ServerOptions.persist_max_mb * 2**20),  # the default: an editor's persistMaxMb overrides it
    }, indent=2))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """`superpie bench SUITE [OPTIONS]` runs bench.SUITE's own command line (imported only now, so the
    product command never loads the benchmarks)."""
    argv = list(args.options)
    if args.cache_dir is not None and "--cache" not in argv:
        argv = ["--cache", str(args.cache_dir), *argv]
    return importlib.import_module(f"bench.{args.suite}").main(argv)


def _host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host, int(port)


def _positive_seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0.0
    if not seconds > 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds above 0, got {value!r}")
    return seconds


def cmd_serve(args: argparse.Namespace) -> int:
    from lsp_server.options import ServerOptions
    from lsp_server.server import serve

    cache = args.cache_dir or cache_root()
    options = ServerOptions(model=args.model, quantization=args.quantization, log_level=args.log_level)
    return serve(options, cache_dir=args.cache_dir, threads=args.threads, device=args.device, tcp=args.tcp,
                 log_file=args.log_file, persist_dir=None if args.no_persist else persist.buffers_dir(cache),
                 hang_timeout_s=args.engine_timeout)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="superpie", description="Local, private AI code completion.")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help=f"model cache (default: $SUPERPIE_CACHE or {cache_root()})")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)

    complete = sub.add_parser("complete", help="print a completion at FILE:LINE:COL (1-based)")
    complete.add_argument("location", metavar="FILE:LINE:COL")
    complete.add_argument("--max-tokens", type=int, default=ServerOptions.max_tokens)
    complete.add_argument("--drafts", type=int, default=ServerOptions.drafts, choices=range(1, MAX_DRAFTS + 1),
                          metavar="N", help=f"drafts to decode (default {ServerOptions.drafts}, as for an editor's "
                                            "explicit request)")
    complete.add_argument("--multi-line", action="store_true", help="do not stop at the end of the line")
    complete.add_argument("--json", action="store_true", help='print {"drafts": [...], "timings": {...}}')
    _model_options(complete)
    complete.set_defaults(func=cmd_complete)

    model = sub.add_parser("model", help="list, inspect or fetch models")
    model.add_argument("action", choices=["list", "info", "fetch"])
    model.add_argument("name", nargs="?", default=DEFAULT_MODEL)
    model.add_argument("--quantization", default=DEFAULT_QUANTIZATION, choices=sorted(QUANTIZATIONS))
    model.set_defaults(func=cmd_model)

    cache = sub.add_parser("cache", help="show or delete the saved buffers (KV caches of closed files)")
    cache.add_argument("action", choices=["info", "clear"])
    cache.set_defaults(func=cmd_cache)

    serve = sub.add_parser("serve", help="run the language server (stdio, or --tcp HOST:PORT)")
    serve.add_argument("--tcp", type=_host_port, default=None, metavar="HOST:PORT",
                       help="listen on a TCP socket instead of stdio (for debugging)")
    serve.add_argument("--log-file", type=Path, default=None, help="also write the log here")
    serve.add_argument("--log-level", default="info", choices=["error", "warning", "info", "debug"])
    serve.add_argument("--no-persist", action="store_true",
                       help="do not save closed or evicted buffers' caches under the cache dir")
    serve.add_argument("--engine-timeout", type=_positive_seconds, default=HANG_TIMEOUT_S, metavar="SECONDS",
                       help="restart the engine process when a job shows no progress for this long "
                            f"(default {HANG_TIMEOUT_S:g}; a model load is exempt)")
    _model_options(serve)
    serve.set_defaults(func=cmd_serve)

    bench = sub.add_parser("bench", help="run a benchmark (prints a table, writes JSON); "
                                         "`superpie bench SUITE --help` lists its options")
    bench.add_argument("suite", choices=BENCH_SUITES)
    bench.add_argument("options", nargs=argparse.REMAINDER, help="the suite's own options")
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except user_errors() as err:
        print(f"superpie: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
