"""Sampling with a draft tree (llama.speculative.tree_sampling) draws from exactly the model's distribution,
the plain sampler's, under temperature, top_p, top_k, min_p, repetition penalty and banned ids: chi-square
tests against that distribution computed independently from the model's logits, which two biased rules
(accepting each child with its probability under p, not renormalised; drawing from p, not the residual,
after every child is rejected) fail; at temperature 0, or with top_k=1, it is greedy decoding; stop tokens,
stop strings, max_gen_len, logprobs, n and streaming behave as without speculation."""

import math
from typing import Dict, List, Optional, Sequence

import pytest
import torch

from helpers import SMALL_GQA, random_state_dict, write_byte_tokenizer
from llama import Llama
from llama.distributed import init_distributed
from llama.model import ModelArgs, Transformer
from llama.scoring import score_sequences
from llama.speculative import Speculation, speculative_generate
from llama.speculative import tree_sampling
from llama.speculative.drafters import Drafter
from llama.speculative.tree import DraftTree
from llama.speculative.verify import draw
from llama.tokenizer import Tokenizer
from test_speculative import goodness_of_fit, one_thread  # noqa: F401  (one_thread: a fixture)
from test_speculative_api import BANNED

VOCAB = 8
TINY_VOCAB = dict(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, multiple_of=16, norm_eps=1e-5,
                  rope_theta=500000.0, vocab_size=VOCAB)
PROMPT = [1, 2]
LEVEL = 1e-3  # a p-value below this rejects "the samples come from the model's distribution"


