"""Draft trees: several candidate continuations verified by one forward pass, with a tree attention mask.

A chain of k drafts is lost from its first wrong token on. A tree holds alternatives: at each depth several
tokens may follow a node (a drafter's top few guesses), and the model checks every node at once. Its tokens
are fed in one pass after the last accepted token (the root), in the order of `DraftTree.tokens`, into cache
slots start + 1, start + 2, ... But node i's *position* is start + its depth, and it attends to the cached
text, the root, its ancestors and itself only (`tree_mask`): so its logits are exactly those plain decoding
computes after the root and its ancestors, whatever its siblings are.

Greedy acceptance (`accept_tree_greedy`) walks from the root: while the model's choice after the current
node is one of its children, move there; the tokens walked, then the model's choice at the last node, are
emitted (1 to depth + 1 tokens). `commit_path` then moves the accepted nodes' keys and values into the slots
start + 1 ... that plain decoding would have written them to (their keys were rotated for exactly those
positions, start + depth), so the cache is plain decoding's again; everything past them is stale and
overwritten before being read, as after a chain's rejection (llama.speculative.generate).

Sampling walks the tree by the multi-draft rejection rule for point-mass drafts (llama.speculative.
tree_sampling: accept each child in turn with its probability under what is left of p, else draw from the
residual); `tree_pass` takes either walk, and the cache is committed alike.
"""

from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple

import torch

from llama.model import Transformer
from llama.sampling import Context, LogitsProcessor, greedy


@dataclass(frozen=True)
class DraftTree:
    """Draft tokens with parents: node i holds tokens[i] and hangs under parents[i] (-1: the root, the last
    accepted token; otherwise an earlier node, so that parents come before their children). Siblings hold
    distinct tokens (a repeated one would be a node verified for nothing, and sampling's rule assumes
    distinct candidates)."""

    tokens: List[int]
    parents: List[int]

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.parents):
            raise ValueError(f"a draft tree needs one parent per token: {len(self.tokens)} tokens, "
                             f"{len(self.parents)} parents")
        bad = [(i, p) for i, p in enumerate(self.parents) if not -1 <= p < i]
        if bad:
            raise ValueError(f"draft tree parents must be -1 or an earlier node's index: (node, parent) {bad[:5]}")
        first: Dict[Tuple[int, int], int] = {}  # (parent, token) -> the first node holding it
        repeated = []  # (node, its earlier sibling with the same token, the token)
        for i, key in enumerate(zip(self.parents, self.tokens)):
            if key in first:
                repeated.append((i, first[key], key[1]))
            else:
                first[key] = i
        if repeated:
            raise ValueError("draft tree siblings must hold distinct tokens: (node, its earlier sibling, token) "
                             f"{repeated[:5]}")

    def __len__(self) -> int:
        return len(self.tokens)

    def depths(self) -> List[int]:
        """[i]: node i's depth, 1 for the root's children."""
        depths: List[int] = []
        for p in self.parents:
            depths.append(1 if p < 0 else depths[p] + 1)
        return depths

    def path_to(self, node: int) -> List[int]:
        """The nodes from the root's child down to `node` (its ancestors, then itself)."""
        path = []
        while node >= 0:
            path.append(node)
            node = self.parents[node]
        return path[::-1]


