"""Completions for open documents: their caches under one memory budget, and the decoders that use them.

Not thread-safe: the server calls it from one model-worker thread only.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from inference.drafting import Recycler
from inference.generate import DecodeRequest, GenerationResult, first_line, greedy_decode, never, vocabulary
from inference.model_store import LoadedModel
from inference.ngram import NgramModel
from inference.speculative import TREE_NODES, Drafter, forked_decode, speculative_decode
from inference.superposed import SuperposedSearch, beam_decode, sampled_decode, superposed_decode
from inference.syntax.finish import finish
from inference.syntax.languages import language_of
from inference.syntax.stop import SyntaxStop
from kv_cache import persist
from kv_cache.crossfile import ContextRows, CrossFileContext
from kv_cache.document import CursorContext, DocumentCache, WindowBudget
from kv_cache.edits import TextEdit
from kv_cache.store import BufferStore
from lsp_server.completion import CacheSettings, CompletionOptions, CompletionOutcome, Suggestion

log = logging.getLogger(__name__)

LOOKUP_BUFFERS = 4  # other open documents that speculative decoding may copy drafts from


def decode_rows(options: CompletionOptions) -> int:
    """Rows a decode may write after the prompt: one per token and draft, plus a verification tree."""
    return options.max_tokens * max(options.drafts, 1) + TREE_NODES


def uses_suffix(layout: str, text: str, offset: int) -> bool:
    """Whether the prompt includes the text after the cursor (FIM) or ends at the cursor (prefix layout).

    "auto" uses FIM only when code follows the cursor on its line. At the end of a line, the default
    model (an Instruct fine-tune) predicts the next line better from the prefix alone: bench/fim.py
    measures both layouts.
    """
    if layout != "auto":
        return layout == "fim"
    line_end = text.find("\n", offset)
    return bool(text[offset:line_end if line_end >= 0 else len(text)].strip())


class Completer:
    """Open documents by URI, each with a DocumentCache; `complete` decodes from the cached rows."""

    def __init__(self, model: LoadedModel, *, cache: CacheSettings = CacheSettings(), refresh_threshold: int = 256,
                 persist_dir: Path | None = None, window: WindowBudget = WindowBudget()) -> None:
        """`window`: the tokens each document's rows keep (bench/cold.py varies how many a cold request waits for)."""
        self.model = model
        self.window = window
        self.cache = cache
        self.store = BufferStore(cache.budget_mb, persist_dir, model.model_dir.name, decoder=model.decoder,
                                 persist_max_mb=cache.persist_max_mb, idle_rows=cache.idle_rows)
        self.docs: dict[str, DocumentCache] = {}
        self.languages: dict[str, str] = {}
        self.active: str | None = None  # the document last opened, edited or completed in: its idle work goes first
        self.refresh_threshold = refresh_threshold
        self.vocab = vocabulary(model.tokenizer)
        self._latencies: deque[float] = deque(maxlen=512)
        self._recent: deque[dict[str, float]] = deque(maxlen=64)  # per-call timings, for bench/lsp.py
        self._calls = 0
        self._edits_s = 0.0  # time applying edits since the last completion
        self._reused = self._encoded = 0
        self.persist_dir = persist_dir
        self.recycler = self._load_recycler()
        self.ngram: NgramModel | None = None  # built in an idle step (a minute, once per tokenizer)
        self.wants_ngram = False  # a superposed request came: only that method re-scores with the n-gram model
        self._ngram_versions: dict[str, int] = {}
        self.crossfile = CrossFileContext(model.decoder, model.tokenizer)

    # -- documents ---------------------------------------------------------------------------------------

    def open(self, uri: str, text: str, language: str = "python") -> None:
        """Track a document (`language`: its LSP language id); rows are encoded lazily (idle steps or the
        first completion)."""
        self.close(uri)
        self.docs[uri] = DocumentCache(uri, text, self.model.decoder, self.model.tokenizer, self.store,
                                       mode=self.cache.mode, budget=self.window)
        syntax = language_of(language, uri)  # the LSP id, or the file's extension when the id is not known
        log.info("%s: syntax rules %s", uri, syntax.rules)
        self.languages[uri] = syntax.name
        self.active = uri

    def change(self, uri: str, edits: Sequence[TextEdit]) -> None:
        """Apply edits in order (LSP semantics). A bad range raises ValueError and changes nothing."""
        t0 = time.perf_counter()
        self.active = uri
        try:
            self._doc(uri).apply(edits)
        finally:
            self._edits_s += time.perf_counter() - t0
        if edits:
            self.crossfile.edited(uri, edits[-1].start)

    def close(self, uri: str) -> None:
        if self.docs.pop(uri, None) is not None:
            self.crossfile.forget(uri)
            self.store.held_elsewhere = self.crossfile.nbytes
            self.store.close(uri)
            self.save_state()
        if self.ngram is not None and self._ngram_versions.pop(uri, None) is not None:
            self.ngram.remove_document(uri)
        self.languages.pop(uri, None)
        if self.active == uri:
            self.active = None

    def text(self, uri: str) -> str:
        return self._doc(uri).text

    def _doc(self, uri: str) -> DocumentCache:
        try:
            return self.docs[uri]
        except KeyError:
            raise KeyError(f"document {uri} is not open") from None

    # -- completion --------------------------------------------------------------------------------------

    def complete(self, uri: str, offset: int, options: CompletionOptions,
                 cancelled: Callable[[str], bool] = never) -> CompletionOutcome:
        """Drafts for the cursor at character `offset`, best first; stops early once `cancelled(text so far)` says
        so."""
        return self.complete_after(uri, offset, "", options, cancelled)

    def complete_after(self, uri: str, offset: int, inserted: str, options: CompletionOptions,
                       cancelled: Callable[[str], bool] = never) -> CompletionOutcome:
        """The drafts at offset + len(inserted) as if `inserted` had been typed at `offset` (a prefetch for
        accepting a suggestion), leaving the document as it is."""
        doc = self._doc(uri)
        self.active = uri
        t0 = time.perf_counter()
        edits_s, self._edits_s = self._edits_s, 0.0
        borrowed = self._borrowed(uri, offset, options)
        t1 = time.perf_counter()
        ctx = doc.context(offset, with_suffix=uses_suffix(options.layout, doc.text, offset),
                          room=decode_rows(options), inserted=inserted, borrowed=borrowed)
        t2 = time.perf_counter()
        self._reused += ctx.reused
        self._encoded += ctx.encoded
        timings = {"edits_s": edits_s, "cross_file_s": t1 - t0, "context_s": t2 - t0,
                   "prompt_tokens": float(ctx.encoded), "window_tokens": float(ctx.built),
                   "cross_file_tokens": float(len(borrowed) if borrowed is not None else 0)}
        if ctx.cache is None or ctx.logits is None or cancelled(""):
            return self._outcome([], timings, cancelled(""))
        language = self.languages[uri]
        stop = SyntaxStop(ctx.prefix, ctx.suffix, None if options.scope == "auto" else options.scope, language)
        request = DecodeRequest(options.max_tokens, stop, ctx.healed, cancelled)
        result = self._decode(uri, ctx, options, request)
        stopped = bool(result.timings.get("cancelled"))
        total = time.perf_counter() - t0
        if not stopped:
            self._latencies.append(total)
        kept: dict[str, Suggestion] = {}  # by first line of code: cycling drafts that start alike shows nothing new
        for draft in result.drafts:
            text = finish(draft.text, ctx.prefix, ctx.suffix, language)
            if text.strip():  # finish can make two drafts equal: keep the first (best)
                kept.setdefault(first_line(text)[0].strip(), Suggestion(text, draft.score))
        suggestions = list(kept.values())
        return self._outcome(suggestions, {**timings, **result.timings, "total_s": total}, stopped)

    def _borrowed(self, uri: str, offset: int, options: CompletionOptions) -> ContextRows | None:
        """Other files' rows for the prompt (kv_cache/crossfile.py); their copy counts against the memory budget."""
        if not options.cross_file_tokens:
            return None
        held = self.crossfile.rows
        rows = self.crossfile.rows_for(uri, offset, self.docs, self.languages, options.cross_file_tokens)
        if rows is not held:
            self.store.held_elsewhere = self.crossfile.nbytes
            self.store.evict_to_budget()
        return rows

    def _decode(self, uri: str, ctx: CursorContext, options: CompletionOptions,
                request: DecodeRequest) -> GenerationResult:
        """One draft (speculative or greedy: the same tokens) or k drafts by `options.draft_method`."""
        decoder, vocab, cache, logits = self.model.decoder, self.vocab, ctx.cache, ctx.logits
        if options.drafts > 1 and options.draft_method == "superposed":
            self.wants_ngram = True
            search = SuperposedSearch(options.drafts, self._ngram_with(uri), ctx.history)
            return superposed_decode(decoder, vocab, cache, logits, request, search)
        if options.drafts > 1 and options.draft_method == "sampled":
            return sampled_decode(decoder, vocab, cache, logits, request, options.drafts)
        if options.drafts > 1 and options.draft_method == "forked":
            return forked_decode(decoder, vocab, cache, logits, request, self._drafter(uri, ctx), options.drafts)
        if options.drafts > 1:
            return beam_decode(decoder, vocab, cache, logits, request, options.drafts)
        if options.speculative:
            return speculative_decode(decoder, vocab, cache, logits, request, self._drafter(uri, ctx))
        return greedy_decode(decoder, vocab, cache, logits, request)

    def _drafter(self, uri: str, ctx: CursorContext) -> Drafter:
        """Speculation's sources: the code before the cursor, this document and the last few others used."""
        corpus = [self.docs[uri].ids, *(self.docs[u].ids for u in self.store.lru_order()[-LOOKUP_BUFFERS:]
                                        if u != uri and u in self.docs)]
        return Drafter(self.recycler, ctx.history, corpus)

    def _ngram_with(self, uri: str) -> NgramModel | None:
        """The n-gram model with this document's current counts in its overlay (None until built)."""
        if self.ngram is None:
            return None
        version = self.docs[uri].version
        if self._ngram_versions.get(uri) != version:
            self.ngram.add_document(uri, self.docs[uri].ids)
            self._ngram_versions[uri] = version
        return self.ngram

    def _outcome(self, suggestions: list[Suggestion], timings: dict[str, float], stopped: bool) -> CompletionOutcome:
        """The outcome, its timings kept for `stats` (numbered, so a client can match them to its requests)."""
        self._calls += 1
        self._recent.append({"call": self._calls, **{k: round(v, 6) for k, v in timings.items()}})
        return CompletionOutcome(suggestions, timings, stopped)

    # -- idle work ---------------------------------------------------------------------------------------

    def refresh_step(self) -> bool:
        """One bounded piece of idle work, the active document first, then the most recently used: encode rows a
        window still lacks, else re-encode stale rows (per the refresh policy). Returns whether work remains."""
        recent = reversed(self.store.lru_order() + [u for u in self.docs if u not in self.store])
        for uri in [self.active, *(u for u in recent if u != self.active)]:
            doc = self.docs.get(uri)
            if doc is None:
                continue
            if doc.pending_tokens() > 0 and doc.encode_step() or self._wants_refresh(doc) and doc.refresh_step():
                self.store.evict_to_budget()  # rows it grew count, and a cache not in use goes back to idle rows
                return True
        if self.wants_ngram and self.ngram is None:
            self._build_ngram()
            return True
        return False

    def _build_ngram(self) -> None:
        cache = self.persist_dir.parent if self.persist_dir is not None else None
        self.ngram = NgramModel.for_tokenizer(self.model.tokenizer, cache)

    # -- state kept across restarts ------------------------------------------------------------------------

    def _recycler_path(self) -> Path | None:
        return self.persist_dir / f"recycler-{self.model.model_dir.name}.npy" if self.persist_dir else None

    def _load_recycler(self) -> Recycler:
        vocab = self.model.config.vocab_size
        path = self._recycler_path()
        if path is not None and path.exists():
            try:
                return Recycler.load(path, vocab)
            except (OSError, ValueError) as err:
                log.warning("ignoring the token-recycling table %s: %s", path, err)
        return Recycler(vocab)

    def save_state(self) -> None:
        """Keep the token-recycling table for the next start (the buffers persist on their own)."""
        path = self._recycler_path()
        if path is not None:
            persist.private_dir(path.parent)
            self.recycler.save(path)

    def _wants_refresh(self, doc: DocumentCache) -> bool:
        if self.cache.refresh == "off":
            return False
        stale = doc.stale_rows()
        return stale > 0 if self.cache.refresh == "idle" else stale >= self.refresh_threshold

    # -- settings and statistics -------------------------------------------------------------------------

    def configure(self, **changes: Any) -> None:
        """Change some of the cache settings (CacheSettings' fields); a bad value raises ValueError and changes
        nothing."""
        old, new = self.cache, replace(self.cache, **changes)
        self.cache = new
        for doc in self.docs.values():
            doc.mode = new.mode
        self.store.budget_bytes = int(new.budget_mb * 2**20)
        self.store.idle_rows = new.idle_rows
        self.store.persist_max_bytes = int(new.persist_max_mb * 2**20)
        if (new.budget_mb, new.idle_rows) != (old.budget_mb, old.idle_rows):
            self.store.evict_to_budget()
        if new.persist_max_mb != old.persist_max_mb:
            self.store.prune_disk()

    def stats(self) -> dict[str, Any]:
        store = self.store.stats()
        latencies = sorted(self._latencies)
        built = self._reused + self._encoded
        return {
            "model": self.model.name,
            "documents": len(self.docs),
            "buffers_in_memory": store.buffers,
            "cached_tokens": store.tokens,
            "cache_bytes": store.bytes_used,
            "bytes_per_token": round(store.bytes_per_token, 1),
            "budget_bytes": self.store.budget_bytes,
            "persist_max_bytes": self.store.persist_max_bytes,
            "evictions": store.evictions,
            "restores": store.restores,
            "stale_rows": sum(doc.stale_rows() for doc in self.docs.values()),
            "encoding": {uri: doc.window() for uri, doc in self.docs.items() if doc.pending_tokens() > 0},
            "reuse_ratio": round(self._reused / built, 4) if built else None,
            "completions": len(latencies),
            "latency_p50_ms": round(1000 * statistics.median(latencies), 1) if latencies else None,
            "latency_p90_ms": round(1000 * latencies[int(0.9 * (len(latencies) - 1))], 1) if latencies else None,
            "cache_mode": self.cache.mode,
            "refresh": self.cache.refresh,
            "idle_rows": self.cache.idle_rows,
            "calls": self._calls,
            "recent_timings": list(self._recent),  # the last 64 calls of `complete`, oldest first
        }
