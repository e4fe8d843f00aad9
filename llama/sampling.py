"""Choosing the next token from the model's logits."""

from typing import Optional

import torch


def sample_top_p(probs: torch.Tensor, p: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Nucleus sampling: draw from the smallest set of most likely tokens whose probability mass reaches p.

    The token whose probability carries the running total past p is kept; the set is renormalised before
    the draw. probs: (bsz, vocab), rows summing to 1. Returns (bsz, 1) token ids.
    """
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    # Mass strictly before each token; a token is dropped when that alone already exceeds p.
    mask = probs_sum - probs_sort > p
    probs_sort[mask] = 0.0
    probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))
    next_token = torch.multinomial(probs_sort, num_samples=1, generator=generator)
    return torch.gather(probs_idx, -1, next_token)


def next_token(
    logits: torch.Tensor, temperature: float, top_p: float, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """The next token of each row from last-position logits (bsz, vocab): greedy when temperature is 0,
    else top-p sampling at that temperature. Returns (bsz,)."""
    if temperature > 0:
        probs = torch.softmax(logits / temperature, dim=-1)
        return sample_top_p(probs, top_p, generator).reshape(-1)
    return torch.argmax(logits, dim=-1)
