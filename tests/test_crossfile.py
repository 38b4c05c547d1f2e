"""Cross-file context: which chunks are chosen, and that rows borrowed from other documents and placed at negative
positions give the prompt the layout says (kv_cache/crossfile.py)."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest

from inference.generate import DecodeCache, prefill
from inference.syntax.definitions import code_chunks
from inference.syntax.languages import language_of
from kv_cache.crossfile import MAX_CHUNK_TOKENS, CrossFileContext
from kv_cache.edits import TextEdit
from kv_cache.rotation import rerotate_keys
from lsp_server.completer import Completer
from lsp_server.completion import CacheSettings, CompletionOptions

SHAPES = '''import math


def circle_area(radius):
    """The area of a circle."""
    return math.pi * radius * radius


class Square:
    def __init__(self, side):
        self.side = side

    def area(self):
        return self.side * self.side


def unused_helper():
    return 0
'''
MAIN = '''from shapes import circle_area, Square


def report(items):
    total = 0
    for item in items:
        total += circle_area(item)
    box = Square(2)
    
'''
SHAPES_URI, MAIN_URI = "file:///w/pkg/shapes.py", "file:///w/pkg/main.py"
CURSOR = MAIN.index("    \n") + 4


@pytest.fixture
def completer(tiny_model_fp32) -> Completer:
    completer = Completer(tiny_model_fp32, cache=CacheSettings(budget_mb=64))
    completer.open(SHAPES_URI, SHAPES, "python")
    completer.open(MAIN_URI, MAIN, "python")
    while completer.refresh_step():  # every window encoded and refreshed: the rows are exact
        pass
    return completer


def _chosen_text(completer: Completer, budget: int = 512) -> list[str]:
    chunks = completer.crossfile.choose(MAIN_URI, CURSOR, completer.docs, completer.languages, budget)
    doc = completer.docs[SHAPES_URI]
    return [completer.model.tokenizer.decode(doc.ids[c.start:c.stop]) for c in chunks]


def test_the_chunks_chosen_define_the_names_used_before_the_cursor(completer):
    chosen = _chosen_text(completer)
    assert any(t.startswith("def circle_area") for t in chosen)
    assert any(t.startswith("class Square") for t in chosen)
    assert not any("unused_helper" in t for t in chosen)  # defines nothing the file uses
    assert not any(t.startswith("import math") for t in chosen)  # defines nothing at all


def test_a_name_the_file_defines_itself_does_not_bring_another_file_s_chunk(completer):
    completer.change(MAIN_URI, [TextEdit(0, 0, "def circle_area(r):\n    return r\n\n\n")])
    chunks = completer.crossfile.choose(MAIN_URI, CURSOR + 33, completer.docs, completer.languages, 512)
    doc = completer.docs[SHAPES_URI]
    assert not any(doc.text[doc.doc.starts[c.start]:].startswith("def circle_area") for c in chunks)


def test_the_budget_bounds_the_chosen_tokens(completer):
    for budget in (16, 24, 40, 512):
        chunks = completer.crossfile.choose(MAIN_URI, CURSOR, completer.docs, completer.languages, budget)
        assert sum(c.stop - c.start for c in chunks) <= budget
        assert all(c.stop - c.start <= MAX_CHUNK_TOKENS for c in chunks)


def test_typing_on_the_line_keeps_the_assembled_rows(completer):
    """The choice reads the lines before the cursor's: a keystroke there neither re-chooses nor re-assembles."""
    context = completer.crossfile
    first = context.rows_for(MAIN_URI, CURSOR, completer.docs, completer.languages, 512)
    assert first is not None
    completer.change(MAIN_URI, [TextEdit(CURSOR, CURSOR, "circle_are")])
    again = context.rows_for(MAIN_URI, CURSOR + 10, completer.docs, completer.languages, 512)
    assert again is first
    completer.change(SHAPES_URI, [TextEdit(0, 0, "# shapes\n")])  # a chunk's document changed: rows rebuilt
    rebuilt = context.rows_for(MAIN_URI, CURSOR + 10, completer.docs, completer.languages, 512)
    assert rebuilt is not first and rebuilt.key != first.key


