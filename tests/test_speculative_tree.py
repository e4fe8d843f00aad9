"""Draft trees (llama.speculative.tree, eagle_tree): several candidate continuations verified by one forward
pass under a tree attention mask give, greedy, token for token what plain decoding gives; a wrong ancestor in
the mask, or accepted entries left where the tree put them, do not. (Sampling with a tree:
test_speculative_tree_sampling.)"""

from typing import Dict, List, Sequence

import pytest
import torch

from llama import Llama
from llama.speculative import Speculation, speculative_generate
from llama.speculative import tree as tree_module
from llama.speculative.drafters import Drafter
from llama.speculative.eagle import EagleDrafter
from llama.speculative.eagle_tree import EagleTreeDrafter
from llama.speculative.tree import DraftTree, accept_tree_greedy, tree_mask
from llama.speculative.forward import forward_features
from test_eagle import AUSTEN_PROMPTS, HEAD_DIR, random_head  # noqa: F401  (random_head: a fixture)
from test_speculative import assert_same_as_plain, demo, one_thread, plain  # noqa: F401  (fixtures)


class OracleTree(Drafter):
    """Trees around a known greedy continuation: at each depth a wrong sibling first, then (if `right`) the
    right token, and under the wrong sibling a wrong child too. With right=True every depth is accepted, the
    accepted nodes sitting in the tree's second branch (so their cache entries must be moved)."""

    def __init__(self, sequence: Sequence[int], vocab_size: int, right: bool = True):
        self.sequence, self.vocab_size, self.right = list(sequence), vocab_size, right

    def propose_tree(self, tokens: Sequence[int], depth: int, max_nodes: int) -> DraftTree:
        truth = self.sequence[len(tokens) : len(tokens) + depth]
        toks: List[int] = []
        parents: List[int] = []
        parent = -1
        for i, t in enumerate(truth):
            if len(toks) + 3 > max_nodes:
                break
            toks.append((t + 1) % self.vocab_size)  # a wrong sibling ...
            parents.append(parent)
            if i < depth - 1:  # ... and its wrong child
                toks.append((t + 2) % self.vocab_size)
                parents.append(len(toks) - 2)
            if not self.right:
                break
            toks.append(t)
            parents.append(parent)
            parent = len(toks) - 1
        return DraftTree(toks, parents)

    def propose(self, tokens: Sequence[int], k: int) -> List[int]:
        raise AssertionError("a tree drafter is asked for trees")


def greedy_continuation(llama: Llama, prompt: List[int], n: int) -> List[int]:
    return prompt + plain(llama, prompt, n)[0]


# ---- the mask and the walk ----


def test_tree_mask_lets_a_node_see_the_cache_the_root_its_ancestors_and_itself_at_its_depth():
    tree = DraftTree([10, 11, 12, 13], [-1, -1, 0, 2])  # root -> 10 -> 12 -> 13; root -> 11
    positions, mask = tree_mask(tree, start=3, device=torch.device("cpu"))
    assert positions.tolist() == [3, 4, 4, 5, 6]
    cached = [True] * 3
    assert mask.tolist() == [
        cached + [True, False, False, False, False],  # the root (slot 3)
        cached + [True, True, False, False, False],  # 10
        cached + [True, False, True, False, False],  # 11: not its sibling 10
        cached + [True, True, False, True, False],  # 12: under 10
        cached + [True, True, False, True, True],  # 13: under 12
    ]


def test_greedy_walk_follows_the_models_choices_down_the_tree():
    tree = DraftTree([10, 11, 12, 13], [-1, -1, 1, 1])  # root -> 10; root -> 11 -> {12, 13}
    logits = torch.zeros(5, 20)
    for row, choice in enumerate([11, 5, 13, 7, 9]):  # the model's choice after root, 10, 11, 12, 13
        logits[row, choice] = 1.0
    path, emitted = accept_tree_greedy(logits, tree)
    assert path == [1, 3] and emitted == [11, 13, 9]


def test_bad_trees_are_refused(tiny_llama):
    with pytest.raises(ValueError, match="parents"):
        DraftTree([1, 2], [-1, 1])  # its own parent
    llama = tiny_llama(seed=0, max_seq_len=64, max_batch_size=1)

    class Deep(Drafter):
        def propose_tree(self, tokens, depth, max_nodes):
            return DraftTree([1] * (depth + 1), list(range(-1, depth)))

    with pytest.raises(ValueError, match="depth"):
        speculative_generate(llama, [[1, 2, 3]], 10, Deep(), k=2)

    class OutOfVocabulary(Drafter):
        def propose_tree(self, tokens, depth, max_nodes):
            return DraftTree([llama.model.vocab_size], [-1])

    with pytest.raises(ValueError, match="outside the vocabulary"):
        speculative_generate(llama, [[1, 2, 3]], 10, OutOfVocabulary(), k=2)


# ---- lossless: greedy, against plain decoding ----


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("right", [True, False])
def test_greedy_with_a_tree_gives_plain_decodings_tokens_and_logprobs(tiny_llama, fast, right):
    llama = tiny_llama(seed=0, max_seq_len=96, max_batch_size=1, fast=fast)
    for prompt, k in (([10, 20, 30, 40], 4), ([7], 3), ([1, 2, 3, 1, 2], 1)):
        drafter = OracleTree(greedy_continuation(llama, prompt, 60), llama.model.vocab_size, right)
        stats = assert_same_as_plain(llama, prompt, 50, drafter, k=k)
        if right:  # every depth accepted: k + 1 tokens a pass (but the last)
            assert stats.mean_accepted_length > k + 0.5


