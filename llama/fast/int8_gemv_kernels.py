"""The Triton kernels of the int8 GEMV and their launch: a one-row int8 weight-only product with split-K, for
decode steps. llama.fast.int8_gemv wraps them in torch custom ops, computes the same functions off CUDA and picks
a block shape for each weight at load; its docstring says why a kernel of our own and what it measured. The
product's kernel (`_gemv_kernel`):

- can split K (grid: N / BLOCK_N row blocks x SPLIT_K slices of K). Why: the number of programs, and so the
  bytes in flight on every multiprocessor, then need not come from the rows alone; a product with few rows
  for its K (a model-parallel rank's slice of a column-parallel weight, a long-K w2 with big row blocks)
  still fills the GPU. Each program writes its rows' float32 partial sums and a second small kernel adds
  the SPLIT_K partials, applies the per-row scale once and rounds once to x's dtype (no atomics: the order
  of the sum is fixed, results repeat). Whether to split is the timing's call: at the 8B shapes on an H200
  one slice won everywhere (w2: 22.3 us unsplit, 23.8 in 7 slices), since 2-row blocks already give w2
  2,048 programs;
- reads BLOCK_N rows of Q at a time along K (row-major, as stored, 16 contiguous bytes a thread), sharing each
  load of x among those rows (inductor's one-row programs read x once per row);
- converts int8 to float32 without the int-to-float instruction, which Hopper issues at a quarter of the
  float rate and which bounds the kernel once its loads are 16 bytes wide (7-10% a product, measured);
- adds the block's residual in its epilogue (RESIDUAL);
- can take the function that forms its input in (PROLOGUE): the RMSNorm (RMS_NORM: each program sums the
  squares of the un-normed x itself, K elements from the caches, then norms x as it reads it) or silu(gate) *
  up (SWIGLU, reading w13's output). After an RMSNorm, `_launch` may instead have x normed once by a
  one-program kernel (`_rms_norm_kernel`, `norm_apart`, the same roundings) and launch the plain product;
- can be launched as a programmatic dependent launch on Hopper and later (PDL): it starts while the kernel
  before it finishes and loads its first tile of Q, which nothing in a step writes, before `gdc_wait`; it
  reads x, the norm's input and the residual, and stores, only after;
- feeds its loop one of several ways (GemvConfig.loop, LOOPS): Q's tiles loaded 0-2 loop steps ahead of their
  use (the first ones before the wait), x one step ahead too, Q in 16- or 8-byte loads; no one way was
  fastest at every 8B shape on an H200 (scripts/int8_gemv_variants.py), so the load-time timing picks it
  with the block shape.

Each product x[k] * Q[n, k] is formed in float32 and summed in float32, then scaled and rounded once to x's
dtype; the prologues and the residual round as the unfused path does (llama.fast.int8_gemv's docstring).
Triton is optional: without it (torch's CPU builds) this module defines no kernels, kernel_runs_on is False
and the ops run their torch references.
"""

from typing import NamedTuple, Optional

import torch

try:  # Triton comes with torch's CUDA builds; without it (CPU builds) the ops run their torch references
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

# The input function a product's kernel takes in (the kernel's PROLOGUE): none; the RMSNorm before it (the
# fast path's wqkv and w13 and the output projection); silu(gate) * up from w13's output (the fast path's w2).
PLAIN, RMS_NORM, SWIGLU = 0, 1, 2

# The most columns of x the RMSNorm prologue reads in one step (its sum of squares).
MAX_NORM_BLOCK = 8192


