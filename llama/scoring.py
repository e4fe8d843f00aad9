"""Log-probabilities: recorded position by position while generating, or for whole given sequences.

The logprob of the token at position i is read from the model's raw logits at position i - 1 (before any
temperature or sampling control), as in Meta's reference; position 0 has no prediction and gets 0.
"""

import math
from typing import List, Optional, Sequence, Tuple, TypedDict

import torch
import torch.nn.functional as F

from llama.model import Transformer


class ScorePrediction(TypedDict):
    log_likelihood: float  # sum of the logprobs of every token after the first
    perplexity: float  # exp(-log_likelihood / n_tokens)
    n_tokens: int  # tokens scored: all but the first
    logprobs: List[float]  # one per scored token


class LogprobRecorder:
    """Fills, for a batch of rows (bsz, total_len), the logprob of the token at each position and, with
    top_k > 0, the k most likely tokens there with their logprobs."""

    def __init__(self, bsz: int, total_len: int, top_k: int, device: torch.device):
        self.token_logprobs = torch.zeros((bsz, total_len), dtype=torch.float, device=device)
        self.top_k = top_k
        if top_k:
            self.top_values = torch.zeros((bsz, total_len, top_k), dtype=torch.float, device=device)
            self.top_ids = torch.zeros((bsz, total_len, top_k), dtype=torch.long, device=device)

    def record(self, logits: torch.Tensor, tokens: torch.Tensor, first_target: int) -> None:
        """logits (bsz, L, vocab) predict the tokens at positions first_target .. first_target + L - 1."""
        end = first_target + logits.shape[1]
        self.token_logprobs[:, first_target:end] = -F.cross_entropy(
            logits.transpose(1, 2), target=tokens[:, first_target:end], reduction="none"
        )
        if self.top_k:
            values, ids = torch.log_softmax(logits, dim=-1).topk(self.top_k, dim=-1)  # (bsz, L, top_k)
            self.top_values[:, first_target:end] = values
            self.top_ids[:, first_target:end] = ids

    def record_rows(self, logits: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor) -> None:
        """One position per row, each its own: logits (bsz, vocab) predict tokens (bsz,) at positions (bsz,)."""
        at = positions[:, None]  # (bsz, 1)
        self.token_logprobs.scatter_(1, at, -F.cross_entropy(logits, tokens, reduction="none")[:, None])
        if self.top_k:
            values, ids = torch.log_softmax(logits, dim=-1).topk(self.top_k, dim=-1)  # (bsz, top_k)
            at = at[:, :, None].expand(-1, 1, self.top_k)  # (bsz, 1, top_k)
            self.top_values.scatter_(1, at, values[:, None])
            self.top_ids.scatter_(1, at, ids[:, None])

    def lists(self) -> Tuple[List[List[float]], Optional[List[List[List[Tuple[int, float]]]]]]:
        """Per row: the logprobs, and (with top_k) per position a list of (token id, logprob) pairs, most
        likely first; position 0 has no alternatives."""
        logprobs = self.token_logprobs.tolist()
        if not self.top_k:
            return logprobs, None
        ids, values = self.top_ids.tolist(), self.top_values.tolist()
        top = [
            [[] if pos == 0 else list(zip(row_ids[pos], row_values[pos])) for pos in range(len(row_ids))]
            for row_ids, row_values in zip(ids, values)
        ]
        return logprobs, top


@torch.inference_mode()
def score_sequences(model: Transformer, prompt_tokens: Sequence[Sequence[int]]) -> List[ScorePrediction]:
    """Score each sequence (each of 2 to max_seq_len tokens: the caller checks), max_batch_size at a time
    with one forward pass each. Shorter sequences are padded at the end (with token 0: the causal mask keeps
    whatever follows a position out of it)."""
    batch_size = model.params.max_batch_size
    return [s for start in range(0, len(prompt_tokens), batch_size)
            for s in _score_batch(model, prompt_tokens[start : start + batch_size])]


def _score_batch(model: Transformer, prompt_tokens: Sequence[Sequence[int]]) -> List[ScorePrediction]:
    device = model.rope_cos.device
    max_len = max(len(t) for t in prompt_tokens)
    tokens = torch.zeros((len(prompt_tokens), max_len), dtype=torch.long, device=device)
    for k, t in enumerate(prompt_tokens):
        tokens[k, : len(t)] = torch.tensor(list(t), dtype=torch.long, device=device)
    logits = model.forward(tokens, 0)  # (bsz, max_len, vocab)
    # Logits at position i predict token i + 1.
    logprobs = -F.cross_entropy(logits[:, :-1].transpose(1, 2), target=tokens[:, 1:], reduction="none")
    results = []
    for k, t in enumerate(prompt_tokens):
        row = logprobs[k, : len(t) - 1].tolist()
        total = math.fsum(row)
        results.append(
            ScorePrediction(
                log_likelihood=total, perplexity=math.exp(-total / len(row)), n_tokens=len(row), logprobs=row
            )
        )
    return results
