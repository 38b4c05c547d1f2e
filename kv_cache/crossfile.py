"""Context from the user's other open files, placed before the current file's rows by re-rotating rows their own
documents already hold (PIE: a key moves to a new position by one more rotation, k' = R(Δ)·k).

The layout, Qwen2.5-Coder's repository format:

    <|file_sep|>pkg/a.py\\n [rows of a.py's chunks] <|file_sep|>pkg/b.py\\n [...] <|file_sep|>pkg/here.py\\n
    <|fim_prefix|> the document's rows ...

The document's rows keep their positions 0, 1, ...; the context takes positions -L..-1. RoPE attention depends
only on the difference of two positions, so this is the same prompt as the context at 0..L-1 with the document
after it, and no row of the document moves. The context rows are written into the decode's spare rows like the
rest of the prompt (kv_cache.document.DocumentCache.context), so the document's own rows are never changed.

What is approximated: a chunk's K/V were computed in its own file, after that file's earlier text (not after
the context placed before it here), the same approximation as PIE's rows after an edit; the document's rows were
computed without the context. What sees it exactly: the path headers (encoded here, against the chunk rows
before them), the prompt's last token (fed again after the context) and every decoded token. bench/crossfile.py
measures the next-token agreement with a fresh encode of the whole prompt.

The choice. Names in the lines before the cursor's line (each time one appears) and, with less weight, names
the file imports, score the chunks of other open documents that define them (inference.syntax.definitions)
and are not defined in this file; the last place edited in another document adds a little. The best chunks
are taken, each at most MAX_CHUNK_TOKENS (its first lines), until the token budget is spent. The choice reads
only the lines before the cursor's line, so typing on a line never reshuffles it, and the assembled rows are
kept until the choice changes or a chunk's document is edited.
"""

from __future__ import annotations

import re
from bisect import bisect_left, bisect_right
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath
from urllib.parse import unquote, urlparse

import numpy as np

from inference.runtime import NEG_INF, Decoder
from inference.syntax.definitions import CodeChunk, code_chunks
from inference.syntax.languages import language_of
from inference.tokenizer import CodeTokenizer
from kv_cache.choices import MIN_CHUNK_TOKENS
from kv_cache.document import DocumentCache
from kv_cache.rotation import rerotate_keys

MAX_CHUNK_TOKENS = 192  # a chunk's first lines: a definition's signature and docstring say the most
NEARBY_LINES = 40  # lines before the cursor's line whose names choose the chunks
IMPORT_WEIGHT = 0.5  # a name the file imports but the nearby lines do not use
EDIT_WEIGHT = 0.5  # a chunk holding the last place edited in its document
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_IMPORT_LINE = re.compile(r"^\s*(?:from\s|import\s|use\s|#\s*include|using\s|require\b|.*\brequire\()")


@dataclass(frozen=True)
class Chunk:
    """Tokens [start, stop) of an open document, chosen for the context with this score."""

    uri: str
    start: int
    stop: int
    score: float


@dataclass
class ContextRows:
    """The assembled context: its token ids and K/V per layer [kv, L, hd] at positions -L..-1, keyed by what they
    were built from (the chunks, their documents' versions, the current file's path)."""

    key: tuple
    ids: list[int]
    keys: list[np.ndarray]
    values: list[np.ndarray]
    chunks: tuple[Chunk, ...]

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (*self.keys, *self.values))


@dataclass
class _Index:
    """A document's chunks, for the text they were cut from (`version`, or `lines` for the document typed in)."""

    version: int
    lines: int
    chunks: list[CodeChunk]
    defined: frozenset[str]
    imported: frozenset[str]  # the words of its import lines


