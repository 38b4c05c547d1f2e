"""Superposed drafts and their baseline (k drafts decoded side by side) on the tiny model."""

from __future__ import annotations

import numpy as np
import pytest

from inference.generate import SINGLE_LINE, DecodeRequest, completion_text, first_line, greedy_decode, prefill, \
    vocabulary
from inference.ngram import NgramModel
from inference.prompt import Prompt
from inference.superposed import SuperposedSearch, _Drafts, beam_decode, sampled_decode, superposed_decode
from tests.decoding import before_cursor, fim, start, start_past_hidden_rows
from tests.fixtures import never_ending


def _superposed(decoder, vocab, cache, logits, request, k, history):
    return superposed_decode(decoder, vocab, cache, logits, request, SuperposedSearch(k, history=history))


def _beam(decoder, vocab, cache, logits, request, k, history):
    return beam_decode(decoder, vocab, cache, logits, request, k)


def _sampled(decoder, vocab, cache, logits, request, k, history):
    return sampled_decode(decoder, vocab, cache, logits, request, k)


DECODERS = [_superposed, _beam, _sampled]


def _complete(decode, model, tok, prompt: Prompt, request: DecodeRequest, k: int):
    """`decode` (a DECODERS entry) after `prompt`, prefilled into a fresh cache, with `tok`'s stop tokens."""
    cache, logits = start(model, prompt.ids, room=k * request.max_tokens + 8)
    return decode(model.decoder, vocabulary(tok), cache, logits, request, k, before_cursor(tok, prompt))


class CutAt:
    """Complete once the text has `n` characters; keeps exactly n."""

    def __init__(self, n: int) -> None:
        self.n = n

    def cut(self, text: str) -> int | None:
        return self.n if len(text) >= self.n else None


def _generated(model, token_ids: list[int]) -> bytes:
    return b"".join(model.tokenizer.token_bytes()[i] for i in token_ids)


def _assert_distinct_and_ranked(drafts, k: int) -> None:
    """At most k drafts, one per text, best first. Fewer than k is right when two drafts spell the same text
    (distinct invalid bytes both show as U+FFFD), which the random model may or may not write on a given CPU."""
    texts = [d.text for d in drafts]
    assert 1 <= len(texts) <= k and len(set(texts)) == len(texts)
    scores = [d.score for d in drafts]
    assert scores == sorted(scores, reverse=True)


@pytest.mark.parametrize("decode", DECODERS)
def test_k_distinct_drafts_best_first(tiny_model, decode):
    tok = tiny_model.tokenizer
    prompt = fim(tok, "def wrap(text, width):\n    lines = ", "\n    return lines\n")
    result = _complete(decode, tiny_model, tok, prompt, DecodeRequest(8, None, prompt.healed), k=3)
    _assert_distinct_and_ranked(result.drafts, 3)


def test_k_distinct_texts_give_k_drafts_and_equal_texts_one(tiny_model):
    """The bookkeeping alone, on hand-made candidates: one draft per distinct text, best first."""
    tok = tiny_model.tokenizer
    token = {b: tok.token_bytes().index(b) for b in (b"a", b"b", b"c", b"\xfe", b"\xff")}

    def ranked(spellings: list[bytes]) -> list[tuple[str, float]]:
        drafts = _Drafts(vocabulary(tok), DecodeRequest(stop=None), 3)
        drafts.advance([(-1.0 - i, 0, token[b]) for i, b in enumerate(spellings)])
        return [(d.text, d.logprob) for d in drafts.ranked()]

    assert ranked([b"a", b"b", b"c"]) == [("a", -1.0), ("b", -2.0), ("c", -3.0)]
    assert ranked([b"a", b"\xfe", b"\xff"]) == [("a", -1.0), ("\ufffd", -2.0)]  # both invalid bytes show U+FFFD


