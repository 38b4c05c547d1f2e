"""N-gram tables: lookups against brute-force counts, the overlay, and the cached base table."""

from __future__ import annotations

import functools
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest

from inference import ngram as ngram_module
from inference.ngram import ORDERS, NgramModel, load_base_table, tokenizer_hash
from inference.tokenizer import tokenizer_from_metadata, tokenizer_metadata, train_tiny_vocab
from tests.fixtures import CPYTHON

VOCAB = 40
WEIGHTS = (0.01, 0.04, 0.15)


def _corpus(seed: int, n_docs: int = 4, length: int = 300) -> list[list[int]]:
    """Skewed random token streams (small alphabet, so contexts repeat) with a few repeated phrases."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n_docs):
        ids = list(rng.zipf(1.6, length) % VOCAB)
        ids[50:56] = [3, 1, 4, 1, 5, 9]
        ids[150:156] = [3, 1, 4, 1, 5, 2]
        docs.append([int(i) for i in ids])
    return docs


def _brute_force(docs: list[list[int]], weighted: list[tuple[list[list[int]], float]] | None = None):
    """p_ng(v | ctx) from dict counts: Σ_n λ_n c(ctx, v) / c(ctx), orders with an unseen context skipped."""
    counts = {n: defaultdict(Counter) for n in ORDERS}
    for group, w in weighted or [(docs, 1.0)]:
        for doc in group:
            for n in ORDERS:
                for i in range(len(doc) - n + 1):
                    counts[n][tuple(doc[i:i + n - 1])][doc[i + n - 1]] += w

    def probs(context: list[int], candidates: list[int]) -> np.ndarray:
        out = np.zeros(len(candidates))
        for n, lam in zip(ORDERS, WEIGHTS):
            if len(context) < n - 1:
                continue
            row = counts[n].get(tuple(context[len(context) - n + 1:]))
            if row:
                total = sum(row.values())
                out += [lam * row[v] / total for v in candidates]
        return out

    return probs


def test_lookups_match_brute_force_counts():
    docs = _corpus(0)
    model = NgramModel.from_sequences(VOCAB, docs, weights=WEIGHTS)
    expected = _brute_force(docs)
    rng = np.random.default_rng(1)
    candidates = list(range(VOCAB))
    contexts = [docs[0][i - 3:i] for i in rng.integers(3, 300, 40)] + [[3, 1, 4, 1], [1, 5], [7], []]
    contexts += [list(rng.integers(0, VOCAB, 3)) for _ in range(20)]  # mostly unseen 3-token contexts
    for context in contexts:
        assert np.allclose(model.probs(context, np.array(candidates)), expected(context, candidates)), context


def test_probs_many_scores_each_context_with_its_own_candidates():
    docs = _corpus(2)
    model = NgramModel.from_sequences(VOCAB, docs, weights=WEIGHTS)
    contexts = [[3, 1, 4, 1], [9], [1, 4]]
    candidates = np.array([[5, 2, 0], [1, 2, 3], [1, 7, 8]])
    many = model.probs_many(contexts, candidates)
    for i, context in enumerate(contexts):
        assert np.allclose(many[i], model.probs(context, candidates[i]))
    assert many[0, 0] > 0 and many[0, 1] > 0  # both continuations of the repeated phrase were seen


def test_unseen_context_gives_zero_and_short_contexts_use_low_orders():
    model = NgramModel.from_sequences(VOCAB, [[1, 2, 3, 4]], weights=WEIGHTS)
    assert not model.probs([9, 9, 9], np.array([1, 2, 3, 4])).any()
    # [3] -> 4 seen once: only the bigram order applies to a 1-token context
    assert model.probs([3], np.array([4]))[0] == pytest.approx(WEIGHTS[0])
    assert model.probs([2, 3], np.array([4]))[0] == pytest.approx(WEIGHTS[0] + WEIGHTS[1])
    assert model.probs([1, 2, 3], np.array([4]))[0] == pytest.approx(sum(WEIGHTS))


def test_overlay_adds_and_removes_document_counts():
    base_docs, doc_a, doc_b = _corpus(3), _corpus(4, 1)[0], _corpus(5, 1)[0]
    model = NgramModel.from_sequences(VOCAB, base_docs, weights=WEIGHTS)
    candidates = np.arange(VOCAB)
    contexts = [doc_a[i - 3:i] for i in range(3, 300, 7)] + [doc_b[i - 3:i] for i in range(3, 300, 11)]
    base_only = [model.probs(c, candidates) for c in contexts]

    model.add_document("a.py", doc_a)
    model.add_document("b.py", doc_b)
    both = _brute_force(base_docs + [doc_a, doc_b])
    for c in contexts:
        assert np.allclose(model.probs(c, candidates), both(c, list(candidates)))

    model.add_document("a.py", doc_b)  # a new version replaces the old counts
    replaced = _brute_force(base_docs + [doc_b, doc_b])
    for c in contexts:
        assert np.allclose(model.probs(c, candidates), replaced(c, list(candidates)))

    model.remove_document("a.py")
    model.remove_document("b.py")
    model.remove_document("never-added.py")
    assert model.documents == []
    for c, before in zip(contexts, base_only):
        assert np.allclose(model.probs(c, candidates), before)
    assert all(model.overlay[n].keys.size == 0 and model.overlay[n].contexts.size == 0 for n in ORDERS)


def test_overlay_weight_scales_the_documents_counts():
    base_docs, doc = _corpus(6), _corpus(7, 1)[0]
    model = NgramModel.from_sequences(VOCAB, base_docs, weights=WEIGHTS, overlay_weight=5.0)
    model.add_document("open.py", doc)
    expected = _brute_force([], [(base_docs, 1.0), ([doc], 5.0)])
    for i in range(3, 300, 13):
        assert np.allclose(model.probs(doc[i - 3:i], np.arange(VOCAB)), expected(doc[i - 3:i], list(range(VOCAB))))


def use_fixture_sources(monkeypatch: pytest.MonkeyPatch) -> None:
    """Base tables count the fixtures' library files, chosen as the host's standard library would be."""
    monkeypatch.setattr(ngram_module, "stdlib_sources", functools.partial(ngram_module.stdlib_sources, root=CPYTHON))


def _other_tokenizer():
    """A second byte-level BPE with a different vocabulary than the tiny model's."""
    tokens, types, merges = train_tiny_vocab(["def f(x):\n    return x + 1\n" * 20], vocab_size=300)
    metadata = tokenizer_metadata(tokens, types, merges, "qwen2", {"eos": 0})
    return tokenizer_from_metadata({key: value.value for key, value in metadata.items()})


