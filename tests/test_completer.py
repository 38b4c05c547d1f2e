"""Completer: documents in, drafts out, from cached rows; idle work; settings."""

from __future__ import annotations

import dataclasses
import stat

import numpy as np
import pytest

from inference.generate import Draft, GenerationResult, decode_one_token, first_line
import lsp_server.completer as completer_module
from kv_cache.edits import TextEdit
from kv_cache import persist
from kv_cache.buffer_cache import BufferCache
from lsp_server.completer import Completer, uses_suffix
from lsp_server.completion import DRAFT_METHODS, CacheSettings, CompletionOptions
from tests.decoding import fim, start
from tests.fixtures import cpython_files, cpython_text, never_ending

SOURCE = cpython_text("textwrap.py")[:3000]
URI = "file:///w/textwrap.py"


@pytest.fixture
def completer(tiny_model_fp32) -> Completer:
    return Completer(tiny_model_fp32, cache=CacheSettings(budget_mb=64))


def test_completion_at_end_of_document_follows_a_plain_fim_prompt_step_by_step(completer, tiny_model_fp32):
    """Nothing after the cursor: the context borrows no suffix row, so each step's logits are the plain
    prompt's (to float rounding: the document's rows keep the healed token hidden among them). Compared
    along the plain greedy path, so no near-tie of the random model decides the outcome."""
    text = SOURCE + "def indent_all(lines):\n    "
    completer.open(URI, text)
    model = tiny_model_fp32
    prompt = fim(model.tokenizer, text, "")
    completer.docs[URI].ensure_rows()  # all of the window, as idle steps build it (a cold request sees less)
    ctx = completer.docs[URI].context(len(text), room=16)
    assert ctx.healed == prompt.healed
    plain, plain_logits = start(model, prompt.ids, 16)
    logits = ctx.logits
    for _ in range(12):
        np.testing.assert_allclose(logits, plain_logits, rtol=0, atol=1e-4)
        token = int(np.argmax(plain_logits))
        logits = decode_one_token(model.decoder, ctx.cache, token)
        plain_logits = decode_one_token(model.decoder, plain, token)


def test_idle_steps_encode_the_document_then_refresh_edits(completer):
    completer.open(URI, SOURCE)
    steps = 0
    while completer.refresh_step():
        steps += 1
    assert steps >= 2  # a 3,000-character file takes several bounded chunks
    assert completer.stats()["cached_tokens"] > 500
    completer.change(URI, [TextEdit(10, 10, "import os\n")])
    assert completer.stats()["stale_rows"] > 0
    while completer.refresh_step():
        pass
    assert completer.stats()["stale_rows"] == 0


def test_refresh_policy_off_leaves_stale_rows(completer):
    completer.configure(refresh="off")
    completer.open(URI, SOURCE)
    while completer.refresh_step():
        pass
    completer.change(URI, [TextEdit(10, 10, "import os\n")])
    assert not completer.refresh_step()
    assert completer.stats()["stale_rows"] > 0


def test_cancelled_request_returns_quickly_and_says_so(tiny_model_fp32):
    """Cancelled after the first decoding step, which cannot finish any draft: the model has no end-of-text, and
    at the end of a line of code outside brackets a block ends only at a later line, which takes a second token."""
    model = dataclasses.replace(tiny_model_fp32, tokenizer=never_ending(tiny_model_fp32.tokenizer))
    completer = Completer(model, cache=CacheSettings(budget_mb=64))
    completer.open(URI, SOURCE)
    calls = []

    def cancelled(text: str) -> bool:
        calls.append(text)
        return len(calls) > 1  # the first call is before decoding starts

    offset = SOURCE.index("ord(' '))\n") + len("ord(' '))")
    outcome = completer.complete(URI, offset, CompletionOptions(max_tokens=50, scope="multi"), cancelled)
    assert outcome.cancelled
    assert len(calls) <= 3


def test_reuse_ratio_counts_borrowed_rows(completer):
    completer.open(URI, SOURCE)
    completer.complete(URI, 1500, CompletionOptions(max_tokens=2))
    stats = completer.stats()
    assert stats["reuse_ratio"] > 0.9 and stats["completions"] == 1


def test_unknown_document_and_bad_settings_are_errors(completer):
    with pytest.raises(KeyError, match="not open"):
        completer.complete("file:///nope.py", 0, CompletionOptions())
    with pytest.raises(ValueError, match="cache mode"):
        completer.configure(mode="fast")
    with pytest.raises(ValueError, match="refresh"):
        completer.configure(refresh="sometimes")
    with pytest.raises(ValueError, match="saved buffers"):
        completer.configure(persist_max_mb=0)
    with pytest.raises(ValueError, match="idle rows"):
        completer.configure(idle_rows="int3")
    assert completer.cache == CacheSettings(budget_mb=64)  # a refused change changes nothing
    completer.open(URI, "x = 1\n")
    with pytest.raises(ValueError):
        completer.change(URI, [TextEdit(3, 40, "")])
    assert completer.text(URI) == "x = 1\n"


