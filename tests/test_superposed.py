"""Superposed drafts and their baseline (k drafts decoded side by side) on the tiny model."""

from __future__ import annotations

import numpy as np
import pytest

from inference.generate import SINGLE_LINE, completion_text, first_line, greedy_complete, prefill
from inference.ngram import NgramModel
from inference.prompt import Prompt, fim_prompt
from inference.superposed import _Drafts, batched_complete, code_before_cursor, superposed_complete
from tests.fixtures import never_ending

DECODERS = [superposed_complete, batched_complete]


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


@pytest.mark.parametrize("complete", DECODERS)
def test_k_distinct_drafts_best_first(tiny_model, complete):
    prompt = fim_prompt(tiny_model.tokenizer, "def wrap(text, width):\n    lines = ", "\n    return lines\n")
    result = complete(tiny_model.decoder, tiny_model.tokenizer, prompt, k=3, max_tokens=8, stop=None)
    _assert_distinct_and_ranked(result.drafts, 3)


def test_k_distinct_texts_give_k_drafts_and_equal_texts_one(tiny_model):
    """The bookkeeping alone, on hand-made candidates: one draft per distinct text, best first."""
    tok = tiny_model.tokenizer
    token = {b: tok.token_bytes().index(b) for b in (b"a", b"b", b"c", b"\xfe", b"\xff")}

    def ranked(spellings: list[bytes]) -> list[tuple[str, float]]:
        drafts = _Drafts(tok, Prompt([0], b""), 3, None, None)
        drafts.advance([(-1.0 - i, 0, token[b]) for i, b in enumerate(spellings)])
        return [(d.text, d.logprob) for d in drafts.ranked()]

    assert ranked([b"a", b"b", b"c"]) == [("a", -1.0), ("b", -2.0), ("c", -3.0)]
    assert ranked([b"a", b"\xfe", b"\xff"]) == [("a", -1.0), ("\ufffd", -2.0)]  # both invalid bytes show U+FFFD


@pytest.mark.parametrize("complete", DECODERS)
def test_every_draft_starts_with_the_healed_bytes(tiny_model, complete):
    prompt = fim_prompt(tiny_model.tokenizer, "import os\nimport sys\nimp", "")
    assert len(prompt.healed) > 1
    result = complete(tiny_model.decoder, tiny_model.tokenizer, prompt, k=3, max_tokens=8, stop=None)
    _assert_distinct_and_ranked(result.drafts, 3)
    for draft in result.drafts:
        generated = _generated(tiny_model, draft.token_ids)
        assert generated.startswith(prompt.healed)
        assert draft.text == completion_text(generated[len(prompt.healed):])


@pytest.mark.parametrize("complete", DECODERS)
def test_each_draft_stops_as_soon_as_the_rule_calls_it_complete(tiny_model, complete):
    """Without end-of-text, 24 tokens always write more than 5 characters: every draft must be cut by the rule."""
    tok = never_ending(tiny_model.tokenizer)
    prompt = fim_prompt(tok, "def f(x):\n    return ", "\n", heal=False)
    result = complete(tiny_model.decoder, tok, prompt, k=3, max_tokens=24, stop=CutAt(5))
    assert result.drafts
    for draft in result.drafts:
        generated = completion_text(_generated(tiny_model, draft.token_ids))
        assert len(draft.text) == 5 and draft.text == generated[:5]
        without_last = completion_text(_generated(tiny_model, draft.token_ids[:-1]))
        assert len(without_last) < 5  # not decoded further once complete


@pytest.mark.parametrize("complete", DECODERS)
def test_single_line_drafts_end_at_their_first_line(tiny_model, complete):
    prompt = fim_prompt(tiny_model.tokenizer, "x = [\n    1,\n    2,\n", "]\n")
    result = complete(tiny_model.decoder, tiny_model.tokenizer, prompt, k=3, max_tokens=32, stop=SINGLE_LINE)
    for draft in result.drafts:
        assert first_line(draft.text)[1] is False  # blank lines before the code are kept, none after it


