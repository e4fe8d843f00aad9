"""Block shapes of the split-K int8 GEMV (llama.fast.int8_gemv_kernels) at the Llama 3 8B shapes, batch 1, against
inductor's form of the same product and bf16's cuBLAS product: time, % of the measured read bandwidth.

    python scripts/int8_gemv_sweep.py [--shapes w2 wo wqkv w13 output] [--budget-s 150] [--out sweep.json]

Every form is timed as a compiled decode step runs it: a CUDA graph of one launch per copy of the weight,
over enough copies (PASS_BYTES) that each launch reads its weight from memory, not from the L2 cache; the
median replay over the copies. The GEMV's time includes its partial sums' reduction (split_k > 1).
Each block shape is checked once against float64 on the dequantized weight (rel. error printed).
"--cvt N": each shape's top N block shapes again with int8 -> float32 by the int-to-float instruction
(`w.to(tl.float32)`), the form the library's kernel replaced by the mantissa's.

bench/results/int8_gemv_sweep_h200.json was written before that swap: its "gemv" rows are the
int-to-float form, its "magic" rows the mantissa's (what llama.fast.int8_gemv_kernels now runs).
"""

import argparse
import glob
import itertools
import json
import math
import os
import re
import sys
import time

import torch
import torch.nn.functional as F

from bench.bandwidth import measure_read_bandwidth
from llama.fast import int8_gemv_kernels as GK
from llama.fast.quantize import quantize_int8
from llama.fast.step import compile_options

SHAPES = {"wqkv": (6144, 4096), "wo": (4096, 4096), "w13": (28672, 4096), "w2": (4096, 14336),
          "output": (128256, 4096)}
PER_STEP = {"wqkv": 32, "wo": 32, "w13": 32, "w2": 32, "output": 1}
PASS_BYTES = 256 * 2**20
SPLITS = {4096: (1, 2, 4, 8), 14336: (1, 2, 4, 7, 8, 14)}


def block_shapes():
    """(block_n, block_k, num_warps) with 2-16 KiB of Q per loop step and 16-64 bytes of it per thread."""
    out = []
    for bn, bk, nw in itertools.product((1, 2, 4, 8, 16), (256, 512, 1024, 2048), (4, 8)):
        tile = bn * bk
        per_thread = tile // (32 * nw)
        if 2048 <= tile <= 16384 and 16 <= per_thread <= 64:
            out.append((bn, bk, nw))
    return out


import triton  # noqa: E402  (the device has it; the script is for CUDA only)
import triton.language as tl  # noqa: E402


@triton.jit
def _gemv_cvt_kernel(x_ptr, w_ptr, scale_ptr, out_ptr, N, K, k_split,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PARTIAL: tl.constexpr):
    """The library's _gemv_kernel (even shapes only) with int8 -> float32 by the int-to-float instruction."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * K
    k_lo = pid_k * k_split
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, k_split, BLOCK_K):
        cols = k_lo + k0 + tl.arange(0, BLOCK_K)
        w = tl.load(w_rows + cols[None, :], eviction_policy="evict_first")
        xk = tl.load(x_ptr + cols, eviction_policy="evict_last")
        acc += w.to(tl.float32) * xk.to(tl.float32)[None, :]
    part = tl.sum(acc, axis=1)
    if PARTIAL:
        tl.store(out_ptr + pid_k * N + rows, part)
    else:
        s = tl.load(scale_ptr + rows).to(tl.float32)
        tl.store(out_ptr + rows, (part * s).to(out_ptr.dtype.element_ty))


def launch_cvt(x, q, scale, cfg):
    n, k = q.shape
    per = GK.k_per_split(k, cfg)
    assert n % cfg.block_n == 0 and per * cfg.split_k == k
    out = torch.empty((1, n), dtype=x.dtype, device=x.device)
    grid = (n // cfg.block_n, cfg.split_k)
    if cfg.split_k == 1:
        _gemv_cvt_kernel[grid](x, q, scale, out, n, k, per, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                                 PARTIAL=False, num_warps=cfg.num_warps)
        return out
    parts = torch.empty((cfg.split_k, n), dtype=torch.float32, device=x.device)
    _gemv_cvt_kernel[grid](x, q, scale, parts, n, k, per, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                             PARTIAL=True, num_warps=cfg.num_warps)
    GK._sum_parts_kernel[(triton.cdiv(n, 1024),)](parts, scale, out, out, n, cfg.split_k, BLOCK=1024, RESIDUAL=False,
                                                  num_warps=4)  # (res_ptr unread without RESIDUAL)
    return out


def ptx_counts() -> dict:
    """{ptx file: counts} of 16-byte loads and int-to-float conversions in Triton's cache (GEMV kernels)."""
    cache = os.environ.get("TRITON_CACHE_DIR", os.path.expanduser("~/.triton/cache"))
    out = {}
    for path in glob.glob(os.path.join(cache, "**", "*gemv*.ptx"), recursive=True):
        text = open(path).read()
        out[os.path.relpath(path, cache)] = {
            "v4_loads": len(re.findall(r"ld\.global[\w:.]*\.v4", text)),
            "loads": len(re.findall(r"ld\.global", text)),
            "cvt_f32_int": len(re.findall(r"cvt\.rn\.f32\.s", text)),
            "constexprs": re.findall(r"\.entry\s+(\w+)", text)}
    return out


