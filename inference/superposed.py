"""k drafts of one completion: superposed decoding (one pass for all drafts) and its baseline, k drafts decoded
side by side.

Superposed decoding (BRIEF §1, Shen et al. 2024) keeps ONE cache row per step. The row's input is the
probability-weighted mixture of the drafts' last-token embeddings; the one next-token distribution it yields
is shared by every draft, re-scored per draft with an n-gram model (geometric interpolation), and the k best
(draft, token) pairs of the k × n_sample candidates become the next drafts, as in a beam search.

The baseline decodes the k drafts for real: each step feeds every alive draft's last token as one row of the
same forward, and an attention mask lets each row see the prompt plus its own draft's earlier rows only (a
tree over the shared prompt rows, which are never copied), as a k-way beam search.

`sampled_decode` is the paper's own baseline: k nucleus-sampled drafts, one full pass each. Which one a
request uses is the `draftMethod` setting; bench/decode.py measures them side by side.

Both follow greedy_decode's conventions: rows are written into the DecodeCache in place; token healing
restricts a draft's first tokens to the backed-off bytes; a draft the stop rule calls complete is finished.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from inference.generate import (
    DecodeCache,
    DecodeRequest,
    Draft,
    GenerationResult,
    Vocabulary,
    Transcript,
    completion_text,
    cut_at_stop,
    decode_transcript,
    log_softmax,
)
from inference.ngram import NgramModel
from inference.runtime import NEG_INF, Decoder

# Tuned on 20 stdlib completion points and checked on 30 others (Qwen2.5-Coder-0.5B; numbers on the issue).
# SPD's own n ≤ 4 setting (params/p15_d3_ngram4_mixed.json: α 0.55, τ 0.1, 9 tokens, no floor) lost 6.7 points
# of draft-1 exact match to greedy: its hard cut drops identifiers the n-gram tables have never seen.
DEFAULT_DRAFTS = 3
DEFAULT_ALPHA = 0.3  # weight of the n-gram distribution in the geometric interpolation
DEFAULT_TEMPERATURE = 0.1  # applied to the LLM logits before the top-n cut
DEFAULT_N_SAMPLE = 9  # LLM tokens per step that the n-gram model may re-score
DEFAULT_NGRAM_FLOOR: float | None = 1e-4  # p_ng never below this; None is the paper's hard cut (see _interpolate)
NO_NGRAM_PENALTY = 200.0  # subtracted from a draft none of whose candidates the n-gram model has seen
SAMPLE_TOP_P = 0.9  # the sampled baseline: nucleus sampling as in the paper's comparison
SAMPLE_TEMPERATURE = 1.0


@dataclass
class _Beam:
    """One draft in progress: generated ids, their bytes, healing bytes still pending, cumulative score."""

    ids: list[int] = field(default_factory=list)
    text: bytes = b""
    pending: bytes = b""
    score: float = 0.0
    rows: list[int] = field(default_factory=list)  # beam decoding: this draft's rows after the prompt

    def extended(self, token: int, vocab: Vocabulary, score: float) -> _Beam:
        pending = vocab.healer.consume(self.pending, token) if self.pending else b""
        token_bytes = vocab.token_bytes[token]
        return _Beam(self.ids + [token], self.text + token_bytes, pending, score, list(self.rows))


class _Drafts:
    """Beam bookkeeping shared by both decoders: candidates in, alive and finished drafts out."""

    def __init__(self, vocab: Vocabulary, request: DecodeRequest, k: int) -> None:
        self.vocab, self.k, self.stop = vocab, k, request.stop
        self.healed = request.healed
        self.alive = [_Beam(pending=request.healed)]
        self.finished: list[_Beam] = []

    def text(self, beam: _Beam) -> str:
        return completion_text(beam.text[len(self.healed):])

    def is_complete(self, beam: _Beam) -> bool:
        return self.stop is not None and not beam.pending and self.stop.cut(self.text(beam)) is not None

    def log_probs(self, logits: np.ndarray, beam: _Beam) -> np.ndarray:
        """log softmax(logits) [vocab], healing-masked while bytes are pending."""
        return log_softmax(logits + self.vocab.healer.mask(beam.pending) if beam.pending else logits)

    def advance(self, candidates: list[tuple[float, int, int]]) -> None:
        """Take (score, alive index, token) candidates best first: EOS or a complete text finishes a draft,
        the best k others stay alive."""
        alive: list[_Beam] = []
        spelled: set[bytes] = set()  # one alive draft per text: another tokenization of it adds nothing
        for score, i, token in sorted(candidates, key=lambda c: -c[0]):
            if len(alive) >= self.k:
                break
            beam = self.alive[i]
            if token in self.vocab.eos:
                self.finished.append(_Beam(beam.ids, beam.text, beam.pending, score))
                continue
            new = beam.extended(token, self.vocab, score)
            if self.is_complete(new):
                self.finished.append(new)
            elif new.text not in spelled:
                spelled.add(new.text)
                alive.append(new)
        self.alive = alive
        self.finished = sorted(self.finished, key=lambda b: -b.score)[: 2 * self.k]

    def settled(self) -> bool:
        """No alive draft can still enter the top k: scores only fall as tokens are added."""
        if not self.alive:
            return True
        if len(self.finished) < self.k:
            return False
        return max(b.score for b in self.alive) <= self.finished[self.k - 1].score

    def ranked(self) -> list[Draft]:
        """Finished and alive drafts, best mean log-score first, one per distinct text, at most k."""
        drafts, seen = [], set()
        for beam in sorted(self.finished + self.alive, key=lambda b: -b.score / max(len(b.ids), 1)):
            text = cut_at_stop(self.text(beam), self.stop)
            if text in seen:
                continue
            seen.add(text)
            drafts.append(Draft(text, beam.ids, beam.score))
            if len(drafts) == self.k:
                break
        return drafts


def _top(values: np.ndarray, n: int) -> np.ndarray:
    """Indices of the n largest finite values, largest first."""
    n = min(n, values.size)
    idx = np.argpartition(-values, n - 1)[:n]
    idx = idx[np.argsort(-values[idx], kind="stable")]
    return idx[np.isfinite(values[idx])]


@dataclass(frozen=True)
class SuperposedSearch:
    """Superposed decoding's settings: k drafts, the n-gram model that re-scores them, and its context."""

    k: int = DEFAULT_DRAFTS
    ngram: NgramModel | None = None  # without it drafts are scored by the sharpened LLM alone (SPD's smoothing=None)
    history: Sequence[int] = ()  # the code before the cursor, for n-gram contexts
    alpha: float = DEFAULT_ALPHA
    temperature: float = DEFAULT_TEMPERATURE
    n_sample: int = DEFAULT_N_SAMPLE
    ngram_floor: float | None = DEFAULT_NGRAM_FLOOR


