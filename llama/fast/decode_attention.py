"""The attention of a compiled CUDA decode step: a torch custom op over the Triton kernel of
llama.fast.decode_attention_kernels, the same function in torch off CUDA, and the load-time pick.

In the compiled batch-1 decode step each layer's attention was cuDNN's SDPA kernel (6.5 us a layer on an H200
at the 8B shape) and a kernel inductor makes from the step's bool mask (0.9 us a layer), for one query token
over a cache of a few hundred positions, well under a megabyte a layer: latency, not bandwidth. The compiled
step also reads the whole cache (max_seq_len positions, masked), since its shapes must not change between
steps. The kernel here takes each row's position instead of a mask, reads the cache only up to it (one
program a block of positions, the blocks merged by a second kernel), and is a custom op
(`llama::decode_attention`) that torch.compile and CUDA graphs call as one opaque call.

`use_decode_attention` gives each fast attention layer the op (`FastAttention.decode_attention`) where it is
faster. LLAMA_DECODE_ATTENTION "auto" (the default): in a model whose products run the int8 GEMV kernel
(llama.fast.int8_gemv), it times every candidate block shape (CANDIDATES) and the current path (SDPA with the
step's mask) in a CUDA graph over the model's own layers at load, and keeps the kernel only if its best is
faster; other models keep SDPA. Why only those: on an H200 at the 8B shape the kernel took 4.3 us a layer
against SDPA's 10.4, and the int8 step ran 1.3% and 4.0% faster with it, but the bf16 step, whose products are
inductor's own kernels, ran at 0.87x and 0.83x with it (its products slower beside the op; cause not found;
bench/results/GPU_RESULTS.md, issue 18, eighth session), and at 0.99-1.00x in the tenth session's process:
no gain for bf16 either way. "on": every model takes the fastest
candidate, without the comparison; "off": SDPA. A cache of more than decode_attention_kernels.MAX_BLOCKS blocks
of the candidates' sizes (512 positions) keeps SDPA.
The layers take it for one row (MAX_ROWS: the batch-1 step the timing measures); more rows keep SDPA.
LLAMA_DECODE_ATTENTION_PDL ("auto", the default, or "off"): the kernel as a programmatic dependent launch where
the GPU has it (llama.fast.int8_gemv_kernels.pdl_supported).
LLAMA_DECODE_ATTENTION_ROTARY ("auto", the default, or "off"): the layers that take the kernel also hand it
their step's rotary embedding and cache writes (`decode_attention_rotary`, a second custom op that writes the
caches in place): the step then has no rotary kernel and no cache-writing kernels of its own.

Numerics: the scores, the softmax and the weighted sum of V in float32, the output divided once and rounded
once to the query's dtype (decode_attention_reference: the same in torch, off CUDA); flash-style kernels such
as cuDNN's round the softmax's weights to the input dtype before their product with V, which this one does
not. tests/test_decode_attention.py bounds it against float64.
"""

import os
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from llama.fast.decode_attention_kernels import AttentionConfig, Rotary, check_config, kernel_runs_on, launch
from llama.fast.int8_gemv import time_pass
from llama.fast.int8_gemv_kernels import pdl_supported
from llama.model import apply_rotary_emb

ENV = "LLAMA_DECODE_ATTENTION"
PDL_ENV = "LLAMA_DECODE_ATTENTION_PDL"
ROTARY_ENV = "LLAMA_DECODE_ATTENTION_ROTARY"
# Rows a decode step may have for its layers to take the kernel: the load-time timing measures one.
MAX_ROWS = 1
SDPA = "sdpa"  # the current path's key among the pick's timings

# Candidates timed at load: a query head a program, or a KV group's heads together (skipped where they do not
# divide the group); one block of cache positions a program. On an H200 at the 8B shape and kv_len 160, per
# layer in a CUDA graph (SDPA with the mask: 10.1 us): (16, 4) 4.4 us, (32, 4) 5.1, (16, 4, 4) 5.2, (32, 4, 4)
# 8.2 (bench/results/GPU_RESULTS.md, issue 18, eighth session).
CANDIDATES = (
    AttentionConfig(16, 4),
    AttentionConfig(16, 2),
    AttentionConfig(32, 4),
    AttentionConfig(16, 4, 4),
    AttentionConfig(32, 4, 4),
)


