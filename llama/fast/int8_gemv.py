"""A one-row int8 weight-only product on CUDA, for decode steps: torch custom ops over the Triton kernels of
llama.fast.int8_gemv_kernels, the same functions in torch off CUDA, the layers' hook and the load-time pick.

At batch 1 a decode step multiplies one row x (1, K) by every int8 weight Q (N, K) once: it is bound by how
fast Q is read. Under compile=True inductor makes each such product one reduction kernel, one program per
output row (or a few), walking the whole of K. Measured on an H200 (bench/results/GPU_RESULTS.md, issue 18)
that ran w13 (28672 x 4096) at 78% of the read bandwidth but w2 (4096 x 14336, the long K) at 24%, with
tuning that landed 3-4x apart from process to process and from layer to layer. A kernel of our own (split K,
several rows a program, int8 to float32 without the int-to-float instruction, a dependent launch: its
module's docstring) does these products instead. Here it:

- is a torch custom op (`llama::int8_gemv`), which torch.compile and CUDA graphs treat as one opaque call;
- adds the block's residual in its epilogue (wo, w2: one small kernel fewer after each);
- can take the function that forms its input in, which inductor would otherwise fuse into its own product's
  kernel or run as a kernel of its own before the opaque op: the RMSNorm before the fast path's wqkv, w13 and
  output projection (`llama::rms_norm_int8_gemv`) and silu(gate) * up before w2 (`llama::swiglu_int8_gemv`,
  reading w13's output). The fast layers hand the norm, the SwiGLU and the residual on to the product
  (llama.fast.layers.fast_block; Int8Linear's `after_norm`, `after_swiglu`, `plus_residual` in
  llama.fast.quantize, through Int8Gemv); the block shape is then timed for the fused form. A product after an
  RMSNorm may instead have x normed once by a one-program kernel before it (`norm_apart`, the same roundings)
  and read it plainly: whichever of the two timed faster at load (LLAMA_INT8_GEMV_NORM_APART; on an H200 every
  8B product after a norm took the kernel apart: w13 36.1 us against 39.4 in-kernel);
- is picked per weight shape from a small table of block shapes (CANDIDATES) by timing them once at load,
  on the model's own weights and in a CUDA graph as a compiled step runs them (`use_int8_gemv`), not by
  inductor's autotuning;
- is launched as a programmatic dependent launch on Hopper and later (LLAMA_INT8_GEMV_PDL);
- feeds its loop one of several ways (GemvConfig.loop: how far ahead Q's tiles and x are loaded, Q in 16- or
  8-byte loads), also picked by that timing: on an H200 the fastest way differed by shape (seventh session).

Numerics: each product x[k] * Q[n, k] is formed in float32 (exact for bf16 x: 8 + 7 significant bits) and
summed in float32, in another order than torch's; then y[n] = sum * scale[n], rounded once to x's dtype. The
same function as F.linear(x, Q * scale) up to float32 summation rounding (tests/test_int8_gemv.py bounds it
against float64). Off CUDA, or without Triton, the op computes the same thing with torch's own float32
product (`int8_gemv_reference`). The prologues round as the unfused path does: the norm's x * (1 / RMS(x))
rounded to x's dtype, times the norm's weight, rounded (llama.model.RMSNorm; the sum of squares in float32, in
another order); silu(gate) rounded to the dtype, times up, rounded (eager torch; a compiled step's fused
silu * up keeps silu in float32); the residual is added to the rounded product and the sum rounded (as
torch adds them); off CUDA, `rms_norm_reference` and `swiglu_reference` (the same torch functions).
tests/test_int8_gemv_fused.py bounds them against float64 on the unfused composition.

LLAMA_INT8_GEMV picks which products take it: "auto" (the default: DEFAULT_ROLES, every product of the fast
layers), "off", "all", or a comma list of layer names (w2,wo,wqkv,w13,output; wq,wk,wv,w1,w3 on the reference
layers). LLAMA_INT8_GEMV_FUSE picks what the fast layers' products take in: "auto" (the default: the RMSNorm
and the residual add, DEFAULT_FORMS), "on" (the SwiGLU too), "off", or a comma list of rms_norm, swiglu,
residual. Measured on an H200 at the 8B shape (compiled batch-1 step, bench/results/GPU_RESULTS.md, issue 18,
sixth session): 350.4 tok/s with the norm apart and the dependent launch, against 326.5 with the dependent
launch only and 322.9 with neither (bf16 223.2 in the same process: 1.57x, 1.46x, 1.45x).
"""

