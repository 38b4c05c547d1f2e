"""Lossless speculative decoding without a second model: draft a small token tree, verify it in one forward.

Each step feeds the last committed token (the root) and a tree of guesses from prompt lookup and token
recycling (inference/drafting.py) in ONE forward, with a tree mask (each node sees the past, its ancestors
and itself) at positions = root position + depth. The greedy choice at every node is compared with its
children: the longest path where each child is the model's own greedy choice is accepted, plus the model's
next token after it (the bonus). The accepted nodes' K/V rows are appended to the cache and the others
dropped; their positions are the ones sequential decoding would have used.

Losslessness relies on the graph being chunk-invariant: attention runs over Concat(past, new), so a node's
logits are bit-identical to feeding its path one token at a time (tests/test_speculative.py checks this),
and the output equals greedy_decode token for token.

`forked_decode` gives k drafts on the same path: draft 1 is the speculative (greedy) one, and the others
fork from it where the model hesitated most.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from inference.drafting import Recycler, lookup_continuations
from inference.generate import (
    DecodeCache,
    DecodeRequest,
    GenerationResult,
    Hesitation,
    Transcript,
    Vocabulary,
    decode_one_token,
)
from inference.runtime import NEG_INF, Decoder, StepOutput

TREE_NODES = 8  # most tokens per verification forward, root and padding included
LOOKUP_LENGTH = 12  # longest prompt-lookup chain considered
LOOKUP_COUNT = 2  # prompt-lookup continuations per step (different first tokens)
RECYCLED_RANKS = 3  # successors per node offered from the recycling matrix
# Chance that a drafted token is the model's greedy choice, given that its parent was: the tree keeps the
# nodes with the highest path probability (a best-first tree, as in EAGLE-2/Sequoia). Measured on greedy
# continuations of 30 stdlib files (Qwen2.5-Coder-0.5B). A lookup token's chance grows with the length of
# the match behind it: the n-gram that found the chain plus the chain tokens before it.
LOOKUP_ACCEPT = (0.0, 0.33, 0.5, 0.62, 0.71, 0.76, 0.82, 0.84, 0.85, 0.86, 0.87, 0.88, 0.89, 0.9, 0.91, 0.92,
                 0.95)  # by match length (index min(length, 16))
RECYCLED_ACCEPT = (0.32, 0.1, 0.045)  # by rank
MIN_PATH_PROBABILITY = 0.05  # below this a node is not worth a slot, however cheap
# Cost of each extra token in a verification forward, in single decoding steps: 0.28 on a 2-core AVX2 CPU
# with the q8 model (README: 8 tokens cost 3.05 steps), near 0 on a GPU.
VERIFY_TOKEN_COST = 0.28


@functools.cache
def softmax_lanes() -> int:
    """SIMD width of ONNX Runtime's softmax sum on this CPU: 8 floats with AVX2, 16 with AVX-512 (and 16,
    a multiple of every width, when unsure). See DraftTree for why it matters."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return 16
    return 8 if " avx2" in flags and " avx512f" not in flags else 16


