"""Choosing the next token from the model's logits."""

from typing import Optional

import torch

# The fast path's nucleus search looks first among this many most likely tokens.
PREFILTER_CANDIDATES = 256


def sample_top_p(probs: torch.Tensor, p: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Nucleus sampling: draw from the smallest set of most likely tokens whose probability mass reaches p.

    The token whose probability carries the running total past p is kept; the set is renormalised before
    the draw. Equally likely tokens are ordered by id (a stable sort), so the result is reproducible.
    probs: (bsz, vocab), rows summing to 1. Returns (bsz, 1) token ids.
    """
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True, stable=True)
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    # Mass strictly before each token; a token is dropped when that alone already exceeds p.
    mask = probs_sum - probs_sort > p
    probs_sort[mask] = 0.0
    probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))
    next_token = torch.multinomial(probs_sort, num_samples=1, generator=generator)
    return torch.gather(probs_idx, -1, next_token)


def sample_top_p_prefiltered(
    probs: torch.Tensor,
    p: float,
    generator: Optional[torch.Generator] = None,
    candidates: int = PREFILTER_CANDIDATES,
) -> torch.Tensor:
    """`sample_top_p`, bit for bit (the same token for the same generator state), without sorting the whole
    vocabulary when the nucleus lies among the `candidates` most likely tokens.

    The candidates are every token at least as likely as the candidates-th most likely one, in the order of
    a stable descending sort: exactly the first entries of sample_top_p's sorted row. If the last candidate
    is dropped from the nucleus, every later token is too (running sums only grow, later probabilities are
    smaller), so the candidates decide it; otherwise this falls back to the full sort. The draw runs on a
    full-width row laid out as sample_top_p's (nucleus first, zeros after), consuming the generator alike.
    Reads one flag per row on the host: meant for the CPU.
    """
    bsz, vocab = probs.shape
    if candidates >= vocab:
        return sample_top_p(probs, p, generator)
    kth = torch.topk(probs, candidates, dim=-1, sorted=False).values.amin(dim=-1)  # (bsz,)
    probs_sort = torch.zeros_like(probs)
    ids = []
    for row in range(bsz):
        cand = torch.nonzero(probs[row] >= kth[row]).squeeze(1)  # (m,) ascending ids
        values, order = torch.sort(probs[row, cand], descending=True, stable=True)
        before = torch.cumsum(values, dim=0) - values  # the same sums as sample_top_p's first m
        dropped = before > p
        if not bool(dropped[-1]):
            return sample_top_p(probs, p, generator)  # the nucleus may reach past the candidates
        probs_sort[row, : len(values)] = values.masked_fill(dropped, 0.0)
        ids.append(cand[order])
    probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))
    choice = torch.multinomial(probs_sort, num_samples=1, generator=generator)  # (bsz, 1)
    return torch.stack([ids[row][choice[row]] for row in range(bsz)])


def next_token(
    logits: torch.Tensor,
    temperature: float,
    top_p: float,
    generator: Optional[torch.Generator] = None,
    *,
    prefilter: bool = False,
) -> torch.Tensor:
    """The next token of each row from last-position logits (bsz, vocab): greedy when temperature is 0,
    else top-p sampling at that temperature (with `prefilter`, by sample_top_p_prefiltered: the same
    tokens, faster on the CPU). Returns (bsz,)."""
    if temperature > 0:
        probs = torch.softmax(logits / temperature, dim=-1)
        sample = sample_top_p_prefiltered if prefilter else sample_top_p
        return sample(probs, top_p, generator).reshape(-1)
    return torch.argmax(logits, dim=-1)