def test_closed_documents_free_their_rows(completer):
    completer.open(URI, SOURCE)
    completer.complete(URI, 100, CompletionOptions(max_tokens=1))
    completer.close(URI)
    assert completer.stats()["cached_tokens"] == 0 and completer.stats()["documents"] == 0


@pytest.mark.parametrize(("layout", "text", "offset", "expected"), [
    ("auto", "x = f(\n", 6, False),  # end of line: prefix layout
    ("auto", "x = f()\n", 6, True),  # code after the cursor: FIM
    ("auto", "x = f(   \r\ny", 6, False),
    ("auto", "x = 1", 5, False),
    ("fim", "x = 1\n", 5, True),
    ("prefix", "x = f()\n", 6, False),
])
def test_layout_choice(layout, text, offset, expected):
    assert uses_suffix(layout, text, offset) is expected


def test_reopened_document_restores_its_rows_from_disk(tiny_model_fp32, tmp_path):
    completer = Completer(tiny_model_fp32, cache=CacheSettings(budget_mb=64), persist_dir=tmp_path)
    completer.open(URI, SOURCE)
    while completer.refresh_step():
        pass
    first = completer.complete(URI, 1500, CompletionOptions(max_tokens=4))
    completer.close(URI)
    completer.open(URI, SOURCE)
    assert completer.refresh_step()  # one step reads the rows back
    assert not completer.refresh_step()  # and nothing is left to encode
    assert completer.stats()["restores"] == 1 and completer.stats()["cached_tokens"] > 500
    again = completer.complete(URI, 1500, CompletionOptions(max_tokens=4))
    assert [s.text for s in again.suggestions] == [s.text for s in first.suggestions]


@pytest.mark.parametrize("method", DRAFT_METHODS)
def test_several_drafts_are_distinct_and_ranked(completer, method):
    completer.open(URI, SOURCE)
    outcome = completer.complete(URI, 1500, CompletionOptions(max_tokens=24, drafts=3, scope="single",
                                                              draft_method=method))
    texts = [s.text for s in outcome.suggestions]
    assert len(texts) <= 3 and len(set(texts)) == len(texts)
    scores = [s.score for s in outcome.suggestions]
    if method != "forked":  # forked decoding keeps greedy's draft first, whatever the forks' mean scores
        assert scores == sorted(scores, reverse=True)
    assert all(first_line(t)[1] is False for t in texts)  # blank lines before the code are kept, none after it


@pytest.mark.parametrize("method", DRAFT_METHODS)
def test_the_draft_method_option_chooses_the_decoder(completer, monkeypatch, method):
    """k drafts go to the decoder the request names; one draft is always the greedy (speculative) path."""
    called = []
    for name in ("superposed_decode", "beam_decode", "sampled_decode", "forked_decode", "speculative_decode"):
        monkeypatch.setattr(completer_module, name, lambda *args, name=name, **kwargs: called.append(name) or
                            GenerationResult([Draft("x", [1], -1.0)]))
    completer.open(URI, "x = 1\n")
    completer.complete(URI, 6, CompletionOptions(drafts=3, draft_method=method))
    completer.complete(URI, 6, CompletionOptions(drafts=1, draft_method=method))
    assert called == [f"{method}_decode", "speculative_decode"]


def test_idle_work_builds_the_ngram_model_once_a_superposed_request_wants_it(completer, monkeypatch):
    """Only superposed decoding re-scores with the n-gram model, so only its requests cost the build."""
    built = []
    monkeypatch.setattr(completer, "_build_ngram", lambda: built.append(1) or setattr(completer, "ngram", object()))
    completer.open(URI, SOURCE)
    completer.complete(URI, 1500, CompletionOptions(max_tokens=2, drafts=3, draft_method="beam"))
    while completer.refresh_step():
        pass
    assert built == []
    completer.complete(URI, 1500, CompletionOptions(max_tokens=2, drafts=3, draft_method="superposed"))
    while completer.refresh_step():
        pass
    assert built == [1]


def test_drafts_that_finish_to_the_same_first_line_are_one_suggestion(completer, monkeypatch):
    """finish() drops trailing blanks and what the suffix provides, so distinct drafts can become equal; and
    drafts that differ only after their first line of code would look the same while cycling."""
    completer.open(URI, "x = 1\n")
    drafts = [Draft("foo", [1], -1.0), Draft("foo  ", [2], -2.0), Draft("  ", [3], -3.0), Draft("bar", [4], -4.0),
              Draft("\nfoo\nbaz", [5], -5.0), Draft("bar\n    qux", [6], -6.0)]
    monkeypatch.setattr(completer, "_decode", lambda *args: GenerationResult(drafts))
    outcome = completer.complete(URI, len("x = 1\n"), CompletionOptions(drafts=3))
    assert [(s.text, s.score) for s in outcome.suggestions] == [("foo", -1.0), ("bar", -4.0)]