def superposed_decode(decoder: Decoder, vocab: Vocabulary, cache: DecodeCache, logits: np.ndarray,
                      request: DecodeRequest, search: SuperposedSearch) -> GenerationResult:
    """k drafts from one autoregressive pass (BRIEF §1.2), ranked best first and distinct by text.

    A draft's logprob is its search score (sharpened LLM log-probabilities interpolated with the n-gram
    model, healing tokens included); drafts are ranked by its mean per token. A `cancelled()` that turns
    true stops decoding and returns the drafts so far (timings["cancelled"] = 1).
    """
    t0 = time.perf_counter()
    k, ngram, max_tokens = search.k, search.ngram, request.max_tokens
    drafts = _Drafts(vocab, request, k)
    history = list(search.history)
    stopped, steps, ngram_s = False, 0, 0.0
    for step in range(max_tokens):
        alive = drafts.alive
        shared: dict[bytes, tuple[np.ndarray, np.ndarray]] = {}  # drafts differ only while healing
        for b in alive:
            if b.pending not in shared:
                z = logits + vocab.healer.mask(b.pending) if b.pending else logits
                top = _top(z, search.n_sample)  # softmax(z/τ) cut to its top n and renormalised = softmax(z[top]/τ)
                zt = z[top] / search.temperature
                shared[b.pending] = top, zt - np.logaddexp.reduce(zt)
        tops = [shared[b.pending][0] for b in alive]
        top_lp = [shared[b.pending][1] for b in alive]
        if ngram is not None:
            tn = time.perf_counter()
            scores = _interpolate(ngram, [history + b.ids for b in alive], tops, top_lp, search.alpha,
                                  search.ngram_floor)
            ngram_s += time.perf_counter() - tn
        else:
            scores = top_lp
        candidates: list[tuple[float, int, int]] = []
        for i, (beam, tokens, s) in enumerate(zip(alive, tops, scores)):
            candidates += [(beam.score + float(v), i, int(t)) for t, v in zip(tokens, s) if np.isfinite(v)]
        candidates.sort(key=lambda c: -c[0])
        drafts.advance(candidates[: 2 * k])
        if drafts.settled() or step == max_tokens - 1:
            break
        if request.cancelled(""):
            stopped = True
            break
        # One row for all drafts: Σ γ_i E[last token of draft i], γ_i ∝ draft i's probability at the LLM's own
        # temperature (score × τ). At the sharpened scale (γ = softmax(score), SPD's code) draft 1 took a median
        # γ of 0.9999, so the row was draft 1's token alone and drafts 2-3 continued draft 1's text (README).
        scores_alive = np.array([b.score for b in drafts.alive]) * search.temperature
        gamma = np.exp(scores_alive - scores_alive.max())
        gamma /= gamma.sum()
        ids = np.array([[b.ids[-1] for b in drafts.alive]], dtype=np.int64)  # [1, m]
        out = cache.forward(decoder, ids, np.array([cache.position]), mix_weights=gamma[None].astype(np.float32))
        cache.write(out.keys, out.values)
        cache.position += 1
        logits = out.logits[-1]
        steps += 1
    timings = {"decode_s": time.perf_counter() - t0, "ngram_s": ngram_s, "forward_steps": float(steps),
               "generated_tokens": float(steps + 1), "cancelled": float(stopped)}
    return GenerationResult(drafts.ranked(), timings)


