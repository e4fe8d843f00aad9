"""int8 products for a draft head (`EagleDrafter(..., draft_dtype=torch.int8)`): a quarter of the bytes.

A drafting call on a CPU reads the head's weights and the output rows it drafts from once per draft: about
4.8 MB a draft in float32 for the demo's head (one block and 2,048 output rows), against 22 MB a step for
the whole demo model. Where other work keeps evicting them from the caches those bytes come from memory, and
their time grows with them. Here each weight is held as int8 with one scale per output row
(llama.fast.quantize's scheme) and multiplied by torch's `aten._weight_int8pack_mm`, whose vector loops take
bf16 activations: the float32 activations are rounded to bf16 on the way in and the product cast back.

Drafts are proposals only: the verify pass, in the model's own dtype over the whole vocabulary, decides
what is emitted, so rounding here can cost acceptance, never exactness.
"""

import torch
from torch import nn

from llama.fast.quantize import int8pack_mm_works, quantize_int8

# The kernel's input width must be a multiple of this (others crash torch 2.13's CPU kernel outright).
INT8_COLUMNS = 16


class Int8DraftProduct(nn.Module):
    """y = x W^T with W held as int8 rows and bf16 scales; x and y in the caller's float dtype."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        if weight.shape[1] % INT8_COLUMNS:
            raise ValueError(f"int8 draft products need an input width that is a multiple of {INT8_COLUMNS}, got "
                             f"a weight of shape {tuple(weight.shape)}")
        if not int8pack_mm_works(weight.device, torch.bfloat16):
            raise ValueError(f"int8 draft products need torch's _weight_int8pack_mm for bf16 activations on "
                             f"{weight.device.type}, which this torch build does not run")
        q, scale = quantize_int8(weight.detach().float())  # (out, in) int8, (out,) float32
        self.register_buffer("q", q.contiguous(), persistent=False)
        self.register_buffer("scale", scale.to(torch.bfloat16), persistent=False)
        self.in_features = weight.shape[1]

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight, (out, in) float32 (for inspection; the product does not use it)."""
        return self.q.float() * self.scale.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16)  # (n, in)
        y = torch.ops.aten._weight_int8pack_mm(rows, self.q, self.scale)  # (n, out) bf16
        return y.to(x.dtype).view(*x.shape[:-1], -1)