def decode_attention_reference(q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor,
                               positions: torch.Tensor, kv_len: int) -> torch.Tensor:
    """softmax(q K^T / sqrt(head_dim)) V over cache positions 0 .. positions[i] (and below kv_len) of row i, in
    float32, rounded once to q's dtype: q (bsz, n_heads, head_dim), caches (>= bsz, n_kv_heads, >= kv_len,
    head_dim) -> (bsz, n_heads, head_dim)."""
    bsz, n_heads, _ = q.shape
    cols = torch.arange(kv_len, device=q.device)
    mask = (cols[None, :] <= positions[:, None])[:, None, None, :]  # (bsz, 1, 1, kv_len)
    keys, values = cache_k[:bsz, :, :kv_len].float(), cache_v[:bsz, :, :kv_len].float()
    out = F.scaled_dot_product_attention(q[:, :, None].float(), keys, values, attn_mask=mask,
                                         enable_gqa=n_heads != cache_k.shape[1])  # (bsz, n_heads, 1, head_dim)
    return out[:, :, 0].to(q.dtype)


@torch.library.custom_op("llama::decode_attention", mutates_args=())
def decode_attention(q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, positions: torch.Tensor,
                     kv_len: int, block_n: int, num_warps: int, heads: int = 1, pdl: bool = False) -> torch.Tensor:
    """One query token per row against the KV cache: q (bsz, n_heads, head_dim), cache_k and cache_v
    (max_batch_size, n_kv_heads, max_seq_len, head_dim), positions (bsz,): row i reads cache positions
    0 .. positions[i] below kv_len -> (bsz, n_heads, head_dim) in q's dtype. The Triton kernel with this block
    shape (AttentionConfig; pdl: a programmatic dependent launch, where pdl_supported holds) on CUDA;
    elsewhere decode_attention_reference."""
    if kernel_runs_on(q.device):
        return launch(q, cache_k, cache_v, positions, kv_len, AttentionConfig(block_n, num_warps, heads),
                      pdl=pdl and pdl_supported(q.device))
    return decode_attention_reference(q, cache_k, cache_v, positions, kv_len)


@decode_attention.register_fake
def _(q, cache_k, cache_v, positions, kv_len, block_n, num_warps, heads=1, pdl=False):
    return q.new_empty(q.shape)


def rotary_attention_reference(xq: torch.Tensor, xk: torch.Tensor, xv: torch.Tensor, cos: torch.Tensor,
                               sin: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor,
                               positions: torch.Tensor, kv_len: int) -> torch.Tensor:
    """What the fast layer does in a decode step of one new token a row, written in torch: rotate the new query
    xq (bsz, n_heads, head_dim) and key xk (bsz, n_kv_heads, head_dim) with the rows' tables cos, sin
    (bsz, head_dim) (apply_rotary_emb), write the key and xv to the caches at each row's position (in place),
    then decode_attention_reference."""
    bsz, n_heads, _ = xq.shape
    xqk = apply_rotary_emb(torch.cat([xq, xk], dim=1)[:, None], cos[:, None], sin[:, None])[:, 0]
    rows = torch.arange(bsz, device=xq.device)
    cache_k[rows, :, positions] = xqk[:, n_heads:]  # (bsz, n_kv_heads, head_dim)
    cache_v[rows, :, positions] = xv
    return decode_attention_reference(xqk[:, :n_heads], cache_k, cache_v, positions, kv_len)


@torch.library.custom_op("llama::decode_attention_rotary", mutates_args=("cache_k", "cache_v"))
def decode_attention_rotary(xq: torch.Tensor, xk: torch.Tensor, xv: torch.Tensor, cos: torch.Tensor,
                            sin: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, positions: torch.Tensor,
                            kv_len: int, block_n: int, num_warps: int, heads: int = 1,
                            pdl: bool = False) -> torch.Tensor:
    """decode_attention with the step's rotation and cache writes in it: xq (bsz, n_heads, head_dim) and xk
    (bsz, n_kv_heads, head_dim) not rotated yet, xv (bsz, n_kv_heads, head_dim), cos and sin (bsz, head_dim)
    (interleave_rope's tables at the rows' positions, each below kv_len). Writes row i's rotated key and xv to
    cache_k and cache_v at positions[i] and returns the attention of its rotated query over positions
    0 .. positions[i]: the Triton kernel (launch with `rotary`) on CUDA, elsewhere rotary_attention_reference."""
    if kernel_runs_on(xq.device):
        return launch(xq, cache_k, cache_v, positions, kv_len, AttentionConfig(block_n, num_warps, heads),
                      pdl=pdl and pdl_supported(xq.device), rotary=Rotary(cos, sin, xk, xv))
    return rotary_attention_reference(xq, xk, xv, cos, sin, cache_k, cache_v, positions, kv_len)


