"""The fast path's layers: fairscale's parallel layers swapped, once the weights are loaded, for equivalents
that are cheaper to run. Same weights, same results (to float32 rounding); `Llama.build(fast=False)` keeps
fairscale's layers.

- On the CPU each weight is packed once into oneDNN's blocked layout. `F.linear` reorders a bf16 weight into
  that layout at every call (reading and writing it once more than needed) and runs a float32 product with
  one row on one thread; a decode step, which reads every weight once to multiply a few rows, then runs at
  a fraction of memory bandwidth. Packed, bf16 results are bit-identical to `F.linear`'s and float32 ones
  differ by rounding only (another summation order, about 1e-6 relative).
- The query, key and value projections become one matrix product, and so do the SwiGLU's w1 and w3
  (Attention.wqkv, FeedForward.w13): fewer, larger products, which split better over cores.
- With one model-parallel rank the layers skip fairscale's no-op autograd functions, whose bookkeeping costs
  time at every call and which torch.compile cannot trace. With several ranks they all-reduce and gather
  exactly as fairscale does.
"""

from typing import Optional

import fairscale.nn.model_parallel.initialize as fs_init
import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from fairscale.nn.model_parallel.mappings import gather_from_model_parallel_region, reduce_from_model_parallel_region
from torch import nn

from llama.model import Attention, FeedForward, Transformer

# The number of rows oneDNN tunes a packed weight for (any number works). Measured here: from 4 rows up the
# float32 kernels it picks stream weights about 1.3x faster than for 1 row, even for products with 1 row.
PACK_FOR_ROWS = 16


def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    """True where weights can be packed for oneDNN: the CPU, float32, or bf16 on processors with native bf16."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return dtype == torch.float32


class FastLinear(nn.Module):
    """y = x W^T for this rank's slice W (out_features, in_features), then fairscale's all-reduce (row-parallel
    layers) or gather (column-parallel layers with gather_output) when there are several ranks.

    With `pack`, W is held packed for oneDNN (an opaque tensor: no parameter or buffer, so state_dict() and
    .to() leave it alone).
    """

    def __init__(self, weight: torch.Tensor, reduce: bool = False, gather: bool = False, pack: bool = False):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        several_ranks = fs_init.get_model_parallel_world_size() > 1
        self.reduce = reduce and several_ranks
        self.gather = gather and several_ranks
        self.packed: Optional[torch.Tensor] = None
        if pack:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_FOR_ROWS)
            self.weight = None
        else:
            self.weight = nn.Parameter(weight.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            y = torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")
        else:
            y = F.linear(x, self.weight)  # (..., out_features)
        if self.reduce:
            y = reduce_from_model_parallel_region(y)
        if self.gather:
            y = gather_from_model_parallel_region(y)
        return y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed={self.packed is not None}"


class FastEmbedding(nn.Module):
    """A VocabParallelEmbedding of one rank: a plain lookup."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight.detach(), requires_grad=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, self.weight)


def _fast(linear: nn.Module, pack: bool) -> FastLinear:
    if linear.bias is not None:
        raise ValueError("the fast layers take bias-free linear layers only (Llama has no biases)")
    if isinstance(linear, RowParallelLinear):
        if not linear.input_is_parallel:
            raise ValueError("the fast layers need row-parallel layers with input_is_parallel=True")
        return FastLinear(linear.weight, reduce=True, pack=pack)
    return FastLinear(linear.weight, gather=linear.gather_output, pack=pack)


def _fused(linears, pack: bool) -> FastLinear:
    """One column-parallel FastLinear whose output is the given layers' outputs side by side."""
    if any(not isinstance(m, ColumnParallelLinear) or m.gather_output or m.bias is not None for m in linears):
        raise ValueError("only column-parallel, bias-free layers without gather_output can be fused")
    weight = torch.cat([m.weight.detach() for m in linears], dim=0)  # (sum of out_features, in_features)
    return FastLinear(weight, pack=pack)


@torch.no_grad()
def use_fast_layers(model: Transformer, pack: bool = True) -> None:
    """Swap, in place, `model`'s fairscale layers for fast ones holding the same weights; the old layers
    and their dense weights are released. Call it once the weights are loaded and the model is on its device
    in its final dtype. pack: pack weights for oneDNN where can_pack allows (not for torch.compile, which
    cannot take pre-packed weights)."""
    weight = model.output.weight
    pack = pack and can_pack(weight.device, weight.dtype)
    for module in list(model.modules()):
        if isinstance(module, Attention):
            module.wqkv = _fused([module.wq, module.wk, module.wv], pack)
            module.wq = module.wk = module.wv = None
            module.wo = _fast(module.wo, pack)
        elif isinstance(module, FeedForward):
            module.w13 = _fused([module.w1, module.w3], pack)
            module.w1 = module.w3 = None
            module.w2 = _fast(module.w2, pack)
    model.output = _fast(model.output, pack)
    if isinstance(model.tok_embeddings, VocabParallelEmbedding) and fs_init.get_model_parallel_world_size() == 1:
        model.tok_embeddings = FastEmbedding(model.tok_embeddings.weight)
