"""Verification: which drafted tokens the model accepts, given its logits at the k + 1 verified positions.

The model is run once on the last accepted token followed by k drafted tokens; its logits at verified position
i are the distribution of the token after draft i (position 0: after the last accepted token). A drafter here
is deterministic: its draft at position i is a function of the tokens before it, so the draft distribution q
is a point mass on the drafted token x. The standard rejection rule of speculative sampling (accept x with
probability min(1, p(x) / q(x)); on rejection draw from normalize(max(0, p - q))) then becomes:

- accept x with probability p(x);
- on rejection draw from p with x removed, renormalised.

A token then comes out as y with probability p(x) for y = x, and (1 - p(x)) * p(y) / (1 - p(x)) = p(y)
otherwise: exactly p. With temperature 0, p is a point mass on the model's greedy choice, and the rule is:
accept while the draft equals the greedy token. After the accepted prefix (all k drafts, or up to the first
rejection) the model's own token follows: the greedy choice, the draw from the residual on a rejection, or a
draw from p at the position after the last draft when every draft was accepted.

`p` is the distribution the plain sampler (llama.sampling.Sampler) draws from: raw logits divided by the
temperature, top_k and min_p filters, softmax, then top_p's nucleus renormalised.
"""

from typing import List, Optional, Sequence, Tuple

import torch

from llama.sampling import greedy, min_p_filter, top_k_filter


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """The distribution sample_top_p draws from: probs (n, vocab) cut to the smallest set of most likely
    tokens whose mass reaches top_p (ties ordered by id, as its stable sort orders them), renormalised,
    in vocabulary order. (n, vocab)."""
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True, stable=True)
    before = torch.cumsum(probs_sort, dim=-1) - probs_sort  # mass strictly before each token
    probs_sort = probs_sort.masked_fill(before > top_p, 0.0)
    probs_sort = probs_sort / probs_sort.sum(dim=-1, keepdim=True)
    return torch.zeros_like(probs).scatter_(-1, probs_idx, probs_sort)


def target_probs(logits: torch.Tensor, temperature: float, top_p: float, top_k: int = 0, min_p: float = 0.0
                 ) -> torch.Tensor:
    """The model's sampling distribution at each position: logits (n, vocab) -> probabilities (n, vocab),
    as Sampler shapes them for temperature > 0 (temperature, top_k, min_p, softmax, top_p)."""
    scaled = min_p_filter(top_k_filter(logits / temperature, top_k), min_p)
    return nucleus(torch.softmax(scaled, dim=-1), top_p)


def accept_greedy(logits: torch.Tensor, drafts: Sequence[int]) -> List[int]:
    """Greedy verification. logits: (len(drafts) + 1, vocab), row i predicting the token after draft i - 1.
    Returns the accepted drafts (the longest prefix equal to the model's greedy choices) and then the model's
    own choice at the first disagreement, or after the last draft."""
    choices = greedy(logits).tolist()  # (len(drafts) + 1,): argmax per position
    out: List[int] = []
    for draft, choice in zip(drafts, choices):
        if draft != choice:
            break
        out.append(draft)
    out.append(choices[len(out)])
    return out


def draw(probs: torch.Tensor, generator: Optional[torch.Generator]) -> int:
    """One token from probs (vocab,)."""
    return int(torch.multinomial(probs, 1, generator=generator))


def accept_point_mass(p: torch.Tensor, x: int, generator: Optional[torch.Generator]) -> Tuple[bool, int]:
    """One step of the rejection rule for a deterministic draft x under the model's distribution p (vocab,):
    (True, x) with probability p(x), else (False, a draw from p with x removed, renormalised)."""
    p_x = float(p[x])
    u = float(torch.rand((), generator=generator, device=p.device))
    if u < p_x:
        return True, x
    residual = p.clone()
    residual[x] = 0.0  # max(0, p - q) for a point mass q on x
    return False, draw(residual / residual.sum(), generator)


def accept_sampled(probs: torch.Tensor, drafts: Sequence[int], generator: Optional[torch.Generator]) -> List[int]:
    """Sampled verification. probs: (len(drafts) + 1, vocab), the model's distribution (target_probs) at each
    verified position. Returns the accepted drafts, then the token drawn at the first rejection (from the
    residual) or, when every draft was accepted, a token drawn from the last position's distribution."""
    out: List[int] = []
    for i, x in enumerate(drafts):
        accepted, token = accept_point_mass(probs[i], x, generator)
        out.append(token)
        if not accepted:
            return out
    out.append(draw(probs[len(drafts)], generator))
    return out