def test_context_rows_are_the_source_rows_moved_and_headers_encoded_after_them(completer, tiny_model_fp32):
    """The one forward with a position mask and negative positions equals building the context at positions
    0..L-1 one piece after another: the borrowed rows rotated there, each header prefilled after what precedes it."""
    model, context = tiny_model_fp32, completer.crossfile
    rows = context.rows_for(MAIN_URI, CURSOR, completer.docs, completer.languages, 512)
    doc = completer.docs[SHAPES_URI]
    spans = sorted((c.start, c.stop) for c in rows.chunks)
    header, tail = context._header("pkg/shapes.py"), context._header("pkg/main.py")
    ref = DecodeCache.empty(model.config, len(rows) + 8)
    prefill(model.decoder, ref, header)
    for start, stop in spans:
        keys, values, positions = doc.borrow_rows(start, stop)
        shift = ref.position + np.arange(stop - start) - positions
        ref.write([rerotate_keys(k, shift, model.config.head_dim, model.config.rope_theta) for k in keys], values)
        ref.position += stop - start
    prefill(model.decoder, ref, tail)
    assert rows.ids == [*header, *(t for a, b in spans for t in doc.ids[a:b]), *tail]
    assert ref.length == len(rows)
    for layer in range(model.config.n_layers):  # the context is at -L..-1: the reference moved by -L
        moved = rerotate_keys(ref.keys[layer][:, :ref.length], -len(rows), model.config.head_dim,
                              model.config.rope_theta)
        np.testing.assert_allclose(rows.keys[layer], moved, rtol=0, atol=1e-4)
        np.testing.assert_allclose(rows.values[layer], ref.values[layer][:, :ref.length], rtol=0, atol=1e-4)


def test_a_chunk_placed_by_rotation_equals_its_file_encoded_fresh_at_that_place(completer, tiny_model_fp32):
    """PIE's claim for borrowed rows: the source file encoded from scratch with its positions shifted so that the
    chunk lands where the context put it gives the same keys and values (RoPE: a shift is one more rotation)."""
    model = tiny_model_fp32
    rows = completer.crossfile.rows_for(MAIN_URI, CURSOR, completer.docs, completer.languages, 512)
    doc = completer.docs[SHAPES_URI]
    at = len(completer.crossfile._header("pkg/shapes.py"))  # the first chunk follows its file's header
    chunk = min(rows.chunks, key=lambda c: c.start)
    assert rows.ids[at:at + chunk.stop - chunk.start] == doc.ids[chunk.start:chunk.stop]
    first = doc.row_of(chunk.start, chunk.stop)  # the document's rows start with the prompt's first token
    last = first + chunk.stop - chunk.start
    fresh = DecodeCache.empty(model.config, last)
    fresh.position = -len(rows) + at - first  # so that the chunk's first row sits at the context's position
    prefill(model.decoder, fresh, doc.cache().ids[:last].tolist())
    span = slice(at, at + chunk.stop - chunk.start)
    for layer in range(model.config.n_layers):
        np.testing.assert_allclose(rows.keys[layer][:, span], fresh.keys[layer][:, first:last], rtol=0, atol=1e-4)
        np.testing.assert_allclose(rows.values[layer][:, span], fresh.values[layer][:, first:last], rtol=0,
                                   atol=1e-4)