def _interpolate(ngram: NgramModel, contexts: list[list[int]], tops: list[np.ndarray], top_lp: list[np.ndarray],
                 alpha: float, floor: float | None) -> list[np.ndarray]:
    """log p_f = (1-α) log p_llm + α log p_ng on each draft's top-n.

    floor=None is the paper's rule: a token the n-gram model has not seen is dropped, and a draft with no
    n-gram support at all keeps (1-α) log p_llm - penalty. A floor instead bounds p_ng from below, so an
    unseen token (a new identifier) is only penalised by α log(floor / p_ng of the others).
    """
    width = max(t.size for t in tops)
    padded = np.zeros((len(tops), width), dtype=np.int64)
    for i, t in enumerate(tops):
        padded[i, : t.size] = t
    p_ng = ngram.probs_many(contexts, padded)
    out = []
    for i, (t, lp) in enumerate(zip(tops, top_lp)):
        png = p_ng[i, : t.size]
        if floor is not None:
            out.append((1 - alpha) * lp + alpha * np.log(np.maximum(png, floor)))
        elif not (png > 0).any():
            out.append((1 - alpha) * lp - NO_NGRAM_PENALTY)
        else:
            with np.errstate(divide="ignore"):
                out.append((1 - alpha) * lp + alpha * np.log(png))
    return out


