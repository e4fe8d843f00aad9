"""The Triton kernels of the decode attention and their launch: one new query token per row, grouped-query
attention over the KV cache, each row masked to the cache positions at or before its own. llama.fast.decode_attention
wraps them in a torch custom op, computes the same function off CUDA and picks a block shape at load; its
docstring says why a kernel of our own.

`_attention_kernel`, one program per (row, block of HEADS query heads of one KV group, block of BLOCK_N cache
positions):

- reads the row's position from `positions` and skips the blocks past it (and past kv_len); the cache
  (max_batch_size, n_kv_heads, max_seq_len, head_dim) is read in place, through its strides;
- keeps the HEADS heads' scores, softmax and weighted sums in float32, in base 2 (the query pre-scaled by
  log2(e) / sqrt(head_dim));
- stores its block's (maximum m, sum l of 2**(s - m), weighted sum of V) in float32, and `_combine_kernel`
  merges the blocks of each row and head in order (no atomics: the order is fixed, results repeat), divides
  and rounds once; a cache of one block is divided and rounded in the kernel itself;
- can be launched as a programmatic dependent launch on Hopper and later (PDL): it waits (`gdc_wait`) before
  its first load, since everything it reads (the query, the cache, just written) comes from the kernels before
  it, and lets its dependents start right after; the combine kernel is launched plainly.

With `rotary` (launch), the kernel also does what the layer did before it: it rotates the step's new query and
key itself (llama.model.apply_rotary_emb's arithmetic) and writes the new key and value to the caches, so that
the step loses the rotary kernel and the two cache writes (3.7 us a layer on an H200 at the 8B shape). Every
program uses the new key and value from its own registers at the row's position, and one program a KV group
writes them, so that no program depends on another's write.

One block a program, always (`launch`): that was the fastest form at the 8B model's decode lengths (4.4 us a
layer at kv_len 160 against 6.0 for two blocks a program and 8.9 for five, on an H200), and it is the form
whose every block shape ran within the float64 bound on the H200. The kernel's loop, an online softmax, can
walk several blocks (launch's chunk_blocks, used by scripts/decode_attention_check.py only): those forms were
slower at these lengths, and were checked within the bound on an H200 (2, 4 and all blocks a program, kv_len
17 to 500; bench/results/GPU_RESULTS.md, issue 18, ninth session) but have no test of their own. So the
library's loop runs at most once, and a cache longer than MAX_BLOCKS blocks keeps SDPA (check_config).

Numerics: every score, exponential, sum and product in float32 (products of bf16 values exact), the output
divided once and rounded once to the query's dtype; tests/test_decode_attention.py bounds it against float64.
Triton is optional: without it this module defines no kernels, kernel_runs_on is False and the op runs its
torch reference.
"""

import math
from typing import NamedTuple, Optional

import torch

try:  # Triton comes with torch's CUDA builds; without it (CPU builds) the op runs its torch reference
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None


# The most blocks of cache positions a row's head is cut into: the combine kernel reads them all at once. 16
# (512 positions in blocks of 32) keeps near what ran on an H200 (10 blocks at kv_len 160); longer caches keep
# SDPA, which was about as fast at 1,024 positions and twice as fast at 4,096 as the kernel's forms then.
MAX_BLOCKS = 16


class AttentionConfig(NamedTuple):
    """A block shape of the kernel: cache positions a program reads, warps a program, query heads a program
    (1, or several heads of a KV group together: they share each load of K and V)."""

    block_n: int
    num_warps: int
    heads: int = 1


class Rotary(NamedTuple):
    """What the kernel needs to rotate a decode step's new query and key itself and to write the new key and value
    to the caches (launch's `rotary`): cos and sin (bsz, head_dim), interleave_rope's tables at each row's
    position; k_new and v_new (bsz, n_kv_heads, head_dim), the new key (not rotated yet) and value. Any strides
    but the last."""

    cos: torch.Tensor
    sin: torch.Tensor
    k_new: torch.Tensor
    v_new: torch.Tensor


