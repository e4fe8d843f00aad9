"""int4 weight-only quantization, group-wise: every linear layer (wq, wk, wv, wo, w1, w2, w3 and the output
projection; not the embedding) holds its weight as 4-bit codes with a float scale and zero per group of
`group` consecutive inputs of a row, and multiplies float activations by it. `Llama.build(...,
quantize="int4")` swaps these layers in from outside, as llama.fast.quantize does for int8.

The scheme, asymmetric, computed in float32: for a weight W (out_features, in_features) cut along its inputs
into groups g of `group` values (one row r, columns g*group .. (g+1)*group - 1),

    lo, hi      = min, max of W over the group
    scale[r, g] = (hi - lo) / 15                (0 for a constant group)
    Q[r, c]     = clamp(round((W[r, c] - lo) / scale[r, g]), 0, 15)     (0 where scale is 0)
    zero[r, g]  = lo + 8 * scale[r, g]

and the dequantized weight is (Q - 8) * scale + zero, which is lo + Q * scale: every weight moves by at most
scale / 2 (to float rounding); a constant group (a group of zeros too) comes back exactly. The "- 8" and
the zero at the group's middle are the convention of torch's kernels (tinygemm's): the codes are read as
signed Q - 8 in [-8, 7] and the zero is added after the scale.

The group is 128 where it divides in_features (Llama 3's dims, 4096, 14336, 8192, 28672, all do), else the
largest of 64 and 32 that does (the demo model's hidden size, 704, takes 64): torch's kernels take groups of
32, 64, 128 or 256. A layer whose in_features none of them divides is a ValueError naming it, raised before
anything is quantized. Groups run along the inputs, so a row-parallel rank's slice (wo, w2: a block of every
row's columns) holds whole groups of the full rows when the group divides its slice: every rank holds exactly
its part of what one process would, with no communication.

Kernels, torch's own, probed once per device and dtype (a small product checked against the dequantized one):
- CUDA: `aten._weight_int4pack_mm(x (M, K) bf16, packed, group, scales_and_zeros (K / group, N, 2) bf16)`, the
  weight packed by `aten._convert_weight_to_int4pack(codes (N, K / 2) uint8, inner_k_tiles)`: two codes a
  byte, the even column in the high nibble. It takes bf16 activations only, N a multiple of 8 and K of
  16 * inner_k_tiles (8, 4 or 2: the largest that divides).
- CPU: `aten._weight_int4pack_mm_for_cpu(x (M, K) float32/bf16/fp16, packed, group, scales_and_zeros in x's
  dtype)`, the weight packed by `aten._convert_weight_to_int4pack_for_cpu(codes (N, K) int32, 2)`; N a
  multiple of 16.
Elsewhere (another dtype on CUDA, shapes the kernel refuses, a torch without the op) the layer holds the codes
two to a byte and computes `F.linear(x, dequantized weight)`, the same product without the kernel.
"""

from functools import partial
from typing import Dict, Optional, Sequence, Tuple

import fairscale.nn.model_parallel.initialize as fs_init
import torch
import torch.nn.functional as F
from torch import nn

from llama.checkpoints.quantized import is_quantized_weight
from llama.fast.layers import FastLinear, across_ranks, is_fast, save_as_meta, use_fast_layers
from llama.fast.quantize import linear_layers, meta_names, row_chunks, swap_linear
from llama.model import Transformer

INT4_GROUPS = (128, 64, 32)  # tried in this order: the group is the first that divides in_features
INT4_LEVELS = 15  # codes 0 .. 15
INT4_OFFSET = 8  # the kernels read a code q as q - 8
CUDA_DTYPE = torch.bfloat16  # the only activation dtype torch's CUDA kernel takes


def int4_group(in_features: int, name: str = "the layer") -> int:
    """The group size for a layer of `in_features` inputs (this rank's): 128, else 64, else 32, the first that
    divides it. ValueError naming `name`, in_features and the groups where none does."""
    for group in INT4_GROUPS:
        if in_features % group == 0:
            return group
    raise ValueError(f"int4 quantization groups a row's inputs by {' or '.join(map(str, INT4_GROUPS))}, and none "
                     f"divides {name}'s in_features {in_features}: leave quantize='int4' out for this model")


