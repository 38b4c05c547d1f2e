"""What the server answers while a statement is typed, computed in-process on this machine.

The editor tests type a statement and check what the editor shows. The random-weight tiny model's answers
depend on the CPU's float rounding, so each test picks its statement here, by running the server's own
Completer over the texts the server will see, with the options it will use."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any, TypeVar

from kv_cache.edits import TextEdit
from lsp_server.completer import Completer
from lsp_server.completion import CompletionOptions
from lsp_server.options import ServerOptions, parse_options

T = TypeVar("T")


def request_options(settings: dict[str, Any], *, invoked: bool) -> CompletionOptions:
    """What the server decodes an Invoked or an Automatic (as-you-type) inline request with, under these settings."""
    options, warnings = parse_options(settings, ServerOptions())
    assert not warnings, warnings
    return options.completion(options.request_drafts(invoked))


def suggestion_texts(completer: Completer, offset: int, options: CompletionOptions) -> list[str]:
    return [s.text for s in completer.complete("probe", offset, options).suggestions]


def typed(model: Any, opened: str, cursor: int, keys: str, options: CompletionOptions,
          first: TextEdit | None = None, language: str = "python") -> tuple[Completer, list[list[str]]]:
    """The server's way there: `opened` opened (as a document in `language`, an LSP id) and encoded, the `first`
    edit (e.g. a new line), then `keys` typed one at a time at `cursor`. Returns the completer after the last key,
    and the drafts an as-you-type request gets before each key (an editor may ask after any keystroke)."""
    completer = Completer(model)
    completer.open("probe", opened, language)
    while completer.refresh_step():
        pass
    if first is not None:
        completer.change("probe", [first])
    before = []
    for done, char in enumerate(keys):
        before.append(suggestion_texts(completer, cursor + done, options))
        completer.change("probe", [TextEdit(cursor + done, cursor + done, char)])
    return completer, before


def near_tie(model: Any, text: str, offset: int, expected: list[tuple[CompletionOptions, list[str]]],
             language: str = "python") -> bool:
    """Whether the drafts change with how they are computed: opened fresh (other batch shapes), and decoded
    greedily instead of speculatively. On a near-tie between two tokens rounding could pick either, and the
    server's path differs from the probe's in such details."""
    fresh = Completer(model)
    fresh.open("probe", text, language)
    return any(suggestion_texts(fresh, offset, options) != drafts
               or suggestion_texts(fresh, offset, replace(options, speculative=False)) != drafts
               for options, drafts in expected)


def runs_through(keys: str, before: list[list[str]]) -> str | None:
    """Why typing `keys` would not reach the final answer: a draft shown earlier already starts with the rest of
    the keys, so the server (and the editor) keep showing the rest of it instead."""
    for done, earlier in enumerate(before):
        if any(draft.startswith(keys[done:]) for draft in earlier):
            return f"a draft before {keys[done:]!r} was typed already starts with it"
    return None


def first_suitable(candidates: Iterable[str], shortcoming: Callable[[str], tuple[str | None, T]], what: str) -> T:
    """The answer for the first candidate with no shortcoming; fails with every candidate's reason otherwise."""
    reasons = []
    for candidate in candidates:
        reason, found = shortcoming(candidate)
        if reason is None:
            return found
        reasons.append(f"  {candidate!r}: {reason}")
    raise AssertionError(f"on this machine no candidate gets drafts from the tiny model that {what} can use; "
                         "add candidates:\n" + "\n".join(reasons))
