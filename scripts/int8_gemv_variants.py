"""Variants of the int8 GEMV's kernel (llama.fast.int8_gemv_kernels._gemv_kernel, plain prologue, even blocks,
one slice of K, launched as a programmatic dependent launch) timed side by side at the Llama 3 8B shapes, batch
1, and the decode attention's mask form; issue 18's seventh session asked which of its leads pays.

    python scripts/int8_gemv_variants.py [--shapes wqkv wo w13 w2] [--out variants.json]

The variants, each a copy of the library kernel with one thing changed:
- "lib": the library kernel's loop as it is (Q one loop step ahead; x loaded 8 bf16 a thread, 16 bytes, and
  moved through shared memory into the layout of Q's tile, 16 int8 a thread);
- "nox": x never loaded (one scalar of it a program): how much the x path costs at most;
- "ahead0": Q loaded in the step that uses it (the loop before the sixth session);
- "ahead2": two tiles of Q ahead, both loaded before the wait;
- "q8": Q loaded 8 int8 a thread (8-byte loads), so that x's 16-byte loads already lie in Q's layout (no
  shared memory, no barrier);
- "q8ahead2": both.
Each is timed as the library's pick times it: a CUDA graph of one launch per copy of the weight, over copies
holding >= 256 MiB, the median replay; and checked against float64 on the dequantized weight (rel. error).
The library's own launch (`GK._launch`) is timed too ("launch"), to tie the copy to it.

What they showed made the loop part of the library's block shape (llama.fast.int8_gemv_kernels.LOOPS; results:
bench/results/int8_gemv_variants_h200_session7_*.json, GPU_RESULTS.md's seventh session). This kernel stays as
the experiment's record.

The attention part times the compiled decode attention of 32 layers (kv_len = 160, the bench's 32 + 128) with
the mask as the fast path hands it (bool, built in the step) against one made additive (0 / -inf) once.
"""

import argparse
import json
import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from llama.fast import int8_gemv_kernels as GK
from llama.fast.quantize import quantize_int8
from llama.fast.step import compile_options

from int8_gemv_sweep import graph_time  # (scripts/ is on sys.path: the script's own folder)

SHAPES = {"wqkv": (6144, 4096), "wo": (4096, 4096), "w13": (28672, 4096), "w2": (4096, 14336)}
# The library's picks on the H200 (sixth session) and a neighbour of each.
CONFIGS = {"wqkv": ((8, 512, 4), (4, 1024, 4), (2, 2048, 4)), "wo": ((8, 512, 8), (8, 512, 4), (4, 1024, 4)),
           "w13": ((16, 256, 4), (8, 512, 4), (16, 512, 8)),
           "w2": ((2, 2048, 4), (4, 1024, 4), (8, 512, 4), (4, 2048, 8))}
# name: (XFORM, AHEAD, X_AHEAD)
VARIANTS = {"lib": (0, 1, 0), "nox": (1, 1, 0), "ahead0": (0, 0, 0), "ahead2": (0, 2, 0), "q8": (2, 1, 0),
            "q8ahead2": (2, 2, 0), "xq1": (0, 1, 1), "x1q0": (0, 0, 1), "q8xq1": (2, 1, 1), "q8x1q0": (2, 0, 1)}
PASS_BYTES = 256 * 2**20


@triton.jit
def _tile(w_rows, cols, live):
    return tl.load(w_rows + cols[None, :], mask=live, other=0, eviction_policy="evict_first")


