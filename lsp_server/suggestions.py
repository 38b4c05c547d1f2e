"""Suggestions as the editor sees them: inline items, completion items, a hover preview, and the
typed-through cache (the user typed the start of what is shown → the rest, without the model)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from lsprotocol import types

from lsp_server.completion import Suggestion
from lsp_server.positions import position_at, units

_WORD_BEFORE = re.compile(r"\w*\Z")


@dataclass(frozen=True)
class ShownSuggestions:
    """The latest suggestions for a document and the text they were computed for."""

    text: str
    offset: int  # the cursor, in code points
    suggestions: tuple[Suggestion, ...]
    drafts: int  # how many were asked for: an Invoked request wants more than an Automatic one got

    def continue_at(self, text: str, offset: int) -> list[Suggestion] | None:
        """What is left of each suggestion if `text` is the old text with only the start of a suggestion
        typed at the old cursor, and the cursor right after it; None when anything else changed."""
        typed_len = offset - self.offset
        if typed_len < 0 or len(text) - len(self.text) != typed_len:
            return None
        if text[offset:] != self.text[self.offset:] or text[:self.offset] != self.text[:self.offset]:
            return None
        typed = text[self.offset:offset]
        return [Suggestion(s.text[typed_len:], s.score, s.replace_suffix) for s in self.suggestions
                if s.text.startswith(typed) and len(s.text) > typed_len]


def _cursor_range(text: str, offset: int, replace: int, encoding: str) -> types.Range:
    start = position_at(text, offset, encoding)
    end = types.Position(start.line, start.character + units(text[offset:offset + replace], encoding))
    return types.Range(start, end)


def inline_items(text: str, offset: int, suggestions: list[Suggestion], encoding: str,
                 selected: types.SelectedCompletionInfo | None = None,
                 selected_start: int | None = None) -> list[types.InlineCompletionItem]:
    """Inline items, best first. A suggestion that replaces text after the cursor gets that `range`. With a
    completion item selected in the popup (`selected`, starting at code point `selected_start`), items must
    extend its text over its range (LSP 3.18): those that do not are dropped."""
    items = []
    for s in suggestions:
        rng = _cursor_range(text, offset, s.replace_suffix, encoding) if s.replace_suffix else None
        insert = s.text
        if selected is not None and selected_start is not None:
            insert = text[selected_start:offset] + s.text
            if not insert.startswith(selected.text) or s.replace_suffix:
                continue
            rng = selected.range
        items.append(types.InlineCompletionItem(insert_text=insert, range=rng))
    return items


def _label(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    first = lines[0].strip() if lines else text.strip()
    more = " …" if len(lines) > 1 else ""
    return (first[:60] + "…" if len(first) > 60 else first) + more


def completion_items(text: str, offset: int, suggestions: list[Suggestion], encoding: str,
                     language_id: str, markdown: bool = True) -> list[types.CompletionItem]:
    """The drafts as completion items for clients without inline completions: each one a textEdit at the
    cursor (over the text it replaces), sorted best first."""
    word = _WORD_BEFORE.search(text, max(0, offset - 200), offset).group()
    items = []
    for rank, s in enumerate(suggestions):
        items.append(types.CompletionItem(
            label=_label(s.text),
            kind=types.CompletionItemKind.Text,
            detail=f"superpie · score {s.score:.2f}",
            documentation=types.MarkupContent(types.MarkupKind.Markdown, _fenced(s.text, language_id))
            if markdown else s.text,
            sort_text=f"{rank:02d}",
            filter_text=word + s.text,  # clients that filter by the word before the cursor keep the item
            insert_text_format=types.InsertTextFormat.PlainText,
            text_edit=types.TextEdit(_cursor_range(text, offset, s.replace_suffix, encoding), s.text),
        ))
    return items


def _fenced(text: str, language_id: str) -> str:
    fence = "```"
    while fence in text:
        fence += "`"
    return f"{fence}{language_id}\n{text}\n{fence}"


def hover_markdown(suggestions: list[Suggestion], language_id: str) -> str:
    """A preview of the drafts with their scores (mean log-probability per token), best first."""
    if not suggestions:
        return "**superpie**: no suggestion here"
    parts = [f"**superpie**: {len(suggestions)} draft{'s' if len(suggestions) != 1 else ''}"]
    for rank, s in enumerate(suggestions, 1):
        replaces = f", replaces {s.replace_suffix} character(s) after the cursor" if s.replace_suffix else ""
        parts.append(f"{rank}. score {s.score:.2f}{replaces}\n\n{_fenced(s.text, language_id)}")
    return "\n\n".join(parts)
