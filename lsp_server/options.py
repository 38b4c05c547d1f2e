"""The server's settings: one typed, fully defaulted model, read from initializationOptions and the
`superpie` section of the client's configuration.

Every value is checked here, once. An unknown key or a bad value becomes a warning and the value
underneath it (the default, or what a lower layer set), so downstream code trusts `ServerOptions`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any

from inference.quantize import DEFAULT_QUANTIZATION, QUANTIZATIONS
from inference.registry import DEFAULT_MODEL
from kv_cache.choices import IDLE_ROWS, MAX_CROSS_FILE_TOKENS, MIN_CHUNK_TOKENS, SPLICE_MODES
from lsp_server.completion import DRAFT_METHODS, LAYOUTS, REFRESH_POLICIES, SCOPES, CacheSettings, CompletionOptions

SECTION = "superpie"  # the workspace/configuration section and the initializationOptions wrapper key
LOG_LEVELS = ("error", "warning", "info", "debug")
MAX_DRAFTS = 8
MAX_TOKENS = 1024


@dataclass(frozen=True)
class ServerOptions:
    model: str = DEFAULT_MODEL  # registry name or path to a .gguf file
    quantization: str = DEFAULT_QUANTIZATION
    drafts: int = 3  # drafts for an Invoked request (the user cycles through them)
    automatic_drafts: int = 1  # drafts for an Automatic (as-you-type) request: one is enough to show
    draft_method: str = CompletionOptions.draft_method  # how k > 1 drafts are decoded (bench/decode.py chose it)
    max_tokens: int = 64
    scope: str = "auto"  # "auto" | "single" | "multi": how far one suggestion may run
    speculative: bool = True
    layout: str = "auto"  # "auto" | "fim" | "prefix": whether the prompt includes the text after the cursor
    cache_mode: str = CacheSettings.mode  # "pie" | "conflict-fast" | "full"
    memory_budget_mb: float = CacheSettings.budget_mb
    persist_max_mb: float = CacheSettings.persist_max_mb  # saved buffers on disk, least recently used deleted first
    idle_rows: str = CacheSettings.idle_rows  # "int8" | "fp16" | "fp32": how the documents not in use keep their K/V
    refresh: str = CacheSettings.refresh  # "off" | "idle" | "threshold": when stale cache rows are re-encoded
    prefetch: bool = True  # while the model is idle, compute the suggestion that follows accepting the shown one
    cross_file_context: bool = False  # other open files' chunks before the prompt (bench/crossfile.py chose it)
    cross_file_tokens: int = 512  # their token budget
    log_level: str = "info"

    def model_identity(self) -> tuple[str, str]:
        """What a model reload depends on."""
        return self.model, self.quantization

    def request_drafts(self, invoked: bool) -> int:
        return self.drafts if invoked else self.automatic_drafts

    def cache_settings(self) -> CacheSettings:
        """What the completer's caches run with (changeable without a reload)."""
        return CacheSettings(mode=self.cache_mode, budget_mb=self.memory_budget_mb, refresh=self.refresh,
                             persist_max_mb=self.persist_max_mb, idle_rows=self.idle_rows)

    def completion(self, drafts: int) -> CompletionOptions:
        """What one request decodes with under these settings (the tests that pick prompts in-process use
        the same, so they see what the server will answer)."""
        return CompletionOptions(max_tokens=self.max_tokens, drafts=drafts, scope=self.scope,
                                 speculative=self.speculative, layout=self.layout, draft_method=self.draft_method,
                                 cross_file_tokens=self.cross_file_tokens if self.cross_file_context else 0)


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.capitalize() for part in rest)


_WIRE_NAMES = {_camel(f.name): f.name for f in fields(ServerOptions)} | {f.name: f.name for f in fields(ServerOptions)}
_WIRE_NAMES["memoryBudgetMB"] = "memory_budget_mb"


def _text(value: Any) -> str | None:
    return value.strip() if isinstance(value, str) and value.strip() else None


def _choice(choices: tuple[str, ...]):
    def check(value: Any) -> str | None:
        return value if isinstance(value, str) and value in choices else None
    check.expects = "one of " + ", ".join(repr(c) for c in choices)  # type: ignore[attr-defined]
    return check


def _int_in(low: int, high: int):
    def check(value: Any) -> int | None:
        if isinstance(value, bool):  # JSON true is not a count
            return None
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        return value if isinstance(value, int) and low <= value <= high else None
    check.expects = f"an integer from {low} to {high}"  # type: ignore[attr-defined]
    return check


def _positive_number(high: float):
    def check(value: Any) -> float | None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        return float(value) if math.isfinite(value) and 0 < value <= high else None
    check.expects = f"a number of megabytes above 0 and at most {high:g}"  # type: ignore[attr-defined]
    return check


def _flag(value: Any) -> bool | None:
    return value if isinstance(value, bool) else None


_text.expects = "a non-empty string"  # type: ignore[attr-defined]
_flag.expects = "true or false"  # type: ignore[attr-defined]

_CHECKS = {
    "model": _text,
    "quantization": _choice(tuple(sorted(QUANTIZATIONS))),
    "drafts": _int_in(1, MAX_DRAFTS),
    "automatic_drafts": _int_in(1, MAX_DRAFTS),
    "draft_method": _choice(DRAFT_METHODS),
    "max_tokens": _int_in(1, MAX_TOKENS),
    "scope": _choice(SCOPES),
    "speculative": _flag,
    "layout": _choice(LAYOUTS),
    "cache_mode": _choice(SPLICE_MODES),
    "memory_budget_mb": _positive_number(1 << 20),
    "persist_max_mb": _positive_number(1 << 20),
    "idle_rows": _choice(tuple(IDLE_ROWS)),
    "refresh": _choice(REFRESH_POLICIES),
    "prefetch": _flag,
    "cross_file_context": _flag,
    "cross_file_tokens": _int_in(MIN_CHUNK_TOKENS, MAX_CROSS_FILE_TOKENS),
    "log_level": _choice(LOG_LEVELS),
}


def section_of(raw: Any) -> Any:
    """The settings object: `{"superpie": {...}}` and a bare `{...}` are both accepted."""
    if isinstance(raw, dict) and set(raw) == {SECTION}:
        return raw[SECTION]
    return raw


def parse_options(raw: Any, base: ServerOptions | None = None) -> tuple[ServerOptions, list[str]]:
    """`base` with the valid values of `raw` applied, and one warning per key that was ignored."""
    base = base or ServerOptions()
    raw = section_of(raw)
    if raw is None:
        return base, []
    if not isinstance(raw, dict):
        return base, [f"superpie settings must be an object, not {type(raw).__name__}; using the defaults"]
    changes: dict[str, Any] = {}
    warnings: list[str] = []
    for key, value in raw.items():
        name = _WIRE_NAMES.get(key) if isinstance(key, str) else None
        if name is None:
            warnings.append(f"unknown superpie setting {key!r} ignored")
            continue
        if value is None:  # "unset" in most clients' settings UIs
            continue
        check = _CHECKS[name]
        checked = check(value)
        if checked is None:
            warnings.append(f"superpie setting {key!r} must be {check.expects}, not {value!r}; "  # type: ignore[attr-defined]
                            f"using {getattr(base, name)!r}")
            continue
        changes[name] = checked
    return replace(base, **changes), warnings


def to_wire(options: ServerOptions) -> dict[str, Any]:
    """The options under their camelCase names, as a client would send them."""
    return {_camel(f.name): getattr(options, f.name) for f in fields(ServerOptions)}