# How the kernel's loop feeds its tiles (GemvConfig.loop): {loop: (tiles of Q loaded ahead of their use, x's
# columns loaded one step ahead too, Q read in runs of 8 columns a thread)}. Q is read 16 int8 a thread (16-byte
# loads) unless in runs of 8 (8-byte loads): then x's 16-byte loads (8 bf16) already lie where each thread uses
# them, where Q's 16 columns a thread make Triton move x through shared memory (two barriers a loop step).
# Loaded ahead: the first tiles before the PDL wait. Which is fastest depends on the shape (the sixth
# session's loop is Q_AHEAD; scripts/int8_gemv_variants.py timed them all on an H200).
Q_IN_STEP, Q_AHEAD, Q8_AHEAD2, Q8_X_AHEAD, QX_AHEAD = 0, 1, 2, 3, 4
LOOPS = {Q_IN_STEP: (0, False, False), Q_AHEAD: (1, False, False), Q8_AHEAD2: (2, False, True),
         Q8_X_AHEAD: (0, True, True), QX_AHEAD: (1, True, False)}


class GemvConfig(NamedTuple):
    """A block shape of the kernel: rows a program reads, columns a loop step reads, slices of K, warps; and
    how its loop feeds its tiles (`loop`, a key of LOOPS)."""

    block_n: int
    block_k: int
    split_k: int
    num_warps: int
    loop: int = Q_AHEAD


def check_config(cfg: GemvConfig, k: int) -> None:
    """ValueError unless `cfg` is a block shape the kernel takes for inputs of width k."""
    ok = all(isinstance(v, int) and v > 0 for v in cfg[:4]) and cfg.loop in LOOPS
    ok = ok and all(v & (v - 1) == 0 for v in (cfg.block_n, cfg.block_k, cfg.num_warps))  # Triton's blocks
    if not ok or cfg.block_k < 16 or cfg.num_warps > 16:
        raise ValueError(f"an int8 GEMV block shape takes powers of two block_n, block_k >= 16, num_warps <= 16, "
                         f"split_k >= 1 and a loop in {sorted(LOOPS)}, got {tuple(cfg)}")
    if k_per_split(k, cfg) * (cfg.split_k - 1) >= k:
        raise ValueError(f"split_k={cfg.split_k} leaves a slice of K={k} empty with block_k={cfg.block_k}")