@pytest.mark.parametrize("decode", DECODERS)
def test_every_draft_starts_with_the_healed_bytes(tiny_model, decode):
    tok = tiny_model.tokenizer
    prompt = fim(tok, "import os\nimport sys\nimp", "")
    assert len(prompt.healed) > 1
    result = _complete(decode, tiny_model, tok, prompt, DecodeRequest(8, None, prompt.healed), k=3)
    _assert_distinct_and_ranked(result.drafts, 3)
    for draft in result.drafts:
        generated = _generated(tiny_model, draft.token_ids)
        assert generated.startswith(prompt.healed)
        assert draft.text == completion_text(generated[len(prompt.healed):])


@pytest.mark.parametrize("decode", DECODERS)
def test_each_draft_stops_as_soon_as_the_rule_calls_it_complete(tiny_model, decode):
    """Without end-of-text, 24 tokens always write more than 5 characters: every draft must be cut by the rule."""
    tok = never_ending(tiny_model.tokenizer)
    prompt = fim(tok, "def f(x):\n    return ", "\n", heal=False)
    result = _complete(decode, tiny_model, tok, prompt, DecodeRequest(24, CutAt(5)), k=3)
    assert result.drafts
    for draft in result.drafts:
        generated = completion_text(_generated(tiny_model, draft.token_ids))
        assert len(draft.text) == 5 and draft.text == generated[:5]
        without_last = completion_text(_generated(tiny_model, draft.token_ids[:-1]))
        assert len(without_last) < 5  # not decoded further once complete


@pytest.mark.parametrize("decode", DECODERS)
def test_single_line_drafts_end_at_their_first_line(tiny_model, decode):
    tok = tiny_model.tokenizer
    prompt = fim(tok, "x = [\n    1,\n    2,\n", "]\n")
    result = _complete(decode, tiny_model, tok, prompt, DecodeRequest(32, SINGLE_LINE, prompt.healed), k=3)
    for draft in result.drafts:
        assert first_line(draft.text)[1] is False  # blank lines before the code are kept, none after it


@pytest.mark.parametrize("decode", DECODERS)
def test_drafts_with_the_same_text_are_merged(tiny_model, decode):
    class Empty:
        def cut(self, text: str) -> int | None:
            return 0  # every draft is complete at once, and its text is ""

    tok = tiny_model.tokenizer
    prompt = fim(tok, "def f(x):\n    return ", "\n", heal=False)
    result = _complete(decode, tiny_model, tok, prompt, DecodeRequest(8, Empty()), k=3)
    assert [d.text for d in result.drafts] == [""]


@pytest.mark.parametrize("decode", [_superposed, _beam])
def test_one_draft_is_greedy_decoding(tiny_model, decode):
    """Without end-of-text: greedy stops at one, while the k-draft decoders keep a longer draft beside the one it
    ended and may rank that first by mean score."""
    tok = never_ending(tiny_model.tokenizer)
    prompt = fim(tok, "for i in range(10):\n    print(", "\n")
    request = DecodeRequest(10, None, prompt.healed)
    greedy = greedy_decode(tiny_model.decoder, vocabulary(tok), *start(tiny_model, prompt.ids), request)
    result = _complete(decode, tiny_model, tok, prompt, request, k=1)
    assert [d.token_ids for d in result.drafts] == [greedy.drafts[0].token_ids]


def test_each_sampled_draft_is_decoded_after_the_prompt_alone(tiny_model):
    """With the nucleus cut to one token every pass is greedy decoding: the k passes give greedy's draft once,
    which holds only if each pass starts from the prompt's rows (the cache is rewound between drafts)."""
    tok = never_ending(tiny_model.tokenizer)
    prompt = fim(tok, "def wrap(text, width):\n    lines = ", "\n", heal=False)
    request, vocab = DecodeRequest(6, None), vocabulary(tok)
    greedy = greedy_decode(tiny_model.decoder, vocab, *start(tiny_model, prompt.ids), request)
    cache, logits = start(tiny_model, prompt.ids, room=3 * 6)
    sampled = sampled_decode(tiny_model.decoder, vocab, cache, logits, request, 3, top_p=1e-9)
    assert [d.token_ids for d in sampled.drafts] == [greedy.drafts[0].token_ids]