@dataclass
class DraftTree:
    """Node 0 is the root: the last committed token, not yet in the cache. A parent precedes its children.

    Nodes are fed in `slots`, and a node of depth d sits in a slot s with s = d (mod lanes). The softmax
    sums each row in `lanes` SIMD lanes (element j in lane j mod lanes); with this layout a node's past,
    ancestors and itself land in the same lanes, in the same order, as when its path is fed one token at
    a time, so its logits and K/V are bit-identical to sequential decoding. (Any other layout differs in
    the last bits and can flip a near-tie.) Slots no node needs are padding: fed, masked, ignored.
    """

    lanes: int
    tokens: list[int]  # [n]
    parents: list[int]  # [n], -1 for the root
    depths: list[int]  # [n], 0 for the root
    slots: list[int]  # [n], slot of each node in the forward
    _children: list[dict[int, int]] = field(default_factory=list)
    _taken: set[int] = field(default_factory=set)

    @classmethod
    def rooted_at(cls, token: int, lanes: int) -> DraftTree:
        return cls(lanes, [token], [-1], [0], [0], [{}], {0})

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def width(self) -> int:
        """Tokens fed to verify the tree, padding included."""
        return max(self.slots) + 1

    def child(self, node: int, token: int) -> int | None:
        return self._children[node].get(token)

    def free_slot(self, parent: int) -> int:
        """The first free slot after the parent's that a child of it may take."""
        depth = self.depths[parent] + 1
        slot = self.slots[parent] + 1
        slot += (depth - slot) % self.lanes
        while slot in self._taken:
            slot += self.lanes
        return slot

    def add(self, parent: int, token: int) -> int:
        """The child of `parent` with `token`, created if new (so equal guesses share one node)."""
        existing = self._children[parent].get(token)
        if existing is not None:
            return existing
        slot = self.free_slot(parent)
        self.tokens.append(token)
        self.parents.append(parent)
        self.depths.append(self.depths[parent] + 1)
        self.slots.append(slot)
        self._taken.add(slot)
        self._children.append({})
        self._children[parent][token] = len(self.tokens) - 1
        return len(self.tokens) - 1

    def prefix(self, size: int) -> DraftTree:
        """The tree of the first `size` nodes (a parent precedes its children, so it is a tree)."""
        tree = DraftTree.rooted_at(self.tokens[0], self.lanes)
        for node in range(1, size):
            tree.add(self.parents[node], self.tokens[node])
        return tree

    def feed(self, past: int, position: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids [w], positions [w], bias [w, past + w]) for the forward; node i's row is slot slots[i].

        A node sees the whole past, its ancestors and itself, at position = root position + depth (nodes
        of one depth are alternatives for one place). Padding sees only itself.
        """
        w = self.width
        ids = np.full(w, self.tokens[0], dtype=np.int64)
        positions = np.full(w, position, dtype=np.int64)
        bias = np.full((w, past + w), NEG_INF, dtype=np.float32)
        bias[np.arange(w), past + np.arange(w)] = 0.0
        for node, slot in enumerate(self.slots):
            ids[slot] = self.tokens[node]
            positions[slot] = position + self.depths[node]
            bias[slot, :past] = 0.0
            ancestor = self.parents[node]
            while ancestor >= 0:
                bias[slot, past + self.slots[ancestor]] = 0.0
                ancestor = self.parents[ancestor]
        return ids, positions, bias


def build_draft_tree(root: int, context: np.ndarray, corpus: Sequence[np.ndarray], recycler: Recycler,
                     width: int, lanes: int, token_cost: float) -> DraftTree:
    """Best-first tree fed in at most `width` slots: prompt-lookup chains and recycled successors, the
    guesses with the highest estimated path probability first. It is cut where the expected tokens per
    forward peak: a forward of w tokens costs 1 + token_cost * (w - 1) single steps."""
    tree = DraftTree.rooted_at(root, lanes)
    if width <= 1:
        return tree
    chains = lookup_continuations(context, corpus, length=min(LOOKUP_LENGTH, width - 1), count=LOOKUP_COUNT)
    # heap of (-path probability, tie-break, parent node, token, chain index or -1, position in chain)
    heap: list[tuple[float, int, int, int, int, int]] = []
    tie = itertools.count()  # first offered, first taken among equals

    def offer_chain(parent: int, probability: float, chain: int, at: int) -> None:
        if at < len(chains[chain].tokens):
            accept = LOOKUP_ACCEPT[min(chains[chain].matched + at, len(LOOKUP_ACCEPT) - 1)]
            heapq.heappush(heap, (-probability * accept, next(tie), parent, chains[chain].tokens[at], chain, at + 1))

    def offer_recycled(parent: int, probability: float) -> None:
        for rank, token in enumerate(recycler.successors[tree.tokens[parent], :RECYCLED_RANKS]):
            if token >= 0:
                heapq.heappush(heap, (-probability * RECYCLED_ACCEPT[rank], next(tie), parent, int(token), -1, 0))

    # tokens per forward = (1 + expected accepted drafts) / cost of the forward; keep the best prefix
    expected, best_rate, best_size = 0.0, 1.0, 1
    for c in range(len(chains)):
        offer_chain(0, 1.0, c, 0)
    offer_recycled(0, 1.0)
    while heap:
        neg_p, _, parent, token, chain, at = heapq.heappop(heap)
        if -neg_p < MIN_PATH_PROBABILITY:
            break
        existing = tree.child(parent, token)
        if existing is not None:  # already drafted by a likelier guess: the chain may still go on from it
            if chain >= 0:
                offer_chain(existing, -neg_p, chain, at)
            continue
        if tree.free_slot(parent) >= width:
            continue  # no room left at that depth
        node = tree.add(parent, token)
        expected += -neg_p
        rate = (1.0 + expected) / (1.0 + token_cost * (tree.width - 1))
        if rate > best_rate:
            best_rate, best_size = rate, len(tree)
        if chain >= 0:
            offer_chain(node, -neg_p, chain, at)
        offer_recycled(node, -neg_p)
    return tree.prefix(best_size)


def verify_tree(decoder: Decoder, cache: DecodeCache, tree: DraftTree) -> StepOutput:
    """One forward of the tree after the cache's rows, the root at the cache's next position: logits
    [n nodes, vocab] and new keys and values per layer [kv, width, hd] in slot order (node i's row is
    tree.slots[i]). Nothing is written: the caller keeps the accepted rows."""
    ids, positions, bias = tree.feed(0, cache.position)
    return cache.forward(decoder, ids, positions, new_bias=bias, logits_index=np.asarray(tree.slots, np.int64))


def greedy_accept(tree: DraftTree, logits: np.ndarray, out: Transcript) -> tuple[list[int], np.ndarray, bool]:
    """Walk down the tree while the model's greedy choice at a node is one of its children, emitting each.

    Returns the accepted nodes (root first), the log-probabilities at the last one (their argmax is the
    bonus token, the next root) and whether the completion finished on the way.
    """
    node, accepted = 0, [0]
    while True:
        logp = out.next_logp(logits[node])
        child = tree.child(node, int(np.argmax(logp)))
        if child is None or out.full:
            return accepted, logp, False
        if out.take(tree.tokens[child], logp):
            return accepted, logp, True
        node = child
        accepted.append(child)


@dataclass
class Drafter:
    """Where speculative decoding finds its guesses, and how many it may verify at once.

    `context`: the code before the cursor (prompt lookup continues it, with the output so far appended);
    `corpus`: other token sequences to copy from (the document itself, other open buffers); `recycler`: a
    shared, long-lived successor matrix. `tree_nodes` bounds the tokens of one verification forward (root
    and padding included); `token_cost` is what each costs beyond the first, in single steps.
    """

    recycler: Recycler
    context: Sequence[int] = ()
    corpus: Sequence[Sequence[int]] = ()
    tree_nodes: int = TREE_NODES
    token_cost: float = VERIFY_TOKEN_COST


def speculative_decode(decoder: Decoder, vocab: Vocabulary, cache: DecodeCache, logits: np.ndarray,
                       request: DecodeRequest, drafter: Drafter) -> GenerationResult:
    """greedy_decode's output, token for token, in fewer forwards."""
    t0 = time.perf_counter()
    out = Transcript(vocab, request)
    stats = _new_stats()
    _decode_from_logits(decoder, cache, out, logits, drafter, stats)
    timings = {"decode_s": time.perf_counter() - t0, "generated_tokens": float(len(out.ids)), **stats}
    return GenerationResult([out.draft()], timings)