@triton.jit
def _variant_kernel(x_ptr, w_ptr, scale_ptr, out_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    XFORM: tl.constexpr, AHEAD: tl.constexpr, X_AHEAD: tl.constexpr):
    """out[rows] = (Q[rows] @ x) * scale[rows] for this program's BLOCK_N rows. XFORM 0: x as the library
    loads it; 1: no x (one scalar); 2: Q's columns cut into runs of 8 (8-byte loads). AHEAD: tiles of Q
    loaded ahead of their use (0, 1 or 2), the first ones before the wait. X_AHEAD: x's columns loaded one
    loop step ahead of their use too (after the wait)."""
    pid = tl.program_id(0)
    dtype = x_ptr.dtype.element_ty
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * K  # (BLOCK_N, 1)
    c = tl.arange(0, BLOCK_K)
    if XFORM == 2:  # runs of 8: the axis analysis sees 8 contiguous columns a thread, not 16
        c = (c // 8) * 8 + c % 8
    if AHEAD >= 1:
        w = _tile(w_rows, c, K > 0)
    if AHEAD == 2:
        w1 = _tile(w_rows, BLOCK_K + c, BLOCK_K < K)
    tl.extra.cuda.gdc_wait()
    tl.extra.cuda.gdc_launch_dependents()
    if XFORM == 1:
        xs = tl.load(x_ptr + pid % 16).to(tl.float32)
    if X_AHEAD:
        x_cur = tl.load(x_ptr + c, eviction_policy="evict_last")
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + c
        if AHEAD == 0:
            w = _tile(w_rows, cols, K > 0)
        if AHEAD == 1:
            w_next = _tile(w_rows, cols + BLOCK_K, k0 + BLOCK_K < K)
        if AHEAD == 2:
            w_next = _tile(w_rows, cols + 2 * BLOCK_K, k0 + 2 * BLOCK_K < K)
        if XFORM == 1:
            xk = tl.zeros((BLOCK_K,), dtype=tl.float32) + xs
        elif X_AHEAD:
            x_next = tl.load(x_ptr + cols + BLOCK_K, mask=(k0 + BLOCK_K < K), other=0.0, eviction_policy="evict_last")
            xk = x_cur.to(tl.float32)
            x_cur = x_next
        else:
            xk = tl.load(x_ptr + cols, eviction_policy="evict_last").to(tl.float32)
        acc += GK._int8_as_float32(w) * xk[None, :]
        if AHEAD == 1:
            w = w_next
        if AHEAD == 2:
            w = w1
            w1 = w_next
    part = tl.sum(acc, axis=1)
    s = tl.load(scale_ptr + rows).to(tl.float32)
    tl.store(out_ptr + rows, (part * s).to(dtype))


def launch_variant(x, q, scale, out, bn, bk, nw, variant):
    xform, ahead, x_ahead = VARIANTS[variant]
    n, k = q.shape
    _variant_kernel[(n // bn,)](x, q, scale, out, n, k, BLOCK_N=bn, BLOCK_K=bk, XFORM=xform, AHEAD=ahead,
                                X_AHEAD=x_ahead, num_warps=nw, launch_pdl=True)


def gemv_rows(names, bandwidth: float) -> list:
    rows = []
    g = torch.Generator(device="cuda").manual_seed(0)
    for name in names:
        n, k = SHAPES[name]
        q0, scale = quantize_int8(torch.randn(n, k, device="cuda", generator=g) * 0.02)
        sb = scale.to(torch.bfloat16)
        copies = max(2, math.ceil(PASS_BYTES / (n * k)))
        qs = [q0] + [q0.clone() for _ in range(copies - 1)]
        x = torch.randn(1, k, device="cuda", generator=g).to(torch.bfloat16)
        ref = (x.double() @ q0.double().T) * sb.double()
        out = torch.empty(1, n, device="cuda", dtype=torch.bfloat16)
        ideal = n * k / bandwidth
        for bn, bk, nw in CONFIGS[name]:
            for variant in ("launch",) + tuple(VARIANTS):
                if variant == "launch":
                    cfg = GK.GemvConfig(bn, bk, 1, nw)
                    fn = lambda i: GK._launch(x, qs[i], sb, cfg, pdl=True)  # noqa: E731
                else:
                    fn = lambda i: launch_variant(x, qs[i], sb, out, bn, bk, nw, variant)  # noqa: E731
                out.fill_(float("nan"))
                y = fn(0) if variant == "launch" else (fn(0), out)[1]
                err = float((y.double() - ref).norm() / ref.norm())
                t = graph_time(fn, copies, rounds=30)
                rows.append({"shape": name, "config": [bn, bk, nw], "variant": variant, "us": t * 1e6,
                             "ideal_us": ideal * 1e6, "rel_err": err})
                print(f"{name:5s} {bn:2d},{bk:4d},{nw} {variant:9s} {t * 1e6:7.2f} us ({ideal / t:4.0%} of read "
                      f"bw) err {err:.1e}", flush=True)
    return rows


def attention_rows(layers: int = 32, kv_len: int = 160) -> list:
    """Compiled decode attention over `layers` caches: bool mask (as the fast path) vs additive, once."""
    dev, dt = "cuda", torch.bfloat16
    ks = [torch.randn(1, 8, kv_len, 128, device=dev, dtype=dt) for _ in range(layers)]
    vs = [torch.randn(1, 8, kv_len, 128, device=dev, dtype=dt) for _ in range(layers)]
    q = torch.randn(1, 32, 1, 128, device=dev, dtype=dt)
    pos = torch.tensor([100], device=dev)

    def bool_form(q, pos):
        mask = (torch.arange(kv_len, device=dev)[None, :] <= pos[:, None])[:, None, None, :]
        o = q
        for k, v in zip(ks, vs):
            o = F.scaled_dot_product_attention(o, k, v, attn_mask=mask, enable_gqa=True)
        return o

    def additive_form(q, pos):
        keep = (torch.arange(kv_len, device=dev)[None, :] <= pos[:, None])[:, None, None, :]
        mask = torch.zeros(keep.shape, device=dev, dtype=dt).masked_fill(~keep, float("-inf"))
        o = q
        for k, v in zip(ks, vs):
            o = F.scaled_dot_product_attention(o, k, v, attn_mask=mask, enable_gqa=True)
        return o

    rows, outs = [], {}
    for name, fn in (("bool", bool_form), ("additive", additive_form)):
        c = torch.compile(fn, options=compile_options(), fullgraph=True, dynamic=False)
        for _ in range(3):
            c(q, pos)
        torch.cuda.synchronize()
        ts = []
        for _ in range(20):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            outs[name] = c(q, pos).clone()
            e.record()
            e.synchronize()
            ts.append(s.elapsed_time(e) * 1e3 / layers)
        t = sorted(ts)[len(ts) // 2]
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                c(q, pos)
            torch.cuda.synchronize()
        kernels = {}
        for ev in prof.events():
            if ev.device_type == torch.autograd.DeviceType.CUDA:
                kernels[ev.name] = kernels.get(ev.name, 0.0) + ev.device_time / (5 * layers)
        rows.append({"mask": name, "us_per_layer": t, "kernels_us_per_layer": kernels})
        print(f"attention, {name} mask: {t:.2f} us a layer (wall); kernels a layer: "
              + "; ".join(f"{k[:60]} {v:.2f}" for k, v in sorted(kernels.items(), key=lambda kv: -kv[1])[:4]),
              flush=True)
    diff = float((outs["bool"].float() - outs["additive"].float()).abs().max())
    print(f"attention forms' largest difference: {diff}", flush=True)
    rows.append({"max_abs_diff": diff})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES))
    p.add_argument("--out", default="int8_gemv_variants.json")
    opts = p.parse_args()
    from bench.bandwidth import measure_read_bandwidth

    bw = measure_read_bandwidth(torch.device("cuda"))
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "read_bandwidth_bytes_s": bw, "gemv": gemv_rows(opts.shapes, bw)}
    with open(opts.out, "w") as f:
        json.dump(report, f, indent=1)
    report["attention"] = attention_rows()
    with open(opts.out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
