"""int8 weight-only quantization: every linear layer (wq, wk, wv, wo, w1, w2, w3 and the output projection; not
the embedding) holds its weight as int8 with one float scale per output row, and multiplies float activations
by it. `Llama.build(..., quantize="int8")` swaps these layers in from outside, as the fast path swaps its own.

The scheme, symmetric and per output channel: for a weight W (out_features, in_features), computed in float32,

    scale[r] = max_c |W[r, c]| / 127            (0 for a row of zeros)
    Q[r, c]  = clamp(round(W[r, c] / scale[r]), -127, 127)      (round half to even: torch.round)

and the layer computes y = (x Q^T) * scale, which is x (Q * scale)^T up to float rounding: the product with
the dequantized weight. Each weight is then read as 1 byte per element instead of 2 (bf16) or 4 (float32).

Model parallelism: a column-parallel rank holds whole rows, so its scales are those of the full tensor. A
row-parallel rank (wo, w2) holds a slice of every row's columns; its rows' maxima are all-reduced (MAX) over
the model-parallel group before quantizing, so every rank holds the full rows' scales and its slice of the
full Q: the ranks together hold exactly what one rank would (llama.checkpoints.quantized does the same).

Kernels: on CUDA, the one-row products (batch-1 decode steps) take a Triton kernel (llama.fast.int8_gemv;
LLAMA_INT8_GEMV picks the layers), which on the fast layers also takes in the RMSNorm before wqkv, w13 and the
output projection and the residual add after wo and w2, and the SwiGLU before w2 where asked (`after_norm`,
`plus_residual`, `after_swiglu`; LLAMA_INT8_GEMV_FUSE). Otherwise torch's own
`aten._weight_int8pack_mm(x (M, K), Q (N, K) int8, scale (N,) in x's dtype)` where it runs (the CPU; probed
once per device and dtype) for products of a few rows (decode steps), else the same product written out,
`F.linear(x, Q.to(x.dtype)) * scale`: for many rows (a prefill) the float copy of Q costs less than the
kernel's repeated conversions, and torch.compile can fuse this form into one kernel.
"""

from functools import partial
from typing import Callable, Dict, Optional, Sequence, Tuple

import fairscale.nn.model_parallel.initialize as fs_init
import torch
import torch.distributed as dist
import torch.nn.functional as F
from fairscale.nn.model_parallel.layers import ColumnParallelLinear, RowParallelLinear
from torch import nn

from llama.fast.int8_gemv import (MAX_ROWS as GEMV_MAX_ROWS, RMS_NORM, SWIGLU, Int8Gemv, swiglu_reference,
                                   use_int8_gemv)
from llama.fast.layers import (HALF_IN_FLOAT32_MIN_ROWS, FastLinear, across_ranks, decode_form,
                               half_products_in_float32, is_fast, save_as_meta, use_fast_layers)
from llama.model import Transformer

# The values `quantize` takes (besides None, no quantization): int8 here, int4 in llama.fast.quantize_int4.
QUANTIZE_CHOICES = ("int8", "int4")
INT8_MAX = 127
# The most input rows (tokens) a product sends through `_weight_int8pack_mm`: it converts the weight's int8
# values to float again for every 4 rows, which is cheap for a decode step's few rows; a prefill's hundreds go
# through one float copy of the weight and torch's float matrix product instead.
KERNEL_MAX_ROWS = 16
# Rows quantized at a time: float32 temporaries stay near this many bytes, whatever the weight's size.
CHUNK_BYTES = 256 * 2**20


def check_quantize(quantize: Optional[str]) -> Optional[str]:
    """`quantize` if it is None or one of QUANTIZE_CHOICES; else ValueError naming it and the choices."""
    if quantize is None or (isinstance(quantize, str) and quantize in QUANTIZE_CHOICES):
        return quantize
    choices = ", ".join(repr(c) for c in QUANTIZE_CHOICES)
    raise ValueError(f"quantize must be None or one of {choices}, got {quantize!r} (int8 per row and int4 "
                     "group-wise weight-only are the schemes implemented)")