def test_sampled_drafts_are_reproducible(tiny_model):
    tok = never_ending(tiny_model.tokenizer)
    prompt = fim(tok, "def wrap(text, width):\n    lines = ", "\n", heal=False)

    def drafts(seed: int) -> list[list[int]]:
        cache, logits = start(tiny_model, prompt.ids, room=3 * 6)
        result = sampled_decode(tiny_model.decoder, vocabulary(tok), cache, logits, DecodeRequest(6, None), 3, seed=seed)
        return [d.token_ids for d in result.drafts]

    assert drafts(7) == drafts(7)


def test_superposed_decoding_runs_one_forward_per_step_for_all_drafts(tiny_model):
    calls: list[tuple[int, ...]] = []
    decoder = tiny_model.decoder

    class Counting:
        def forward(self, ids, *args, **kwargs):
            calls.append(np.asarray(ids).shape)
            return decoder.forward(ids, *args, **kwargs)

    tok = never_ending(tiny_model.tokenizer)  # nothing finishes a draft, so all 8 tokens are decoded
    prompt = fim(tok, "def wrap(text, width):\n    lines = ", "\n")
    cache, logits = start(tiny_model, prompt.ids)  # the caller's prefill: not one of the decoder's steps
    search = SuperposedSearch(3, history=before_cursor(tok, prompt))
    result = superposed_decode(Counting(), vocabulary(tok), cache, logits, DecodeRequest(8, None, prompt.healed),
                               search)
    assert len(calls) == 7 and result.drafts
    # one row whose input mixes the alive drafts' last tokens (3, unless two candidates spell the same bytes)
    assert all(len(shape) == 2 and shape[0] == 1 and 1 <= shape[1] <= 3 for shape in calls)
    assert (1, 3) in calls


@pytest.mark.parametrize("hidden", [False, True])
def test_beam_drafts_carry_their_true_log_probability(tiny_model_fp32, hidden):
    """The batched baseline's attention mask gives each draft exactly its own history, also in a cache whose
    prompt follows rows it must not see (the cache's hidden rows and the drafts' mask combine)."""
    model = tiny_model_fp32
    tok = never_ending(model.tokenizer)  # an end-of-text's log-probability is in the score, its token is not
    prompt = fim(tok, "def wrap(text, width):\n    lines = ", "\n", heal=False)
    request = DecodeRequest(6, None)
    if hidden:
        cache, logits = start_past_hidden_rows(model, prompt.ids, tok.encode("x = 1\n" * 8), room=3 * 6)
        result = beam_decode(model.decoder, vocabulary(tok), cache, logits, request, 3)
    else:
        result = _complete(_beam, model, tok, prompt, request, k=3)
    _assert_distinct_and_ranked(result.drafts, 3)
    for draft in result.drafts:
        ids = list(prompt.ids)
        total = 0.0
        for token in draft.token_ids:
            _, logits = start(model, ids, room=0)
            shifted = logits - logits.max()
            total += float(shifted[token] - np.log(np.exp(shifted).sum()))
            ids.append(token)
        assert draft.logprob == pytest.approx(total, abs=1e-3)


def test_the_ngram_model_steers_the_drafts(tiny_model):
    tok = tiny_model.tokenizer
    corpus = tok.encode("import os\nimport sys\n" * 20)
    ngram = NgramModel.from_sequences(tok.vocab_size, [corpus])
    prompt = fim(tok, "import os\nimport sys\nimport", "", heal=False)
    vocab, request = vocabulary(tok), DecodeRequest(4, None)

    def drafts(**settings) -> list:
        search = SuperposedSearch(3, history=before_cursor(tok, prompt), n_sample=tok.vocab_size, temperature=1.0,
                                  **settings)
        return superposed_decode(tiny_model.decoder, vocab, *start(tiny_model, prompt.ids), request, search).drafts

    free = drafts()
    unweighted = drafts(ngram=ngram, alpha=0.0)
    steered = drafts(ngram=ngram, alpha=0.9)
    assert [d.token_ids for d in unweighted] == [d.token_ids for d in free]  # α weighs it, no more
    assert steered[0].text.startswith((" os\n", " sys\n"))


