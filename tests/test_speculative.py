"""Speculative decoding: token-identical to greedy, tree verification bit-identical to sequential steps."""

from __future__ import annotations

import numpy as np
import pytest

from inference import speculative
from inference.drafting import Recycler, lookup_continuations, top_tokens
from inference.generate import SINGLE_LINE, DecodeCache, DecodeRequest, decode_one_token, greedy_decode, prefill, \
    vocabulary
from inference.prompt import Prompt
from inference.runtime import NEG_INF
from inference.speculative import DraftTree, Drafter, forked_decode, softmax_lanes, speculative_decode, verify_tree
from tests.decoding import before_cursor, fim, start, start_past_hidden_rows
from tests.fixtures import cpython_text, never_ending


def _snippets(count: int, seed: int = 0) -> list[tuple[str, str]]:
    """(prefix, suffix) pairs cut from real library files at random points (mid-line and at line starts)."""
    rng = np.random.default_rng(seed)
    texts = [cpython_text(name) for name in ("argparse.py", "csv.py", "pprint.py", "calendar.py", "shlex.py")]
    out = []
    for i in range(count):
        text = texts[i % len(texts)]
        cut = int(rng.integers(200, len(text) - 200))
        if i % 2:
            cut = text.rfind("\n", 0, cut) + 1  # a line start, as after pressing Enter
        start = max(0, cut - int(rng.integers(20, 400)))
        out.append((text[start:cut], text[cut:cut + int(rng.integers(0, 200))]))
    return out


