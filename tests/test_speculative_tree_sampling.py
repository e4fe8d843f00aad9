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
from test_eagle import random_head  # noqa: F401  (a fixture)
from test_speculative import goodness_of_fit, one_thread  # noqa: F401  (one_thread: a fixture)

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
    (list(range(8)), ("not_renormalised",)),  # every token: one is accepted surely, no residual is drawn
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


# ---- greedy, and every other control, as without speculation (a random model writing letters) ----

NOT_LETTERS = tuple(t for t in range(512) if not ord("a") <= t <= ord("z"))
TREE_SAMPLED = dict(temperature=1.0, top_p=0.95, banned_token_ids=NOT_LETTERS)  # texts of letters only


@pytest.fixture(scope="module")
def llama(tiny_checkpoint) -> Llama:
    return Llama.build(str(tiny_checkpoint(SMALL_GQA, seed=2).dir), None, max_seq_len=64, max_batch_size=4)


@pytest.fixture(scope="module")
def twin_tree(tiny_checkpoint) -> "TwinTree":
    """Trees from a second copy of the model: its likeliest tokens, so that drafts are often accepted."""
    twin = Llama.build(str(tiny_checkpoint(SMALL_GQA, seed=2).dir), None, max_seq_len=64, max_batch_size=1)
    return TwinTree(twin)


class TwinTree(Drafter):
    """At each depth the `branch` likeliest letters after the text and the
    likeliest chain so far, under the twin model (the target's own weights, a separate cache): the chain of
    first children and their siblings. A function of the text, as a drafter must be."""

    def __init__(self, twin: Llama, branch: int = 3):
        self.twin, self.branch = twin, branch
        self.allowed = torch.ones(twin.model.vocab_size, dtype=torch.bool)
        self.allowed[list(NOT_LETTERS)] = False

    @torch.inference_mode()
    def propose_tree(self, tokens: Sequence[int], depth: int, max_nodes: int) -> DraftTree:
        text, toks, parents, parent = list(tokens), [], [], -1
        for _ in range(depth):
            if len(toks) + self.branch > max_nodes or len(text) >= self.twin.model.params.max_seq_len:
                break
            logits = self.twin.model.forward(torch.tensor([text]), 0)[0, -1].masked_fill(~self.allowed, -math.inf)
            top = logits.topk(self.branch).indices.tolist()
            toks += top
            parents += [parent] * len(top)
            parent = len(toks) - len(top)  # the likeliest child carries the chain on
            text.append(top[0])
        return DraftTree(toks, parents)

    def propose(self, tokens: Sequence[int], k: int) -> List[int]:
        raise AssertionError("a tree drafter is asked for trees")


def flat(results) -> list:
    return [c for samples in results for c in samples]


PROMPTS = [list(b"cab"), list(b"hello wor"), list(b"q")]


@pytest.mark.parametrize("controls", [dict(temperature=0), dict(temperature=0.8, top_k=1, seed=5),
                                      dict(temperature=1.5, top_p=1e-6)],
                         ids=["temperature 0", "top_k 1", "top_p 1e-6"])
def test_tree_sampling_of_a_point_mass_is_greedy_decoding(llama, twin_tree, controls):
    # top_k=1 or a tiny top_p leave p a point mass on the greedy token: the sampling rule must then accept
    # exactly the greedy walk's nodes and draw the greedy token.
    want = flat(llama.complete(PROMPTS, 30, logprobs=True, temperature=0, banned_token_ids=NOT_LETTERS))
    spec = Speculation(twin_tree, k=3)
    got = flat(llama.complete(PROMPTS, 30, logprobs=True, banned_token_ids=NOT_LETTERS, speculative=spec,
                              **controls))
    for g, w in zip(got, want):
        assert (g.tokens, g.text, g.stop_reason) == (w.tokens, w.text, w.stop_reason)
        assert max((abs(a - b) for a, b in zip(g.logprobs, w.logprobs)), default=0.0) <= 1e-5
    assert spec.stats.mean_accepted_length > 2  # (the twin's drafts are the model's choices)


def sampled(llama: Llama, drafter: Drafter, prompts=PROMPTS[:1], max_gen_len: int = 40, **kw):
    spec = Speculation(drafter, k=3)
    return flat(llama.complete(prompts, max_gen_len, speculative=spec, **dict(TREE_SAMPLED, **kw))), spec.stats


