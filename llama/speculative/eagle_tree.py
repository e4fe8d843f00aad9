"""The EAGLE-style head drafting a tree (EAGLE-2's dynamic draft tree), verified in one pass by
llama.speculative.tree.

At each depth the head runs once on the `branch` likeliest nodes of the depth before (by the product of the
head's probabilities along their path: its confidence that the whole path is right), and each of them gets
its `branch` likeliest next tokens as children. After `depth` such steps the tree keeps its `nodes` likeliest
nodes. A step of the head costs about the same for 4 rows as for 1 on a small model (its cost is the number
of operations, not their arithmetic), and so does a verify pass of 17 tokens against one of 5: a tree of 16
nodes costs about what a chain of 4 costs, and offers the model more chances to agree.

The head's own cache holds the fed nodes' pairs after the real ones, each node attending to the real pairs,
its fed ancestors and itself (a tree mask, as the model's in the verify pass); like a chain's predicted
pairs, they are overwritten by the next call's real pairs before anything reads them.
"""

from pathlib import Path
from typing import Any, Dict, List, Sequence, Union

import torch
import torch.nn.functional as F

from llama.speculative.eagle import EagleDrafter, EagleHead
from llama.speculative.tree import DraftTree


class EagleTreeDrafter(EagleDrafter):
    """Drafts a DraftTree with an EagleHead (greedy or sampled: llama.speculative.tree_sampling). `k`, the
    Speculation's drafts per pass, is the tree's depth."""

    def __init__(self, head: Union[EagleHead, str, Path], target: Any, branch: int = 4, nodes: int = 16,
                 **options: Any):
        """head, target: as EagleDrafter's; branch: nodes expanded per depth and children tried per expanded
        node; nodes: the most nodes a tree keeps (its verify pass feeds nodes + 1 tokens); options:
        EagleDrafter's draft_vocab and draft_dtype."""
        for name, value in (("branch", branch), ("nodes", nodes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        super().__init__(head, target, fast=True, **options)
        if not self.lean:
            raise ValueError(f"EagleTreeDrafter drafts with a one-block head, this one has "
                             f"{self.head.params.n_layers} blocks")
        self.branch, self.nodes = branch, nodes

    @torch.inference_mode()
    def propose_tree(self, tokens: Sequence[int], depth: int, max_nodes: int) -> DraftTree:
        """A tree of at most min(nodes, max_nodes) nodes and `depth` levels that may follow `tokens`,
        its likeliest chain first (its nodes take the verify pass's first cache slots)."""
        length = len(tokens)
        max_nodes = min(self.nodes, max_nodes)
        if depth <= 0 or length < 2 or max_nodes <= 0:
            return DraftTree([], [])
        model, device, b = self.target.model, self.features.device, self.branch
        head_slots = self.head.layers[0].attention.cache_k.shape[2]
        feature = self._catch_up(tokens)  # (w, dim): the predicted features of the frontier (first: the root)
        front: List[int] = [-1]  # the frontier's nodes (-1: the root)
        toks: List[int] = []
        parents: List[int] = []
        scores: List[float] = []  # each node's path log-probability under the head
        fed: Dict[int, int] = {}  # node -> its slot in the head's cache
        real = length - 1  # the real pairs fill the head's slots 0 .. real - 1; fed nodes follow
        for d in range(depth):
            normed = F.rms_norm(feature, (feature.shape[-1],), model.norm.weight, model.norm.eps)
            top = torch.log_softmax(self.draft_logits(normed).float(), dim=-1).topk(b, dim=-1)  # (w, b) each
            first = len(toks)
            ids = top.indices.flatten()
            toks += (ids if self.draft_ids is None else self.draft_ids[ids]).tolist()
            for parent, values in zip(front, top.values.tolist()):
                base = 0.0 if parent < 0 else scores[parent]
                parents += [parent] * b
                scores += [base + v for v in values]
            slot = real + len(fed)
            if d == depth - 1 or slot + b > head_slots:
                break
            # The head runs on the b likeliest new nodes: (its parent's predicted feature, its token).
            front = sorted(range(first, len(toks)), key=lambda i: (-scores[i], i))[:b]
            tree_part = []  # (n, len(fed) + n): which fed slots each sees: its ancestors' and its own
            for r, node in enumerate(front):
                row = [False] * (len(fed) + len(front))
                ancestor = parents[node]
                while ancestor >= 0:
                    row[fed[ancestor]] = True
                    ancestor = parents[ancestor]
                row[len(fed) + r] = True
                tree_part.append(row)
            rows = [(node - first) // b for node in front]  # the frontier row each one's parent had
            fed.update({node: slot - real + r for r, node in enumerate(front)})  # (not len(fed): it grows)
            mask = torch.ones(len(front), slot + len(front), dtype=torch.bool, device=device)
            mask[:, real:] = torch.tensor(tree_part, dtype=torch.bool, device=device)  # (n, slot + n)
            ids = torch.tensor([toks[i] for i in front], dtype=torch.long, device=device)
            positions = torch.full((len(front),), length - 1 + d, device=device)  # a depth-(d + 1) node's pair
            feature = self._lean_step(feature[rows], ids, slot, positions, mask)  # (n, dim)
        return best_subtree(toks, parents, scores, max_nodes)

    def __repr__(self) -> str:
        drafter = super().__repr__()  # "EagleDrafter(1 layer, ..., draft_vocab=...)"
        return f"EagleTreeDrafter(branch={self.branch}, nodes={self.nodes}, {drafter[drafter.index('(') + 1 :]}"


def best_subtree(tokens: List[int], parents: List[int], scores: List[float], n: int) -> DraftTree:
    """The n best-scored nodes (a node's score is at most its parent's, and a parent comes first on ties, so
    they form a tree), in depth-first order with the best child first: the best chain takes slots 0, 1, ...."""
    keep: List[int] = []
    kept = set()
    for i in sorted(range(len(tokens)), key=lambda i: (-scores[i], i)):
        if len(keep) == n:
            break
        if parents[i] < 0 or parents[i] in kept:  # (always, but for float ties between siblings' subtrees)
            keep.append(i)
            kept.add(i)
    children: Dict[int, List[int]] = {}
    for i in keep:  # keep is best-first, so each list of children is too
        children.setdefault(parents[i], []).append(i)
    order: List[int] = []
    stack = list(reversed(children.get(-1, [])))
    while stack:
        node = stack.pop()
        order.append(node)
        stack.extend(reversed(children.get(node, [])))
    index = {node: j for j, node in enumerate(order)}
    return DraftTree([tokens[i] for i in order], [-1 if parents[i] < 0 else index[parents[i]] for i in order])