def quantize_int4(weight: torch.Tensor, group: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Q uint8 (out, in) codes 0..15, scale float32 (out, in / group), zero float32 (out, in / group)) of a 2-d
    floating-point weight, as the module docstring says; computed in float32, a few rows at a time."""
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"int4 quantization takes a 2-d floating-point weight, got {weight.dtype} "
                         f"{tuple(weight.shape)}")
    rows, cols = weight.shape
    if group < 1 or cols % group:
        raise ValueError(f"int4 group {group} does not divide the weight's in_features {cols}")
    q = torch.empty(weight.shape, dtype=torch.uint8, device=weight.device)
    scale = torch.empty(rows, cols // group, dtype=torch.float32, device=weight.device)
    zero = torch.empty_like(scale)
    start = 0
    for chunk in row_chunks(weight):
        end = start + chunk.shape[0]
        w = chunk.float().view(chunk.shape[0], cols // group, group)  # (rows, groups, group)
        lo, hi = w.amin(dim=2), w.amax(dim=2)  # (rows, groups)
        s = (hi - lo) / INT4_LEVELS
        divisor = torch.where(s > 0, s, torch.ones_like(s))[..., None]  # a constant group: codes 0, scale 0
        codes = torch.round((w - lo[..., None]) / divisor).clamp_(0, INT4_LEVELS)
        q[start:end] = codes.to(torch.uint8).view(chunk.shape[0], cols)
        scale[start:end] = s
        zero[start:end] = lo + INT4_OFFSET * s
        start = end
    return q, scale, zero


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(Q - 8) * scale + zero, group by group along the inputs, computed in float32 and returned in `dtype`."""
    group = q.shape[1] // scale.shape[1]
    s = scale.float().repeat_interleave(group, dim=1)  # (out, in)
    z = zero.float().repeat_interleave(group, dim=1)
    return ((q.float() - INT4_OFFSET) * s + z).to(dtype)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """Codes (N, K) 0..15 two to a byte (N, K / 2): column 2j in the high nibble, 2j + 1 in the low one (the
    layout `aten._convert_weight_to_int4pack` takes on CUDA)."""
    return (q[:, 0::2] << 4 | q[:, 1::2]).to(torch.uint8)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """pack_nibbles undone: (N, K / 2) bytes to (N, K) codes."""
    return torch.stack([packed >> 4, packed & 15], dim=2).view(packed.shape[0], -1)


def _inner_k_tiles(in_features: int) -> int:
    """The CUDA layout's k-tiles per 32-bit word group: the largest of 8, 4, 2 with in_features a multiple of
    16 times it (0: none)."""
    return next((t for t in (8, 4, 2) if in_features % (16 * t) == 0), 0)


def _pack(q: torch.Tensor, kernel: str) -> torch.Tensor:
    """Codes (N, K) packed for `kernel` ("cuda" or "cpu")."""
    if kernel == "cuda":
        return torch.ops.aten._convert_weight_to_int4pack(pack_nibbles(q).contiguous(), _inner_k_tiles(q.shape[1]))
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 2)


def _scales_and_zeros(scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(K / group, N, 2) in `dtype`: each group's scale and zero side by side, the kernels' layout."""
    return torch.stack([scale, zero], dim=2).transpose(0, 1).contiguous().to(dtype)


def _product(kernel: str, x: torch.Tensor, packed: torch.Tensor, group: int,
             scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """The kernel's x (dequantized W)^T for a 2-d, contiguous x."""
    if kernel == "cuda":
        return torch.ops.aten._weight_int4pack_mm(x, packed, group, scales_and_zeros)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, scales_and_zeros)


