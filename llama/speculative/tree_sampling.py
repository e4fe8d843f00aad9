"""Sampling over a draft tree, exactly the model's distribution.

A tree's node may have several children, distinct candidate tokens c_1 .. c_m, each drafted
deterministically (a point mass). At a node whose processed distribution is p (the plain sampler's: after the
logits processors, temperature, top_k, min_p and top_p; llama.speculative.verify.target_probs), the rule goes
through the children in order:

- p_1 = p; accept c_i with probability p_i(c_i); on acceptance move to that child, whose own distribution
  is the verify pass's row for it (the logits plain decoding computes after the path to it);
- on rejection, p_{i+1} = p_i with c_i's mass removed, renormalised;
- if every child is rejected, draw the node's token from the last residual p_{m+1};
- at a node without children (a leaf, or the root of an empty tree), draw from p: the pass's last token.

Why one node emits a token y with probability exactly p(y) (SpecInfer's multi-draft rule for point-mass
drafts; it is sampling without replacement until the first success). Write R_i = 1 - p(c_1) - .. - p(c_{i-1})
for the mass left before child i (R_1 = 1). Then p_i = p / R_i off the removed children, so
p_i(c_i) = p(c_i) / R_i, and child i is reached (c_1 .. c_{i-1} rejected) with probability
    prod_{j<i} (1 - p(c_j) / R_j) = prod_{j<i} R_{j+1} / R_j = R_i      (telescoping).
So P(y = c_i) = R_i * p(c_i) / R_i = p(c_i); and for y not a child, P(y) = R_{m+1} * p(y) / R_{m+1} = p(y).
By induction over the depth, a path of tokens comes out with the product of the model's conditional
probabilities along it, which is plain sampling's probability of that text; each pass starts afresh from
the text accepted so far, so the whole output is distributed as plain sampling's.

Edge cases, all inside that argument:
- a child with p_i(c_i) = 0 (cut by top_p, top_k, min_p or a banned id) is rejected at once, with no
  random number drawn, and removing it changes nothing;
- the residual is never empty when a draw needs it: a child is rejected only if some other token keeps
  mass (if c_i holds all the mass left, p_i(c_i) = 1 and it is accepted surely; the code checks that the
  rest is empty, and then accepts without drawing a random number); so after a rejection R_{i+1} > 0, and
  the final residual has mass;
- two children with the same token would make the second one a zero-probability child (harmless here), but
  a tree must not hold them: DraftTree refuses duplicate siblings when it is built.
Temperature 0 is not sampled here: greedy trees go through llama.speculative.tree.accept_tree_greedy.
"""

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from llama.speculative.tree import DraftTree
from llama.speculative.verify import draw

# logits (n, vocab) -> the distributions sampled from (n, vocab): target_probs with the call's controls.
Distribution = Callable[[torch.Tensor], torch.Tensor]


def sample_at_node(p: torch.Tensor, children: Sequence[int], generator: Optional[torch.Generator]
                   ) -> Tuple[Optional[int], int]:
    """One node of the tree rule. p (vocab,): the model's distribution there; children: its children's
    tokens in tree order (distinct). Returns (i, children[i]) when child i is accepted, else (None, a token
    drawn from p with every child's mass removed, renormalised; from p itself when there are no children)."""
    residual = p  # p_i, normalised
    for i, c in enumerate(children):
        p_c = float(residual[c])
        if p_c <= 0.0:
            continue  # never drawn from p_i: rejected at once
        rest = residual.clone()
        rest[c] = 0.0
        rest_mass = float(rest.sum())
        if rest_mass <= 0.0:
            return i, c  # c holds all the mass left: p_i(c) = 1
        u = float(torch.rand((), generator=generator, device=p.device))
        if u < p_c:
            return i, c
        residual = rest / rest_mass  # p_{i+1}
    return None, draw(residual, generator)


def accept_tree_sampled(scores: torch.Tensor, tree: DraftTree, distribution: Distribution,
                        generator: Optional[torch.Generator]) -> Tuple[List[int], List[int]]:
    """scores (n + 1, vocab): the processed logits of a verify pass of `tree` (row 0 after the root, row
    i + 1 after node i) -> (the accepted nodes, root's child first; the emitted tokens: theirs, then the
    token drawn at the last of them). `distribution` turns a node's row into the distribution to sample
    (only the rows of the nodes visited are computed)."""
    children: Dict[int, List[int]] = {}
    for node, parent in enumerate(tree.parents):
        children.setdefault(parent, []).append(node)
    path: List[int] = []
    node = -1
    while True:
        p = distribution(scores[node + 1 : node + 2])[0]  # (vocab,)
        kids = children.get(node, [])
        chosen, token = sample_at_node(p, [tree.tokens[j] for j in kids], generator)
        if chosen is None:
            return path, [tree.tokens[j] for j in path] + [token]
        node = kids[chosen]
        path.append(node)