@pytest.mark.parametrize("complete", DECODERS)
def test_drafts_with_the_same_text_are_merged(tiny_model, complete):
    class Empty:
        def cut(self, text: str) -> int | None:
            return 0  # every draft is complete at once, and its text is ""

    prompt = fim_prompt(tiny_model.tokenizer, "def f(x):\n    return ", "\n", heal=False)
    result = complete(tiny_model.decoder, tiny_model.tokenizer, prompt, k=3, max_tokens=8, stop=Empty())
    assert [d.text for d in result.drafts] == [""]


@pytest.mark.parametrize("complete", DECODERS)
def test_one_draft_is_greedy_decoding(tiny_model, complete):
    """Without end-of-text: greedy stops at one, while the k-draft decoders keep a longer draft beside the one it
    ended and may rank that first by mean score."""
    tok = never_ending(tiny_model.tokenizer)
    prompt = fim_prompt(tok, "for i in range(10):\n    print(", "\n")
    greedy = greedy_complete(tiny_model.decoder, tok, prompt, max_tokens=10, stop=None)
    result = complete(tiny_model.decoder, tok, prompt, k=1, max_tokens=10, stop=None)
    assert [d.token_ids for d in result.drafts] == [greedy.drafts[0].token_ids]


def test_superposed_decoding_runs_one_forward_per_step_for_all_drafts(tiny_model):
    calls: list[tuple[int, ...]] = []
    decoder = tiny_model.decoder

    class Counting:
        def forward(self, ids, *args, **kwargs):
            calls.append(np.asarray(ids).shape)
            return decoder.forward(ids, *args, **kwargs)

        def empty_past(self):
            return decoder.empty_past()

    tok = never_ending(tiny_model.tokenizer)  # nothing finishes a draft, so all 8 tokens are decoded
    prompt = fim_prompt(tok, "def wrap(text, width):\n    lines = ", "\n")
    result = superposed_complete(Counting(), tok, prompt, k=3, max_tokens=8, stop=None)
    steps = calls[1:]  # calls[0] is the prefill
    assert len(steps) == 7 and result.drafts
    # one row whose input mixes the alive drafts' last tokens (3, unless two candidates spell the same bytes)
    assert all(len(shape) == 2 and shape[0] == 1 and 1 <= shape[1] <= 3 for shape in steps)
    assert (1, 3) in steps


def test_beam_drafts_carry_their_true_log_probability(tiny_model_fp32):
    """The batched baseline's attention mask gives each draft exactly its own history."""
    model = tiny_model_fp32
    tok = never_ending(model.tokenizer)  # an end-of-text's log-probability is in the score, its token is not
    prompt = fim_prompt(tok, "def wrap(text, width):\n    lines = ", "\n", heal=False)
    result = batched_complete(model.decoder, tok, prompt, k=3, max_tokens=6, stop=None)
    _assert_distinct_and_ranked(result.drafts, 3)
    for draft in result.drafts:
        ids = list(prompt.ids)
        total = 0.0
        for token in draft.token_ids:
            _, logits = prefill(model.decoder, ids)
            shifted = logits - logits.max()
            total += float(shifted[token] - np.log(np.exp(shifted).sum()))
            ids.append(token)
        assert draft.logprob == pytest.approx(total, abs=1e-3)


def test_the_ngram_model_steers_the_drafts(tiny_model):
    tok = tiny_model.tokenizer
    corpus = tok.encode("import os\nimport sys\n" * 20)
    ngram = NgramModel.from_sequences(tok.vocab_size, [corpus])
    prompt = fim_prompt(tok, "import os\nimport sys\nimport", "", heal=False)
    common = dict(k=3, max_tokens=4, stop=None, n_sample=tok.vocab_size, temperature=1.0)
    free = superposed_complete(tiny_model.decoder, tok, prompt, **common)
    unweighted = superposed_complete(tiny_model.decoder, tok, prompt, ngram=ngram, alpha=0.0, **common)
    steered = superposed_complete(tiny_model.decoder, tok, prompt, ngram=ngram, alpha=0.9, **common)
    assert [d.token_ids for d in unweighted.drafts] == [d.token_ids for d in free.drafts]  # α weighs it, no more
    assert steered.drafts[0].text.startswith((" os\n", " sys\n"))