def test_stop_strings_and_stop_tokens_cut_a_tree_sampled_text_where_they_first_occur(llama, twin_tree, monkeypatch):
    # Stop strings and stop tokens change neither the trees nor the draws before them: with the same seed the
    # output is the uncut one, cut where plain decoding cuts a text (before the stop string / stop token).
    [full], stats = sampled(llama, twin_tree, seed=4)
    assert full.stop_reason == "length" and len(full.text) == 40
    assert stats.accepted > 5  # several passes accepted nodes: stops inside runs of accepted tokens
    for where in (3, 11, 20):
        stop = full.text[where : where + 2]
        [cut], _ = sampled(llama, twin_tree, seed=4, stop=[stop], logprobs=True)
        assert cut.stop_reason == "stop_string" and cut.text == full.text[: full.text.index(stop)]
        assert cut.tokens == full.tokens[: len(cut.tokens)]
    letter = full.tokens[17]
    monkeypatch.setattr(llama.tokenizer, "stop_tokens", set(llama.tokenizer.stop_tokens) | {letter})
    [cut], _ = sampled(llama, twin_tree, seed=4, logprobs=True)
    first = full.tokens.index(letter)
    assert (cut.tokens, cut.stop_reason, cut.stop_token) == (full.tokens[:first], "stop_token", letter)
    assert len(cut.logprobs) == first
    [kept], _ = sampled(llama, twin_tree, seed=4, ignore_eos=True)  # ignore_eos: the stop token is kept
    assert kept.tokens == full.tokens


@pytest.mark.parametrize("max_gen_len", [1, 2, 4, 9])
def test_max_gen_len_and_the_end_of_the_context_end_tree_sampled_rows_as_plain_decoding(llama, twin_tree,
                                                                                       max_gen_len):
    prompts = [list(b"cab"), list(b"ab" * 30)]  # the second: 4 slots of the context left
    got, _ = sampled(llama, twin_tree, prompts, max_gen_len, seed=1, ignore_eos=True, logprobs=True)
    for c, room in zip(got, (max_gen_len, min(max_gen_len, 4))):
        assert (len(c.tokens), len(c.logprobs), c.stop_reason) == (room, room, "length")


def test_logprobs_and_top_logprobs_of_tree_sampled_tokens_are_the_models_own(llama, twin_tree):
    got, stats = sampled(llama, twin_tree, PROMPTS, 30, seed=2, logprobs=True, top_logprobs=3)
    assert stats.accepted > 0
    for prompt, c in zip(PROMPTS, got):
        text = prompt + c.tokens
        with torch.inference_mode():
            want = torch.log_softmax(llama.model.forward(torch.tensor([text]), 0)[0].float(), dim=-1)
        want = want[len(prompt) - 1 : len(text) - 1]  # (len(c.tokens), vocab): the rows that predicted them
        lps = want.gather(1, torch.tensor(c.tokens)[:, None])[:, 0]
        assert torch.allclose(torch.tensor(c.logprobs), lps, atol=1e-5)
        assert score_sequences(llama.model, [text])[0]["logprobs"][len(prompt) - 1 :] == pytest.approx(c.logprobs,
                                                                                                       abs=1e-5)
        for pos, top in enumerate(c.top_logprobs):
            values, ids = want[pos].topk(3)
            assert [t for t, _ in top] == ids.tolist()
            assert [v for _, v in top] == pytest.approx(values.tolist(), abs=1e-5)


def test_n_seeded_tree_samples_repeat_differ_and_do_not_depend_on_the_other_rows(llama, twin_tree):
    runs = [[c.tokens for c in sampled(llama, twin_tree, max_gen_len=20, seed=3, n=3)[0]] for _ in range(2)]
    assert runs[0] == runs[1]  # the seed makes it repeat
    assert len({tuple(t) for t in runs[0]}) == 3  # each sample its own random stream
    alone = sampled(llama, twin_tree, [list(b"cab")], 20, seed=11)[0][0].tokens
    second = sampled(llama, twin_tree, [list(b"hello"), list(b"cab")], 20, seed=11)[0][1].tokens
    assert second == alone
    assert sampled(llama, twin_tree, max_gen_len=20, seed=12)[0][0].tokens != runs[0][0]


def test_a_tree_sampled_stream_gives_each_rows_text_token_by_token_and_its_stop_reason(llama, twin_tree):
    kw = dict(TREE_SAMPLED, seed=6)
    whole, _ = sampled(llama, twin_tree, PROMPTS[:2], 30, seed=6)
    stop = whole[0].text[8:10]
    for extra in ({}, {"stop": [stop]}):
        want, _ = sampled(llama, twin_tree, PROMPTS[:2], 30, seed=6, **extra)
        events = list(llama.generate_stream(PROMPTS[:2], 30, speculative=Speculation(twin_tree, k=3), **kw,
                                            **extra))
        assert [e.row for e in events] == sorted(e.row for e in events)  # rows one after the other
        for row, c in enumerate(want):
            mine = [e for e in events if e.row == row]
            assert "".join(e.text for e in mine) == c.text
            assert mine[-1].token is None and mine[-1].stop_reason == c.stop_reason
            assert [e.token for e in mine[:-1]][: len(c.tokens)] == c.tokens
    assert want[0].stop_reason == "stop_string"


def test_the_eagle_tree_setting_samples_reproducibly_with_a_seed(llama, random_head):
    setting = f"eagle-tree:{random_head(llama)}"
    runs = [llama.complete([list(b"cab")], 20, speculative=setting, seed=s, **TREE_SAMPLED)[0][0].tokens
            for s in (7, 7, 8)]
    assert runs[0] == runs[1] != runs[2]
    assert len(runs[0]) == 20 and all(ord("a") <= t <= ord("z") for t in runs[0])