def test_greedy_with_a_tree_near_the_end_of_the_context_is_plain_decoding(tiny_llama):
    llama = tiny_llama(seed=1, max_seq_len=40, max_batch_size=1)
    prompt = list(range(5, 30))
    drafter = OracleTree(greedy_continuation(llama, prompt, 40), llama.model.vocab_size)
    assert_same_as_plain(llama, prompt, 30, drafter, k=6)  # the trees shrink to the cache slots left


def wrong_ancestor_mask(tree, start, device):
    """A planted bug: each node under a parent sees the parent's first sibling's slot instead."""
    positions, mask = tree_mask(tree, start, device)
    for i, parent in enumerate(tree.parents):
        siblings = [j for j, p in enumerate(tree.parents) if p == tree.parents[parent]] if parent >= 0 else []
        if parent >= 0 and siblings[0] != parent:
            mask[i + 1, start + 1 + parent] = False
            mask[i + 1, start + 1 + siblings[0]] = True
    return positions, mask


@pytest.mark.parametrize("bug", ["wrong ancestor in the mask", "accepted entries not moved"])
def test_a_planted_bug_in_tree_verification_is_caught(tiny_llama, monkeypatch, bug):
    llama = tiny_llama(seed=0, max_seq_len=96, max_batch_size=1)
    prompt = [10, 20, 30, 40]
    drafter = OracleTree(greedy_continuation(llama, prompt, 60), llama.model.vocab_size)
    if bug == "wrong ancestor in the mask":
        monkeypatch.setattr(tree_module, "tree_mask", wrong_ancestor_mask)
    else:
        monkeypatch.setattr(tree_module, "commit_path", lambda model, start, path: None)
    with pytest.raises(AssertionError):
        assert_same_as_plain(llama, prompt, 50, drafter, k=4)


def test_logits_processors_and_stop_strings_shape_each_node_given_its_own_path(tiny_llama):
    llama = tiny_llama(seed=2, max_seq_len=96, max_batch_size=1)
    prompt = [10, 20, 30, 40]
    controls = dict(repetition_penalty=1.3, banned_token_ids=[5, 6], min_new_tokens=3)
    want = llama.generate([prompt], 40, temperature=0, **controls)[0][0]
    sequence = prompt + want + [0] * 10
    tokens = llama.generate([prompt], 40, temperature=0, **controls,
                            speculative=Speculation(OracleTree(sequence, llama.model.vocab_size), k=3))[0][0]
    assert tokens == want


# ---- the EAGLE-style head drafting a tree ----


def path_children(drafter: EagleTreeDrafter, llama: Llama, tokens: List[int], path: List[int], b: int) -> List[int]:
    """The head's b likeliest tokens after tokens + path, computed as a chain through its cache (causal
    mask: no tree) from a fresh state: what the tree's node at the end of `path` must have as children."""
    with torch.inference_mode():
        drafter.reset()
        drafter.observe_features(0, forward_features(llama.model, torch.tensor([tokens[:-1]]), 0)[1][0])
        feature = drafter._catch_up(tokens)
        for i, token in enumerate(path):
            ids = torch.tensor([token])
            feature = drafter._lean_step(feature, ids, len(tokens) - 1 + i)
        normed = torch.nn.functional.rms_norm(feature, (feature.shape[-1],), llama.model.norm.weight,
                                              llama.model.norm.eps)
        return sorted(drafter.draft_logits(normed)[0].topk(b).indices.tolist())


def test_the_heads_tree_gives_each_node_the_children_its_own_path_gives(demo):
    drafter = EagleTreeDrafter(HEAD_DIR, demo, branch=3, nodes=100)
    tokens = demo.tokenizer.encode(AUSTEN_PROMPTS[0], bos=True, eos=False)
    with torch.inference_mode():
        drafter.observe_features(0, forward_features(demo.model, torch.tensor([tokens[:-1]]), 0)[1][0])
        tree = drafter.propose_tree(tokens, 4, 100)
    children: Dict[int, List[int]] = {}
    for i, p in enumerate(tree.parents):
        children.setdefault(p, []).append(tree.tokens[i])
    assert len(children) == 1 + 3 * 3  # the root and b expanded nodes at depths 1..3
    for node, kids in children.items():
        path = [] if node < 0 else [tree.tokens[j] for j in tree.path_to(node)]
        assert sorted(kids) == path_children(drafter, demo, tokens, path, 3), path


@pytest.mark.slow
def test_demo_eagle_tree_is_plain_decoding_and_accepts_more_per_pass_than_the_chain(demo):
    tree = EagleTreeDrafter(HEAD_DIR, demo, branch=3, nodes=8, draft_vocab=2048, draft_dtype=torch.bfloat16)
    chain = EagleDrafter(HEAD_DIR, demo)
    lengths = {}
    for name, drafter, k in (("tree", tree, 3), ("chain", chain, 4)):
        total = None
        for text in AUSTEN_PROMPTS:
            ids = demo.tokenizer.encode(text, bos=True, eos=False)
            stats = assert_same_as_plain(demo, ids, 32, drafter, k=k, ignore_eos=True)
            total = stats if total is None else total.add(stats)
        lengths[name] = total.mean_accepted_length
    assert lengths["tree"] > lengths["chain"] + 0.3, lengths


def test_the_eagle_tree_named_as_a_setting_is_plain_greedy_decoding(tiny_llama, random_head):
    llama = tiny_llama(seed=0, max_seq_len=96, max_batch_size=2)
    prompts = [[10, 20, 30, 40], [7, 8]]
    want = llama.generate(prompts, 30, temperature=0, logprobs=True)
    got = llama.generate(prompts, 30, temperature=0, logprobs=True, speculative=f"eagle-tree:{random_head(llama)}")
    assert got[0] == want[0]
    assert max(abs(a - b) for row, ref in zip(got[1], want[1]) for a, b in zip(row, ref)) <= 1e-5