def test_chunks_of_an_evicted_document_are_read_from_disk_and_usable_after_it_returns(tiny_model_fp32, tmp_path,
                                                                                     completer):
    """With a budget that holds one document, the other one's chunks come from its saved file (int8 on disk,
    persist.py) without bringing it back; once it is in use again and edited, its chunks follow the edit."""
    small = Completer(tiny_model_fp32, cache=CacheSettings(budget_mb=0.05), persist_dir=tmp_path)
    small.open(SHAPES_URI, SHAPES, "python")
    small.open(MAIN_URI, MAIN, "python")
    while small.refresh_step():
        pass
    small.docs[MAIN_URI].cache()
    small.store.evict_to_budget()
    assert small.store.peek(SHAPES_URI) is None and list(tmp_path.iterdir())  # on disk only
    exact = completer.crossfile.rows_for(MAIN_URI, CURSOR, completer.docs, completer.languages, 512)
    read = small.crossfile.rows_for(MAIN_URI, CURSOR, small.docs, small.languages, 512)
    assert read is not None and read.ids == exact.ids
    assert small.store.peek(SHAPES_URI) is None  # read, not restored
    for got, want in zip(read.keys + read.values, exact.keys + exact.values):
        assert np.abs(got - want).max() <= 0.02 * np.abs(want).max()  # the disk codec's rounding, not misplaced rows
    options = CompletionOptions(drafts=1, max_tokens=4, cross_file_tokens=512)
    assert small.complete(MAIN_URI, CURSOR, options).timings["cross_file_tokens"] == len(read)
    for c in (small, completer):  # back in use, then edited above the chunks
        c.change(SHAPES_URI, [TextEdit(0, 0, "# shapes\n")])
        while c.refresh_step():
            pass
    assert small.store.peek(SHAPES_URI) is not None or small.store.peek(MAIN_URI) is not None
    moved = small.crossfile.rows_for(MAIN_URI, CURSOR, small.docs, small.languages, 512)
    want = completer.crossfile.rows_for(MAIN_URI, CURSOR, completer.docs, completer.languages, 512)
    assert moved.key != read.key and moved.ids == want.ids
    for got, ref in zip(moved.keys + moved.values, want.keys + want.values):
        assert np.abs(got - ref).max() <= 0.02 * np.abs(ref).max()


def test_the_prompt_with_borrowed_rows_sees_them_before_the_document(completer, tiny_model_fp32):
    """Prefix layout: the document's rows before the last prompt token, the context, the last token fed again;
    equal to a prompt built with the context at 0..L-1 and the document's rows moved after it."""
    model = tiny_model_fp32
    doc = completer.docs[MAIN_URI]
    rows = completer.crossfile.rows_for(MAIN_URI, CURSOR, completer.docs, completer.languages, 512)
    ctx = doc.context(CURSOR, with_suffix=False, room=8, borrowed=rows)
    assert ctx.encoded == 1
    last = ctx.prefix_rows - 1
    keys, values, positions = doc.cache().copy_rows(0, last)
    ref = DecodeCache.empty(model.config, len(rows) + last + 8)
    cfg = model.config
    ref.write([rerotate_keys(k, len(rows), cfg.head_dim, cfg.rope_theta) for k in rows.keys], rows.values)
    ref.write([rerotate_keys(k, len(rows), cfg.head_dim, cfg.rope_theta) for k in keys], values)
    ref.position = len(rows) + int(positions[-1]) + 1
    expected = prefill(model.decoder, ref, [int(doc.cache().ids[last])])
    np.testing.assert_allclose(ctx.logits, expected, rtol=0, atol=1e-4)
    logits = ctx.logits.copy()
    again = doc.context(CURSOR, with_suffix=False, room=8, borrowed=rows)
    assert again.encoded == 0  # the written prompt is kept for the next request at the same cursor
    np.testing.assert_allclose(again.logits, logits, rtol=0, atol=0)
    without = doc.context(CURSOR, with_suffix=False, room=8)
    assert not np.allclose(without.logits, logits, atol=1e-4)  # the context changed what comes next


def test_a_fim_prompt_with_borrowed_rows_is_written_once_and_reused(completer):
    text = completer.docs[MAIN_URI].text
    at = text.index("box = ") + 4
    doc = completer.docs[MAIN_URI]
    rows = completer.crossfile.rows_for(MAIN_URI, at, completer.docs, completer.languages, 512)
    first = doc.context(at, room=8, borrowed=rows)
    logits = first.logits.copy()
    again = doc.context(at, room=8, borrowed=rows)
    assert first.encoded > 0 and again.encoded == 0
    np.testing.assert_allclose(again.logits, logits, rtol=0, atol=0)
    plain = doc.context(at, room=8)
    assert plain.encoded > 0 and first.reused == plain.reused + len(rows)
    assert not np.allclose(plain.logits, logits, atol=1e-4)


