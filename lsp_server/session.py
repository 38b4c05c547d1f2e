"""The session: the open documents as the editor has them, the suggestions last shown for each, the requests in
flight, and the prefetch: the suggestions for the text as it will be once the shown one is accepted.

It works in code points on the documents' text; the handlers translate positions, and the model host runs the model.
A request is answered, in this order, from the prefetch when the editor inserted exactly the suggestion it was
computed for, from the shown suggestions when the user typed the start of one, from the decode in flight when the
user has typed at its cursor since (see Generation), else from a new decode; a model result for a document that
changed meanwhile is dropped (ContentModified).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

from pygls.exceptions import JsonRpcContentModified, JsonRpcInvalidParams

from kv_cache.edits import TextEdit
from lsp_server.completion import CompletionOptions, CompletionOutcome, Suggestion
from lsp_server.engine_process import EngineJob, text_digest
from lsp_server.model_host import ModelHost
from lsp_server.positions import same_line
from lsp_server.suggestions import ShownSuggestions
from lsp_server.worker import SKIPPED

log = logging.getLogger(__name__)

FOLLOW_GRACE_S = 0.05  # how long a cancelled request's decode waits for the keystroke that may follow it


def _result(future: Future) -> Any:
    """A settled job's result; None if it failed or was cancelled."""
    return None if future.cancelled() or future.exception() is not None else future.result()


@dataclass
class Document:
    uri: str
    language_id: str
    version: int
    text: str


@dataclass
class Generation:
    """A model job for one document, and how it is told to stop: an edit or a request it cannot serve stops a
    request's, any other job stops a prefetch.

    A request's generation follows typing: while the user types at its cursor (`typed`), it keeps decoding, and a
    request at the cursor after the typed text waits for it and gets the rest of its suggestions, as if typed
    through them; the engine stops it as soon as its output no longer starts with what was typed.
    """

    version: int
    job: EngineJob | None = None
    stopped_at: int | None = None  # `steps` when it was told to stop
    text: str = ""  # the document when it was requested
    offset: int = 0  # its cursor, in code points
    options: CompletionOptions | None = None
    typed: str = ""  # typed at the cursor since
    typed_version: int = 0  # the document version once `typed` was typed
    waiters: int = 0  # requests waiting for it

    @property
    def steps(self) -> int:
        """Cancel checks in the engine so far: one before decoding, then one per step (superpie.stats shows it)."""
        return self.job.steps if self.job is not None else 0

    def stop(self) -> bool:
        """Stop at the engine's next check; False if it had been told already."""
        if self.stopped_at is not None:
            return False
        self.stopped_at = self.steps
        if self.job is not None:
            self.job.cancel()
        return True

    def follow(self, edits: list[TextEdit], version: int) -> bool:
        """Take `edits` as typed at the cursor if they are one insertion right after the typed text (a decode of
        one draft only); False if they are anything else."""
        if self.stopped_at is not None or self.job is None or self.options is None or self.options.drafts != 1 \
                or len(edits) != 1:
            return False
        edit, at = edits[0], self.offset + len(self.typed)
        if edit.start != at or edit.end != at or not edit.text:
            return False
        self.typed += edit.text
        self.typed_version = version
        self.job.typed(self.typed)
        return True

    def serves(self, doc: Document, offset: int, options: CompletionOptions) -> bool:
        """Whether a request at `offset` of `doc` as it is now can wait for this generation."""
        return self.stopped_at is None and self.options == options and self.typed_version == doc.version and \
            offset == self.offset + len(self.typed)

    def shown(self, outcome: CompletionOutcome) -> ShownSuggestions:
        assert self.options is not None
        return ShownSuggestions(self.text, self.offset, tuple(outcome.suggestions), self.options.drafts)