@pytest.mark.parametrize("decode", DECODERS)
def test_decoding_writes_in_place_and_never_changes_the_rows_it_was_lent(tiny_model, decode):
    """A prompt that continues a cache: the rows [0, length) the decode starts from are bit-identical after it,
    its own rows went into the same buffers after them, and the drafts and rows are those of a fresh decode."""
    tok, decoder = never_ending(tiny_model.tokenizer), tiny_model.decoder  # no draft ends before a forward
    vocab, request = vocabulary(tok), DecodeRequest(6, None)
    ids = tok.encode("import os\nimport sys\n\ndef main():\n")
    cache, _ = start(tiny_model, ids[:-3], room=3 + 3 * 6)
    logits = prefill(decoder, cache, ids[-3:])
    length = cache.length
    buffers = cache.keys + cache.values
    before = [buf[:, :length].copy() for buf in buffers]
    continued = decode(decoder, vocab, cache, logits, request, 3, ids)
    fresh_cache, fresh_logits = start(tiny_model, ids, room=3 * 6)
    fresh = decode(decoder, vocab, fresh_cache, fresh_logits, request, 3, ids)
    assert [d.token_ids for d in continued.drafts] == [d.token_ids for d in fresh.drafts]
    assert all(a is b for a, b in zip(cache.keys + cache.values, buffers))
    assert all(np.array_equal(buf[:, :length], old) for buf, old in zip(buffers, before))
    assert cache.length == fresh_cache.length > length and cache.position == fresh_cache.position
    assert all(np.array_equal(a[:, :cache.length], b[:, :cache.length])
               for a, b in zip(buffers, fresh_cache.keys + fresh_cache.values))


@pytest.mark.parametrize("decode", DECODERS)
def test_cancelling_returns_the_drafts_so_far(tiny_model, decode):
    tok = never_ending(tiny_model.tokenizer)
    prompt = fim(tok, "def f(x):\n    return ", "\n", heal=False)
    polls = []

    def cancelled(text: str) -> bool:
        polls.append(text)
        return len(polls) >= 2

    result = _complete(decode, tiny_model, tok, prompt, DecodeRequest(20, None, cancelled=cancelled), k=3)
    assert result.timings["cancelled"] == 1.0
    assert result.drafts and all(len(d.token_ids) == 2 for d in result.drafts)


def test_a_floor_keeps_tokens_the_ngram_model_has_not_seen(tiny_model):
    """The paper's hard cut drops every unseen token whatever α; a floor only penalises them.

    One step, full vocabulary, τ = 1: a token's score is (1-α) log p_llm + α log max(p_ng, floor), so the best
    one's log p_llm is within α/(1-α) log(1/floor) of the LLM's best, whatever the n-gram model has seen."""
    tok = never_ending(tiny_model.tokenizer)
    ngram = NgramModel.from_sequences(tok.vocab_size, [tok.encode("import os\nimport sys\n" * 20)])
    prompt = fim(tok, "import os\nimport sys\nimport", "", heal=False)
    history = before_cursor(tok, prompt)
    alpha, floor = 0.01, 1e-3

    def drafts(ngram_floor: float | None) -> list:
        search = SuperposedSearch(3, ngram, history, alpha, temperature=1.0, n_sample=tok.vocab_size,
                                  ngram_floor=ngram_floor)
        return superposed_decode(tiny_model.decoder, vocabulary(tok), *start(tiny_model, prompt.ids),
                                 DecodeRequest(1, None), search).drafts

    cut, floored = drafts(None), drafts(floor)
    seen = ngram.probs(history, np.array([d.token_ids[0] for d in cut]))
    assert (seen > 0).all()
    _, logits = start(tiny_model, prompt.ids, room=0)
    llm = logits - np.logaddexp.reduce(logits)
    bound = alpha / (1 - alpha) * np.log(1 / floor)
    assert llm[floored[0].token_ids[0]] >= llm.max() - bound - 1e-4