def int4_kernel(device: torch.device, dtype: torch.dtype, out_features: int, in_features: int) -> Optional[str]:
    """"cuda" or "cpu": the torch kernel a layer of these sizes takes on `device` for `dtype` activations; None
    where none does (the layer then computes with the dequantized weight)."""
    if device.type == "cuda":
        ok = dtype == CUDA_DTYPE and out_features % 8 == 0 and _inner_k_tiles(in_features) > 0
        kernel = "cuda"
    elif device.type == "cpu":
        ok, kernel = out_features % 16 == 0, "cpu"
    else:
        return None
    return kernel if ok and int4pack_mm_works(device, dtype) else None


_KERNEL_WORKS: Dict[Tuple[str, torch.dtype], bool] = {}


def int4pack_mm_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch's int4 kernel for `device` runs for `dtype` activations and gives the product with the
    dequantized weight (probed once, on a small product; torch builds without it give False)."""
    key = (device.type, dtype)
    if key not in _KERNEL_WORKS:
        kernel = "cuda" if device.type == "cuda" else "cpu"
        g = torch.Generator().manual_seed(0)
        x = torch.randn(3, 128, generator=g).to(device=device, dtype=dtype)
        w = torch.randn(32, 128, generator=g).to(device)
        try:
            q, scale, zero = quantize_int4(w, 32)
            y = _product(kernel, x, _pack(q, kernel), 32, _scales_and_zeros(scale, zero, dtype))
            expected = F.linear(x.float(), dequantize_int4(q, scale.to(dtype), zero.to(dtype)))
            works = bool(torch.allclose(y.float(), expected, rtol=3e-2, atol=3e-2))
        except (RuntimeError, NotImplementedError, AttributeError):
            works = False
        _KERNEL_WORKS[key] = works
    return _KERNEL_WORKS[key]


class Int4Linear(nn.Module):
    """y = x Wᵀ for W = (Q - 8) * scale + zero, this rank's slice, group-wise (the module docstring), then
    fairscale's all-reduce (row-parallel layers) or gather (column-parallel layers with gather_output) when
    there are several ranks.

    The scales and zeros are held in the activations' dtype (the kernels take them so). With a kernel
    (`kernel` "cuda" or "cpu") the codes are held in its packed layout only; without, two to a byte
    (pack_nibbles). state_dict() writes Meta's keys with the dequantized weight in the activations' dtype,
    read back through the kernel where there is one (the product with the identity), so it holds the values the
    layer computes with. A fused product (wqkv, w13) names its parts in `parts`, as FastLinear does.
    """

    def __init__(
        self,
        q: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor,
        dtype: torch.dtype,
        reduce: bool = False,
        gather: bool = False,
        parts: Sequence[Tuple[str, int]] = (),
    ):
        super().__init__()
        if (q.dtype != torch.uint8 or q.dim() != 2 or scale.dim() != 2 or scale.shape != zero.shape
                or scale.shape[0] != q.shape[0] or scale.shape[1] == 0 or q.shape[1] % scale.shape[1]):
            raise ValueError(f"Int4Linear takes uint8 codes (out, in) with scales and zeros (out, in / group), got "
                             f"{q.dtype} {tuple(q.shape)}, {tuple(scale.shape)} and {tuple(zero.shape)}")
        self.out_features, self.in_features = q.shape
        self.group = self.in_features // scale.shape[1]
        self.dtype = dtype
        self.parts = list(parts)
        several_ranks = fs_init.get_model_parallel_world_size() > 1
        self.reduce = reduce and several_ranks
        self.gather = gather and several_ranks
        self.kernel = int4_kernel(q.device, dtype, self.out_features, self.in_features)
        self.register_buffer("scales_and_zeros", _scales_and_zeros(scale, zero, dtype), persistent=False)
        codes = _pack(q, self.kernel) if self.kernel else pack_nibbles(q)
        self.register_buffer("weight", codes, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None and x.dtype == self.dtype:
            x2 = x.reshape(-1, self.in_features).contiguous()  # (M, K): the kernels take a 2-d, contiguous input
            y = _product(self.kernel, x2, self.weight, self.group, self.scales_and_zeros)
            y = y.view(*x.shape[:-1], self.out_features)  # (..., out_features)
        else:
            y = F.linear(x, self.dense_weight().to(x.dtype))  # (..., out_features)
        return across_ranks(y, self.reduce, self.gather)

    @torch.no_grad()
    def dense_weight(self) -> torch.Tensor:
        """The dequantized weight (out_features, in_features) in the activations' dtype: with a kernel, the
        kernel's own product with the identity, a block of inputs at a time; else from the codes."""
        if self.kernel is None:
            scale, zero = self.scales_and_zeros.unbind(dim=2)  # (K / group, N) each
            return dequantize_int4(unpack_nibbles(self.weight), scale.t(), zero.t(), self.dtype)
        columns = []
        step = max(self.group, (2**24 // self.in_features) // self.group * self.group)  # identity blocks <= 32 MiB
        for start in range(0, self.in_features, step):
            rows = min(step, self.in_features - start)
            eye = torch.zeros(rows, self.in_features, dtype=self.dtype, device=self.weight.device)
            eye[:, start:start + rows].fill_diagonal_(1)
            columns.append(_product(self.kernel, eye, self.weight, self.group, self.scales_and_zeros))  # (rows, N)
        return torch.cat(columns).t().contiguous()

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        save_as_meta(destination, prefix, self.dense_weight(), self.parts)

    def extra_repr(self) -> str:
        kernel = {"cuda": "_weight_int4pack_mm", "cpu": "_weight_int4pack_mm_for_cpu"}.get(self.kernel, "dequantize")
        return f"in_features={self.in_features}, out_features={self.out_features}, group={self.group}, kernel={kernel}"


def check_int4_source(state: Dict[str, torch.Tensor], stored_int8: bool, ckpt_dir: str) -> None:
    """Before the model is built: a checkpoint stored int8 is refused (its float values are gone), and every
    linear weight of this rank's checkpoint `state` must take a group (int4_groups). ValueError naming them."""
    if stored_int8:
        raise ValueError(f"{ckpt_dir!r} is stored int8: it cannot be quantized to int4 (load the float "
                         "checkpoint with quantize='int4')")
    int4_groups({n[: -len(".weight")]: t.shape for n, t in state.items() if is_quantized_weight(n)})


def int4_groups(shapes: Dict[str, Sequence[int]]) -> Dict[str, int]:
    """The group of each (out_features, in_features) weight shape, by its layer's name: ValueError (int4_group)
    naming the first that takes none. Cheap, shapes only: Llama.build calls it on this rank's checkpoint
    tensors before the model is even built."""
    return {name: int4_group(shape[1], name) for name, shape in shapes.items()}


@torch.no_grad()
def use_int4_layers(model: Transformer, dtype: torch.dtype, fast: bool = True,
                    source: Optional[Dict[str, torch.Tensor]] = None) -> None:
    """Swap, in place, every linear layer of `model` for an Int4Linear (the embedding stays as it is).

    Call it once the weights are loaded and on their device. Each layer is quantized from its weight in
    `source` (this rank's checkpoint tensors by Meta's names, as stored: the checkpoint's values) where it is
    there, else from the model's own. fast: first swap in the fast path's layers (fused, not packed), as
    Llama does with fast=True; with fast=False the reference modules keep running, on Int4Linears. dtype: the
    activations' dtype. ValueError before any quantizing where a layer's in_features takes no group.
    """
    int4_groups({path: linear.weight.shape if getattr(linear, "weight", None) is not None
                 else (linear.out_features, linear.in_features) for path, linear in linear_layers(model).items()})
    if fast and not is_fast(model):
        use_fast_layers(model, pack=False)  # packing is for float weights
    source = source or {}
    for path, linear in linear_layers(model).items():
        names = [n + ".weight" for n in meta_names(path, linear)]
        if all(n in source for n in names):
            weight = torch.cat([source[n] for n in names]).to(model.rope_cos.device)
        else:
            weight = linear.dense_weight() if isinstance(linear, FastLinear) else linear.weight.detach()
        q, scale, zero = quantize_int4(weight, int4_group(weight.shape[1], path))
        swap_linear(model, path, linear, partial(Int4Linear, q, scale, zero, dtype))