def forked_decode(decoder: Decoder, vocab: Vocabulary, cache: DecodeCache, logits: np.ndarray,
                  request: DecodeRequest, drafter: Drafter, k: int) -> GenerationResult:
    """k drafts: draft 1 is greedy's (decoded speculatively), and drafts 2..k fork from it where the model
    hesitated most.

    A fork takes, at one step of draft 1, a token the model ranked just below the one taken, chosen by the
    probability of the fork's tokens up to there, and is then continued greedily. The forks are decoded side
    by side, one row each per forward after draft 1's rows, each seeing draft 1's rows before its step: the
    forks cost about as much as the longest of them. Drafts come out draft 1 first, then the forks in the
    order chosen (bench/decode.py measures the method).
    """
    t0 = time.perf_counter()
    length, position = cache.length, cache.position
    first = Transcript(vocab, request, runners_up=max(k - 1, 1))
    stats = _new_stats()
    stopped = _decode_from_logits(decoder, cache, first, logits, drafter, stats)
    forks = [] if stopped else _choose_forks(first, k - 1)
    started = [(first.forked(at, token, token_logp), at.step, token) for at, token, token_logp in forks]
    going = [(fork, step, token) for (fork, finished), step, token in started if not finished and not fork.full]
    if going:
        stopped = _decode_side_by_side(decoder, cache, [fork for fork, _, _ in going], [token for _, _, token in going],
                                       [(length + step, position + step) for _, step, _ in going], stats)
    stats["forks"] = float(len(started))
    drafts = [first.draft(), *(fork.draft() for (fork, _), _, _ in started)]
    timings = {"decode_s": time.perf_counter() - t0, "generated_tokens": float(len(first.ids)), **stats,
               "cancelled": float(stopped)}
    return GenerationResult(drafts, timings)


