"""The fast path's forward pass and its decode step, optionally compiled.

`fast_forward` is the reference Transformer.forward (llama.model) with what the batched loop needs besides:
one new token per row at each row's own position, and logits at chosen positions only. `DecodeStep` runs one
decode step through it, compiled by torch.compile with CUDA graphs when asked (`compile_options`).
"""

from typing import Dict, Optional

import torch

from llama.fast.layers import Positions, fast_block, is_fast, normed_product
from llama.model import Transformer, causal_mask


def fast_forward(
    model: Transformer,
    tokens: torch.Tensor,
    start_pos: Positions,
    *,
    kv_len: Optional[int] = None,
    last_pos: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Append `tokens` (bsz, seqlen) to the KV cache and return float32 logits (bsz, seqlen, vocab_size), as
    model.forward does (not in inference mode, so that torch.compile can trace it), on the fast layers.

    start_pos: an int, the cache position of the first new token in every row (the reference's interface);
        or a (bsz,) tensor of per-row positions of each row's first new token, which then reads the first
        `kv_len` cache positions, masked to those at or before its own.
    last_pos: (bsz,) positions within `tokens`: return only the logits there, (bsz, 1, vocab_size).
    """
    bsz, seqlen = tokens.shape
    h = model.tok_embeddings(tokens)  # (bsz, seqlen, dim)
    if isinstance(start_pos, int):
        cos = model.rope_cos[start_pos : start_pos + seqlen]  # (seqlen, head_dim)
        sin = model.rope_sin[start_pos : start_pos + seqlen]
        mask = causal_mask(seqlen, start_pos, tokens.device)
    elif seqlen == 1:
        if kv_len is None:
            raise ValueError(f"per-row positions need a kv_len (got seqlen={seqlen}, kv_len={kv_len})")
        cos = model.rope_cos[start_pos][:, None]  # (bsz, 1, head_dim): each row at its own position
        sin = model.rope_sin[start_pos][:, None]
        cols = torch.arange(kv_len, device=tokens.device)
        mask = (cols[None, :] <= start_pos[:, None])[:, None, None, :]  # (bsz, 1, 1, kv_len)
    else:  # row i's tokens at positions start_pos[i] .. + seqlen - 1 (a speculative verify, compiled)
        if kv_len is None:
            raise ValueError(f"per-row positions need a kv_len (got seqlen={seqlen}, kv_len={kv_len})")
        pos = start_pos[:, None] + torch.arange(seqlen, device=tokens.device)  # (bsz, seqlen)
        cos, sin = model.rope_cos[pos], model.rope_sin[pos]  # (bsz, seqlen, head_dim)
        cols = torch.arange(kv_len, device=tokens.device)
        mask = (cols[None, None, :] <= pos[:, :, None])[:, None]  # (bsz, 1, seqlen, kv_len)

    for layer in model.layers:
        # The block as the reference's (its FastAttention takes both kinds of start_pos), each norm handed on
        # to the product after it.
        h = fast_block(layer, h, start_pos, cos, sin, mask)
    if last_pos is not None:
        h = h[torch.arange(bsz, device=h.device), last_pos][:, None]  # (bsz, 1, dim)
    return normed_product(model.output, model.norm, h).float()  # model.output(model.norm(h)): (bsz, seqlen, vocab)


def compile_options() -> Dict[str, bool]:
    """Inductor's options for the compiled decode step (compile=True).

    CUDA graphs (one launch a step); max_autotune, which times inductor's own kernels for each matrix
    product against cuBLAS (at batch 1 it picks generated one-row products fused with the RMSNorm before
    them); coordinate-descent tuning of the generated kernels' block sizes; programmatic dependent launch
    where torch offers it (Hopper and later; inductor leaves it out elsewhere): each generated kernel starts
    while the one before finishes, waiting only where it reads that one's output. What each option gains is
    measured by scripts/compile_ab.py and scripts/compile_variants.py (figures: bench/README.md, History).
    """
    import torch._inductor.config as inductor_config  # (here: only compile=True needs it)

    options = {"triton.cudagraphs": True, "max_autotune": True, "coordinate_descent_tuning": True}
    if hasattr(inductor_config.triton, "enable_pdl"):  # an option of recent torch versions
        options["triton.enable_pdl"] = True
    return options


class DecodeStep:
    """One decode step: one new token per row, each at its own cache position -> next-token logits.

    With `compile=True` the step is compiled by torch.compile with CUDA graphs (on CUDA) and tuned
    generated kernels: shapes must not change between steps, so the step always reads the whole cache (max_seq_len
    positions), masked per row, instead of the part filled so far.
    """

    def __init__(self, model: Transformer, compile: bool = False):
        if not is_fast(model):
            raise ValueError("DecodeStep runs on the fast layers: call llama.fast.layers.use_fast_layers(model) first")
        self.model = model
        self.compiled = None
        if compile:
            self.compiled = torch.compile(self._step, options=compile_options(), fullgraph=True, dynamic=False)

    def _step(self, tokens: torch.Tensor, positions: Positions, kv_len: int) -> torch.Tensor:
        return fast_forward(self.model, tokens[:, None], positions, kv_len=kv_len)[:, 0]  # (bsz, vocab)

    def __call__(self, tokens: torch.Tensor, positions: Positions, kv_len: int) -> torch.Tensor:
        """tokens: (bsz,); positions: (bsz,), or an int when every row is at the same position (then the
        step reads the cache up to it, unmasked); kv_len: cache positions to read, beyond every row's."""
        if self.compiled is not None:
            if isinstance(positions, int):
                positions = torch.full_like(tokens, positions)
            # Compiled code cannot take inference tensors (those made under torch.inference_mode): run it
            # outside inference mode, on copies. Its outputs are overwritten by the next replay: copy them.
            with torch.inference_mode(False), torch.no_grad():
                logits = self.compiled(tokens.clone(), positions.clone(), self.model.params.max_seq_len)
                return logits.clone()
        return self._step(tokens, positions, kv_len)