def beam_decode(decoder: Decoder, vocab: Vocabulary, cache: DecodeCache, logits: np.ndarray,
                request: DecodeRequest, k: int = DEFAULT_DRAFTS) -> GenerationResult:
    """The baseline: k drafts decoded for real, one forward per step with one row per alive draft.

    The k best (draft, token) pairs by summed log-probability survive each step. A draft's logprob is its summed
    log-probability (healing tokens included); drafts are ranked by its mean per token.
    """
    t0 = time.perf_counter()
    max_tokens = request.max_tokens
    prompt_rows = cache.length
    drafts = _Drafts(vocab, request, k)
    row_logits = logits[None]  # [alive, vocab]
    stopped, steps = False, 0
    for step in range(max_tokens):
        candidates: list[tuple[float, int, int]] = []
        for i, beam in enumerate(drafts.alive):
            lp = drafts.log_probs(row_logits[i], beam)
            candidates += [(beam.score + float(lp[t]), i, int(t)) for t in _top(lp, k)]
        candidates.sort(key=lambda c: -c[0])
        drafts.advance(candidates[: 2 * k])
        if drafts.settled() or step == max_tokens - 1:
            break
        if request.cancelled(""):
            stopped = True
            break
        alive = drafts.alive
        tree = cache.length - prompt_rows  # draft rows already in the cache
        m = len(alive)
        row_bias = np.zeros((m, cache.length), dtype=np.float32)  # each row sees the prompt and its own draft
        row_bias[:, prompt_rows:] = NEG_INF
        new_bias = np.full((m, m), NEG_INF, dtype=np.float32)
        for j, beam in enumerate(alive):
            row_bias[j, [prompt_rows + r for r in beam.rows]] = 0.0
            new_bias[j, j] = 0.0
            beam.rows.append(tree + j)
        ids = np.array([b.ids[-1] for b in alive], dtype=np.int64)
        positions = np.full(m, cache.position, dtype=np.int64)
        out = cache.forward(decoder, ids, positions, new_bias=new_bias, row_bias=row_bias,
                            logits_index=np.arange(m, dtype=np.int64))
        cache.write(out.keys, out.values)
        cache.position += 1
        row_logits = out.logits
        steps += 1
    timings = {"decode_s": time.perf_counter() - t0, "forward_steps": float(steps),
               "generated_tokens": float(steps + 1), "cancelled": float(stopped)}
    return GenerationResult(drafts.ranked(), timings)


def _nucleus(logp: np.ndarray, rng: np.random.Generator, top_p: float, temperature: float) -> int:
    """A token drawn from softmax(logp / temperature) cut to its smallest top-p set."""
    z = logp / temperature
    order = np.argsort(-z)
    p = np.exp(z[order] - z[order[0]])
    p /= p.sum()
    keep = int(np.searchsorted(np.cumsum(p), top_p)) + 1
    return int(order[rng.choice(keep, p=p[:keep] / p[:keep].sum())])


def sampled_decode(decoder: Decoder, vocab: Vocabulary, cache: DecodeCache, logits: np.ndarray,
                   request: DecodeRequest, k: int = DEFAULT_DRAFTS, *, top_p: float = SAMPLE_TOP_P,
                   temperature: float = SAMPLE_TEMPERATURE, seed: int = 0) -> GenerationResult:
    """The paper's baseline (BRIEF §1.4): k nucleus-sampled drafts, one full pass each after the same prompt rows.

    Each pass rewinds the cache to the prompt, so its rows overwrite the previous draft's. Drafts are ranked by
    mean log-probability, one per text; the seed makes a request's drafts reproducible.
    """
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    length, position = cache.length, cache.position
    found: dict[str, Draft] = {}
    stopped, steps = False, 0
    for _ in range(k):
        cache.length, cache.position = length, position
        out = Transcript(vocab, request)
        stopped, taken = decode_transcript(decoder, cache, out, out.next_logp(logits),
                                           lambda logp: _nucleus(logp, rng, top_p, temperature))
        steps += taken
        draft = out.draft()
        found.setdefault(draft.text, draft)
        if stopped:
            break
    timings = {"decode_s": time.perf_counter() - t0, "forward_steps": float(steps), "cancelled": float(stopped)}
    return GenerationResult(sorted(found.values(), key=lambda d: -d.score), timings)