def row_chunks(weight: torch.Tensor) -> Sequence[torch.Tensor]:
    rows = max(1, CHUNK_BYTES // (4 * max(1, weight.shape[1])))
    return weight.split(rows, dim=0)


def row_absmax(weight: torch.Tensor) -> torch.Tensor:
    """max |W[r, :]| for every row r of a 2-d weight, as float32 (exact: a maximum rounds nothing)."""
    return torch.cat([chunk.float().abs().amax(dim=1) for chunk in row_chunks(weight)])


def quantize_int8(weight: torch.Tensor, absmax: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(Q int8 (out, in), scale float32 (out,)) of a 2-d weight, as the module docstring says. `absmax`: the
    rows' maxima to use instead of this tensor's own (a row-parallel slice takes its full rows')."""
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"int8 quantization takes a 2-d floating-point weight, got {weight.dtype} "
                         f"{tuple(weight.shape)}")
    if absmax is None:
        absmax = row_absmax(weight)
    scale = absmax.float() / INT8_MAX  # (out,)
    divisor = torch.where(scale > 0, scale, torch.ones_like(scale))[:, None]  # a zero row stays zero
    q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    start = 0
    for chunk in row_chunks(weight):
        end = start + chunk.shape[0]
        q[start:end] = torch.round(chunk.float() / divisor[start:end]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
        start = end
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Q * scale, row by row, computed in float32 and returned in `dtype`."""
    return (q.float() * scale.float()[:, None]).to(dtype)


def quantize_row_parallel(weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """quantize_int8 of this rank's column slice of a row-parallel weight, with the full rows' scales: each
    row's maximum is all-reduced (MAX) over the model-parallel group first."""
    absmax = row_absmax(weight)
    if fs_init.get_model_parallel_world_size() > 1:
        dist.all_reduce(absmax, op=dist.ReduceOp.MAX, group=fs_init.get_model_parallel_group())
    return quantize_int8(weight, absmax)


_KERNEL_WORKS: Dict[Tuple[str, torch.dtype], bool] = {}


def int8pack_mm_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch's `aten._weight_int8pack_mm` runs on `device` for `dtype` activations and gives the
    dequantized product (probed once, on a small product; torch builds without it give False)."""
    key = (device.type, dtype)
    if key not in _KERNEL_WORKS:
        works = hasattr(torch.ops.aten, "_weight_int8pack_mm")
        if works:
            g = torch.Generator().manual_seed(0)
            x = torch.randn(3, 64, generator=g).to(device=device, dtype=dtype)
            q = torch.randint(-127, 128, (32, 64), generator=g, dtype=torch.int8).to(device)
            scale = (torch.rand(32, generator=g) / 100).to(device=device, dtype=dtype)
            try:
                y = torch.ops.aten._weight_int8pack_mm(x, q, scale)
                expected = F.linear(x.float(), q.float()) * scale.float()
                works = bool(torch.allclose(y.float(), expected, rtol=2e-2, atol=1e-2))
            except (RuntimeError, NotImplementedError):
                works = False
        _KERNEL_WORKS[key] = works
    return _KERNEL_WORKS[key]


class Int8Linear(nn.Module):
    """y = (x Q^T) * scale for this rank's slice (Q int8 (out_features, in_features), scale (out_features,)),
    then fairscale's all-reduce (row-parallel layers) or gather (column-parallel layers with gather_output)
    when there are several ranks; the same as F.linear with the dequantized weight, to float rounding.

    A fused product (the fast path's wqkv, w13) is several of Meta's layers side by side: `parts` names them
    with their rows, in order. state_dict() writes Meta's keys with the dequantized weights, in the
    activations' dtype: `scale` is per row, so every part's rows dequantize on their own.
    """

    def __init__(
        self,
        q: torch.Tensor,
        scale: torch.Tensor,
        dtype: torch.dtype,
        reduce: bool = False,
        gather: bool = False,
        parts: Sequence[Tuple[str, int]] = (),
    ):
        super().__init__()
        if q.dtype != torch.int8 or q.dim() != 2 or scale.shape != (q.shape[0],):
            raise ValueError(f"Int8Linear takes an int8 (out, in) weight and (out,) scales, got {q.dtype} "
                             f"{tuple(q.shape)} and {tuple(scale.shape)}")
        self.out_features, self.in_features = q.shape
        self.dtype = dtype
        self.parts = list(parts)
        several_ranks = fs_init.get_model_parallel_world_size() > 1
        self.reduce = reduce and several_ranks
        self.gather = gather and several_ranks
        self.register_buffer("weight", q, persistent=False)
        self.register_buffer("scale", scale.float(), persistent=False)  # as stored in checkpoints
        # The kernel takes scales in the activations' dtype: converted once here, not at every call.
        self.register_buffer("scale_act", scale.to(dtype), persistent=False)
        # The CPU kernel's vector loops read rows 16 elements at a time, with aligned loads.
        self.use_kernel = self.in_features % 16 == 0 and int8pack_mm_works(q.device, dtype)
        # Another form of the product for decode steps' few rows, picked at load (llama.fast.cpu_forms).
        self.decode_form: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
        # On CUDA, the one-row product's split-K Triton kernel, given at load (llama.fast.int8_gemv); it is a
        # custom op, so it serves compiled steps too.
        self.gemv: Optional[Int8Gemv] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)  # (M, K): the kernel takes a 2-d, contiguous input
        form = decode_form(self, x2.shape[0])
        if self.gemv is not None and x2.shape[0] <= GEMV_MAX_ROWS:
            y = self.gemv(x, self.weight, self.scale_act)  # (..., out_features)
        elif form is not None:
            y = form(x)  # picked at load for decode steps (llama.fast.cpu_forms)
        elif self.use_kernel and x2.shape[0] <= KERNEL_MAX_ROWS and not torch.compiler.is_compiling():
            if not x2.is_contiguous() or x2.data_ptr() % 64:
                x2 = x2.clone(memory_format=torch.contiguous_format)  # a fresh, aligned copy
            y = torch.ops.aten._weight_int8pack_mm(x2, self.int8_weight(), self.scale_act)
            y = y.view(*x.shape[:-1], self.out_features)  # (..., out_features)
        elif x.is_cpu and x2.shape[0] >= HALF_IN_FLOAT32_MIN_ROWS and half_products_in_float32(x.dtype):
            # no fast bf16 product here (llama.fast.layers)
            y = F.linear(x.float(), self.int8_weight().float()).to(x.dtype) * self.scale_act  # (..., out_features)
        else:
            y = F.linear(x, self.int8_weight().to(x.dtype)) * self.scale_act  # (..., out_features)
        return across_ranks(y, self.reduce, self.gather)

    def after_norm(self, x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        """self(norm(x)) for x un-normed and `norm` an RMSNorm (llama.model.RMSNorm: `weight`, `eps`), as the
        fast path hands them on (llama.fast.layers.normed_product). For one row, where the layer's GEMV takes
        the norm in (its prologue RMS_NORM), one kernel that norms x as it reads it, with the norm's roundings."""
        gemv = self.gemv
        if (gemv is not None and gemv.prologue == RMS_NORM and x.numel() == self.in_features
                and norm.weight.dtype == x.dtype):
            y = gemv.after_norm(x, norm.weight, norm.eps, self.weight, self.scale_act)  # (..., out_features)
            return across_ranks(y, self.reduce, self.gather)
        return self(norm(x))

    def after_swiglu(self, gate_up: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """self(F.silu(gate) * up) of gate_up (..., 2 * in_features), gate then up (the fast path's w13
        output, llama.fast.layers.FastFeedForward), plus `residual` where given. For one row, where the
        layer's GEMV takes the SwiGLU in (its prologue SWIGLU), one kernel that forms it as it reads gate_up,
        with eager torch's roundings, and adds the residual in its epilogue where it takes that too."""
        gemv = self.gemv
        if gemv is not None and gemv.prologue == SWIGLU and gate_up.numel() == 2 * self.in_features:
            inside = self._residual_inside(residual)
            y = gemv.after_swiglu(gate_up, self.weight, self.scale_act, inside)  # (..., out_features)
            y = across_ranks(y, self.reduce, self.gather)
            return y if residual is None or inside is not None else residual + y
        swiglu = swiglu_reference(gate_up)  # (..., in_features)
        return self(swiglu) if residual is None else self.plus_residual(swiglu, residual)

    def plus_residual(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """residual + self(x), the block's residual add after wo and w2 (llama.fast.layers.added_product): for
        one row, where the layer's GEMV takes the residual in, added in the kernel's epilogue (rounded as
        torch rounds the sum)."""
        inside = self._residual_inside(residual) if self.gemv is not None else None
        if inside is not None and x.numel() == self.in_features:
            return self.gemv(x, self.weight, self.scale_act, inside)  # (..., out_features)
        return residual + self(x)

    def _residual_inside(self, residual: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """`residual` where this layer's GEMV adds it in; None where it does not (a row-parallel rank's
        partial product is all-reduced first, so the residual is added after)."""
        ok = residual is not None and self.gemv.residual and not self.reduce and not self.gather
        return residual if ok and residual.numel() == self.out_features else None

    def int8_weight(self) -> torch.Tensor:
        """Q (out_features, in_features): the `weight` buffer, or, where a decode form holds the weight in
        its own layout instead (llama.fast.blocked), rebuilt from it."""
        return self.weight if self.weight is not None else self.decode_form.dense_weight()

    def dense_weight(self) -> torch.Tensor:
        """The dequantized weight Q * scale (out_features, in_features), in the activations' dtype, with the
        scales the products use (in that dtype too)."""
        return dequantize_int8(self.int8_weight(), self.scale_act, self.dtype)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        save_as_meta(destination, prefix, self.dense_weight(), self.parts)

    def extra_repr(self) -> str:
        kernel = repr(self.gemv) if self.gemv else "_weight_int8pack_mm" if self.use_kernel else "dequantize"
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={kernel}"


def linear_layers(model: nn.Module) -> Dict[str, nn.Module]:
    """Every linear layer of `model` by its module path: the reference's fairscale layers, or FastLinears."""
    kinds = (ColumnParallelLinear, RowParallelLinear, FastLinear)
    return {name: m for name, m in model.named_modules() if isinstance(m, kinds)}


def meta_names(path: str, linear: nn.Module) -> Sequence[str]:
    """Meta's names (without ".weight") of the layers a linear layer holds, in order: several for a fused one."""
    parts = getattr(linear, "parts", None)
    if not parts:
        return [path]
    owner = path.rsplit(".", 1)[0]
    return [f"{owner}.{name}" for name, _ in parts]


def swap_linear(model: nn.Module, path: str, linear: nn.Module, make: Callable[..., nn.Module]) -> None:
    """Put make(reduce=, gather=, parts=) in place of the linear layer at `path`, keeping its place in the
    model-parallel layout: a FastLinear's own flags and fused parts, or a fairscale layer's kind."""
    if isinstance(linear, FastLinear):
        new = make(reduce=linear.reduce, gather=linear.gather, parts=linear.parts)
    else:
        new = make(reduce=isinstance(linear, RowParallelLinear), gather=getattr(linear, "gather_output", False))
    owner, _, attr = path.rpartition(".")
    setattr(model.get_submodule(owner) if owner else model, attr, new)


@torch.no_grad()
def use_int8_layers(
    model: Transformer, dtype: torch.dtype, fast: bool = True, scales: Optional[Dict[str, torch.Tensor]] = None
) -> None:
    """Swap, in place, every linear layer of `model` for an Int8Linear (the embedding stays as it is).

    Call it once the weights are loaded and on their device. Each layer's weight is either float (quantized
    here: per row, the full rows' scales on a row-parallel rank) or already int8, with its scales in `scales`
    under Meta's name with ".scale" for ".weight" (a quantized checkpoint, llama.checkpoints.quantized).
    fast: first swap in the fast path's layers (fused, not packed), as Llama does with fast=True; with
    fast=False the reference modules keep running, on Int8Linears.
    dtype: the activations' dtype. `model.state_dict()` then holds Meta's keys with the dequantized weights.
    A second call finds no linear layer left to swap and does nothing.
    """
    scales = scales or {}
    if fast and not is_fast(model):
        use_fast_layers(model, pack=False)  # packing is for float weights; int8 ones are read as they are
    for path, linear in linear_layers(model).items():
        names = meta_names(path, linear)
        weight = linear.dense_weight() if isinstance(linear, FastLinear) else linear.weight.detach()
        if weight.dtype == torch.int8:
            missing = [n + ".scale" for n in names if n + ".scale" not in scales]
            if missing:
                raise ValueError(f"int8 weights without their scales: {missing}")
            q = weight
            scale = torch.cat([scales[n + ".scale"].to(weight.device) for n in names])
        else:
            row_parallel = isinstance(linear, RowParallelLinear) or getattr(linear, "reduce", False)
            q, scale = quantize_row_parallel(weight) if row_parallel else quantize_int8(weight)
        swap_linear(model, path, linear, partial(Int8Linear, q, scale, dtype))
    # On CUDA: the one-row products' Triton kernel, its block shape timed here per weight shape; on the fast
    # layers, with the RMSNorm before a product, the residual add after it (or the SwiGLU) taken into its kernel.
    use_int8_gemv({p: m for p, m in model.named_modules() if isinstance(m, Int8Linear)}, fused_forms=is_fast(model))