@decode_attention_rotary.register_fake
def _(xq, xk, xv, cos, sin, cache_k, cache_v, positions, kv_len, block_n, num_warps, heads=1, pdl=False):
    return xq.new_empty(xq.shape)


class DecodeAttention:
    """A layer's decode attention: decode_attention with the block shape picked at load (`cfg`) and its launch
    (`pdl`). Called as the fast attention layer calls it: q (bsz, n_heads, head_dim), its caches, the rows'
    positions and kv_len."""

    def __init__(self, cfg: AttentionConfig, pdl: bool = False, rotary: bool = False):
        self.cfg = cfg
        self.pdl = pdl
        self.rotary = rotary  # whether the layer hands it the step's rotation and cache writes (with_rotary)

    def __call__(self, q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, positions: torch.Tensor,
                 kv_len: int) -> torch.Tensor:
        return decode_attention(q, cache_k, cache_v, positions, kv_len, *self.cfg, self.pdl)

    def with_rotary(self, xq: torch.Tensor, xk: torch.Tensor, xv: torch.Tensor, cos: torch.Tensor,
                    sin: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, positions: torch.Tensor,
                    kv_len: int) -> torch.Tensor:
        """decode_attention_rotary with this block shape: the step's new query and key not rotated yet, its new
        value, the rows' tables; writes the caches."""
        return decode_attention_rotary(xq, xk, xv, cos, sin, cache_k, cache_v, positions, kv_len, *self.cfg,
                                       self.pdl)

    def __repr__(self) -> str:
        return (f"DecodeAttention{tuple(self.cfg)}{', dependent launch' if self.pdl else ''}"
                f"{', rotary and cache writes in' if self.rotary else ''}")


def setting() -> str:
    """LLAMA_DECODE_ATTENTION: "auto" (the default), "on" or "off"; ValueError on another value."""
    value = os.environ.get(ENV, "auto").strip()
    if value not in ("auto", "on", "off"):
        raise ValueError(f"{ENV} must be 'auto', 'on' or 'off', got {value!r}")
    return value


def pdl_runs_on(device: torch.device) -> bool:
    """Whether the kernel is launched as a programmatic dependent launch on `device`: pdl_supported, and
    LLAMA_DECODE_ATTENTION_PDL is not "off" ("auto", the default); ValueError on another value."""
    value = os.environ.get(PDL_ENV, "auto").strip()
    if value not in ("auto", "off"):
        raise ValueError(f"{PDL_ENV} must be 'auto' or 'off', got {value!r}")
    return value == "auto" and pdl_supported(device)


def rotary_runs_in() -> bool:
    """Whether layers that take the kernel hand it their decode steps' rotation and cache writes too
    (decode_attention_rotary): LLAMA_DECODE_ATTENTION_ROTARY "auto" (the default) or "off"; ValueError on
    another value."""
    value = os.environ.get(ROTARY_ENV, "auto").strip()
    if value not in ("auto", "off"):
        raise ValueError(f"{ROTARY_ENV} must be 'auto' or 'off', got {value!r}")
    return value == "auto"