def _decode_side_by_side(decoder: Decoder, cache: DecodeCache, outs: list[Transcript], tokens: list[int],
                         starts: list[tuple[int, int]], stats: dict[str, float]) -> bool:
    """Continue several transcripts greedily in one forward per step, one row each, after the cache's rows.

    Transcript i sees the cache's first starts[i][0] rows and its own rows, and its next token (tokens[i], not
    in the cache yet) is at position starts[i][1]. Returns whether it was cancelled."""
    seen = [rows for rows, _ in starts]
    positions = [position for _, position in starts]
    own: list[list[int]] = [[] for _ in outs]  # each transcript's own rows in the cache
    alive = list(range(len(outs)))
    while alive:
        if outs[0].request.cancelled(""):
            stats["cancelled"] = 1.0
            return True
        m, rows = len(alive), cache.length
        row_bias = np.full((m, rows), NEG_INF, dtype=np.float32)
        new_bias = np.full((m, m), NEG_INF, dtype=np.float32)
        for j, i in enumerate(alive):
            row_bias[j, :seen[i]] = 0.0
            row_bias[j, own[i]] = 0.0
            new_bias[j, j] = 0.0
            own[i].append(rows + j)
        out = cache.forward(decoder, np.asarray([tokens[i] for i in alive], dtype=np.int64),
                            np.asarray([positions[i] for i in alive], dtype=np.int64), new_bias=new_bias,
                            row_bias=row_bias, logits_index=np.arange(m, dtype=np.int64))
        cache.write(out.keys, out.values)
        stats["side_by_side_steps"] += 1
        still = []
        for j, i in enumerate(alive):
            positions[i] += 1
            logp = outs[i].next_logp(out.logits[j])
            tokens[i] = int(np.argmax(logp))
            if not (outs[i].take(tokens[i], logp) or outs[i].full):
                still.append(i)
        alive = still
    return False


def _choose_forks(first: Transcript, n: int) -> list[tuple[Hesitation, int, float]]:
    """The n likeliest (step, runner-up) pairs by the probability of the forked prefix, within draft 1's first
    line of code (a fork after it would cycle to the same first line), leaving out a runner-up that only
    spells draft 1's own text in other tokens."""
    token_bytes = first.vocab.token_bytes
    candidates = []
    for at in first.hesitations:
        if b"\n" in first.text_bytes[len(first.request.healed):at.emitted].lstrip():
            break
        rest = first.text_bytes[at.emitted:]
        for token, token_logp in zip(at.tokens, at.logps):
            if token not in first.vocab.eos and rest.startswith(token_bytes[token]):
                continue
            candidates.append((at.logprob + token_logp, at.step, at, token, token_logp))
    candidates.sort(key=lambda c: (-c[0], c[1]))
    return [(at, token, token_logp) for _, _, at, token, token_logp in candidates[:n]]


def _new_stats() -> dict[str, float]:
    return {"single_steps": 0.0, "tree_steps": 0.0, "tree_tokens": 0.0, "accepted_drafts": 0.0, "draft_s": 0.0,
            "forks": 0.0, "side_by_side_steps": 0.0, "cancelled": 0.0}


def _decode_from_logits(decoder: Decoder, cache: DecodeCache, out: Transcript, logits: np.ndarray,
                        drafter: Drafter, stats: dict[str, float]) -> bool:
    """Greedy from the prompt's logits; returns whether it was cancelled."""
    logp = out.next_logp(logits)
    token = int(np.argmax(logp))
    if out.take(token, logp) or out.full:
        return False
    return _decode_from_token(decoder, cache, out, token, drafter, stats)


def _decode_from_token(decoder: Decoder, cache: DecodeCache, out: Transcript, token: int, drafter: Drafter,
                       stats: dict[str, float]) -> bool:
    """Continue `out` greedily, speculating; `token`, its last, is not in the cache yet. Returns whether it was
    cancelled."""
    request = out.request
    lanes = softmax_lanes()
    corpus = [np.asarray(seq, dtype=np.int64) for seq in drafter.corpus if len(seq)]
    history = len(drafter.context)
    context = np.empty(history + request.max_tokens, dtype=np.int64)  # code before the cursor + output
    context[:history] = drafter.context
    context[history:history + len(out.ids)] = out.ids
    while True:
        n_context = history + len(out.ids)
        if request.cancelled(out.text):
            stats["cancelled"] = 1.0
            return True
        if out.pending:  # still healing: the next token is constrained, so drafts would not help
            logp = out.next_logp(decode_one_token(decoder, cache, token))
            stats["single_steps"] += 1
        else:
            td = time.perf_counter()
            tree = build_draft_tree(token, context[:n_context], corpus, drafter.recycler, drafter.tree_nodes, lanes,
                                    drafter.token_cost)
            stats["draft_s"] += time.perf_counter() - td
            step = verify_tree(decoder, cache, tree)
            td = time.perf_counter()
            accepted, logp, finished = greedy_accept(tree, step.logits, out)
            context[n_context:n_context + len(accepted) - 1] = [tree.tokens[node] for node in accepted[1:]]
            cache.write(step.keys, step.values, rows=np.asarray([tree.slots[node] for node in accepted]))
            cache.position += len(accepted)
            drafter.recycler.update(np.asarray(tree.tokens), step.logits)
            stats["tree_steps"] += 1
            stats["tree_tokens"] += tree.width
            stats["accepted_drafts"] += len(accepted) - 1
            stats["draft_s"] += time.perf_counter() - td
            if finished or out.full:
                return False
        token = int(np.argmax(logp))
        if out.take(token, logp) or out.full:
            return False
        context[history + len(out.ids) - 1] = token