def tree_mask(tree: DraftTree, start: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """(positions (n + 1,), mask (n + 1, start + n + 1) bool) for feeding the root at cache slot `start` and
    node i at slot start + 1 + i: row 0 (the root) sees slots 0 .. start; node i's row sees those, its
    ancestors' slots and its own. Its position is start + its depth."""
    n = len(tree)
    block = [[True] + [False] * n]  # the tree block of the mask: row r over slots start .. start + n
    for i, parent in enumerate(tree.parents):
        row = list(block[parent + 1])  # what its parent sees (the root's row for -1) ...
        row[i + 1] = True  # ... and itself
        block.append(row)
    mask = torch.ones(n + 1, start + n + 1, dtype=torch.bool, device=device)
    mask[:, start:] = torch.tensor(block, dtype=torch.bool, device=device)
    positions = torch.tensor([start] + [start + d for d in tree.depths()], device=device)
    return positions, mask


def forward_tree(model: Transformer, root: int, tree: DraftTree, start: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Feed the root at cache slot `start` and the tree's nodes after it, under the tree mask -> (float32
    logits (n + 1, vocab), features (n + 1, dim)): row 0 predicts the token after the root, row i + 1 the
    token after node i (features: the top layer's hidden state, before the final norm). Reference or fast
    layers alike (both take per-token cos/sin and a mask)."""
    tokens = torch.tensor([[root] + list(tree.tokens)], dtype=torch.long, device=model.rope_cos.device)
    positions, mask = tree_mask(tree, start, tokens.device)
    cos, sin = model.rope_cos[positions], model.rope_sin[positions]  # (n + 1, head_dim)
    h = model.tok_embeddings(tokens)  # (1, n + 1, dim)
    for layer in model.layers:
        h = layer(h, start, cos, sin, mask)
    return model.output(model.norm(h)).float()[0], h[0]


def accept_tree_greedy(logits: torch.Tensor, tree: DraftTree) -> Tuple[List[int], List[int]]:
    """logits (n + 1, vocab) from forward_tree -> (the accepted nodes, root's child first; the emitted
    tokens: theirs, then the model's greedy choice after the last of them)."""
    choices = greedy(logits).tolist()  # (n + 1,): the model's choice after the root and after each node
    child = {(p, t): i for i, (p, t) in enumerate(zip(tree.parents, tree.tokens))}
    path: List[int] = []
    node = -1
    while (node, choices[node + 1]) in child:
        node = child[(node, choices[node + 1])]
        path.append(node)
    return path, [tree.tokens[i] for i in path] + [choices[node + 1]]


def commit_path(model: Transformer, start: int, path: Sequence[int]) -> None:
    """Move the keys and values of the accepted nodes (cache slots start + 1 + node) to slots start + 1 ...
    start + len(path), where plain decoding has them. Nothing to do when they are there already (a tree
    whose first branch is accepted: `EagleTreeDrafter` puts its likeliest chain first)."""
    slots = [start + 1 + node for node in path]
    if slots == list(range(start + 1, start + 1 + len(path))):
        return
    source = torch.tensor(slots, device=model.rope_cos.device)
    for layer in model.layers:
        attn = layer.attention  # the reference Attention or a FastAttention: the same cache buffers
        for cache in (attn.cache_k, attn.cache_v):  # (bsz, n_kv_heads, max_seq_len, head_dim)
            cache[0, :, start + 1 : start + 1 + len(path)] = cache[0, :, source]  # (index read copies first)


def tree_contexts(tokens: List[int], tree: DraftTree, prompt_len: int, device: torch.device) -> Context:
    """The text before each verified row, for the logits processors: row 0 is `tokens`, row i + 1 is
    `tokens` and the path to node i (what the text is if that path is accepted)."""
    rows = [list(tokens)] + [list(tokens) + [tree.tokens[j] for j in tree.path_to(i)] for i in range(len(tree))]
    width = max(len(r) for r in rows)
    seq = torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.long, device=device)
    lengths = torch.tensor([len(r) for r in rows], device=device)
    return Context(seq, lengths, torch.full((len(rows),), prompt_len, device=device))


# (processed logits (n + 1, vocab), tree) -> (accepted nodes, emitted tokens): accept_tree_greedy, or
# llama.speculative.tree_sampling.accept_tree_sampled with the call's controls and random stream.
TreeAcceptance = Callable[[torch.Tensor, DraftTree], Tuple[List[int], List[int]]]


def tree_pass(model: Transformer, tokens: List[int], tree: DraftTree, prompt_len: int,
              processors: Sequence[LogitsProcessor] = (), accept: TreeAcceptance = accept_tree_greedy
              ) -> Tuple[List[int], torch.Tensor, torch.Tensor]:
    """One verify pass of `tree` after `tokens` (the last one not yet in the cache), its nodes accepted by
    `accept` (greedy by default) -> (the emitted tokens, the raw logits that predicted them (len(emitted),
    vocab), the features of the fed tokens that were accepted (len(emitted), dim): the root's, then the
    accepted nodes'), with the cache committed."""
    start = len(tokens) - 1
    logits, features = forward_tree(model, tokens[-1], tree, start)
    scores = logits
    for process in processors:
        scores = process(scores, tree_contexts(tokens, tree, prompt_len, logits.device))
    path, emitted = accept(scores, tree)
    commit_path(model, start, path)
    rows = torch.tensor([0] + [node + 1 for node in path], device=logits.device)
    return emitted, logits[rows], features[rows]