def blocks(kv_len: int, cfg: AttentionConfig) -> int:
    """Programs a row's head is cut into along the cache: kv_len / block_n, rounded up."""
    return -(-kv_len // cfg.block_n)


def check_config(cfg: AttentionConfig, group: int, kv_len: Optional[int] = None) -> None:
    """ValueError unless `cfg` is a block shape the kernel takes for KV groups of `group` query heads (and, where
    given, a cache of kv_len positions: at most MAX_BLOCKS blocks)."""
    ok = all(isinstance(v, int) and v > 0 for v in cfg)
    ok = ok and all(v & (v - 1) == 0 for v in cfg)  # Triton's blocks
    if not ok or cfg.num_warps > 16:
        raise ValueError(f"a decode attention block shape takes powers of two block_n, num_warps <= 16 and heads, "
                         f"got {tuple(cfg)}")
    if group % cfg.heads:
        raise ValueError(f"heads={cfg.heads} does not divide a KV group of {group} query heads")
    if kv_len is not None and blocks(kv_len, cfg) > MAX_BLOCKS:
        raise ValueError(f"block_n={cfg.block_n} cuts a cache of {kv_len} positions into more than {MAX_BLOCKS} "
                         f"blocks")


if triton is not None:

    @triton.jit
    def _attention_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, out_ptr, part_ptr, kv_len, chunk, head_dim, n_heads, qk_scale,
                          sq_b, sq_h, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, so_b, so_h,
                          cos_ptr, sin_ptr, kn_ptr, vn_ptr, sc_b, ss_b, skn_b, skn_h, svn_b, svn_h,
                          GROUP: tl.constexpr, HEADS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                          SPLIT: tl.constexpr, PDL: tl.constexpr, ROTARY: tl.constexpr):
        """Row b = program 0, query heads [program 1 * HEADS, + HEADS) (one KV head's), cache positions
        [program 2 * chunk, + chunk) up to the row's own position (inclusive) and below kv_len; chunk is BLOCK_N
        times launch's chunk_blocks (1 in the library: the loop runs at most once; the module docstring).
        SPLIT == 1: out (bsz, n_heads, head_dim) = softmax(q K^T / sqrt(head_dim)) V, rounded to out's dtype.
        SPLIT > 1: part (bsz, n_heads, SPLIT, 2 + BLOCK_D) float32 holds this block's maximum m (base 2), the
        sum l of 2**(s - m) and the weighted sum of V, for _combine_kernel (a block past the row's position:
        m = -inf, l = 0).

        ROTARY: q and the row's new key (kn, (bsz, n_kv_heads, head_dim)) are not rotated yet. Each program
        rotates them itself with the row's tables (cos, sin (bsz, head_dim): interleave_rope's), as
        llama.model.apply_rotary_emb does (float32, rounded to q's dtype), and uses the new key and value (vn)
        from its registers at the row's position, whatever the cache holds there; the first program of each
        KV group whose block holds that position writes them to the cache. So no program waits for another's
        write. (Launched with enable_fp_fusion=False: products and sums rounded as torch rounds them.)"""
        b = tl.program_id(0)
        h0 = tl.program_id(1) * HEADS
        c = tl.program_id(2)
        heads = h0 + tl.arange(0, HEADS)  # (HEADS,)
        kv_head = h0 // GROUP
        d = tl.arange(0, BLOCK_D)  # (BLOCK_D,)
        d_ok = d < head_dim
        n = tl.arange(0, BLOCK_N)  # (BLOCK_N,)
        if PDL:  # the query and the cache are written by the kernels just before: read nothing until they finish
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        pos = tl.load(pos_ptr + b).to(tl.int32)
        end = tl.minimum(pos + 1, kv_len)  # positions 0 .. end - 1 are visible
        lo = c * chunk
        hi = tl.minimum(lo + chunk, end)
        q_rows = q_ptr + b * sq_b + heads[:, None] * sq_h  # (HEADS, 1)
        q = tl.load(q_rows + d[None, :], mask=d_ok[None, :], other=0.0)
        k_rows = k_ptr + b.to(tl.int64) * sk_b + kv_head * sk_h
        v_rows = v_ptr + b.to(tl.int64) * sv_b + kv_head * sv_h
        if ROTARY:  # x * (cos, cos) + (each pair swapped) * (-sin, sin), as apply_rotary_emb
            swap = d ^ 1  # (BLOCK_D,): each pair (2i, 2i + 1) read the other way round
            cos = tl.load(cos_ptr + b * sc_b + d, mask=d_ok, other=0.0).to(tl.float32)
            sin = tl.load(sin_ptr + b * ss_b + d, mask=d_ok, other=0.0).to(tl.float32)
            q_swap = tl.load(q_rows + swap[None, :], mask=d_ok[None, :], other=0.0).to(tl.float32)
            q = (q.to(tl.float32) * cos[None, :] + q_swap * sin[None, :]).to(q_ptr.dtype.element_ty)
            kn = kn_ptr + b * skn_b + kv_head * skn_h
            k_new = tl.load(kn + d, mask=d_ok, other=0.0).to(tl.float32)
            k_new = k_new * cos + tl.load(kn + swap, mask=d_ok, other=0.0).to(tl.float32) * sin
            k_new = k_new.to(q_ptr.dtype.element_ty).to(k_ptr.dtype.element_ty)  # (BLOCK_D,) as the cache holds it
            v_new = tl.load(vn_ptr + b * svn_b + kv_head * svn_h + d, mask=d_ok, other=0.0).to(v_ptr.dtype.element_ty)
            if (h0 % GROUP == 0) & (pos >= lo) & (pos < lo + chunk) & (pos < kv_len):  # the one writer
                tl.store(k_rows + pos * sk_s + d, k_new, mask=d_ok)
                tl.store(v_rows + pos * sv_s + d, v_new, mask=d_ok)
        q = q.to(tl.float32) * qk_scale  # (HEADS, BLOCK_D): scores come out in base 2, scaled
        m = tl.full((HEADS,), float("-inf"), dtype=tl.float32)
        l = tl.zeros((HEADS,), dtype=tl.float32)
        acc = tl.zeros((HEADS, BLOCK_D), dtype=tl.float32)
        for start in range(lo, hi, BLOCK_N):  # (at most once where chunk is BLOCK_N)
            cols = start + n  # (BLOCK_N,) cache positions
            ok = cols < hi
            kv_ok = ok[:, None] & d_ok[None, :]
            k = tl.load(k_rows + cols[:, None] * sk_s + d[None, :], mask=kv_ok, other=0.0).to(tl.float32)
            v = tl.load(v_rows + cols[:, None] * sv_s + d[None, :], mask=kv_ok, other=0.0).to(tl.float32)
            if ROTARY:  # the row's own position: this step's key and value, not what the cache held before
                new = (cols == pos)[:, None]
                k = tl.where(new, k_new.to(tl.float32)[None, :], k)
                v = tl.where(new, v_new.to(tl.float32)[None, :], v)
            s = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # (HEADS, BLOCK_N)
            s = tl.where(ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))  # finite: every step has a visible position
            alpha = tl.exp2(m - m_new)  # (HEADS,): 0 at the first step (m = -inf)
            p = tl.exp2(s - m_new[:, None])  # (HEADS, BLOCK_N), 0 where masked
            l = l * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)  # (HEADS, BLOCK_D)
            m = m_new
        if SPLIT == 1:
            out = acc / l[:, None]
            tl.store(out_ptr + b * so_b + heads[:, None] * so_h + d[None, :], out.to(out_ptr.dtype.element_ty),
                     mask=d_ok[None, :])
        else:
            row = part_ptr + ((b * n_heads + heads) * SPLIT + c) * (2 + BLOCK_D)  # (HEADS,) each slot's start
            tl.store(row, m)
            tl.store(row + 1, l)
            tl.store(row[:, None] + 2 + d[None, :], acc)

    @triton.jit
    def _combine_kernel(part_ptr, out_ptr, head_dim, n_heads, so_b, so_h, SPLIT: tl.constexpr,
                        BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
        """out[b, h] = (sum over blocks of 2**(m_c - M) acc_c) / (sum over blocks of 2**(m_c - M) l_c), M the
        largest m_c, rounded once to out's dtype: program (b, h) merges its row's SPLIT blocks in order."""
        b = tl.program_id(0)
        h = tl.program_id(1)
        s = tl.arange(0, BLOCK_S)
        s_ok = s < SPLIT
        d = tl.arange(0, BLOCK_D)
        slots = part_ptr + ((b * n_heads + h) * SPLIT + s) * (2 + BLOCK_D)  # (BLOCK_S,)
        m = tl.load(slots, mask=s_ok, other=float("-inf"))
        l = tl.load(slots + 1, mask=s_ok, other=0.0)
        acc = tl.load(slots[:, None] + 2 + d[None, :], mask=s_ok[:, None], other=0.0)  # (BLOCK_S, BLOCK_D)
        top = tl.max(m, axis=0)  # finite: the first block always holds position 0
        w = tl.exp2(m - top)  # 0 for blocks past the row's position
        out = tl.sum(w[:, None] * acc, axis=0) / tl.sum(w * l, axis=0)
        tl.store(out_ptr + b * so_b + h * so_h + d, out.to(out_ptr.dtype.element_ty), mask=d < head_dim)


def launch(q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, positions: torch.Tensor, kv_len: int,
           cfg: AttentionConfig, pdl: bool = False, out: Optional[torch.Tensor] = None,
           num_stages: Optional[int] = None, rotary: Optional[Rotary] = None,
           chunk_blocks: int = 1) -> torch.Tensor:
    """The kernels on q (bsz, n_heads, head_dim) (any strides, head_dim contiguous), the caches
    (>= bsz, n_kv_heads, >= kv_len, head_dim) (head_dim contiguous) and positions (bsz,) int: row i reads
    positions 0 .. min(positions[i], kv_len - 1) -> (bsz, n_heads, head_dim) in q's dtype (into `out` where
    given). One program per block of cfg.block_n positions (check_config's limits must hold). pdl: the
    attention kernel as a programmatic dependent launch (pdl_supported(device) must hold); num_stages: Triton's
    software pipelining depth (its default where None; for scripts/decode_attention_check.py); chunk_blocks:
    blocks a program walks through, the kernel's loop (1 everywhere but scripts/decode_attention_check.py).

    rotary (Rotary): q and rotary.k_new not rotated yet; the kernel rotates them, writes the new key and value
    rotary.v_new to the caches at each row's position (below kv_len) and attends over them (the kernel's
    docstring)."""
    bsz, n_heads, head_dim = q.shape
    n_kv_heads = cache_k.shape[1]
    group = n_heads // n_kv_heads
    if out is None:
        out = torch.empty((bsz, n_heads, head_dim), dtype=q.dtype, device=q.device)
    block_d = triton.next_power_of_2(head_dim)
    chunk = chunk_blocks * cfg.block_n
    split = -(-kv_len // chunk)  # programs a row's head is cut into
    part = out
    if split > 1:
        part = torch.empty((bsz, n_heads, split, 2 + block_d), dtype=torch.float32, device=q.device)
    qk_scale = math.log2(math.e) / math.sqrt(head_dim)
    grid = (bsz, n_heads // cfg.heads, split)
    options = {"launch_pdl": True} if pdl else {}  # (older Tritons know no launch_pdl: only passed when asked)
    if num_stages is not None:
        options["num_stages"] = num_stages
    if rotary is None:  # (unused pointers: q's)
        tables = (q, q, q, q, 0, 0, 0, 0, 0, 0)
    else:
        cos, sin, k_new, v_new = rotary
        tables = (cos, sin, k_new, v_new, cos.stride(0), sin.stride(0), k_new.stride(0), k_new.stride(1),
                  v_new.stride(0), v_new.stride(1))
        options["enable_fp_fusion"] = False  # the rotation's products and sums rounded one by one, as in torch
    _attention_kernel[grid](q, cache_k, cache_v, positions, out, part, kv_len, chunk, head_dim, n_heads,
                            qk_scale, q.stride(0), q.stride(1), cache_k.stride(0), cache_k.stride(1),
                            cache_k.stride(2), cache_v.stride(0), cache_v.stride(1), cache_v.stride(2), out.stride(0),
                            out.stride(1), *tables, GROUP=group, HEADS=cfg.heads, BLOCK_D=block_d,
                            BLOCK_N=cfg.block_n, SPLIT=split, PDL=pdl, ROTARY=rotary is not None,
                            num_warps=cfg.num_warps, **options)
    if split > 1:
        _combine_kernel[(bsz, n_heads)](part, out, head_dim, n_heads, out.stride(0), out.stride(1), SPLIT=split,
                                        BLOCK_S=triton.next_power_of_2(split), BLOCK_D=block_d, num_warps=4)
    return out


def kernel_runs_on(device: torch.device) -> bool:
    """Whether the Triton kernel can run on `device` (CUDA, with Triton installed)."""
    return triton is not None and device.type == "cuda" and torch.cuda.is_available()