@dataclass
class Prefetch:
    """The suggestions for `uri` with the best suggestion inserted at the cursor and the cursor after it, computed
    at idle priority. Keyed by that text (its length and digest) and cursor, the options and the model load."""

    uri: str
    length: int
    digest: str
    offset: int
    options: CompletionOptions
    serial: int
    generation: Generation  # its job is the prefetch's

    @property
    def future(self) -> Future:
        return self.generation.job.future

    def serves(self, options: CompletionOptions, serial: int) -> bool:
        """Computed by this model with these options, and at least as many drafts (as typed-through answers)."""
        return serial == self.serial and self.options.drafts >= options.drafts and \
            replace(self.options, drafts=options.drafts) == options

    def outcome(self) -> CompletionOutcome | None:
        """The finished result; None while it runs, or if it failed, yielded or found no document."""
        if not self.future.done() or self.future.exception() is not None:
            return None
        outcome = self.future.result()
        return None if outcome is SKIPPED or outcome is None or outcome.cancelled else outcome

    def state(self) -> str:
        future = self.future
        if not future.done():
            return "running" if self.generation.steps else "queued"
        if future.exception() is not None:
            return "failed"
        if self.outcome() is not None:
            return "ready"
        return "closed" if future.result() is None else "yielded"


class Session:
    def __init__(self, host: ModelHost) -> None:
        self.host = host
        self.documents: dict[str, Document] = {}
        self.shown: dict[str, ShownSuggestions] = {}
        self.inflight: dict[str, Generation] = {}
        self.prefetch: Prefetch | None = None
        self.counters: Counter[str] = Counter()

    # -- text sync -------------------------------------------------------------------------------------------

    def open(self, uri: str, language_id: str, version: int, text: str) -> None:
        self._cancel_generation(uri)
        self._drop_prefetch(uri)
        self.documents[uri] = Document(uri, language_id, version, text)
        self.shown.pop(uri, None)
        self.host.open(uri, text, language_id)

    def _resync(self, uri: str) -> None:
        """The engine lost track of `uri` (an edit failed there): it gets the document's text again."""
        doc = self.documents.get(uri)
        if doc is not None:
            log.warning("%s: re-opening the document in the engine from the server's text", uri)
            self.host.open(uri, doc.text, doc.language_id)

    def change(self, doc: Document, version: int, edits: list[TextEdit], text_after: str) -> None:
        """`edits` (code points, in order) took `doc` to `text_after` at `version`. Typing at the cursor of the
        generation in flight is followed; any other edit stops it."""
        gen = self.inflight.get(doc.uri)
        if gen is not None and gen.follow(edits, version):
            self.counters["followed_edits"] += 1
        else:
            self._cancel_generation(doc.uri)
        if version <= doc.version:
            log.warning("%s: version %s after %s (out of order?)", doc.uri, version, doc.version)
        doc.version = version
        if edits:
            doc.text = text_after
            job = self.host.change(doc.uri, edits)
            job.future.add_done_callback(partial(self._after_change, asyncio.get_running_loop(), doc.uri))

    def _after_change(self, loop: asyncio.AbstractEventLoop, uri: str, future: Future) -> None:
        """An edit's answer from the engine (its reader thread): False asks for the document's text again."""
        if future.cancelled():
            return
        if future.exception() is not None:
            log.error("%s: an edit failed in the engine: %s", uri, future.exception())
            loop.call_soon_threadsafe(self._resync, uri)
        elif future.result() is False:
            loop.call_soon_threadsafe(self._resync, uri)

    def close(self, uri: str) -> None:
        self._cancel_generation(uri)
        self._drop_prefetch(uri)
        self.shown.pop(uri, None)
        if self.documents.pop(uri, None) is not None:
            self.host.close(uri)

    def document(self, uri: str) -> Document:
        doc = self.documents.get(uri)
        if doc is None:
            raise JsonRpcInvalidParams(f"document {uri} is not open")
        return doc

    def snapshot(self) -> dict[str, tuple[str, str]]:
        """Each document's text and language id, as a model load re-opens them."""
        return {uri: (doc.text, doc.language_id) for uri, doc in self.documents.items()}

    def cancel_all(self) -> None:
        for gen in list(self.inflight.values()):
            gen.stop()
        self._drop_prefetch()

    # -- suggestions -----------------------------------------------------------------------------------------

    async def suggest(self, doc: Document, offset: int, options: CompletionOptions, *,
                      prefetch: bool = False) -> list[Suggestion]:
        """Suggestions at `offset` of `doc` as it is now. ContentModified if the document changes before the model
        answers; an empty list if a newer request for the document took over. With `prefetch`, the suggestions
        after accepting the best one are then computed while the model is idle."""
        suggestions = self._prefetched(doc, offset, options)
        if suggestions is None:
            suggestions = self._typed_through(doc, offset, options)
        if suggestions is None:
            suggestions = await self._from_model(doc, offset, options)
        if prefetch and suggestions:
            self._prefetch_after(doc, offset, suggestions[0], options)
        return suggestions

    async def preview(self, doc: Document, offset: int, options: CompletionOptions) -> list[Suggestion] | None:
        """The drafts for a hover: from the latest suggestions on this line, else computed if the model is free (a
        prefetch yields to it). A busy model means no preview rather than a hover that waits for a decode."""
        shown = self.shown.get(doc.uri)
        if shown is not None:
            rest = shown.continue_at(doc.text, offset)
            if rest:
                return rest
            if shown.text == doc.text and same_line(doc.text, shown.offset, offset):
                return list(shown.suggestions)
        if not self.host.can_compute_now():
            return None
        return await self.suggest(doc, offset, options)

    def _typed_through(self, doc: Document, offset: int, options: CompletionOptions) -> list[Suggestion] | None:
        """The rest of the shown suggestions when the user typed the start of one of them."""
        shown = self.shown.get(doc.uri)
        if shown is None or shown.drafts < options.drafts:
            return None
        rest = shown.continue_at(doc.text, offset)
        if not rest:
            return None
        self.counters["typed_through"] += 1
        return rest

    async def _from_model(self, doc: Document, offset: int, options: CompletionOptions) -> list[Suggestion]:
        text, version = doc.text, doc.version
        if self.host.state == "not loaded":  # initialized is still pulling the settings the load needs
            await self.host.until_load_queued()
            if doc.text is not text:
                raise JsonRpcContentModified(f"{doc.uri} changed before the model was queued")
        if self.host.state == "failed":
            return []
        gen = self.inflight.get(doc.uri)
        if gen is None or not gen.serves(doc, offset, options):
            self._cancel_generation(doc.uri, superseded=True)
            gen = self._start(doc, offset, options)
        outcome = await self._wait(gen)
        finished = outcome is not SKIPPED and outcome is not None and not outcome.cancelled
        self._settle(doc.uri, gen, outcome)
        current = self.documents.get(doc.uri)
        if current is not doc or doc.version != version or doc.text is not text:
            self.counters["stale_dropped"] += 1
            raise JsonRpcContentModified(f"{doc.uri} changed while completing; the result for version "
                                         f"{version} was dropped")
        rest = gen.shown(outcome).continue_at(text, offset) if finished else None
        if gen.typed and not rest and gen.stopped_at is None:  # the user typed past it: decode here
            self.counters["typed_past"] += 1
            return await self._from_model(doc, offset, options)
        if not finished:
            return []
        self.counters["followed" if gen.typed else "completions"] += 1
        return rest or []

    def _start(self, doc: Document, offset: int, options: CompletionOptions) -> Generation:
        gen = Generation(doc.version, self.host.complete(doc.uri, offset, options), text=doc.text, offset=offset,
                         options=options, typed_version=doc.version)
        self.inflight[doc.uri] = gen
        loop = asyncio.get_running_loop()
        gen.job.future.add_done_callback(
            lambda future: loop.call_soon_threadsafe(self._settle, doc.uri, gen, _result(future)))
        return gen

    async def _wait(self, gen: Generation) -> CompletionOutcome | None:
        """The generation's outcome. A request the client cancels stops it, unless another request waits for it
        or the user typed on at its cursor within FOLLOW_GRACE_S (the editor cancels the previous request just
        before it sends the keystroke and the next request)."""
        gen.waiters += 1
        try:
            return await asyncio.shield(asyncio.wrap_future(gen.job.future))
        except asyncio.CancelledError:  # $/cancelRequest
            asyncio.get_running_loop().call_later(FOLLOW_GRACE_S, self._drop_unwanted, gen, len(gen.typed))
            raise
        finally:
            gen.waiters -= 1

    def _drop_unwanted(self, gen: Generation, typed: int) -> None:
        if gen.waiters == 0 and len(gen.typed) == typed and gen.stop():
            self.counters["cancelled_by_client"] += 1

    def _settle(self, uri: str, gen: Generation, outcome: Any) -> None:
        """A request's generation is done: it is no longer in flight, and a finished one is what is shown (even if
        stale: typing through it may still answer the next request)."""
        if self.inflight.get(uri) is gen:
            del self.inflight[uri]
            if isinstance(outcome, CompletionOutcome) and not outcome.cancelled:
                self.shown[uri] = gen.shown(outcome)

    def _cancel_generation(self, uri: str, *, superseded: bool = False) -> None:
        gen = self.inflight.get(uri)
        if gen is not None and gen.stop():
            self.counters["superseded" if superseded else "cancelled_by_edit"] += 1

    # -- prefetch --------------------------------------------------------------------------------------------

    def _prefetch_after(self, doc: Document, offset: int, best: Suggestion, options: CompletionOptions) -> None:
        """Queue the suggestions for `doc` with `best` accepted, unless they are queued or known already."""
        if best.replace_suffix or self.host.state != "ready":
            return
        after = doc.text[:offset] + best.text + doc.text[offset:]
        length, digest, cursor = len(after), text_digest(after), offset + len(best.text)
        current = self.prefetch
        if current is not None and (current.uri, current.length, current.digest, current.offset) == \
                (doc.uri, length, digest, cursor) and current.serves(options, self.host.serial) and \
                current.state() in ("queued", "running", "ready"):
            return  # typing through the suggestion leads to the same text
        self._drop_prefetch()
        gen = Generation(doc.version)
        gen.job = self.host.prefetch(doc.uri, offset, best.text, options, partial(self._yield_prefetch, gen))
        self.prefetch = Prefetch(doc.uri, length, digest, cursor, options, self.host.serial, gen)

    def _prefetched(self, doc: Document, offset: int, options: CompletionOptions) -> list[Suggestion] | None:
        """The prefetched suggestions if `doc` and `offset` are what they were computed for."""
        prefetch = self.prefetch
        if prefetch is None or (prefetch.uri, prefetch.offset, prefetch.length) != (doc.uri, offset, len(doc.text)) \
                or not prefetch.serves(options, self.host.serial):
            return None
        outcome = prefetch.outcome()
        if outcome is None or text_digest(doc.text) != prefetch.digest:
            return None
        self.counters["prefetch_hits"] += 1
        self.shown[doc.uri] = ShownSuggestions(doc.text, offset, tuple(outcome.suggestions), prefetch.options.drafts)
        return list(outcome.suggestions)

    def _yield_prefetch(self, gen: Generation) -> None:
        """Another job was submitted: the running prefetch stops at its next step (called on the event loop)."""
        if gen.stop():
            self.counters["prefetch_yielded"] += 1

    def _drop_prefetch(self, uri: str | None = None) -> None:
        """Forget the prefetch (for `uri` only, if given), stopping it if it runs."""
        if self.prefetch is not None and uri in (None, self.prefetch.uri):
            self.prefetch.generation.stop()
            self.prefetch = None

    # -- statistics ------------------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        prefetch = self.prefetch
        return {
            "documents": len(self.documents),
            "versions": {uri: doc.version for uri, doc in self.documents.items()},
            "counters": dict(self.counters),
            "decoding": {uri: gen.steps for uri, gen in self.inflight.items()},
            "prefetch": None if prefetch is None else {
                "uri": prefetch.uri, "state": prefetch.state(), "steps": prefetch.generation.steps,
                "steps_after_stop": None if prefetch.generation.stopped_at is None
                else prefetch.generation.steps - prefetch.generation.stopped_at},
        }
