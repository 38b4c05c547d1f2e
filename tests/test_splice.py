"""Text edits as minimal token splices: after any edits, ids and starts match a fresh encode of the text.

Runs with the tiny test vocabulary and with the real Qwen2.5-Coder tokenizer (the converted model's
cached metadata, fetched and converted on first use). Documents are excerpts of standard-library
sources, also with CRLF line ends, tabs and non-ASCII text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inference.converted import TOKENIZER_FILE
from inference.fetch import cache_root
from inference.model_store import LoadedModel, prepare_model
from inference.tokenizer import CodeTokenizer, tokenizer_from_metadata
from kv_cache import splice as splice_module
from kv_cache.edits import TextEdit
from kv_cache.splice import TokenizedText, TokenSplice, apply_edit, apply_edits
from tests.fixtures import cpython_text

SOURCES = ("textwrap.py", "heapq.py", "shlex.py", "fnmatch.py", "colorsys.py", "json/encoder.py")
NON_ASCII_COMMENTS = (
    "# 中文注释：堆的不变量",
    "# 😀 👍🏽 👨\u200d👩\u200d👧 🇺🇸",
    "# café, nai\u0308ve, \u0915\u094d\u0937",
    "# 日本語のコメント 한국어 e\u0301\u0301",
)


def _excerpt(name: str, size: int = 3000) -> str:
    """About `size` characters from a third of the way in, past module docstrings, from a line start."""
    source = cpython_text(name)
    start = source.index("\n", len(source) // 3) + 1
    return source[start : start + size]


def _crlf(text: str) -> str:
    return text.replace("\n", "\r\n")


def _tabs(text: str) -> str:
    return re.sub(r"^(?:    )+", lambda indent: "\t" * (len(indent[0]) // 4), text, flags=re.MULTILINE)


def _non_ascii(text: str) -> str:
    lines = text.split("\n")
    for i in range(0, len(lines), 3):
        lines[i] += "  " + NON_ASCII_COMMENTS[i // 3 % len(NON_ASCII_COMMENTS)]
    return "\n".join(lines)


VARIANTS: dict[str, Callable[[str], str]] = {
    "plain": lambda text: text,
    "crlf": _crlf,
    "tabs": _tabs,
    "non-ascii": _non_ascii,
    "all": lambda text: _crlf(_tabs(_non_ascii(text))),
}
DOCUMENTS = {f"{name}/{variant}": make(_excerpt(name)) for name in SOURCES for variant, make in VARIANTS.items()}
DOCUMENTS["empty"] = ""

# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def qwen_tokenizer() -> CodeTokenizer:
    model_dir = prepare_model(cache=cache_root(), progress=False)
    return tokenizer_from_metadata(json.loads((model_dir / TOKENIZER_FILE).read_text()))


@pytest.fixture(scope="module", params=["tiny", pytest.param("qwen", marks=pytest.mark.real_model)])
def tokenizer(request: pytest.FixtureRequest) -> CodeTokenizer:
    if request.param == "qwen":
        return request.getfixturevalue("qwen_tokenizer")
    model: LoadedModel = request.getfixturevalue("tiny_model")
    return model.tokenizer


def assert_in_sync(doc: TokenizedText, tokenizer: CodeTokenizer) -> None:
    ids, spans = tokenizer.encode_with_offsets(doc.text)
    assert doc.ids == tokenizer.encode(doc.text) == ids
    assert doc.starts == [start for start, _ in spans]


def edit_and_check(doc: TokenizedText, edit: TextEdit, tokenizer: CodeTokenizer) -> TokenSplice:
    """apply_edit, checked against a fresh encode; returns the splice."""
    old_ids, expected_text = list(doc.ids), edit.apply(doc.text)
    splice = apply_edit(doc, edit, tokenizer)
    assert doc.text == expected_text
    assert_in_sync(doc, tokenizer)
    assert splice.apply(old_ids) == doc.ids
    return splice


# ---------------------------------------------------------------------------- random edit sequences

TYPED = [*"abcxyz_XY0123456789 ()[]{}:.,=+-*'\"#\\", "\t", "\n", "\r\n", "é", "中", "😀", "\u0301", "\u200d"]
SNIPPETS = [
    "self",
    "return None",
    "if x:\n    pass\n",
    "for i in range(10):\r\n\tprint(i)\r\n",
    "    ",
    "\t",
    "\n\n",
    "  \n  ",
    "# 注释 😀\n",
    "'''doc'''",
    "x = [1, 2, 3]",
    "e\u0301",
    "👨\u200d👩\u200d👧",
    "🇺🇸",
    "<|endoftext|>",
    "it's",
]
EDIT_KINDS = ("type", "backspace", "insert", "delete", "delete line", "indent", "dedent", "replace", "paste", "any")


def _line_starts(text: str) -> list[int]:
    return [0, *(match.end() for match in re.finditer(r"\r\n|\r|\n", text))]


SNIPPET = st.sampled_from(SNIPPETS) | st.text(max_size=30)


@st.composite
def realistic_edits(draw: st.DrawFn, text: str) -> TextEdit:
    """Mostly what an editor sends (typing, deleting, indenting, pasting), sometimes anything."""
    n = len(text)
    kind = draw(st.sampled_from(EDIT_KINDS))
    if kind in ("delete line", "indent", "dedent"):
        line_starts = [*_line_starts(text), n]
        line = draw(st.integers(0, len(line_starts) - 2))
        line_start, line_end = line_starts[line], line_starts[line + 1]
        if kind == "delete line":
            return TextEdit(line_start, line_end, "")
        if kind == "indent":
            return TextEdit(line_start, line_start, draw(st.sampled_from(["    ", "\t", " "])))
        return TextEdit(line_start, line_start + len(re.match(r"[ \t]{0,4}", text[line_start:])[0]), "")
    at = draw(st.integers(0, n))
    if kind == "type":
        return TextEdit(at, at, draw(st.sampled_from(TYPED)))
    if kind == "backspace":
        return TextEdit(max(at - 1, 0), at, "")
    if kind == "insert":
        return TextEdit(at, at, draw(SNIPPET))
    if kind == "delete":
        return TextEdit(at, min(at + draw(st.integers(1, 40)), n), "")
    if kind == "replace":
        return TextEdit(at, min(at + draw(st.integers(1, 20)), n), draw(SNIPPET))
    if kind == "paste":
        source = draw(st.integers(0, n))
        return TextEdit(at, at, text[source : source + draw(st.integers(0, 200))])
    return TextEdit(at, draw(st.integers(at, n)), draw(st.text(max_size=50)))


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_random_edit_sequences_keep_ids_and_starts_in_sync(tokenizer: CodeTokenizer, data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(sorted(DOCUMENTS)), label="document")
    doc = TokenizedText.encode(DOCUMENTS[name], tokenizer)
    edits = []
    for _ in range(data.draw(st.integers(1, 8), label="number of edits")):
        edits.append(data.draw(realistic_edits(doc.text)))
        edit_and_check(doc, edits[-1], tokenizer)

    batch = TokenizedText.encode(DOCUMENTS[name], tokenizer)
    ids = list(batch.ids)
    for splice in apply_edits(batch, edits, tokenizer):
        ids = splice.apply(ids)
    assert batch == doc
    assert ids == doc.ids


# ---------------------------------------------------------------------------- known hard spots

TRICKY_EDITS = {
    "insert between CR and LF": ("a = 1\r\nb = 2\r\n", TextEdit(6, 6, "x")),
    "newline into trailing spaces": ("x = 1    \n    y = 2\n", TextEdit(7, 7, "\n")),
    "join two whitespace runs": ("if x:    \n        pass\n", TextEdit(9, 10, "")),
    "long whitespace run": ("a" + " " * 300 + "b", TextEdit(150, 151, "\n")),
    "whitespace-only document": ("   \n\t\n  ", TextEdit(4, 4, " ")),
    "tab before punctuation": ("x\t= 1\n", TextEdit(1, 2, "\t\t")),
    "punctuation glued to line breaks": ("f()\n\n\ng()\n", TextEdit(3, 4, "")),
    "space glues to the next word": ("x=foo", TextEdit(2, 2, " ")),
    "contraction": ("it s", TextEdit(2, 3, "'")),
    "digits": ("n = 12345\n", TextEdit(7, 7, "9")),
    "combining mark after a letter": ("cafe = 1\n", TextEdit(4, 4, "\u0301")),
    "inside a ZWJ emoji": ("s = '👨\u200d👩\u200d👧'\n", TextEdit(6, 6, "x")),
    "between a flag's two letters": ("f = '🇺🇸'\n", TextEdit(6, 6, " ")),
    "replace one of several CJK characters": ("# 中文注释\n", TextEdit(3, 4, "x")),
    "replace a character split over byte tokens": ("s = 'a\U0002070e'\n", TextEdit(6, 7, "中")),
    "combining mark after a character split over byte tokens": ("s = 'a\U0002070e'\n", TextEdit(7, 7, "\u0301")),
    "marker text stays text": ("m = '<|fim_prefix|>'\n", TextEdit(8, 8, "x")),
    "type at the start": ("def f():\n    pass\n", TextEdit(0, 0, "a")),
    "type at the end": ("x = 1", TextEdit(5, 5, "2")),
    "insert into an empty document": ("", TextEdit(0, 0, "def f():\r\n\treturn 1\n")),
    "delete everything": ("def f():\n    return 1\n", TextEdit(0, 22, "")),
}


@pytest.mark.parametrize("case", TRICKY_EDITS)
def test_tricky_edit(tokenizer: CodeTokenizer, case: str) -> None:
    text, edit = TRICKY_EDITS[case]
    edit_and_check(TokenizedText.encode(text, tokenizer), edit, tokenizer)


def test_apply_edits_applies_each_edit_to_the_previous_result(tokenizer: CodeTokenizer) -> None:
    doc = TokenizedText.encode("x = 1\n", tokenizer)
    splices = apply_edits(doc, [TextEdit(0, 1, "total"), TextEdit(5, 5, "s"), TextEdit(10, 10, "0")], tokenizer)
    assert doc.text == "totals = 10\n"
    assert_in_sync(doc, tokenizer)
    assert len(splices) == 3


# ---------------------------------------------------------------------------- minimal splices

FUNCTION = "def heappush(heap, item):\n    heap.append(item)\n    _siftdown(heap, 0, len(heap)-1)\n"


def test_typing_inside_an_identifier_changes_only_that_word(tokenizer: CodeTokenizer) -> None:
    doc = TokenizedText.encode(FUNCTION, tokenizer)
    word_start, word_end = FUNCTION.index("heappush"), FUNCTION.index("(")
    old_starts = list(doc.starts)
    splice = edit_and_check(doc, TextEdit(word_start + 4, word_start + 4, "x"), tokenizer)
    assert splice.stop - splice.start <= 3 and len(splice.ids) <= 3
    assert word_start - 1 <= old_starts[splice.start] and old_starts[splice.stop - 1] < word_end


@pytest.mark.parametrize("edit", [TextEdit(10, 10, ""), TextEdit(4, 30, FUNCTION[4:30]), TextEdit(0, 0, "")])
def test_an_edit_that_changes_nothing_returns_an_empty_splice(tokenizer: CodeTokenizer, edit: TextEdit) -> None:
    doc = TokenizedText.encode(FUNCTION, tokenizer)
    before = TokenizedText(doc.text, list(doc.ids), list(doc.starts))
    splice = apply_edit(doc, edit, tokenizer)
    assert splice.start == splice.stop and splice.ids == () and splice.delta == 0
    assert doc == before


@pytest.mark.parametrize("removed", ["    y = b\n", ", b", " x"])
def test_deleting_whole_tokens_inserts_nothing(tokenizer: CodeTokenizer, removed: str) -> None:
    text = "def f(a, b):\n    x = a\n    y = b\n    return x\n"
    start = text.index(removed)
    splice = edit_and_check(TokenizedText.encode(text, tokenizer), TextEdit(start, start + len(removed), ""), tokenizer)
    assert splice.ids == () and splice.stop > splice.start


# ---------------------------------------------------------------------------- cost and verification


def _record_encoded_lengths(tokenizer: CodeTokenizer, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Wrap the tokenizer's encoders to record the length of every text they are given."""
    lengths: list[int] = []

    def recording(encoder: Callable[[str], object]) -> Callable[[str], object]:
        def encode(text: str) -> object:
            lengths.append(len(text))
            return encoder(text)

        return encode

    for name in ("encode", "encode_with_offsets"):
        monkeypatch.setattr(tokenizer, name, recording(getattr(tokenizer, name)))
    return lengths