def _sequential(decoder, cache: DecodeCache, tokens: list[int]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Logits [n, vocab] and the new rows' keys + values per layer [kv, n, hd] after feeding `tokens` one
    forward each; the cache is rewound after (its rows [0, length) are never written)."""
    length, position = cache.length, cache.position
    logits = [decode_one_token(decoder, cache, token) for token in tokens]
    rows = [buf[:, length:cache.length].copy() for buf in cache.keys + cache.values]
    cache.length, cache.position = length, position
    return np.array(logits), rows


def _random_tree(rng: np.random.Generator, lanes: int, vocab: int, size: int) -> DraftTree:
    tree = DraftTree.rooted_at(int(rng.integers(vocab)), lanes)
    while len(tree) < size:
        tree.add(int(rng.integers(len(tree))), int(rng.integers(vocab)))
    return tree


def _path(tree: DraftTree, node: int) -> list[int]:
    path = []
    while node >= 0:
        path.append(node)
        node = tree.parents[node]
    return path[::-1]


# -- the draft tree ------------------------------------------------------------------------------------------


def test_tree_mask_lets_each_node_see_the_past_its_ancestors_and_itself():
    tree = DraftTree.rooted_at(10, lanes=8)
    a = tree.add(0, 11)
    b = tree.add(0, 12)  # sibling of a: same depth, so the next slot with slot = 1 (mod 8)
    a2 = tree.add(a, 13)
    b2 = tree.add(b, 14)
    assert tree.slots == [0, 1, 9, 2, 10] and tree.width == 11
    ids, positions, bias = tree.feed(past=5, position=100)
    assert bias.shape == (11, 5 + 11) and ids.shape == positions.shape == (11,)
    visible = bias == 0.0
    for node, ancestors in {0: [0], a: [0, a], b: [0, b], a2: [0, a, a2], b2: [0, b, b2]}.items():
        slot = tree.slots[node]
        assert visible[slot, :5].all()  # the whole past
        assert set(np.flatnonzero(visible[slot, 5:])) == {tree.slots[n] for n in ancestors}
        assert ids[slot] == tree.tokens[node] and positions[slot] == 100 + tree.depths[node]
    for pad in set(range(11)) - set(tree.slots):  # padding sees only itself and is seen by no node
        assert np.flatnonzero(visible[pad]).tolist() == [5 + pad]
        assert not visible[tree.slots, 5 + pad].any()
    assert (bias[~visible] == NEG_INF).all()


def test_tree_slots_keep_depth_modulo_lanes_and_follow_parents():
    rng = np.random.default_rng(0)
    for lanes in (1, 4, 8, 16):
        tree = _random_tree(rng, lanes, 100, 20)
        assert len(set(tree.slots)) == len(tree)
        for node in range(1, len(tree)):
            assert tree.slots[node] % lanes == tree.depths[node] % lanes
            assert tree.slots[node] > tree.slots[tree.parents[node]]


def test_equal_guesses_share_one_node():
    tree = DraftTree.rooted_at(1, lanes=8)
    assert tree.add(0, 5) == tree.add(0, 5) and len(tree) == 2


def test_softmax_lanes_is_a_simd_width():
    assert softmax_lanes() in (8, 16)


@pytest.mark.parametrize("quantization", ["q8", "fp32"])
def test_tree_forward_is_bit_identical_to_sequential_steps(quantization, tiny_gguf, tiny_cache):
    """The premise of losslessness: every node's logits and K/V equal feeding its path one token at a time,
    also over a cache with hidden rows (a document's rows the prompt leaves out)."""
    from inference.model_store import load_model

    model = load_model(str(tiny_gguf), quantization, cache=tiny_cache, progress=False)
    decoder, vocab = model.decoder, model.config.vocab_size
    rng = np.random.default_rng(1)
    for past, hidden in ((3, (0, 0)), (37, (0, 0)), (37, (10, 20)), (530, (100, 300))):
        # 530: the attention's value matmul runs over more than one 512-row block
        cache, _ = start(model, [int(t) for t in rng.integers(0, vocab, past)], room=32)
        cache.hide(*hidden)
        tree = _random_tree(rng, softmax_lanes(), vocab, int(rng.integers(6, 14)))
        step = verify_tree(decoder, cache, tree)
        assert cache.length == past  # nothing written: the caller keeps the accepted rows
        for node in range(len(tree)):
            path = _path(tree, node)
            expected, rows = _sequential(decoder, cache, [tree.tokens[n] for n in path])
            assert np.array_equal(step.logits[node], expected[-1])
            slots = [tree.slots[n] for n in path]
            for got, want in zip(step.keys + step.values, rows):
                assert np.array_equal(got[:, slots], want)


# -- drafting ------------------------------------------------------------------------------------------------


def test_prompt_lookup_prefers_the_longest_then_the_most_recent_match():
    context = np.array([1, 2, 3, 7, 8, 5, 3, 9, 9, 1, 2, 3, 6, 6, 2, 3])  # ends with [2, 3]
    found = lookup_continuations(context, [], length=2, count=3)
    # [2, 3] occurs at 10 (-> 6, 6) and 1 (-> 7, 8); the longest suffix with a match is [2, 3]
    assert [(c.tokens, c.matched) for c in found[:2]] == [([6, 6], 2), ([7, 8], 2)]
    assert found[2].matched == 1 and found[2].tokens[0] not in (6, 7)  # then [3] alone, a new first token


def test_prompt_lookup_searches_other_buffers():
    found = lookup_continuations(np.array([4, 5, 6]), [np.array([9, 5, 6, 42, 43])], length=3, count=1)
    assert found[0].tokens == [42, 43] and found[0].matched == 2


def test_top_tokens_orders_the_largest_logits_first():
    logits = np.random.default_rng(0).standard_normal((3, 5000)).astype(np.float32) * 4
    logits[1] /= 8  # a flat row: most of it is near the maximum
    expected = np.argsort(-logits, axis=1, kind="stable")[:, :8]
    assert np.array_equal(top_tokens(logits, 8), expected)


def test_recycler_records_each_tokens_top_successors():
    recycler = Recycler(vocab_size=10, top_k=2)
    logits = np.zeros((2, 10), np.float32)
    logits[0, [4, 7]] = [2.0, 3.0]
    logits[1, [1, 2]] = [5.0, 1.0]
    recycler.update(np.array([3, 8]), logits)
    assert recycler.successors[3].tolist() == [7, 4] and recycler.successors[8].tolist() == [1, 2]
    assert (recycler.successors[0] == -1).all()  # never seen: no guess


def test_recycler_survives_a_restart(tmp_path):
    recycler = Recycler(vocab_size=151_936)
    assert recycler.successors.nbytes <= 5 * 2**20  # [vocab, 8] int32: a few MB for Qwen's vocabulary
    recycler.successors[123] = np.arange(8)
    recycler.save(tmp_path / "recycler.npy")
    loaded = Recycler.load(tmp_path / "recycler.npy", vocab_size=151_936)
    assert np.array_equal(loaded.successors, recycler.successors)
    with pytest.raises(ValueError, match="vocabulary"):
        Recycler.load(tmp_path / "recycler.npy", vocab_size=512)


# -- speculative decoding equals greedy ----------------------------------------------------------------------


def _assert_same(spec, greedy) -> None:
    assert spec.drafts[0].token_ids == greedy.drafts[0].token_ids
    assert spec.drafts[0].text == greedy.drafts[0].text
    assert spec.drafts[0].logprob == greedy.drafts[0].logprob  # bit-identical logits, not just argmax


def _prefilled(model, prompt: Prompt, layout: int, room: int = 64) -> tuple[DecodeCache, np.ndarray]:
    """A fresh cache holding the prompt and the logits after it. Layout 0: prefilled in one go; 1: its second
    half continues the first with a gap in positions; 2: its second half follows hidden rows (of itself)."""
    decoder, ids = model.decoder, prompt.ids
    if layout == 2:
        return start_past_hidden_rows(model, ids, ids[len(ids) // 2:], room)
    cache = DecodeCache.empty(model.config, len(ids) + room)
    if layout == 0:
        return cache, prefill(decoder, cache, ids)
    prefill(decoder, cache, ids[:len(ids) // 2])
    cache.position += 7
    return cache, prefill(decoder, cache, ids[len(ids) // 2:])


def _decode(model, tok, prompt: Prompt, request: DecodeRequest, drafter: Drafter | None = None):
    """Greedy (no drafter) or speculative decoding of `prompt` from a fresh cache, with `tok`'s stop tokens."""
    cache, logits = start(model, prompt.ids, room=request.max_tokens + 16)
    if drafter is None:
        return greedy_decode(model.decoder, vocabulary(tok), cache, logits, request)
    return speculative_decode(model.decoder, vocabulary(tok), cache, logits, request, drafter)


def test_speculative_output_equals_greedy_on_200_real_prompts(tiny_model):
    """Healed and unhealed FIM prompts from real files, single-line and unbounded stopping, in caches that hold
    the prompt alone, with a gap in positions or after hidden rows, drafts from the code before the cursor,
    other buffers and a recycler shared across prompts."""
    decoder, tok = tiny_model.decoder, tiny_model.tokenizer
    vocab = vocabulary(tok)
    recycler = Recycler(tiny_model.config.vocab_size)
    snippets = _snippets(200)
    accepted = healed = 0
    for i, (prefix, suffix) in enumerate(snippets):
        prompt = fim(tok, prefix, suffix, heal=i % 3 != 0)
        healed += bool(prompt.healed)
        request = DecodeRequest(int(12 + i % 13), SINGLE_LINE if i % 2 else None, prompt.healed)
        layout = (0, 1, 0, 2)[i % 4]
        greedy = greedy_decode(decoder, vocab, *_prefilled(tiny_model, prompt, layout), request)
        # drafts: other buffers (sometimes holding the answer itself, so long paths get accepted)
        context = before_cursor(tok, prompt)
        corpus = [tok.encode(snippets[(i + 1) % len(snippets)][0])]
        if i % 5 == 2:
            corpus.append([*context[-3:], *greedy.drafts[0].token_ids])
        drafter = Drafter(recycler, context, corpus, tree_nodes=(2, 4, 8, 12, 16)[i % 5],
                          token_cost=(0.0, 0.28)[i % 2])
        spec = speculative_decode(decoder, vocab, *_prefilled(tiny_model, prompt, layout), request, drafter)
        _assert_same(spec, greedy)
        accepted += spec.timings["accepted_drafts"]
    assert healed > 100
    assert accepted > 400  # drafts were really taken, not all rejected


def test_decoding_writes_in_place_and_never_changes_the_rows_it_was_lent(tiny_model):
    """The rows [0, length) the decode starts from are bit-identical after it, its own rows went into the same
    buffers after them, and they are the rows greedy decoding writes."""
    decoder, tok = tiny_model.decoder, never_ending(tiny_model.tokenizer)
    vocab = vocabulary(tok)
    ids = tok.encode(cpython_text("csv.py")[:1500])
    request = DecodeRequest(30, None)

    def lent() -> tuple[DecodeCache, np.ndarray]:  # a prompt that continues a cache of the document's head
        cache, _ = start(tiny_model, ids[:-5], room=64)
        return cache, prefill(decoder, cache, ids[-5:])

    greedy_cache, greedy_logits = lent()
    greedy = greedy_decode(decoder, vocab, greedy_cache, greedy_logits, request)
    cache, logits = lent()
    length, position = cache.length, cache.position
    buffers = cache.keys + cache.values
    before = [buf[:, :length].copy() for buf in buffers]
    corpus = [ids, [*ids[-3:], *greedy.drafts[0].token_ids]]  # holds the answer: drafts get accepted
    result = speculative_decode(decoder, vocab, cache, logits, request,
                                Drafter(Recycler(tiny_model.config.vocab_size), ids, corpus))
    _assert_same(result, greedy)
    assert len(greedy.drafts[0].token_ids) == 30 and result.timings["accepted_drafts"] > 0
    assert all(a is b for a, b in zip(cache.keys + cache.values, buffers))
    assert all(np.array_equal(buf[:, :length], old) for buf, old in zip(buffers, before))
    written = greedy_cache.length  # greedy feeds every token but the last
    assert written == length + 29 and cache.length >= written
    assert cache.position - cache.length == position - length
    assert all(np.array_equal(a[:, length:written], b[:, length:written])
               for a, b in zip(buffers, greedy_cache.keys + greedy_cache.values))


def test_a_correct_draft_needs_few_forwards_when_verifying_is_cheap(tiny_model):
    tok = never_ending(tiny_model.tokenizer)
    prompt = fim(tok, cpython_text("pprint.py")[:800], "", heal=False)
    request = DecodeRequest(40, None)
    greedy = _decode(tiny_model, tok, prompt, request)
    answer = greedy.drafts[0].token_ids
    assert len(answer) == 40  # no stop token and no stop rule: always the whole budget
    context = before_cursor(tok, prompt)
    corpus = [[*context[-4:], *answer]]
    recycler = Recycler(tiny_model.config.vocab_size)
    free = _decode(tiny_model, tok, prompt, request, Drafter(recycler, context, corpus, tree_nodes=8, token_cost=0.0))
    _assert_same(free, greedy)
    assert free.timings["tree_steps"] <= 40 / 6
    # when each verified token costs as much as a step, drafting stops paying: one token per forward
    costly = _decode(tiny_model, tok, prompt, request, Drafter(recycler, context, corpus, tree_nodes=8,
                                                                token_cost=1.0))
    _assert_same(costly, greedy)
    assert costly.timings["tree_tokens"] == costly.timings["tree_steps"] == 39


def test_cancellation_returns_the_output_so_far(tiny_model):
    """A decode cancelled before its 4th forward returns a strict prefix of the uncancelled output; each check
    is shown the text decoded so far."""
    tok = never_ending(tiny_model.tokenizer)
    prompt = fim(tok, cpython_text("calendar.py")[:1200], "")
    greedy = _decode(tiny_model, tok, prompt, DecodeRequest(40, None, prompt.healed))
    calls = 0
    texts: list[str] = []

    def cancelled(text: str) -> bool:
        nonlocal calls
        calls += 1
        texts.append(text)
        return calls > 3

    context = before_cursor(tok, prompt)
    drafter = Drafter(Recycler(tiny_model.config.vocab_size), context)
    spec = _decode(tiny_model, tok, prompt, DecodeRequest(40, None, prompt.healed, cancelled), drafter)
    ids = spec.drafts[0].token_ids
    assert len(greedy.drafts[0].token_ids) == 40  # no stop token and no stop rule: always the whole budget
    assert spec.timings["cancelled"] == 1.0 and calls == 4
    assert 0 < len(ids) < len(greedy.drafts[0].token_ids) and greedy.drafts[0].token_ids[:len(ids)] == ids
    assert texts[-1] == spec.drafts[0].text and all(greedy.drafts[0].text.startswith(t) for t in texts)
    drafter = Drafter(Recycler(tiny_model.config.vocab_size), context)
    not_cancelled = _decode(tiny_model, tok, prompt, DecodeRequest(40, None, prompt.healed), drafter)
    assert not_cancelled.timings["cancelled"] == 0.0
    _assert_same(not_cancelled, greedy)


@pytest.mark.real_model
def test_real_model_speculative_output_equals_greedy(real_model):
    """Qwen2.5-Coder q8 (int8 activations): lane-aligned tree verification is still exactly greedy."""
    tok = real_model.tokenizer
    accepted = 0
    for name, cut in (("textwrap.py", 3000), ("bisect.py", 1500), ("heapq.py", 4000)):
        text = cpython_text(name)
        cut = text.rfind("\n", 0, cut) + 1
        prompt = fim(tok, text[:cut], "")
        request = DecodeRequest(24, None, prompt.healed)
        greedy = _decode(real_model, tok, prompt, request)
        drafter = Drafter(Recycler(real_model.config.vocab_size), before_cursor(tok, prompt),
                          [tok.encode(text[:cut])], tree_nodes=12)
        spec = _decode(real_model, tok, prompt, request, drafter)
        _assert_same(spec, greedy)
        accepted += spec.timings["accepted_drafts"]
    assert accepted > 0


# -- forked drafts ----------------------------------------------------------------------------------------------

def _forked(model, tok, prompt: Prompt, request: DecodeRequest, k: int = 3):
    cache, logits = start(model, prompt.ids, room=request.max_tokens + 16)
    drafter = Drafter(Recycler(model.config.vocab_size), before_cursor(tok, prompt))
    return forked_decode(model.decoder, vocabulary(tok), cache, logits, request, drafter, k)


def _follows_greedily(model, prompt: Prompt, ids: list[int], start_at: int) -> bool:
    """Whether every token of `ids` from `start_at` on is the model's top choice after the ones before it (to
    within a near-tie: forks decoded side by side are not bit-identical to one token at a time)."""
    cache, logits = start(model, prompt.ids, room=len(ids) + 4)
    for i, token in enumerate(ids):
        if i >= start_at and logits[token] < logits.max() - 1e-3:
            return False
        logits = decode_one_token(model.decoder, cache, token)
    return True


FORCED_FORKS = {
    "shared": lambda first, n: [(first.hesitations[1], t, lp) for t, lp in zip(first.hesitations[1].tokens,
                                                                                  first.hesitations[1].logps)][:n],
    "apart": lambda first, n: [(h, h.tokens[0], h.logps[0]) for h in first.hesitations[1:1 + n]],
}


@pytest.mark.parametrize("where", ["chosen", "shared", "apart"])
def test_forked_drafts_are_greedy_then_forks_of_it_continued_greedily(tiny_model, monkeypatch, where):
    """Draft 1 is greedy's, token for token. Every other draft is draft 1 up to one step, then a token other than
    draft 1's there, then the model's greedy choices again: for the forks forked decoding picks, and for forks
    forced to step 1's two runners-up ("shared") or to the runner-up at steps 1 and 2 ("apart": side by side,
    each sees draft 1's rows up to its own step only)."""
    if where in FORCED_FORKS:
        monkeypatch.setattr(speculative, "_choose_forks", FORCED_FORKS[where])
    tok = never_ending(tiny_model.tokenizer)
    steps_shared = steps_apart = 0
    for i, (prefix, suffix) in enumerate(_snippets(24, seed=3)):
        prompt = fim(tok, prefix, suffix, heal=False)
        request = DecodeRequest(10 + i % 7, None)
        greedy = _decode(tiny_model, tok, prompt, request)
        result = _forked(tiny_model, tok, prompt, request)
        first, *forks = result.drafts
        assert first.token_ids == greedy.drafts[0].token_ids and first.text == greedy.drafts[0].text
        assert len(forks) == 2 and result.timings["forks"] == 2
        fork_steps = []
        for fork in forks:
            step = next(s for s, (a, b) in enumerate(zip(fork.token_ids, first.token_ids + [-1])) if a != b)
            assert fork.token_ids[:step] == first.token_ids[:step]
            assert _follows_greedily(tiny_model, prompt, fork.token_ids, step + 1)
            fork_steps.append(step)
        steps_shared += fork_steps[0] == fork_steps[1]
        steps_apart += fork_steps[0] != fork_steps[1]
    if where in FORCED_FORKS:
        assert (steps_shared, steps_apart) == ((24, 0) if where == "shared" else (0, 24))


def test_forked_drafts_start_with_the_healed_bytes(tiny_model):
    tok = tiny_model.tokenizer
    for prefix, suffix in _snippets(20, seed=5):
        prompt = fim(tok, prefix, suffix)
        if not prompt.healed:
            continue
        result = _forked(tiny_model, tok, prompt, DecodeRequest(8, SINGLE_LINE, prompt.healed))
        healed = prompt.healed.decode("utf-8", errors="ignore")
        for draft in result.drafts:
            full = (tok.decode(draft.token_ids))
            assert full.startswith(healed) or healed.startswith(full)


def test_a_cancelled_forked_decode_returns_what_it_has(tiny_model):
    tok = never_ending(tiny_model.tokenizer)
    prompt = fim(tok, cpython_text("calendar.py")[:1200], "", heal=False)
    calls = 0

    def cancelled(text: str) -> bool:
        nonlocal calls
        calls += 1
        return calls > 3

    result = _forked(tiny_model, tok, prompt, DecodeRequest(40, None, b"", cancelled))
    greedy = _decode(tiny_model, tok, prompt, DecodeRequest(40, None))
    assert result.timings["cancelled"] == 1.0 and result.timings["forks"] == 0
    [only] = result.drafts
    assert greedy.drafts[0].token_ids[:len(only.token_ids)] == only.token_ids