import os
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from llama.fast.int8_gemv_kernels import (PLAIN, Q8_AHEAD2, Q8_X_AHEAD, Q_AHEAD, Q_IN_STEP, QX_AHEAD, RMS_NORM, SWIGLU,
                                          GemvConfig, _launch, check_config, kernel_runs_on, pdl_supported)

ENV = "LLAMA_INT8_GEMV"
# Every layer name the setting takes, and those that take the kernel under "auto": every product of the fast
# layers. Until the kernel took the RMSNorm in, wqkv and w13 kept inductor's products, which fuse the norm
# before them; with it, the 8B step on an H200 ran at 1.64x of bf16 against 1.41x with the kernel on w2, wo
# and output only (bench/results/GPU_RESULTS.md, issue 18, third session).
ROLES = ("w2", "wo", "wqkv", "w13", "output", "wq", "wk", "wv", "w1", "w3")
DEFAULT_ROLES = ("wqkv", "wo", "w13", "w2", "output")
# Which of FORMS the kernel takes in on the fast layers: "auto" (the default: DEFAULT_FORMS), "on" (all), "off"
# (none), or a comma list. The SwiGLU is not among the defaults: w2 with it took 23.0 us alone against 20.0
# plain (each program computes silu for every column it reads, an exp and a division), and the 8B step ran
# at 320.9 tok/s with it against 329.4 without (H200, one process; GPU_RESULTS.md).
FUSE_ENV = "LLAMA_INT8_GEMV_FUSE"
FORMS = ("rms_norm", "swiglu", "residual")
DEFAULT_FORMS = ("rms_norm", "residual")
# Whether the kernel is launched as a programmatic dependent launch where it can (Hopper and later): "auto" (the
# default) or "off". Then the first tile of Q streams in while the kernel before finishes (see _gemv_kernel in
# llama.fast.int8_gemv_kernels); compile=True launches inductor's own kernels so too
# (llama.fast.step.compile_options).
PDL_ENV = "LLAMA_INT8_GEMV_PDL"
# How a product after an RMSNorm norms x: in its own kernel (every program norms x: an RMS_NORM prologue) or in a
# one-program kernel before it (then the plain product); "auto" (the default) times both at load.
NORM_APART_ENV = "LLAMA_INT8_GEMV_NORM_APART"
# The input function each fast layer's product takes in (the kernel's PROLOGUE): the RMSNorm before wqkv,
# w13 and the output projection; silu(gate) * up from w13's output before w2.
PROLOGUE_OF = {"wqkv": RMS_NORM, "w13": RMS_NORM, "output": RMS_NORM, "w2": SWIGLU}
# The products whose output the fast block adds to its residual stream: their kernels add it in (epilogue).
RESIDUAL_ROLES = ("wo", "w2")
# Rows of x the kernel serves (a batch-1 decode step); more rows keep the layer's own product.
MAX_ROWS = 1
# A timed pass over a shape's layers reads at least this many bytes (several times the L2 cache), so the
# weights stream from memory as in a step.
PASS_BYTES = 256 * 2**20
ROUNDS = 5


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
    # Other loops (GemvConfig.loop), the fastest of scripts/int8_gemv_variants.py on an H200 (seventh session):
    GemvConfig(8, 512, 1, 4, Q8_AHEAD2),  # wqkv: 8.9 us against 9.7-10.0 with Q_AHEAD
    GemvConfig(8, 512, 1, 4, QX_AHEAD),  # wqkv: 9.0
    GemvConfig(2, 2048, 1, 4, Q_IN_STEP),  # w2: 19.1 against 20.3-20.4
    GemvConfig(4, 1024, 1, 4, Q_IN_STEP),  # w2: 18.9-19.0
    GemvConfig(4, 1024, 1, 4, Q8_X_AHEAD),  # w2: 18.6
)
# More for the SwiGLU prologue, which computes silu once a column per program: rows per program share it.
SWIGLU_CANDIDATES = CANDIDATES + (
    GemvConfig(8, 1024, 1, 8),
    GemvConfig(16, 512, 1, 8),
    GemvConfig(16, 1024, 1, 8),
    GemvConfig(32, 256, 1, 8),
)


