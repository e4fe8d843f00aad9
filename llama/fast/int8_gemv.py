"""A one-row int8 weight-only product on CUDA: a hand-written Triton kernel with split-K, for decode steps.

At batch 1 a decode step multiplies one row x (1, K) by every int8 weight Q (N, K) once: it is bound by how
fast Q is read. Under compile=True inductor makes each such product one reduction kernel, one program per
output row (or a few), walking the whole of K. Measured on an H200 (bench/results/GPU_RESULTS.md, issue 18)
that ran w13 (28672 x 4096) at 78% of the read bandwidth but w2 (4096 x 14336, the long K) at 24%, with
tuning that landed 3-4x apart from process to process and from layer to layer. This kernel:

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
- is picked per weight shape from a small table of block shapes (CANDIDATES) by timing them once at load,
  on the model's own weights and in a CUDA graph as a compiled step runs them (`use_int8_gemv`), not by
  inductor's autotuning;
- is a torch custom op (`llama::int8_gemv`), which torch.compile and CUDA graphs treat as one opaque call.

Numerics: each product x[k] * Q[n, k] is formed in float32 (exact for bf16 x: 8 + 7 significant bits) and
summed in float32, in another order than torch's; then y[n] = sum * scale[n], rounded once to x's dtype. The
same function as F.linear(x, Q * scale) up to float32 summation rounding (tests/test_int8_gemv.py bounds it
against float64). Off CUDA, or without Triton, the op computes the same thing with torch's own float32
product (`int8_gemv_reference`).

LLAMA_INT8_GEMV picks which products take it: "auto" (the default: DEFAULT_ROLES, w2, wo and the output
projection), "off", "all", or a comma list of layer names (w2,wo,wqkv,w13,output; wq,wk,wv,w1,w3 on the
reference layers).
"""

import os
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

try:  # Triton comes with torch's CUDA builds; without it (CPU builds) the op runs int8_gemv_reference
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

ENV = "LLAMA_INT8_GEMV"
# Every layer name the setting takes, and those that take the kernel under "auto": the products that follow
# no RMSNorm. wqkv and w13 follow one, which inductor fuses into its own product's kernel (an opaque op
# cannot take it in): alone the kernel beat inductor's form there by 1-2 us (H200), less than the separate
# norm kernel it would need (bench/results/GPU_RESULTS.md).
ROLES = ("w2", "wo", "wqkv", "w13", "output", "wq", "wk", "wv", "w1", "w3")
DEFAULT_ROLES = ("w2", "wo", "output")
# Rows of x the kernel serves (a batch-1 decode step); more rows keep the layer's own product.
MAX_ROWS = 1
# A timed pass over a shape's layers reads at least this many bytes (several times the L2 cache), so the
# weights stream from memory as in a step.
PASS_BYTES = 256 * 2**20
ROUNDS = 5


class GemvConfig(NamedTuple):
    """A block shape of the kernel: rows a program reads, columns a loop step reads, slices of K, warps."""

    block_n: int
    block_k: int
    split_k: int
    num_warps: int


# Candidates timed at build for each weight shape: the fastest block shapes of scripts/int8_gemv_sweep.py's
# sweep (20 block shapes x 4-6 splits at each 8B shape, H200; bench/results/GPU_RESULTS.md), and split-K ones
# for products with fewer rows (a model-parallel rank's slice) or a longer K.
CANDIDATES = (
    GemvConfig(2, 2048, 1, 4),  # the sweep's best for wqkv, wo, w2
    GemvConfig(4, 2048, 1, 8),
    GemvConfig(8, 512, 1, 4),  # w13's
    GemvConfig(8, 512, 1, 8),
    GemvConfig(16, 256, 1, 4),  # the output projection's
    GemvConfig(4, 1024, 2, 4),
    GemvConfig(8, 512, 4, 4),
    GemvConfig(8, 512, 7, 4),  # w2's best split (within 7% of its best)
)


def check_config(cfg: GemvConfig, k: int) -> None:
    """ValueError unless `cfg` is a block shape the kernel takes for inputs of width k."""
    ok = all(isinstance(v, int) and v > 0 for v in cfg)
    ok = ok and all(v & (v - 1) == 0 for v in (cfg.block_n, cfg.block_k, cfg.num_warps))  # Triton's blocks
    if not ok or cfg.block_k < 16 or cfg.num_warps > 16:
        raise ValueError(f"an int8 GEMV block shape takes powers of two block_n, block_k >= 16, num_warps <= 16 "
                         f"and split_k >= 1, got {tuple(cfg)}")
    if k_per_split(k, cfg) * (cfg.split_k - 1) >= k:
        raise ValueError(f"split_k={cfg.split_k} leaves a slice of K={k} empty with block_k={cfg.block_k}")


