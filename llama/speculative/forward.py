"""The forward passes speculative decoding runs, on the reference layers or the fast ones alike."""

import torch

from llama.fast.layers import is_fast
from llama.fast.step import fast_forward
from llama.model import Transformer, causal_mask
from llama.speculative.verify_step import verify_step_of


def forward_all(model: Transformer, tokens: torch.Tensor, start_pos: int) -> torch.Tensor:
    """Append tokens (1, n) to the KV cache at start_pos; float32 logits at every position, (1, n, vocab).
    Through the model's verify step (llama.speculative.verify_step: CUDA graphs) where it has one that fits."""
    step = verify_step_of(model)
    if step is not None and step.fits(tokens.shape[1], start_pos):
        return step(tokens, start_pos)
    return model.forward(tokens, start_pos)


def forward_last(model: Transformer, tokens: torch.Tensor, start_pos: int) -> torch.Tensor:
    """Append tokens (1, n) to the KV cache at start_pos; float32 logits of the last position only,
    (1, vocab). On the fast layers the output layer then multiplies one row, not n (a prompt's worth of
    vocabulary-wide products saved)."""
    if is_fast(model):
        last = torch.tensor([tokens.shape[1] - 1], device=tokens.device)
        return fast_forward(model, tokens, start_pos, last_pos=last)[:, 0]
    return model.forward(tokens, start_pos)[:, -1]


def forward_features(model: Transformer, tokens: torch.Tensor, start_pos: int, logits: bool = True):
    """Append tokens (1, n) to the KV cache at start_pos; (logits, features): the float32 logits at every
    position, (1, n, vocab), as forward_all gives them (None when not asked), and the top layer's features
    there, the hidden state before the final norm, (1, n, dim). An EAGLE-style drafter drafts from these
    (llama.speculative.eagle). Transformer.forward's body, stopped before the norm."""
    seqlen = tokens.shape[1]
    h = model.tok_embeddings(tokens)  # (1, n, dim)
    cos = model.rope_cos[start_pos : start_pos + seqlen]
    sin = model.rope_sin[start_pos : start_pos + seqlen]
    mask = causal_mask(seqlen, start_pos, tokens.device)
    for layer in model.layers:
        h = layer(h, start_pos, cos, sin, mask)
    return (model.output(model.norm(h)).float() if logits else None), h