def test_a_small_edit_to_a_large_document_encodes_only_a_window(
    tokenizer: CodeTokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = "".join(cpython_text(name) for name in ("argparse.py", "typing.py"))[:200_000]
    doc = TokenizedText.encode(text, tokenizer)
    middle = text.index("\n", len(text) // 2)
    lengths = _record_encoded_lengths(tokenizer, monkeypatch)
    for edit in (TextEdit(middle - 3, middle - 3, "x"), TextEdit(middle, middle + 1, ""), TextEdit(10, 10, "\n")):
        apply_edit(doc, edit, tokenizer)
    monkeypatch.undo()
    assert len(lengths) == 3 and max(lengths) < 1_000
    assert_in_sync(doc, tokenizer)


def test_a_window_whose_tokenization_contradicts_an_anchor_grows(
    tokenizer: CodeTokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Pretend every token start is an anchor. The one between the two spaces is wrong: after "bar" is
    # deleted they end the text, and both tokenizers encode "  " as one token.
    monkeypatch.setattr(splice_module, "_is_anchor", lambda before, after: True)
    doc = TokenizedText.encode("foo  bar", tokenizer)
    lengths = _record_encoded_lengths(tokenizer, monkeypatch)
    splice = apply_edit(doc, TextEdit(5, 8, ""), tokenizer)
    encoded = len(lengths)
    monkeypatch.undo()
    assert encoded > 1
    assert_in_sync(doc, tokenizer)
    assert doc.ids == tokenizer.encode("foo  ") and splice.stop > splice.start


# ---------------------------------------------------------------------------- bad edits


@pytest.mark.parametrize("start,end", [(5, 3), (-1, 0)])
def test_a_reversed_or_negative_range_is_refused(start: int, end: int) -> None:
    with pytest.raises(ValueError, match="bad edit range"):
        TextEdit(start, end, "x")


def test_an_edit_past_the_end_is_refused_and_leaves_the_document_unchanged(tokenizer: CodeTokenizer) -> None:
    doc = TokenizedText.encode(FUNCTION, tokenizer)
    before = TokenizedText(doc.text, list(doc.ids), list(doc.starts))
    n = len(FUNCTION)
    for edits in ([TextEdit(0, n + 1, "")], [TextEdit(n + 1, n + 1, "x")],
                  [TextEdit(0, 3, ""), TextEdit(n - 3, n - 1, "x")]):  # the second edit fits only the old text
        with pytest.raises(ValueError, match="ends past the text"):
            apply_edits(doc, edits, tokenizer)
        assert doc == before
    with pytest.raises(ValueError, match="ends past the text"):
        apply_edit(doc, TextEdit(n, n + 1, "x"), tokenizer)
    assert doc == before