def k_per_split(k: int, cfg: GemvConfig) -> int:
    """Columns of each slice of K: K / split_k rounded up to whole block_k steps (the last slice is masked)."""
    per = -(-k // cfg.split_k)
    return -(-per // cfg.block_k) * cfg.block_k


def int8_gemv_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(x Q^T) * scale in float32, rounded once to x's dtype: x (M, K), Q (N, K) int8, scale (N,) -> (M, N)."""
    return (F.linear(x.float(), q.float()) * scale.float()).to(x.dtype)


if triton is not None:

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, scale_ptr, out_ptr, N, K, k_split,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PARTIAL: tl.constexpr, EVEN: tl.constexpr):
        """Rows [pid0 * BLOCK_N, +BLOCK_N) of Q times x over columns [pid1 * k_split, +k_split): their float32
        sums, stored as partials (PARTIAL: out is (SPLIT_K, N) float32) or scaled and rounded (out is (N,))."""
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
        row_ok = rows < N
        w_rows = w_ptr + rows.to(tl.int64)[:, None] * K  # (BLOCK_N, 1) row starts
        k_lo = pid_k * k_split
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)  # BLOCK_K running sums a row, added at the end
        for k0 in range(0, k_split, BLOCK_K):
            cols = k_lo + k0 + tl.arange(0, BLOCK_K)  # (BLOCK_K,)
            if EVEN:  # no masks: N and K fill the blocks exactly
                w = tl.load(w_rows + cols[None, :], eviction_policy="evict_first")
                xk = tl.load(x_ptr + cols, eviction_policy="evict_last")
            else:
                col_ok = cols < K
                w = tl.load(w_rows + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0,
                            eviction_policy="evict_first")
                xk = tl.load(x_ptr + cols, mask=col_ok, other=0.0, eviction_policy="evict_last")
            # int8 -> float32 without the int-to-float instruction (a quarter of the float rate on Hopper, and the
            # bound once loads are 16 bytes wide): the bits 0x4B000080 + b are float32 2**23 + 128 + b exactly
            # for b in -128..127, and subtracting 2**23 + 128 leaves b exactly.
            wf = (w.to(tl.int32) + 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0
            acc += wf * xk.to(tl.float32)[None, :]
        part = tl.sum(acc, axis=1)  # (BLOCK_N,)
        if PARTIAL:
            tl.store(out_ptr + pid_k * N + rows, part, mask=row_ok)
        else:
            s = tl.load(scale_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
            tl.store(out_ptr + rows, (part * s).to(out_ptr.dtype.element_ty), mask=row_ok)

    @triton.jit
    def _sum_parts_kernel(part_ptr, scale_ptr, out_ptr, N, split_k, BLOCK: tl.constexpr):
        """out[n] = (sum over s of part[s, n]) * scale[n], rounded once to out's dtype."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < N
        acc = tl.load(part_ptr + offs, mask=ok, other=0.0)
        for s in range(1, split_k):
            acc += tl.load(part_ptr + s * N + offs, mask=ok, other=0.0)
        scale = tl.load(scale_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, (acc * scale).to(out_ptr.dtype.element_ty), mask=ok)


def _launch(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, cfg: GemvConfig) -> torch.Tensor:
    """The Triton kernels on x (1, K) contiguous, Q (N, K) contiguous int8, scale (N,) -> (1, N) in x's dtype."""
    n, k = q.shape
    per = k_per_split(k, cfg)
    even = n % cfg.block_n == 0 and per * cfg.split_k == k
    out = torch.empty((1, n), dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(n, cfg.block_n), cfg.split_k)
    if cfg.split_k == 1:
        _gemv_kernel[grid](x, q, scale, out, n, k, per, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, PARTIAL=False,
                           EVEN=even, num_warps=cfg.num_warps)
        return out
    parts = torch.empty((cfg.split_k, n), dtype=torch.float32, device=x.device)
    _gemv_kernel[grid](x, q, scale, parts, n, k, per, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, PARTIAL=True,
                       EVEN=even, num_warps=cfg.num_warps)
    block = 1024
    _sum_parts_kernel[(triton.cdiv(n, block),)](parts, scale, out, n, cfg.split_k, BLOCK=block, num_warps=4)
    return out


def kernel_runs_on(device: torch.device) -> bool:
    """Whether the Triton kernel can run on `device` (CUDA, with Triton installed)."""
    return triton is not None and device.type == "cuda" and torch.cuda.is_available()


@torch.library.custom_op("llama::int8_gemv", mutates_args=())
def int8_gemv(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, block_n: int, block_k: int, split_k: int,
              num_warps: int) -> torch.Tensor:
    """(x Q^T) * scale: x (..., K) with one row in all, Q (N, K) int8, scale (N,) -> (..., N) in x's dtype, summed
    in float32 (the module docstring). The Triton kernel with this block shape on CUDA; elsewhere (or for
    more rows) int8_gemv_reference."""
    x2 = x.reshape(-1, x.shape[-1])  # (M, K)
    if x2.shape[0] == 1 and kernel_runs_on(x.device):
        y = _launch(x2.contiguous(), q.contiguous(), scale.contiguous(), GemvConfig(block_n, block_k, split_k,
                                                                                      num_warps))
    else:
        y = int8_gemv_reference(x2, q, scale)
    return y.view(*x.shape[:-1], q.shape[0])


@int8_gemv.register_fake
def _(x, q, scale, block_n, block_k, split_k, num_warps):
    return x.new_empty((*x.shape[:-1], q.shape[0]))


class Int8Gemv:
    """A layer's one-row product: int8_gemv with the block shape picked for its weight's shape."""

    def __init__(self, cfg: GemvConfig):
        self.cfg = cfg

    def __call__(self, x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return int8_gemv(x, q, scale, *self.cfg)

    def __repr__(self) -> str:
        return f"Int8Gemv{tuple(self.cfg)}"


def gemv_roles() -> Optional[Sequence[str]]:
    """The layer names LLAMA_INT8_GEMV gives the kernel (None: "all"); ValueError on an unknown name."""
    setting = os.environ.get(ENV, "auto").strip()
    if setting == "auto":
        return DEFAULT_ROLES
    if setting == "all":
        return None
    if setting == "off":
        return ()
    roles = [r.strip() for r in setting.split(",") if r.strip()]
    known = set(ROLES)
    unknown = [r for r in roles if r not in known]
    if unknown or not roles:
        raise ValueError(f"{ENV} must be 'auto', 'off', 'all' or a comma list of {sorted(known)}, got {setting!r}")
    return roles


def _time_pass(fn: Callable[[], None]) -> float:
    """Seconds one replay of `fn`'s launches takes, captured in a CUDA graph as a compiled step runs them
    (launched one by one from Python, a few-microsecond kernel would time Python's launch cost)."""
    fn()  # compiles and warms up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    best = float("inf")
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(ROUNDS):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    del graph
    return best


def pick_config(layers: List[nn.Module], candidates: Optional[Sequence[GemvConfig]] = None) -> GemvConfig:
    """The fastest of `candidates` (default CANDIDATES) for the products of `layers` (Int8Linears of one weight
    shape, on CUDA): each times a CUDA-graph replay of a pass over the first layers holding PASS_BYTES (the best
    of ROUNDS)."""
    k = layers[0].in_features
    fitting = []
    for cfg in CANDIDATES if candidates is None else candidates:
        try:
            check_config(cfg, k)
            fitting.append(cfg)
        except ValueError:
            pass
    if not fitting:
        raise ValueError(f"no int8 GEMV block shape fits K={k}")
    timed, total = [], 0
    for m in layers:
        timed.append(m)
        total += m.out_features * m.in_features
        if total >= PASS_BYTES:
            break
    device = layers[0].scale.device
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(0)).to(device=device, dtype=layers[0].dtype)

    def make(cfg):
        def run():
            for m in timed:
                _launch(x, m.weight, m.scale_act, cfg)
        return run

    times = {cfg: _time_pass(make(cfg)) for cfg in fitting}
    return min(fitting, key=times.__getitem__)


@torch.no_grad()
def use_int8_gemv(linears: Dict[str, nn.Module]) -> Dict[str, GemvConfig]:
    """Give each Int8Linear of `linears` ({module path: layer}) named in LLAMA_INT8_GEMV's roles, on CUDA with
    Triton, with one model-parallel rank's whole product, its shape's fastest block shape (`gemv` attribute);
    the others keep their own product. Returns {module path: block shape} of the layers given one."""
    roles = gemv_roles()
    chosen = {path: m for path, m in linears.items()
              if (roles is None or path.rpartition(".")[2] in roles) and kernel_runs_on(m.scale.device)
              and getattr(m, "weight", None) is not None and m.dtype in (torch.bfloat16, torch.float16, torch.float32)}
    groups: Dict[tuple, List[str]] = {}
    for path, m in chosen.items():
        groups.setdefault((m.out_features, m.in_features, m.dtype), []).append(path)
    picked = {}
    for paths in groups.values():
        cfg = pick_config([chosen[p] for p in paths])
        for p in paths:
            chosen[p].gemv = Int8Gemv(cfg)
            picked[p] = cfg
    return picked