@pytest.mark.parametrize("complete", DECODERS)
def test_decoding_continues_a_cache_without_changing_it(tiny_model, complete):
    tok, decoder = tiny_model.tokenizer, tiny_model.decoder
    ids = tok.encode("import os\nimport sys\n\ndef main():\n")
    rows, _ = prefill(decoder, ids[:-3])
    before = [k.copy() for k in rows.keys]
    continued = complete(decoder, tok, Prompt(ids[-3:], b""), k=3, max_tokens=6, stop=None, rows=rows,
                         history=ids)
    fresh = complete(decoder, tok, Prompt(ids, b""), k=3, max_tokens=6, stop=None)
    assert [d.token_ids for d in continued.drafts] == [d.token_ids for d in fresh.drafts]
    assert all((a == b).all() for a, b in zip(before, rows.keys)) and rows.length == len(ids) - 3


@pytest.mark.parametrize("complete", DECODERS)
def test_cancelling_returns_the_drafts_so_far(tiny_model, complete):
    prompt = fim_prompt(tiny_model.tokenizer, "def f(x):\n    return ", "\n", heal=False)
    polls = []

    def cancelled() -> bool:
        polls.append(1)
        return len(polls) >= 2

    result = complete(tiny_model.decoder, never_ending(tiny_model.tokenizer), prompt, k=3, max_tokens=20, stop=None,
                      cancelled=cancelled)
    assert result.timings["cancelled"] == 1.0
    assert result.drafts and all(len(d.token_ids) == 2 for d in result.drafts)


def test_ngram_history_is_the_code_before_the_cursor(tiny_model):
    tok = tiny_model.tokenizer
    prompt = fim_prompt(tok, "import os\nimport sys\n", "print(1)\n", heal=False)
    assert code_before_cursor(prompt, tok) == tok.encode("import os\nimport sys\n")
    assert code_before_cursor(Prompt([5, 6, 7], b""), tok) == [5, 6, 7]


def test_a_floor_keeps_tokens_the_ngram_model_has_not_seen(tiny_model):
    """The paper's hard cut drops every unseen token whatever α; a floor only penalises them.

    One step, full vocabulary, τ = 1: a token's score is (1-α) log p_llm + α log max(p_ng, floor), so the best
    one's log p_llm is within α/(1-α) log(1/floor) of the LLM's best, whatever the n-gram model has seen."""
    tok = never_ending(tiny_model.tokenizer)
    ngram = NgramModel.from_sequences(tok.vocab_size, [tok.encode("import os\nimport sys\n" * 20)])
    prompt = fim_prompt(tok, "import os\nimport sys\nimport", "", heal=False)
    alpha, floor = 0.01, 1e-3
    common = dict(k=3, max_tokens=1, stop=None, n_sample=tok.vocab_size, temperature=1.0, alpha=alpha)
    cut = superposed_complete(tiny_model.decoder, tok, prompt, ngram=ngram, ngram_floor=None, **common)
    floored = superposed_complete(tiny_model.decoder, tok, prompt, ngram=ngram, ngram_floor=floor, **common)
    seen = ngram.probs(code_before_cursor(prompt, tok), np.array([d.token_ids[0] for d in cut.drafts]))
    assert (seen > 0).all()
    _, logits = prefill(tiny_model.decoder, prompt.ids)
    llm = logits - np.logaddexp.reduce(logits)
    bound = alpha / (1 - alpha) * np.log(1 / floor)
    assert llm[floored.drafts[0].token_ids[0]] >= llm.max() - bound - 1e-4