def test_base_table_round_trips_through_the_cache(tiny_model, tmp_path: Path, monkeypatch):
    use_fixture_sources(monkeypatch)
    tok = tiny_model.tokenizer
    built = NgramModel.for_tokenizer(tok, tmp_path, budget_bytes=60_000)
    files = list((tmp_path / "ngram").glob("*.npz"))
    assert len(files) == 1 and files[0].name.startswith(tokenizer_hash(tok)[:16])
    assert built.base[4].keys.size > 1000  # real code was counted

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the cached table should have been loaded")

    monkeypatch.setattr(ngram_module, "stdlib_sources", no_rebuild)
    loaded = NgramModel.for_tokenizer(tok, tmp_path, budget_bytes=60_000)
    for n in ORDERS:
        assert np.array_equal(loaded.base[n].keys, built.base[n].keys)
        assert np.array_equal(loaded.base[n].counts, built.base[n].counts)
        assert np.array_equal(loaded.base[n].totals, built.base[n].totals)
    ids = tok.encode("def dedent(text):\n    return text")
    assert np.allclose(loaded.probs(ids, np.arange(tok.vocab_size)), built.probs(ids, np.arange(tok.vocab_size)))


def test_base_table_is_rebuilt_for_another_tokenizer(tiny_model, tmp_path: Path, monkeypatch):
    use_fixture_sources(monkeypatch)
    tok, other = tiny_model.tokenizer, _other_tokenizer()
    assert tokenizer_hash(tok) != tokenizer_hash(other)
    NgramModel.for_tokenizer(tok, tmp_path, budget_bytes=30_000)
    path = next((tmp_path / "ngram").glob("*.npz"))
    assert load_base_table(path, tokenizer_hash(other), 30_000) is None  # never read for the wrong vocabulary
    assert load_base_table(path, tokenizer_hash(tok), 31_000) is None  # nor for another corpus budget
    model = NgramModel.for_tokenizer(other, tmp_path, budget_bytes=30_000)
    assert len(list((tmp_path / "ngram").glob("*.npz"))) == 2
    assert model.vocab_size == other.vocab_size and model.base[2].keys.size > 0
    top_token = int(model.base[2].keys.max() & ((1 << model.bits) - 1))
    assert top_token < other.vocab_size


def test_a_damaged_cache_file_is_rebuilt(tiny_model, tmp_path: Path, monkeypatch):
    use_fixture_sources(monkeypatch)
    tok = tiny_model.tokenizer
    NgramModel.for_tokenizer(tok, tmp_path, budget_bytes=30_000)
    path = next((tmp_path / "ngram").glob("*.npz"))
    path.write_bytes(b"not an npz")
    model = NgramModel.for_tokenizer(tok, tmp_path, budget_bytes=30_000)
    assert model.base[2].keys.size > 0
    assert load_base_table(path, tokenizer_hash(tok), 30_000) is not None