def test_token_recycling_table_survives_a_restart(tiny_model_fp32, tmp_path):
    completer = Completer(tiny_model_fp32, cache=CacheSettings(budget_mb=64), persist_dir=tmp_path)
    completer.open(URI, SOURCE)
    completer.complete(URI, 1500, CompletionOptions(max_tokens=8, drafts=1, scope="multi"))
    completer.close(URI)  # saves the table
    assert (completer.recycler.successors >= 0).any()  # the decode taught it something
    again = Completer(tiny_model_fp32, cache=CacheSettings(budget_mb=64), persist_dir=tmp_path)
    assert (again.recycler.successors == completer.recycler.successors).all()


def test_idle_work_and_statistics_leave_the_document_in_use_most_recent(completer):
    completer.open("file:///w/a.py", SOURCE)
    completer.open("file:///w/b.py", SOURCE[:1500])
    while completer.refresh_step():
        pass
    completer.change("file:///w/b.py", [TextEdit(10, 10, "import os\n")])  # leaves b with stale rows
    completer.complete("file:///w/a.py", 1000, CompletionOptions(max_tokens=2, drafts=1))
    completer.stats()
    assert completer.store.peek("file:///w/b.py").stale.any()
    while completer.refresh_step():  # refreshing b's rows is not using b
        assert completer.store.lru_order()[-1] == "file:///w/a.py"
    assert not completer.store.peek("file:///w/b.py").stale.any()


CLOSED_DOCUMENTS = 200
DOC_CHARS = 600
FILES_UNDER_CAP = 8  # about how many documents' files the cap holds


def _distinct_texts(n: int) -> list[str]:
    """`n` different pieces of the fixture sources, DOC_CHARS each."""
    texts = []
    for path in cpython_files():
        text = path.read_bytes().decode("utf-8", errors="replace")  # two are in legacy encodings
        texts += [text[i:i + DOC_CHARS] for i in range(0, len(text) - DOC_CHARS + 1, DOC_CHARS)]
    assert len(set(texts[:n])) == n
    return texts[:n]


def _spkv_sizes(directory) -> dict:
    return {p: p.stat().st_size for p in directory.glob("*" + persist.SUFFIX)}


def _open_encode_close(completer: Completer, uri: str, text: str):
    """Open `uri`, let idle steps encode it, close it; the file its rows are saved to."""
    completer.open(uri, text)
    while completer.refresh_step():
        pass
    ids = completer.store.peek(uri).ids
    completer.close(uri)
    return persist.cache_path(completer.persist_dir, completer.model.model_dir.name, ids)


def test_two_hundred_closed_documents_keep_their_saved_buffers_within_the_cap(tiny_model_fp32, tmp_path):
    """Each document is encoded by idle steps and closed, which saves its rows. After every close: the files
    take at most the cap, they are the most recently written ones (as many as fit), and only the user can
    read them."""
    texts = _distinct_texts(CLOSED_DOCUMENTS)
    probe = BufferCache(tiny_model_fp32.decoder)
    probe.encode(tiny_model_fp32.tokenizer.encode(texts[0]))
    cap = FILES_UNDER_CAP * persist.save(probe, tmp_path / "probe", "probe").stat().st_size
    directory = tmp_path / "buffers"
    completer = Completer(tiny_model_fp32, cache=CacheSettings(budget_mb=64, persist_max_mb=cap / 2**20),
                          persist_dir=directory)
    written, sizes = [], {}  # the closed documents' files, oldest first; their sizes when written
    for i, text in enumerate(texts):
        path = _open_encode_close(completer, f"file:///w/doc{i}.py", text)
        on_disk = _spkv_sizes(directory)
        assert path in on_disk, f"the file of document {i}, just closed, is gone"
        written.append(path)
        sizes[path] = on_disk[path]
        assert sum(on_disk.values()) <= cap
        newest, total = set(), 0
        for p in reversed(written):  # the most recent files, as many as fit under the cap
            if total + sizes[p] > cap:
                break
            newest.add(p)
            total += sizes[p]
        assert set(on_disk) == newest, f"after document {i}"
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
        assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in directory.iterdir())
    assert len(newest) < len(written)  # the cap did delete files


def test_a_lowered_cap_on_saved_buffers_applies_at_once(tiny_model_fp32, tmp_path):
    """A smaller persistMaxMb deletes the least recently used files now, not at the next close."""
    completer = Completer(tiny_model_fp32, cache=CacheSettings(budget_mb=64), persist_dir=tmp_path)
    for i, text in enumerate(_distinct_texts(3)):
        last = _open_encode_close(completer, f"file:///w/doc{i}.py", text)
    assert len(_spkv_sizes(tmp_path)) == 3
    completer.configure(persist_max_mb=last.stat().st_size / 2**20)
    assert list(_spkv_sizes(tmp_path)) == [last]
    assert completer.stats()["persist_max_bytes"] == last.stat().st_size