@pytest.fixture(scope="module")
def tiny_vocab_llama(tmp_path_factory) -> Llama:
    """A random model over 8 tokens (the byte tokenizer only supplies stop tokens, ids >= 256, never drawn)."""
    init_distributed(torch.device("cpu"))  # fairscale's layers need it (Llama.build would start it)
    args = ModelArgs.from_params(TINY_VOCAB, max_seq_len=32, max_batch_size=1)
    model = Transformer(args)
    model.load_state_dict(random_state_dict(TINY_VOCAB, seed=3))
    tokenizer = Tokenizer(str(write_byte_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.model")))
    return Llama(model.eval(), tokenizer)


# ---- the distribution, written out independently of llama.sampling ----


def by_hand(logits: Sequence[float], context: Sequence[int], temperature: float, top_p: float, top_k: int = 0,
            min_p: float = 0.0, repetition_penalty: float = 1.0, banned_token_ids: Sequence[int] = ()
            ) -> List[float]:
    """The plain sampler's distribution after `context`: repetition penalty (CTRL's: positive logits of seen
    tokens divided, negative ones multiplied), banned ids, temperature, top_k (ties kept), softmax, min_p
    (below min_p x the largest probability dropped, the rest renormalised), top_p (the smallest set of the
    likeliest tokens, ties by id, whose mass reaches top_p, renormalised)."""
    x = [float(v) for v in logits]
    for t in set(context):
        if repetition_penalty != 1.0 and t < len(x):
            x[t] = x[t] / repetition_penalty if x[t] > 0 else x[t] * repetition_penalty
    for t in banned_token_ids:
        x[t] = -math.inf
    x = [v / temperature for v in x]
    if 0 < top_k < len(x):
        kth = sorted(x, reverse=True)[top_k - 1]
        x = [v if v >= kth else -math.inf for v in x]
    top = max(x)
    probs = [math.exp(v - top) for v in x]
    probs = [q / sum(probs) for q in probs]
    if min_p > 0:
        probs = [q if q >= min_p * max(probs) else 0.0 for q in probs]
        probs = [q / sum(probs) for q in probs]
    kept, mass = [], 0.0
    for i in sorted(range(len(probs)), key=lambda i: (-probs[i], i)):
        if mass > top_p:
            break
        kept.append(i)
        mass += probs[i]
    total = sum(probs[i] for i in kept)
    return [probs[i] / total if i in kept else 0.0 for i in range(len(probs))]


def next_distribution(llama: Llama, text: Sequence[int], controls: dict) -> List[float]:
    """by_hand on the model's logits after `text` (one whole forward pass from position 0)."""
    logits = llama.model.forward(torch.tensor([list(text)]), 0)[0, -1].tolist()
    sampling = {k: v for k, v in controls.items() if k != "seed"}
    return by_hand(logits, text, **sampling)


def expected_pairs(llama: Llama, controls: dict) -> Dict[tuple, float]:
    """The probability of each (first, second) generated token after PROMPT under plain sampling."""
    pairs = {}
    for t1, q1 in enumerate(next_distribution(llama, PROMPT, controls)):
        if q1 > 0:
            for t2, q2 in enumerate(next_distribution(llama, PROMPT + [t1], controls)):
                if q2 > 0:
                    pairs[(t1, t2)] = q1 * q2
    return pairs


# ---- drafters ----


class FixedTree(Drafter):
    """Proposes the same tree after any text (a deterministic drafter), cut to the depth and size asked."""

    def __init__(self, tree: DraftTree):
        self.tree = tree

    def propose_tree(self, tokens: Sequence[int], depth: int, max_nodes: int) -> DraftTree:
        depths = self.tree.depths()
        index: Dict[int, int] = {-1: -1}  # node of self.tree -> node of the tree proposed
        kept_tokens, kept_parents = [], []
        for i, (token, parent) in enumerate(zip(self.tree.tokens, self.tree.parents)):
            if depths[i] <= depth and parent in index and len(kept_tokens) < max_nodes:
                index[i] = len(kept_tokens)
                kept_tokens.append(token)
                kept_parents.append(index[parent])
        return DraftTree(kept_tokens, kept_parents)

    def propose(self, tokens: Sequence[int], k: int) -> List[int]:
        raise AssertionError("a tree drafter is asked for trees")


def by_rank(probs: Sequence[float]) -> List[int]:
    """Token ids, the likeliest first (ties by id)."""
    return sorted(range(len(probs)), key=lambda i: (-probs[i], i))


def ranked_tree(llama: Llama, controls: dict) -> DraftTree:
    """A tree that meets every case of the rule after PROMPT: at the root, the second likeliest token, then
    the likeliest, then one the controls give probability 0 (if any); under each of the first two, its
    second likeliest and likeliest tokens (depth 2, where the walk goes on after an acceptance)."""
    first = next_distribution(llama, PROMPT, controls)
    ranks = by_rank(first)
    root = ranks[1::-1] + [t for t in ranks if first[t] == 0][:1]
    tokens, parents = list(root), [-1] * len(root)
    for node, token in enumerate(root[:2]):
        under = by_rank(next_distribution(llama, PROMPT + [token], controls))[1::-1]
        tokens += under
        parents += [node] * len(under)
    return DraftTree(tokens, parents)


def every_token_tree(llama: Llama, controls: dict) -> DraftTree:
    """Every token under the root, least likely first (so the rule meets "all the mass left on one child"),
    and every token again under the likeliest."""
    order = by_rank(next_distribution(llama, PROMPT, controls))[::-1]
    return DraftTree(order + list(range(VOCAB)), [-1] * VOCAB + [VOCAB - 1] * VOCAB)


# ---- biased rules: each fails the test below ----


def not_renormalised(p: torch.Tensor, children: Sequence[int], generator: Optional[torch.Generator]):
    """Each child accepted with its probability under p itself (not under what is left of it): later
    children come out too rarely, the draw from the residual too often."""
    residual = p.clone()
    for i, c in enumerate(children):
        if float(torch.rand((), generator=generator)) < float(p[c]):
            return i, c
        residual[c] = 0.0
    return None, draw(residual / residual.sum() if residual.sum() > 0 else p, generator)


def resample_from_p(p: torch.Tensor, children: Sequence[int], generator: Optional[torch.Generator]):
    """The right acceptances, but after every child is rejected a draw from p instead of the residual: the
    children come out too often."""
    chosen, token = RIGHT_RULE(p, children, generator)
    if chosen is None and children:
        token = draw(p, generator)  # (the residual's draw, made by the right rule, thrown away)
    return chosen, token


RIGHT_RULE = tree_sampling.sample_at_node  # (kept before any test replaces it)


# ---- one node ----


def node_p_value(p: List[float], children: List[int], n: int, rule=None) -> float:
    """n draws of one node's rule (seeded) against p: the chi-square p-value of the emitted tokens."""
    rule = rule or tree_sampling.sample_at_node
    generator = torch.Generator().manual_seed(0)
    probs = torch.tensor(p)
    counts: Dict[tuple, int] = {}
    for _ in range(n):
        chosen, token = rule(probs, children, generator)
        assert chosen is None or children[chosen] == token
        counts[(token,)] = counts.get((token,), 0) + 1
    return goodness_of_fit(counts, {(t,): q for t, q in enumerate(p) if q > 0}, n)


P = [0.3, 0.0, 0.25, 0.05, 0.2, 0.0, 0.15, 0.05]


@pytest.mark.parametrize("children, caught_by", [
    ([], ()),
    ([0], ()),  # one child: the chain's rule; neither bias changes anything
    ([2, 0], ("not_renormalised", "resample_from_p")),
    ([4, 1, 2], ("not_renormalised", "resample_from_p")),  # a zero-probability child in between
    ([1, 5], ()),  # only zero-probability children: a draw from p
    ([7, 6, 4, 3, 2], ("not_renormalised", "resample_from_p")),  # all but the likeliest
    (list(range(8)), ()),  # every token: one is accepted surely, and the biased rules fail to draw at all
], ids=["no children", "one", "two", "a zero in between", "only zeros", "all but one", "every token"])
def test_one_node_emits_each_token_with_its_probability_and_biased_rules_do_not(children, caught_by):
    assert node_p_value(P, children, 4000) > LEVEL
    for biased in caught_by:
        assert node_p_value(P, children, 4000, globals()[biased]) < LEVEL, biased


def test_a_child_holding_all_the_mass_left_is_accepted_surely_and_a_zero_one_without_a_random_number():
    p = torch.tensor([1 / 3, 1 / 3, 0.0, 1 / 3])
    for seed in range(50):
        g = torch.Generator().manual_seed(seed)
        chosen, token = tree_sampling.sample_at_node(p, [2, 0, 1, 3], g)
        assert token in (0, 1, 3) and chosen == [2, 0, 1, 3].index(token)  # never the zero, never a residual
    # A zero-probability child draws no random number: the stream is where a tree without it leaves it.
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert tree_sampling.sample_at_node(p, [2, 1], g1)[1] == tree_sampling.sample_at_node(p, [1], g2)[1]
    assert torch.equal(g1.get_state(), g2.get_state())


def test_a_tree_with_repeated_siblings_is_refused_and_a_child_may_repeat_its_parent():
    with pytest.raises(ValueError, match=r"siblings must hold distinct tokens: .*\[\(2, 0, 5\)\]"):
        DraftTree([5, 6, 5], [-1, -1, -1])
    with pytest.raises(ValueError, match=r"\[\(3, 1, 7\)\]"):
        DraftTree([5, 7, 6, 7], [-1, 0, 0, 0])
    DraftTree([5, 5, 5], [-1, 0, 1])  # a chain of one token: no siblings


# ---- the whole loop: the first two generated tokens, over many seeds ----


def pairs_p_value(llama: Llama, expected: Dict[tuple, float], n: int, drafter: Optional[Drafter],
                  controls: dict) -> float:
    """n generations of 3 tokens (seed i for sample i; trees 2 deep in the first pass) with `drafter`, or
    plain sampling (None): the chi-square p-value of their first two tokens against `expected`."""
    counts: Dict[tuple, int] = {}
    for seed in range(n):
        kw = dict(controls, seed=seed)
        if drafter is None:
            tokens = llama.generate([PROMPT], 3, **kw)[0]
        else:
            tokens = speculative_generate(llama, [PROMPT], 3, drafter, k=2, **kw)[0]
        key = tuple(tokens[0][:2])
        counts[key] = counts.get(key, 0) + 1
    return goodness_of_fit(counts, expected, n)


META = dict(temperature=0.7, top_p=0.9)


def test_tree_sampling_draws_plain_samplings_distribution_and_biased_rules_fail(tiny_vocab_llama, monkeypatch):
    llama = tiny_vocab_llama
    expected = expected_pairs(llama, META)
    assert 15 <= len(expected) < VOCAB ** 2  # top_p cut some tokens at some positions
    ranked, every = FixedTree(ranked_tree(llama, META)), FixedTree(every_token_tree(llama, META))
    assert 0.0 in [next_distribution(llama, PROMPT, META)[t] for t in ranked.tree.tokens[:3]]
    assert pairs_p_value(llama, expected, 1000, None, META) > LEVEL  # the plain sampler: the expectation holds
    assert pairs_p_value(llama, expected, 2000, ranked, META) > LEVEL
    assert pairs_p_value(llama, expected, 1000, every, META) > LEVEL
    for biased in (not_renormalised, resample_from_p):
        monkeypatch.setattr(tree_sampling, "sample_at_node", biased)
        assert pairs_p_value(llama, expected, 1000, ranked, META) < LEVEL, biased.__name__


@pytest.mark.parametrize("controls", [
    dict(temperature=1.0, top_p=1.0, top_k=3),
    dict(temperature=1.3, top_p=0.95, min_p=0.2),
    dict(temperature=0.9, top_p=1.0, repetition_penalty=1.8, banned_token_ids=[4]),
], ids=["top_k", "min_p", "repetition_penalty_and_banned_ids"])
def test_tree_sampling_follows_every_sampling_control(tiny_vocab_llama, controls):
    llama = tiny_vocab_llama
    expected = expected_pairs(llama, controls)
    assert pairs_p_value(llama, expected, 1000, FixedTree(ranked_tree(llama, controls)), controls) > LEVEL