def graph_time(fn, copies, rounds: int = 15) -> float:
    """Median seconds per launch of `fn(i)` for i over the copies, as one CUDA graph replay (of `rounds`)."""
    for i in range(copies):
        fn(i)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(copies):
            fn(i)
    times = []
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    for _ in range(rounds):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / copies)
    del graph
    return sorted(times)[len(times) // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["w2", "wo", "wqkv", "w13", "output"])
    p.add_argument("--budget-s", type=float, default=150.0, help="stop sweeping block shapes after this long")
    p.add_argument("--cvt", type=int, default=3, help="the top N block shapes per shape, also by int-to-float")
    p.add_argument("--out", default="int8_gemv_sweep.json")
    opts = p.parse_args()
    t0 = time.time()
    torch._dynamo.config.cache_size_limit = 64
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    options = {k: v for k, v in compile_options().items() if k != "triton.cudagraphs"}
    bandwidth = measure_read_bandwidth(device)
    print(f"read bandwidth {bandwidth / 1e9:.0f} GB/s", flush=True)
    res = {"read_bandwidth_bytes_s": bandwidth, "gpu": torch.cuda.get_device_name(device), "torch": torch.__version__,
           "triton": triton.__version__, "rows": [], "best": {}}
    g = torch.Generator(device=device).manual_seed(0)
    blocks = block_shapes()
    for shape in opts.shapes:
        n, k = SHAPES[shape]
        w = torch.randn(n, k, generator=g, device=device) / k**0.5
        q0, scale = quantize_int8(w)
        del w
        sb = scale.bfloat16()
        copies = max(2, math.ceil(PASS_BYTES / (n * k)))
        qs = [q0] + [q0.clone() for _ in range(copies - 1)]
        x = torch.randn(1, k, generator=g, device=device).bfloat16()
        ref = (x.double() @ q0.double().t()) * sb.double()  # (1, N)

        def row(form, t, y, nbytes, **extra):
            rel = ((y.double() - ref).norm() / ref.norm()).item()
            r = {"shape": shape, "N": n, "K": k, "form": form, "seconds": t, "fraction": nbytes / t / bandwidth,
                 "rel_error": rel, **extra}
            res["rows"].append(r)
            print(f"{shape:6s} {form:34s} {t * 1e6:8.2f} us {100 * r['fraction']:5.1f}%  rel {rel:.2e}", flush=True)
            return r

        # inductor's form (the layer's F.linear(x, Q.to(bf16)) * scale), compiled as the step compiles it
        ind = torch.compile(lambda x, q, s: F.linear(x, q.to(x.dtype)) * s, options=options, fullgraph=True,
                            dynamic=False)
        y = ind(x, q0, sb)
        row("inductor", graph_time(lambda i: ind(x, qs[i], sb), copies), y, n * k)
        wb = [(q0.float() * scale[:, None]).bfloat16()]
        wb += [wb[0].clone() for _ in range(min(copies, max(2, math.ceil(PASS_BYTES / (2 * n * k)))) - 1)]
        row("bf16-cublas", graph_time(lambda i: F.linear(x, wb[i]), len(wb)), F.linear(x, wb[0]), 2 * n * k)
        wb.clear()
        torch.cuda.empty_cache()
        found = []
        for (bn, bk, nw), sk in itertools.product(blocks, SPLITS[k]):
            if time.time() - t0 > opts.budget_s:
                print("budget spent", flush=True)
                break
            cfg = GK.GemvConfig(bn, bk, sk, nw)
            if bk > k // sk or (k // sk) % bk:
                continue
            try:
                GK.check_config(cfg, k)
                if GK.k_per_split(k, cfg) * sk != k:
                    continue
                y = GK._launch(x, q0, sb, cfg)
                t = graph_time(lambda i: GK._launch(x, qs[i], sb, cfg), copies)
            except Exception as e:  # noqa: BLE001  (a block shape that fails is reported, not fatal)
                print(f"{shape} {cfg} FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            found.append(row(f"gemv {bn}x{bk} s{sk} w{nw}", t, y, n * k, config=list(cfg)))
        found.sort(key=lambda r: r["seconds"])
        for r in found[: opts.cvt]:
            cfg = GK.GemvConfig(*r["config"])
            try:
                y = launch_cvt(x, q0, sb, cfg)
                t = graph_time(lambda i: launch_cvt(x, qs[i], sb, cfg), copies)
                row(f"cvt {r['form'][5:]}", t, y, n * k, config=list(cfg))
            except Exception as e:  # noqa: BLE001
                print(f"{shape} cvt {cfg} FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
        if found:
            res["best"][shape] = {"config": found[0]["config"], "seconds": found[0]["seconds"],
                                  "top": [r["config"] for r in found[:5]]}
            print(f"{shape}: best {found[0]['form']} {found[0]['seconds'] * 1e6:.2f} us", flush=True)
        qs.clear()
        del q0
        torch.cuda.empty_cache()
        with open(opts.out, "w") as f:
            json.dump(res, f, indent=1)
    for form in ("inductor", "bf16-cublas"):
        rows = {r["shape"]: r["seconds"] for r in res["rows"] if r["form"] == form}
        if set(rows) == set(SHAPES):
            print(f"one 8B step's products, {form}: {sum(PER_STEP[s] * rows[s] for s in SHAPES) * 1e3:.3f} ms")
    if set(res["best"]) == set(SHAPES):
        total = sum(PER_STEP[s] * res["best"][s]["seconds"] for s in SHAPES)
        print(f"one 8B step's products, best gemv: {total * 1e3:.3f} ms")
    # PTX of the kernels compiled: are Q's loads 16 bytes wide, how many int-to-float conversions
    res["ptx"] = ptx_counts()
    res["elapsed_s"] = time.time() - t0
    with open(opts.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
