"""Linear layers for fast decoding on the CPU: each weight repacked once into oneDNN's blocked layout.

A decode step multiplies a few rows of activations by every weight matrix, so its speed is the speed at which
the weights stream from memory. On the CPU, `torch.nn.functional.linear` reorders a bf16 weight into oneDNN's
blocked layout at every call (reading and writing it once more than needed) and runs a float32 one-row product
on one thread. Packing each weight once, when the model is ready, lets every step read it once, in the layout
the kernel wants, on every core. bf16 results are bit-identical to `F.linear`; float32 ones differ by
rounding only (the sums are taken in another order, about 1e-6 relative).

The packed layers keep fairscale's model-parallel behaviour: a row-parallel layer all-reduces its partial
sums, a column-parallel layer that gathers its output still gathers it.
"""

from typing import Union

import torch
from fairscale.nn.model_parallel.layers import ColumnParallelLinear, RowParallelLinear
from fairscale.nn.model_parallel.mappings import (
    gather_from_model_parallel_region,
    reduce_from_model_parallel_region,
)
from torch import nn


def can_prepack(device: torch.device, dtype: torch.dtype) -> bool:
    """True where packed linear layers are available: the CPU with oneDNN, float32 or bf16 (bf16 only on
    processors with native bf16 support)."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return dtype == torch.float32


class PackedLinear(nn.Module):
    """A fairscale Column/RowParallelLinear (no bias) with its weight packed for oneDNN.

    `batch_hint` is the number of rows the kernels are tuned for (any number works).
    """

    def __init__(self, linear: Union[ColumnParallelLinear, RowParallelLinear], batch_hint: int):
        super().__init__()
        if linear.bias is not None:
            raise ValueError("PackedLinear packs bias-free layers only (Llama has no biases)")
        if isinstance(linear, RowParallelLinear) and not linear.input_is_parallel:
            raise ValueError("PackedLinear needs row-parallel layers with input_is_parallel=True")
        weight = linear.weight.detach()  # (out_features, in_features) on this rank
        self.out_features, self.in_features = weight.shape
        # An opaque oneDNN tensor: not a parameter or buffer, so state_dict() and .to() leave it alone.
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, batch_hint)
        self.all_reduce = isinstance(linear, RowParallelLinear)
        self.gather = isinstance(linear, ColumnParallelLinear) and linear.gather_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")  # (..., out_features)
        if self.all_reduce:
            y = reduce_from_model_parallel_region(y)
        if self.gather:
            y = gather_from_model_parallel_region(y)
        return y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def prepack_linear_layers(model: nn.Module, batch_hint: int) -> int:
    """Replace, in place, every fairscale linear layer of `model` by a PackedLinear holding the same weight;
    the dense weights are released. Returns how many layers were packed.

    Call it once the weights are loaded and the model is on the CPU in its final dtype (see can_prepack).
    """
    targets = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, (ColumnParallelLinear, RowParallelLinear))
    ]
    for parent, name, child in targets:
        setattr(parent, name, PackedLinear(child, batch_hint))
    return len(targets)