def int8_gemv_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(x Q^T) * scale in float32, rounded once to x's dtype: x (M, K), Q (N, K) int8, scale (N,) -> (M, N)."""
    return (F.linear(x.float(), q.float()) * scale.float()).to(x.dtype)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """llama.model.RMSNorm's function, with its roundings: x normed in float32, rounded to x's dtype, times
    the weight."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


def swiglu_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """F.silu(gate) * up of gate_up (..., 2 * hidden), gate then up, as the fast path's feed-forward computes
    it (llama.fast.layers.FastFeedForward; eager torch rounds silu's result to the dtype, then the product)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def norm_apart_setting() -> str:
    """LLAMA_INT8_GEMV_NORM_APART: "auto" (the default: for each product after an RMSNorm, whichever of the
    two ways timed faster at load), "on" (a kernel of its own norms x first) or "off" (every program of the
    product norms x); ValueError on another value."""
    setting = os.environ.get(NORM_APART_ENV, "auto").strip()
    if setting not in ("auto", "on", "off"):
        raise ValueError(f"{NORM_APART_ENV} must be 'auto', 'on' or 'off', got {setting!r}")
    return setting


def pdl_runs_on(device: torch.device) -> bool:
    """Whether layers loaded now launch the kernel so on `device`: pdl_supported, and LLAMA_INT8_GEMV_PDL is
    not "off" ("auto", the default: wherever it can); ValueError on another value."""
    setting = os.environ.get(PDL_ENV, "auto").strip()
    if setting not in ("auto", "off"):
        raise ValueError(f"{PDL_ENV} must be 'auto' or 'off', got {setting!r}")
    return setting == "auto" and pdl_supported(device)


@torch.library.custom_op("llama::int8_gemv", mutates_args=())
def int8_gemv(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, block_n: int, block_k: int, split_k: int,
              num_warps: int, loop: int = Q_AHEAD, residual: Optional[torch.Tensor] = None,
              pdl: bool = False) -> torch.Tensor:
    """(x Q^T) * scale: x (..., K) with one row in all, Q (N, K) int8, scale (N,) -> (..., N) in x's dtype, summed
    in float32 (the module docstring); plus `residual` (..., N), rounded again, where given (the block's
    residual add, in the kernel's epilogue). The Triton kernel with this block shape and loop (GemvConfig) on
    CUDA (pdl: launched as
    a programmatic dependent launch, where pdl_supported holds); elsewhere (or for more rows)
    int8_gemv_reference."""
    x2 = x.reshape(-1, x.shape[-1])  # (M, K)
    if x2.shape[0] == 1 and kernel_runs_on(x.device):
        y = _launch(x2.contiguous(), q.contiguous(), scale.contiguous(), GemvConfig(block_n, block_k, split_k,
                                                                                      num_warps, loop),
                    residual=_flat(residual), pdl=pdl and pdl_supported(x.device))
    else:
        y = _plus(int8_gemv_reference(x2, q, scale), residual)
    return y.view(*x.shape[:-1], q.shape[0])


def _flat(residual: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if residual is None else residual.reshape(-1).contiguous()


def _plus(y: torch.Tensor, residual: Optional[torch.Tensor]) -> torch.Tensor:
    """residual + y (M, N), as the block adds them (torch's rounding), where there is a residual."""
    return y if residual is None else residual.reshape(y.shape) + y


@int8_gemv.register_fake
def _(x, q, scale, block_n, block_k, split_k, num_warps, loop=Q_AHEAD, residual=None, pdl=False):
    return x.new_empty((*x.shape[:-1], q.shape[0]))


@torch.library.custom_op("llama::rms_norm_int8_gemv", mutates_args=())
def rms_norm_int8_gemv(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, q: torch.Tensor, scale: torch.Tensor,
                       block_n: int, block_k: int, split_k: int, num_warps: int, loop: int = Q_AHEAD,
                       pdl: bool = False, norm_apart: bool = False) -> torch.Tensor:
    """int8_gemv(rms_norm_reference(x, norm_weight, eps), Q, scale) in one kernel: x (..., K) with one row in
    all, un-normed, norm_weight (K,) in x's dtype -> (..., N). Each program sums x's squares itself and norms
    x as it reads it, rounding as the norm does (pdl: as int8_gemv's); norm_apart: a one-program kernel norms
    x first, with the same roundings, and the product reads it plainly (two kernels). Off CUDA (or for more
    rows): the two reference functions."""
    x2 = x.reshape(-1, x.shape[-1])  # (M, K)
    if x2.shape[0] == 1 and kernel_runs_on(x.device):
        cfg = GemvConfig(block_n, block_k, split_k, num_warps, loop)
        y = _launch(x2.contiguous(), q.contiguous(), scale.contiguous(), cfg, RMS_NORM, norm_weight.contiguous(),
                    eps, pdl=pdl and pdl_supported(x.device), norm_apart=norm_apart)
    else:
        y = int8_gemv_reference(rms_norm_reference(x2, norm_weight, eps), q, scale)
    return y.view(*x.shape[:-1], q.shape[0])


@rms_norm_int8_gemv.register_fake
def _(x, norm_weight, eps, q, scale, block_n, block_k, split_k, num_warps, loop=Q_AHEAD, pdl=False,
      norm_apart=False):
    return x.new_empty((*x.shape[:-1], q.shape[0]))


@torch.library.custom_op("llama::swiglu_int8_gemv", mutates_args=())
def swiglu_int8_gemv(gate_up: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, block_n: int, block_k: int,
                     split_k: int, num_warps: int, loop: int = Q_AHEAD, residual: Optional[torch.Tensor] = None,
                     pdl: bool = False) -> torch.Tensor:
    """int8_gemv(swiglu_reference(gate_up), Q, scale, ..., residual) in one kernel: gate_up (..., 2K), gate
    then up, with one row in all -> (..., N) (pdl: as int8_gemv's). Off CUDA (or for more rows): the reference
    functions."""
    g2 = gate_up.reshape(-1, gate_up.shape[-1])  # (M, 2K)
    if g2.shape[0] == 1 and kernel_runs_on(gate_up.device):
        y = _launch(g2.contiguous(), q.contiguous(), scale.contiguous(),
                    GemvConfig(block_n, block_k, split_k, num_warps, loop), SWIGLU, residual=_flat(residual),
                    pdl=pdl and pdl_supported(gate_up.device))
    else:
        y = _plus(int8_gemv_reference(swiglu_reference(g2), q, scale), residual)
    return y.view(*gate_up.shape[:-1], q.shape[0])


@swiglu_int8_gemv.register_fake
def _(gate_up, q, scale, block_n, block_k, split_k, num_warps, loop=Q_AHEAD, residual=None, pdl=False):
    return gate_up.new_empty((*gate_up.shape[:-1], q.shape[0]))


class Int8Gemv:
    """A layer's one-row product: int8_gemv with the block shape picked for its weight's shape. `prologue`:
    the input function its kernel may take in as well (PLAIN: none; RMS_NORM or SWIGLU: `after_norm` or
    `after_swiglu`), with the block shape picked for that form; `residual`: whether it may add the block's
    residual in its epilogue; `pdl`: whether its kernel is a programmatic dependent launch (pdl_runs_on);
    `norm_apart` (RMS_NORM): whether a kernel of its own norms x first (rms_norm_int8_gemv)."""

    def __init__(self, cfg: GemvConfig, prologue: int = PLAIN, residual: bool = False, pdl: bool = False,
                 norm_apart: bool = False):
        self.cfg = cfg
        self.prologue = prologue
        self.residual = residual
        self.pdl = pdl
        self.norm_apart = norm_apart

    def __call__(self, x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                 residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        return int8_gemv(x, q, scale, *self.cfg, residual, self.pdl)

    def after_norm(self, x: torch.Tensor, norm_weight: torch.Tensor, eps: float, q: torch.Tensor,
                   scale: torch.Tensor) -> torch.Tensor:
        return rms_norm_int8_gemv(x, norm_weight, eps, q, scale, *self.cfg, self.pdl, self.norm_apart)

    def after_swiglu(self, gate_up: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                     residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        return swiglu_int8_gemv(gate_up, q, scale, *self.cfg, residual, self.pdl)

    def __repr__(self) -> str:
        form = {PLAIN: "", RMS_NORM: ", after the RMSNorm", SWIGLU: ", after the SwiGLU"}[self.prologue]
        form += " (normed apart)" if self.norm_apart else ""
        return (f"Int8Gemv{tuple(self.cfg)}{form}{', plus the residual' if self.residual else ''}"
                f"{', dependent launch' if self.pdl else ''}")


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


def time_pass(fn: Callable[[], None], rounds: int = ROUNDS) -> float:
    """Seconds one replay of `fn`'s launches takes, captured in a CUDA graph as a compiled step runs them
    (launched one by one from Python, a few-microsecond kernel would time Python's launch cost): the best of
    `rounds`. (llama.fast.decode_attention's pick times its kernels with it too.)"""
    fn()  # compiles and warms up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    best = float("inf")
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(rounds):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    del graph
    return best


def fuse_setting() -> Sequence[str]:
    """The FORMS LLAMA_INT8_GEMV_FUSE lets the kernel take in: "auto" (the default: DEFAULT_FORMS), "on" (all),
    "off" (none) or a comma list of them; ValueError on another value."""
    setting = os.environ.get(FUSE_ENV, "auto").strip()
    if setting in ("auto", "on", "off"):
        return {"auto": DEFAULT_FORMS, "on": FORMS, "off": ()}[setting]
    forms = [f.strip() for f in setting.split(",") if f.strip()]
    if not forms or any(f not in FORMS for f in forms):
        raise ValueError(f"{FUSE_ENV} must be 'auto', 'on', 'off' or a comma list of {list(FORMS)}, got {setting!r}")
    return forms


# The timings of every pick made in this process, {(N, K, dtype, prologue, pdl, norm_apart): {block shape: seconds a
# product}}
# (a pass's time over its number of layers), for scripts.
PICK_TIMES: Dict[tuple, Dict[GemvConfig, float]] = {}


def pick_config(layers: List[nn.Module], candidates: Optional[Sequence[GemvConfig]] = None,
                prologue: int = PLAIN, pdl: bool = False, norm_apart: bool = False) -> GemvConfig:
    """The fastest of `candidates` (default CANDIDATES, or SWIGLU_CANDIDATES) for the products of `layers`
    (Int8Linears of one weight shape, on CUDA), with this prologue, launch (pdl) and norm (norm_apart): each
    times a CUDA-graph replay of a pass over the first layers holding PASS_BYTES (the best of ROUNDS)."""
    k = layers[0].in_features
    if candidates is None:
        candidates = SWIGLU_CANDIDATES if prologue == SWIGLU else CANDIDATES
    fitting = []
    for cfg in candidates:
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
    device, dtype = layers[0].scale.device, layers[0].dtype
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2 * k if prologue == SWIGLU else k, generator=g).to(device=device, dtype=dtype)
    norm_weight = (1 + torch.rand(k, generator=g)).to(device=device, dtype=dtype)

    def make(cfg):
        def run():
            for m in timed:
                _launch(x, m.weight, m.scale_act, cfg, prologue, norm_weight, 1e-5, pdl=pdl, norm_apart=norm_apart)
        return run

    times = {cfg: time_pass(make(cfg)) / len(timed) for cfg in fitting}
    PICK_TIMES[(layers[0].out_features, k, str(dtype), prologue, pdl, norm_apart)] = times
    return min(fitting, key=times.__getitem__)


def picked_gemvs(model: nn.Module) -> Dict[str, str]:
    """{"<layer name> <N>x<K>": the Int8Gemv it took (block shape, loop, form)} for the model's products that
    took the kernel (one entry per layer name and shape), as the bench records them."""
    out = {}
    for path, m in model.named_modules():
        gemv = getattr(m, "gemv", None)
        if isinstance(gemv, Int8Gemv):
            out.setdefault(f"{path.rpartition('.')[2]} {m.out_features}x{m.in_features}", repr(gemv))
    return out


@torch.no_grad()
def use_int8_gemv(linears: Dict[str, nn.Module], fused_forms: bool = False) -> Dict[str, GemvConfig]:
    """Give each Int8Linear of `linears` ({module path: layer}) named in LLAMA_INT8_GEMV's roles, on CUDA with
    Triton, with one model-parallel rank's whole product, its shape's fastest block shape (`gemv` attribute);
    the others keep their own product. fused_forms: the layers are the fast path's, which hand the RMSNorm
    before wqkv, w13 and output, and the SwiGLU before w2, to the product (llama.fast.layers.normed_product,
    FastFeedForward), and the residual add after wo and w2 to it too (llama.fast.layers.added_product): unless
    LLAMA_INT8_GEMV_FUSE leaves them out, those layers' kernels take them in (PROLOGUE_OF, RESIDUAL_ROLES),
    with a block shape timed for that form. Each kernel is a programmatic dependent launch where pdl_runs_on
    holds (timed so too); an RMSNorm is normed in the product's kernel or in one of its own before it
    (LLAMA_INT8_GEMV_NORM_APART; "auto": the faster, timed). Returns {module path: block shape} of the layers
    given one."""
    roles = gemv_roles()
    forms = fuse_setting() if fused_forms else ()
    prologues = {role: p for role, p in PROLOGUE_OF.items() if {RMS_NORM: "rms_norm", SWIGLU: "swiglu"}[p] in forms}
    chosen = {path: m for path, m in linears.items()
              if (roles is None or path.rpartition(".")[2] in roles) and kernel_runs_on(m.scale.device)
              and getattr(m, "weight", None) is not None and m.dtype in (torch.bfloat16, torch.float16, torch.float32)}
    groups: Dict[tuple, List[str]] = {}
    for path, m in chosen.items():
        prologue = prologues.get(path.rpartition(".")[2], PLAIN)
        groups.setdefault((m.out_features, m.in_features, m.dtype, prologue), []).append(path)
    picked = {}
    apart_setting = norm_apart_setting()
    for (n, k, dtype, prologue), paths in groups.items():
        layers = [chosen[p] for p in paths]
        pdl = pdl_runs_on(layers[0].scale.device)
        apart = apart_setting == "on" and prologue == RMS_NORM
        cfg = pick_config(layers, prologue=prologue, pdl=pdl, norm_apart=apart)
        if apart_setting == "auto" and prologue == RMS_NORM:  # the faster of the two ways, by the same timing
            cfg_apart = pick_config(layers, prologue=prologue, pdl=pdl, norm_apart=True)
            key = (n, k, str(dtype), prologue, pdl)
            timed = lambda apart, c: PICK_TIMES.get(key + (apart,), {}).get(c, float("inf"))  # noqa: E731
            if timed(True, cfg_apart) < timed(False, cfg):
                cfg, apart = cfg_apart, True
        for p in paths:
            residual = "residual" in forms and p.rpartition(".")[2] in RESIDUAL_ROLES
            chosen[p].gemv = Int8Gemv(cfg, prologue, residual=residual, pdl=pdl, norm_apart=apart)
            picked[p] = cfg
    return picked