def sdpa_with_mask(q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The current path, as llama.fast.layers.FastAttention runs it in a decode step: SDPA over the first
    kv_len = mask.shape[-1] cache positions with the step's bool mask (bsz, 1, 1, kv_len)."""
    bsz, n_heads, _ = q.shape
    kv_len = mask.shape[-1]
    out = F.scaled_dot_product_attention(q[:, :, None], cache_k[:bsz, :, :kv_len], cache_v[:bsz, :, :kv_len],
                                         attn_mask=mask, enable_gqa=n_heads != cache_k.shape[1])
    return out[:, :, 0]


# The timings of every pick made in this process: {(n_heads, n_kv_heads, head_dim, kv_len, dtype, pdl):
# {AttentionConfig or SDPA: seconds a layer}}, for scripts and the bench.
PICK_TIMES: Dict[tuple, Dict[object, float]] = {}


def time_candidates(caches: List[Tuple[torch.Tensor, torch.Tensor]], n_heads: int, kv_len: int, pdl: bool,
                    candidates=CANDIDATES, rows: int = 1) -> Dict[object, float]:
    """Seconds a layer for each candidate that fits (check_config) and for SDPA with the step's mask: each a
    CUDA-graph replay of a pass over every layer's caches (as a step reads them), one query row at the last
    position (the whole of kv_len, as SDPA always reads)."""
    cache_k = caches[0][0]
    n_kv_heads, head_dim = cache_k.shape[1], cache_k.shape[3]
    g = torch.Generator().manual_seed(0)
    q = torch.randn(rows, n_heads, head_dim, generator=g).to(device=cache_k.device, dtype=cache_k.dtype)
    positions = torch.full((rows,), kv_len - 1, dtype=torch.long, device=cache_k.device)
    cols = torch.arange(kv_len, device=cache_k.device)
    mask = (cols[None, :] <= positions[:, None])[:, None, None, :]
    fitting = []
    for cfg in candidates:
        try:
            check_config(cfg, n_heads // n_kv_heads, kv_len)
            fitting.append(cfg)
        except ValueError:
            pass

    def kernel(cfg):
        return lambda: [launch(q, k, v, positions, kv_len, cfg, pdl=pdl) for k, v in caches]

    times = {cfg: time_pass(kernel(cfg)) / len(caches) for cfg in fitting}
    times[SDPA] = time_pass(lambda: [sdpa_with_mask(q, k, v, mask) for k, v in caches]) / len(caches)
    PICK_TIMES[(n_heads, n_kv_heads, head_dim, kv_len, str(cache_k.dtype), pdl)] = times
    return times


def pick(times: Dict[object, float], mode: str) -> Optional[AttentionConfig]:
    """The block shape a layer takes from `times` (time_candidates'): the fastest candidate, if mode is "on" or
    if it beat SDPA ("auto"); else None (SDPA)."""
    kernels = {c: t for c, t in times.items() if c != SDPA}
    if not kernels:
        return None
    best = min(kernels, key=kernels.__getitem__)
    return best if mode == "on" or kernels[best] < times[SDPA] else None


@torch.no_grad()
def use_decode_attention(model: nn.Module) -> Optional[DecodeAttention]:
    """Give each fast attention layer of `model` (llama.fast.layers.FastAttention) the kernel for its decode
    steps (`decode_attention`) where LLAMA_DECODE_ATTENTION allows (the module docstring: "auto" only in models
    whose products run the int8 GEMV) and the timing finds it faster: on CUDA with Triton only; call it once the
    model is on its device, before any generation (the timing fills the caches with random values, then
    zeroes them as they were built). Returns what the layers took (None: SDPA)."""
    mode, rotary = setting(), rotary_runs_in()
    layers = [m for m in model.modules() if hasattr(m, "decode_attention") and hasattr(m, "cache_k")]
    for m in layers:
        m.decode_attention = None
    if mode == "off" or not layers or not kernel_runs_on(layers[0].cache_k.device):
        return None
    if mode == "auto" and not any(getattr(m, "gemv", None) is not None for m in model.modules()):
        return None  # products of inductor's own: the step ran slower with the kernel (the module docstring)
    cache_k = layers[0].cache_k
    pdl = pdl_runs_on(cache_k.device)
    caches = [(m.cache_k, m.cache_v) for m in layers]
    for k, v in caches:
        k.normal_(), v.normal_()  # time on data, not zeros
    try:
        times = time_candidates(caches, layers[0].n_local_heads, cache_k.shape[2], pdl)
    finally:
        for k, v in caches:
            k.zero_(), v.zero_()
    cfg = pick(times, mode)
    if cfg is None:
        return None
    chosen = DecodeAttention(cfg, pdl, rotary)
    for m in layers:
        m.decode_attention = chosen
    return chosen


def picked_attention(model: nn.Module) -> str:
    """What the model's attention layers run in decode steps, as the bench records it: the DecodeAttention they
    took, or "sdpa"."""
    for m in model.modules():
        chosen = getattr(m, "decode_attention", None)
        if chosen is not None:
            return repr(chosen)
    return SDPA