def k_per_split(k: int, cfg: GemvConfig) -> int:
    """Columns of each slice of K: K / split_k rounded up to whole block_k steps (the last slice is masked)."""
    per = -(-k // cfg.split_k)
    return -(-per // cfg.block_k) * cfg.block_k


if triton is not None:

    @triton.jit
    def _int8_as_float32(w):
        """int8 -> float32 without the int-to-float instruction (a quarter of the float rate on Hopper, and the
        bound once loads are 16 bytes wide): the bits 0x4B000080 + b are float32 2**23 + 128 + b exactly for b
        in -128..127, and subtracting 2**23 + 128 leaves b exactly."""
        return (w.to(tl.int32) + 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0

    @triton.jit
    def _load_q(w_rows, cols, row_ok, K, live, EVEN: tl.constexpr):
        """Q's tile (BLOCK_N, BLOCK_K) at columns `cols` (int8; zeros where masked); `live` (a scalar) False
        loads nothing."""
        if EVEN:  # no masks but `live`: N and K fill the blocks exactly
            return tl.load(w_rows + cols[None, :], mask=live, other=0, eviction_policy="evict_first")
        return tl.load(w_rows + cols[None, :], mask=row_ok[:, None] & (cols < K)[None, :] & live, other=0,
                       eviction_policy="evict_first")

    @triton.jit
    def _load_input(x_ptr, norm_ptr, cols, K, live, EVEN: tl.constexpr, PROLOGUE: tl.constexpr):
        """The input's raw columns `cols` in their dtype (zeros where masked; `live` False loads nothing): x,
        and the norm's weight (RMS_NORM) or up (SWIGLU, x's second half) where the prologue reads one, else x
        again (not loaded twice)."""
        ok = live if EVEN else (cols < K) & live
        xk = tl.load(x_ptr + cols, mask=ok, other=0.0, eviction_policy="evict_last")
        other = xk
        if PROLOGUE == 1:
            other = tl.load(norm_ptr + cols, mask=ok, other=0.0, eviction_policy="evict_last")
        if PROLOGUE == 2:
            other = tl.load(x_ptr + K + cols, mask=ok, other=0.0, eviction_policy="evict_last")
        return xk, other

    @triton.jit
    def _gemv_kernel(x_ptr, norm_ptr, w_ptr, scale_ptr, res_ptr, out_ptr, N, K, k_split, eps,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PARTIAL: tl.constexpr, EVEN: tl.constexpr,
                     PROLOGUE: tl.constexpr, RESIDUAL: tl.constexpr, NORM_BLOCK: tl.constexpr, PDL: tl.constexpr,
                     Q_AHEAD: tl.constexpr, X_AHEAD: tl.constexpr, Q8: tl.constexpr):
        """Rows [pid0 * BLOCK_N, +BLOCK_N) of Q times the input over columns [pid1 * k_split, +k_split): their
        float32 sums, stored as partials (PARTIAL: out is (SPLIT_K, N) float32) or scaled and rounded (out is
        (N,)). The input a column k takes (PROLOGUE): 0, x[k]; 1 (RMS_NORM), x's RMSNorm with weight norm[k],
        rounded as llama.model.RMSNorm rounds it; 2 (SWIGLU), silu(x[k]) * x[K + k], rounded as eager torch
        rounds F.silu(gate) * up. RESIDUAL: the rounded result plus res[n], rounded (residual + y in torch).
        PDL (launched as a programmatic dependent launch): the first tiles of Q (Q_AHEAD of them), which
        nothing in a step writes, are loaded while the kernel before may still run; everything else (x, the
        norm's input, the residual, the store) only after `gdc_wait`, which returns once that kernel has
        finished and its writes are visible; the kernel after may start once every program has passed that
        wait. The loop (LOOPS): Q_AHEAD (0-2) tiles of Q loaded ahead of their use; X_AHEAD, the input's
        columns one step ahead too; Q8, Q read in runs of 8 columns a thread."""
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        dtype = x_ptr.dtype.element_ty  # the activations' dtype, to which the prologues round as torch does
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
        row_ok = rows < N
        w_rows = w_ptr + rows.to(tl.int64)[:, None] * K  # (BLOCK_N, 1) row starts
        k_lo = pid_k * k_split
        c = tl.arange(0, BLOCK_K)  # (BLOCK_K,)
        if Q8:  # the same columns; the compiler's analysis sees runs of 8 contiguous ones, so loads 8 a thread
            c = (c // 8) * 8 + c % 8
        if Q_AHEAD >= 1:  # the first tile (BLOCK_N, BLOCK_K), before the wait
            w = _load_q(w_rows, k_lo + c, row_ok, K, k_split > 0, EVEN)
        if Q_AHEAD == 2:  # and the second
            w1 = _load_q(w_rows, k_lo + BLOCK_K + c, row_ok, K, BLOCK_K < k_split, EVEN)
        if PDL:
            # Passing the tiles through an opaque move, ordered before the wait as both are side effects, keeps
            # the loads ahead of the wait whatever the compiler would schedule (Triton 3.6's PTX has them ahead
            # without the move too; the move costs one register copy a word).
            if Q_AHEAD >= 1:
                w = tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [w], dtype=tl.int8, is_pure=False, pack=4)
            if Q_AHEAD == 2:
                w1 = tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [w1], dtype=tl.int8, is_pure=False,
                                               pack=4)
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        if PROLOGUE == 1:
            # 1 / RMS(x) over the whole of x (every program: x is K elements, a few KB read from the caches),
            # as the norm computes it: the mean of the float32 squares, plus eps, reciprocal square root. In
            # NORM_BLOCK columns at a time (the whole of x, up to 8192): all its loads are issued at once, so
            # the program waits one memory latency before it streams Q, not one a step.
            squares = tl.zeros((NORM_BLOCK,), dtype=tl.float32)
            for k0 in range(0, K, NORM_BLOCK):
                cols = k0 + tl.arange(0, NORM_BLOCK)
                xs = tl.load(x_ptr + cols, mask=cols < K, other=0.0, eviction_policy="evict_last").to(tl.float32)
                squares += xs * xs
            inv_rms = tl.math.rsqrt(tl.sum(squares, axis=0) / K + eps)
        if X_AHEAD:
            x_cur, o_cur = _load_input(x_ptr, norm_ptr, k_lo + c, K, k_split > 0, EVEN, PROLOGUE)
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)  # BLOCK_K running sums a row, added at the end
        for k0 in range(0, k_split, BLOCK_K):
            cols = k_lo + k0 + c  # (BLOCK_K,)
            if Q_AHEAD == 0:
                w = _load_q(w_rows, cols, row_ok, K, True, EVEN)
            else:
                w_next = _load_q(w_rows, cols + Q_AHEAD * BLOCK_K, row_ok, K, k0 + Q_AHEAD * BLOCK_K < k_split, EVEN)
            if X_AHEAD:
                xk, other = x_cur, o_cur
                x_cur, o_cur = _load_input(x_ptr, norm_ptr, cols + BLOCK_K, K, k0 + BLOCK_K < k_split, EVEN,
                                           PROLOGUE)
            else:
                xk, other = _load_input(x_ptr, norm_ptr, cols, K, True, EVEN, PROLOGUE)
            xk = xk.to(tl.float32)
            if PROLOGUE == 1:  # (x * inv_rms) rounded to the activations' dtype, times the weight, rounded
                xk = ((xk * inv_rms).to(dtype).to(tl.float32) * other.to(tl.float32)).to(dtype).to(tl.float32)
            if PROLOGUE == 2:  # silu(gate) rounded to the activations' dtype, times up, rounded
                xk = ((xk / (1.0 + tl.exp(-xk))).to(dtype).to(tl.float32) * other.to(tl.float32)).to(dtype).to(
                    tl.float32)
            acc += _int8_as_float32(w) * xk[None, :]
            if Q_AHEAD == 1:
                w = w_next
            if Q_AHEAD == 2:
                w = w1
                w1 = w_next
        part = tl.sum(acc, axis=1)  # (BLOCK_N,)
        if PARTIAL:
            tl.store(out_ptr + pid_k * N + rows, part, mask=row_ok)
        else:
            s = tl.load(scale_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
            y = (part * s).to(out_ptr.dtype.element_ty)
            if RESIDUAL:
                y = (y.to(tl.float32) + tl.load(res_ptr + rows, mask=row_ok, other=0.0).to(tl.float32))
            tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty), mask=row_ok)

    @triton.jit
    def _rms_norm_kernel(x_ptr, norm_ptr, out_ptr, K, eps, BLOCK: tl.constexpr, PDL: tl.constexpr):
        """out = x's RMSNorm with weight norm, rounded as llama.model.RMSNorm rounds it (one program; the
        same function as the GEMV's RMS_NORM prologue, for products whose many programs would each norm x)."""
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        dtype = x_ptr.dtype.element_ty
        squares = tl.zeros((BLOCK,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            cols = k0 + tl.arange(0, BLOCK)
            xs = tl.load(x_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
            squares += xs * xs
        inv_rms = tl.math.rsqrt(tl.sum(squares, axis=0) / K + eps)
        for k0 in range(0, K, BLOCK):
            cols = k0 + tl.arange(0, BLOCK)
            xs = tl.load(x_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
            nk = tl.load(norm_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
            tl.store(out_ptr + cols, ((xs * inv_rms).to(dtype).to(tl.float32) * nk).to(dtype), mask=cols < K)

    @triton.jit
    def _sum_parts_kernel(part_ptr, scale_ptr, res_ptr, out_ptr, N, split_k, BLOCK: tl.constexpr,
                          RESIDUAL: tl.constexpr):
        """out[n] = (sum over s of part[s, n]) * scale[n], rounded once to out's dtype (RESIDUAL: plus res[n],
        rounded again)."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < N
        acc = tl.load(part_ptr + offs, mask=ok, other=0.0)
        for s in range(1, split_k):
            acc += tl.load(part_ptr + s * N + offs, mask=ok, other=0.0)
        scale = tl.load(scale_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        y = (acc * scale).to(out_ptr.dtype.element_ty)
        if RESIDUAL:
            y = y.to(tl.float32) + tl.load(res_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=ok)


def _launch(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, cfg: GemvConfig, prologue: int = PLAIN,
            norm_weight: Optional[torch.Tensor] = None, eps: float = 0.0,
            residual: Optional[torch.Tensor] = None, pdl: bool = False, norm_apart: bool = False) -> torch.Tensor:
    """The Triton kernels on Q (N, K) contiguous int8, scale (N,) and a contiguous input in the activations'
    dtype: x (1, K) (PLAIN, RMS_NORM with norm_weight (K,) and eps) or gate and up side by side (1, 2K)
    (SWIGLU) -> (1, N) in that dtype; plus `residual` (N elements, contiguous) where given. pdl: the product's
    kernel as a programmatic dependent launch (pdl_supported(device) must hold); a split-K sum kernel after it
    is launched as usual. norm_apart (RMS_NORM): x normed by a one-program kernel first (the same roundings),
    then the PLAIN product, instead of every program norming x."""
    if prologue == RMS_NORM and norm_apart:
        normed = torch.empty_like(x)
        block = min(triton.next_power_of_2(x.shape[-1]), MAX_NORM_BLOCK)
        _rms_norm_kernel[(1,)](x, norm_weight, normed, x.shape[-1], eps, BLOCK=block, PDL=pdl,
                               num_warps=min(16, max(4, block // 512)), **({"launch_pdl": True} if pdl else {}))
        return _launch(normed, q, scale, cfg, PLAIN, residual=residual, pdl=pdl)
    n, k = q.shape
    per = k_per_split(k, cfg)
    even = n % cfg.block_n == 0 and per * cfg.split_k == k
    out = torch.empty((1, n), dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(n, cfg.block_n), cfg.split_k)
    norm = norm_weight if norm_weight is not None else x  # (not read unless RMS_NORM)
    norm_block = min(triton.next_power_of_2(k), MAX_NORM_BLOCK) if prologue == RMS_NORM else 16
    res = residual if residual is not None else out  # (not read unless RESIDUAL)
    add = residual is not None
    launch = {"launch_pdl": True} if pdl else {}  # (older Tritons know no launch_pdl: only passed when asked)
    partial = cfg.split_k > 1
    dest = torch.empty((cfg.split_k, n), dtype=torch.float32, device=x.device) if partial else out
    q_ahead, x_ahead, q8 = LOOPS[cfg.loop]
    _gemv_kernel[grid](x, norm, q, scale, res, dest, n, k, per, eps, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                       PARTIAL=partial, EVEN=even, PROLOGUE=prologue, RESIDUAL=add and not partial,
                       NORM_BLOCK=norm_block, PDL=pdl, Q_AHEAD=q_ahead, X_AHEAD=x_ahead, Q8=q8,
                       num_warps=cfg.num_warps, **launch)
    if partial:
        block = 1024
        _sum_parts_kernel[(triton.cdiv(n, block),)](dest, scale, res, out, n, cfg.split_k, BLOCK=block,
                                                    RESIDUAL=add, num_warps=4)
    return out


def kernel_runs_on(device: torch.device) -> bool:
    """Whether the Triton kernel can run on `device` (CUDA, with Triton installed)."""
    return triton is not None and device.type == "cuda" and torch.cuda.is_available()


def pdl_supported(device: torch.device) -> bool:
    """Whether the kernel can be launched as a programmatic dependent launch on `device`: the kernel runs
    there, the GPU has it (compute capability 9.0, Hopper, and later) and Triton has its `gdc_wait`."""
    if triton is None or device.type != "cuda" or not torch.cuda.is_available():
        return False
    cuda = getattr(getattr(tl, "extra", None), "cuda", None)
    return hasattr(cuda, "gdc_wait") and torch.cuda.get_device_capability(device)[0] >= 9