class CrossFileContext:
    """Chooses chunks of the other open documents for a cursor and keeps the rows assembled for the last choice."""

    def __init__(self, decoder: Decoder, tokenizer: CodeTokenizer) -> None:
        self.decoder, self.tokenizer = decoder, tokenizer
        self._file_sep = tokenizer.specials.file_sep
        self._indexes: dict[str, _Index] = {}
        self._last_edit: dict[str, int] = {}  # uri -> character offset of its last edit
        self.rows: ContextRows | None = None  # the last assembled context (its bytes count against the budget)

    @property
    def nbytes(self) -> int:
        return self.rows.nbytes if self.rows is not None else 0

    def edited(self, uri: str, offset: int) -> None:
        self._last_edit[uri] = offset

    def forget(self, uri: str) -> None:
        """A closed document: its chunks are no longer candidates."""
        self._indexes.pop(uri, None)
        self._last_edit.pop(uri, None)
        if self.rows is not None and any(c.uri == uri for c in self.rows.chunks):
            self.rows = None

    # -- the choice ----------------------------------------------------------------------------------------------

    def choose(self, uri: str, offset: int, docs: Mapping[str, DocumentCache], languages: Mapping[str, str],
               budget: int) -> list[Chunk]:
        """The chunks for a cursor at character `offset` of `uri`, best first, within `budget` tokens."""
        here = docs[uri]
        text = here.text
        line_start = text.rfind("\n", 0, offset) + 1
        nearby = text[_nth_newline_before(text, line_start, NEARBY_LINES):line_start]
        weights: Counter[str] = Counter(_WORD.findall(nearby))
        index = self._index(uri, here, languages, typing=True)
        for name in index.imported:
            weights[name] += IMPORT_WEIGHT if name not in weights else 0
        own = index.defined
        candidates = []
        for other, doc in docs.items():
            if other == uri:
                continue
            edit = self._last_edit.get(other)
            for chunk in self._index(other, doc, languages).chunks:
                score = sum(weights[name] for name in chunk.names - own)
                if score <= 0:
                    continue
                if edit is not None and chunk.start <= edit <= chunk.stop:
                    score += EDIT_WEIGHT
                start, stop = _token_span(doc, chunk)
                if stop > start and doc.row_of(start, min(stop, start + MAX_CHUNK_TOKENS)) is not None:
                    # (only rows its document holds)
                    candidates.append(Chunk(other, start, stop, score))
        candidates.sort(key=lambda c: (-c.score, c.uri, c.start))
        chosen, left = [], budget
        for chunk in candidates:
            stop = min(chunk.stop, chunk.start + MAX_CHUNK_TOKENS, chunk.start + left)
            if stop < chunk.stop:
                stop = _cut(docs[chunk.uri], chunk.start, stop)
            if stop - chunk.start >= MIN_CHUNK_TOKENS:
                chosen.append(Chunk(chunk.uri, chunk.start, stop, chunk.score))
                left -= stop - chunk.start
            if left < MIN_CHUNK_TOKENS:
                break
        return chosen

    def _index(self, uri: str, doc: DocumentCache, languages: Mapping[str, str], typing: bool = False) -> _Index:
        """The document's chunks. The one being typed in is cut again only when its number of lines changes: a
        keystroke within a line does not re-parse the file (its definitions are read from the lines before it)."""
        index = self._indexes.get(uri)
        lines = doc.text.count("\n")
        if index is not None and (index.version == doc.version or typing and index.lines == lines):
            return index
        text = doc.text
        chunks = code_chunks(language_of(languages.get(uri, ""), uri), text)
        imported = frozenset(name for line in text.splitlines() if _IMPORT_LINE.match(line)
                             for name in _WORD.findall(line))
        index = _Index(doc.version, lines, chunks, frozenset().union(*(c.names for c in chunks)), imported)
        self._indexes[uri] = index
        return index

    # -- the rows ------------------------------------------------------------------------------------------------

    def rows_for(self, uri: str, offset: int, docs: Mapping[str, DocumentCache], languages: Mapping[str, str],
                 budget: int) -> ContextRows | None:
        """The context rows for a cursor: those kept if the choice and its documents are unchanged, else assembled
        from the chosen chunks' rows; None when nothing relevant is open (or the model has no <|file_sep|>)."""
        if self._file_sep is None or budget <= 0:
            return None
        chunks = self.choose(uri, offset, docs, languages, budget)
        if not chunks:
            return None
        paths = _display_paths([uri, *(c.uri for c in chunks)])
        key = (paths[uri], tuple((c.uri, docs[c.uri].version, c.start, c.stop) for c in chunks))
        if self.rows is None or self.rows.key != key:
            self.rows = None  # free the old rows before building the new ones
            self.rows = self._assemble(key, chunks, docs, paths, uri)
        return self.rows

    def _assemble(self, key: tuple, chunks: list[Chunk], docs: Mapping[str, DocumentCache], paths: dict[str, str],
                  uri: str) -> ContextRows | None:
        """Chunk rows (copied, re-rotated) and path headers (encoded in one forward), ordered: files from the least
        to the most relevant, each file's chunks in their order, the current file's header last."""
        files: dict[str, list[Chunk]] = {}
        for chunk in chunks[::-1]:
            files.setdefault(chunk.uri, []).append(chunk)
        segments: list[tuple[list[int], tuple | None]] = []  # (ids, borrowed rows or None for a header to encode)
        for other, mine in files.items():
            borrowed = []
            for chunk in sorted(mine, key=lambda c: c.start):
                rows = docs[other].borrow_rows(chunk.start, chunk.stop)
                if rows is not None:
                    borrowed.append((docs[other].ids[chunk.start:chunk.stop], rows))
            if borrowed:
                segments.append((self._header(paths[other]), None))
                segments.extend(borrowed)
        if not segments:
            return None
        segments.append((self._header(paths[uri]), None))
        return self._place(key, segments, tuple(chunks))

    def _header(self, path: str) -> list[int]:
        return [self._file_sep, *self.tokenizer.encode(path + "\n")]

    def _place(self, key: tuple, segments: list[tuple[list[int], tuple | None]], chunks: tuple[Chunk, ...]
               ) -> ContextRows:
        cfg = self.decoder.config
        ids = [t for seg_ids, _ in segments for t in seg_ids]
        total = len(ids)
        positions = np.arange(-total, 0)
        keys = [np.empty((cfg.n_kv_heads, total, cfg.head_dim), np.float32) for _ in range(cfg.n_layers)]
        values = [np.empty_like(k) for k in keys]
        borrowed, headers, at = [], [], 0
        for seg_ids, rows in segments:
            span = slice(at, at + len(seg_ids))
            if rows is None:
                headers.append(span)
            else:
                row_keys, row_values, source = rows
                shift = positions[span] - source
                for layer, (k, v) in enumerate(zip(row_keys, row_values)):
                    keys[layer][:, span] = rerotate_keys(k, shift, cfg.head_dim, cfg.rope_theta)
                    values[layer][:, span] = v
                borrowed.append(span)
            at += len(seg_ids)
        rows_at = np.concatenate([np.arange(s.start, s.stop) for s in borrowed])
        new_at = np.concatenate([np.arange(s.start, s.stop) for s in headers])
        # A header token sees the chunk rows before it and the header tokens before it (causal by position).
        bias = np.where(rows_at[None, :] < new_at[:, None], 0.0, NEG_INF)
        bias = np.concatenate([bias, np.where(new_at[None, :] <= new_at[:, None], 0.0, NEG_INF)], axis=1)
        out = self.decoder.forward(np.asarray(ids)[new_at], positions[new_at], [k[:, rows_at] for k in keys],
                                   [v[:, rows_at] for v in values], bias=bias.astype(np.float32))
        for layer in range(cfg.n_layers):
            keys[layer][:, new_at] = out.keys[layer]
            values[layer][:, new_at] = out.values[layer]
        return ContextRows(key, ids, keys, values, chunks)