def test_completions_with_context_count_its_rows_against_the_budget(completer):
    options = CompletionOptions(drafts=1, max_tokens=4, cross_file_tokens=512)
    out = completer.complete(MAIN_URI, CURSOR, options)
    assert out.timings["cross_file_tokens"] == len(completer.crossfile.rows) > 0
    assert completer.store.held_elsewhere == completer.crossfile.rows.nbytes
    assert completer.stats()["cache_bytes"] >= completer.crossfile.rows.nbytes
    off = completer.complete(MAIN_URI, CURSOR, CompletionOptions(drafts=1, max_tokens=4))
    assert off.timings["cross_file_tokens"] == 0
    completer.close(SHAPES_URI)  # its chunks go with it
    assert completer.crossfile.rows is None and completer.store.held_elsewhere == 0
    assert completer.complete(MAIN_URI, CURSOR, options).timings["cross_file_tokens"] == 0


def test_rows_of_an_idle_document_are_borrowed_without_waking_it(completer):
    """The other document keeps its int8 rows: only the borrowed ones come back as fp32 (a close copy)."""
    completer.docs[MAIN_URI].cache()  # the document in use: the other one is idle
    other = completer.store.peek(SHAPES_URI)
    completer.store.evict_to_budget()
    assert other._idle == "int8"
    keys, values, positions = other.copy_rows(2, 9)
    assert other._idle == "int8"
    other_keys, other_values = other.rows(2, 9)  # wakes it
    for a, b in zip(keys + values, other_keys + other_values):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(positions, np.arange(2, 9))


def test_no_context_without_a_file_separator_token(completer, tiny_model_fp32):
    tokenizer = copy.copy(tiny_model_fp32.tokenizer)
    tokenizer.specials = dataclasses.replace(tokenizer.specials, file_sep=None)
    plain = CrossFileContext(tiny_model_fp32.decoder, tokenizer)
    assert plain.rows_for(MAIN_URI, CURSOR, completer.docs, completer.languages, 512) is None


@pytest.mark.parametrize("language, source, names", [
    ("python", "import os\n\nX = 1\n\n@dec\ndef f(a):\n    return a\n\nclass C:\n    def m(self):\n        pass\n",
     [{"X"}, {"f"}, {"C", "m"}]),
    ("go", 'package p\n\nimport "fmt"\n\ntype Point struct{ X int }\n\nfunc (p Point) Len() int { return 1 }\n',
     [set(), {"Point"}, {"Len"}]),  # (a struct's fields are too deep in its type)
    ("rust", "use std::io;\npub struct S { a: u8 }\nimpl S { pub fn new() -> Self { S { a: 0 } } }\n",
     [set(), {"S", "a"}, {"S", "new"}]),
    ("typescript", 'import {a} from "b";\nexport class K { m(): void {} }\nexport function g(x: number) { return x }\n',
     [set(), {"K", "m"}, {"g"}]),
    ("c", "#include <stdio.h>\nstatic int count(const char *s) { return 0; }\nstruct pt { int x; };\n",
     [set(), {"count"}, {"pt", "x"}]),
    ("java", "package a;\nimport b.C;\npublic class K { private int f; public void m(int a) {} }\n",
     [set(), {"K", "f", "m"}]),
])
def test_definitions_per_language(language, source, names):
    chunks = code_chunks(language_of(language), source)
    assert [set(c.names) for c in chunks] == names
    assert all(source[c.start:c.stop].strip() for c in chunks)


def test_a_long_definition_is_cut_into_its_header_and_members():
    chunks = code_chunks(language_of("python"), SHAPES, max_chars=60)
    texts = [SHAPES[c.start:c.stop] for c in chunks]
    assert any(t.startswith("class Square") and "def" not in t for t in texts)
    assert any(t.startswith("def area") for t in texts)
    assert {"area"} in [set(c.names) for c in chunks]


def test_without_a_grammar_paragraphs_define_the_words_of_their_first_line():
    text = "proc greet {name} {\n  puts $name\n}\n\nproc bye {} {\n}\n"
    chunks = code_chunks(language_of("tcl"), text)
    assert [text[c.start:c.stop].split("\n")[0] for c in chunks] == ["proc greet {name} {", "proc bye {} {"]
    assert "greet" in chunks[0].names
