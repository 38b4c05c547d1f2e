"""What a completion asks and gets, and how the open documents' rows are kept: plain types that the LSP
process and the engine process share. The LSP process never imports the model's code (lsp_server/engine.py
does, in the engine), so it stays small."""

from __future__ import annotations

from dataclasses import dataclass, field

from kv_cache.choices import IDLE_ROWS, PERSIST_MAX_MB, SPLICE_MODES

# how k > 1 drafts are decoded: inference/superposed.py, and "forked" in inference/speculative.py
DRAFT_METHODS = ("superposed", "beam", "sampled", "forked")
REFRESH_POLICIES = ("off", "idle", "threshold")
LAYOUTS = ("auto", "fim", "prefix")
SCOPES = ("auto", "single", "multi")


@dataclass(frozen=True)
class CacheSettings:
    """How the open documents' rows are kept: what a running completer can change without a reload."""

    mode: str = "pie"  # one of SPLICE_MODES: how an edit updates the rows
    budget_mb: float = 1024.0  # memory for all documents' rows; least recently used ones go to disk
    refresh: str = "idle"  # one of REFRESH_POLICIES: when stale rows are re-encoded
    persist_max_mb: float = float(PERSIST_MAX_MB)  # disk for the rows of closed and evicted documents
    idle_rows: str = "int8"  # one of IDLE_ROWS: how the documents not in use keep their K/V

    def __post_init__(self) -> None:
        if self.mode not in SPLICE_MODES:
            raise ValueError(f"cache mode must be one of {', '.join(SPLICE_MODES)}, not {self.mode!r}")
        if self.refresh not in REFRESH_POLICIES:
            raise ValueError(f"refresh policy must be one of {', '.join(REFRESH_POLICIES)}, not {self.refresh!r}")
        if not self.budget_mb > 0:
            raise ValueError(f"memory budget must be positive, not {self.budget_mb}")
        if not self.persist_max_mb > 0:
            raise ValueError(f"the cap on saved buffers must be positive, not {self.persist_max_mb}")
        if self.idle_rows not in IDLE_ROWS:
            raise ValueError(f"idle rows must be one of {', '.join(IDLE_ROWS)}, not {self.idle_rows!r}")


@dataclass
class CompletionOptions:
    max_tokens: int = 64
    drafts: int = 3
    scope: str = "auto"  # "auto" | "single" | "multi"
    speculative: bool = True
    layout: str = "auto"  # "auto" | "fim" | "prefix": see prompt_layout
    draft_method: str = "forked"  # one of DRAFT_METHODS, for drafts > 1: bench/decode.py compares them
    cross_file_tokens: int = 0  # tokens of other open files' chunks placed before the prompt (0: none)


@dataclass
class Suggestion:
    text: str  # what to insert at the cursor
    score: float  # mean log-probability per token: higher is better
    replace_suffix: int = 0  # characters after the cursor (on its line) that the suggestion replaces


@dataclass
class CompletionOutcome:
    suggestions: list[Suggestion]  # best first
    timings: dict[str, float] = field(default_factory=dict)
    cancelled: bool = False