def _nth_newline_before(text: str, offset: int, n: int) -> int:
    """The start of the line `n` lines before the one starting at `offset` (0 at the top)."""
    at = offset
    for _ in range(n):
        if at <= 0:
            return 0
        at = text.rfind("\n", 0, at - 1) + 1
    return at


def _token_span(doc: DocumentCache, chunk: CodeChunk) -> tuple[int, int]:
    """The document tokens covering the chunk's characters, and the line break after them (so that chunks
    placed one after the other stay on lines of their own)."""
    starts, text = doc.doc.starts, doc.text
    stop = bisect_left(starts, chunk.stop)
    if stop < len(starts) and text.startswith(("\n", "\r"), starts[stop]):
        stop += 1
    return max(bisect_right(starts, chunk.start) - 1, 0), stop


def _cut(doc: DocumentCache, start: int, stop: int) -> int:
    """`stop`, moved back to just after the last token in [start, stop) that ends a line, if one does in the second
    half (a chunk cut by the budget ends with a whole line)."""
    text, starts = doc.text, doc.doc.starts
    for i in range(stop - 1, (start + stop) // 2, -1):
        end = starts[i + 1] if i + 1 < len(starts) else len(text)
        if "\n" in text[starts[i]:end]:
            return i + 1
    return stop


def _display_paths(uris: list[str]) -> dict[str, str]:
    """Paths as the prompt's headers show them: relative to the parent of the open files' common directory (so
    they keep the package's name, as `requests/models.py`)."""
    paths = {u: PurePosixPath(unquote(urlparse(u).path)) for u in uris}
    parents = [p.parent.parts for p in paths.values()]
    common = 0
    while all(len(p) > common for p in parents) and len({p[common] for p in parents}) == 1:
        common += 1
    base = max(common - 1, 1)
    return {u: "/".join(p.parts[base:]) or p.name for u, p in paths.items()}
