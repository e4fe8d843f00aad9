"""One-row int8 weight-only products on a GPU, each form compiled by inductor as compile=True compiles the decode
step, at the Llama 3 8B shapes: time, GB/s of weights read and % of the measured read bandwidth.

    python scripts/int8_matvec.py [--shapes wqkv wo w13 w2 output] [--out int8_matvec.json] [--code DIR]
    python scripts/int8_matvec.py --shapes w2 --swiglu

Measured on an H200 (bench/results/GPU_RESULTS.md, issue 18): no form beat `dequantize`; the same int8 w2
product took 25.6 us in one process and 71.3 us in another (inductor's tuning).

Forms (x (1, K) bf16, Q (N, K) int8, per-row scales):
- bf16:        F.linear(x, W) with W in bf16: the float step's product, for comparison.
- dequantize:  F.linear(x, Q.to(bf16)) * scale: the written-out form (gpt-fast's); at one row inductor turns
               it into a reduction that converts each byte with the int-to-float instruction.
- matvec:      int8_matvec below: the bytes of int32 words put into float32 2**23's mantissa, no I2F.
- matvec-perm: the same on a weight whose columns are permuted so that the 4 bytes of a word multiply 4
               contiguous slices of x (x read contiguously; a diagnostic of what the strided x reads cost).
- read:        a reduction that only reads Q as int32 words (max): the ceiling for one pass over the bytes.
- triton, triton-prmt: a hand-written Triton kernel of the matvec-perm form (shift-and-or, or one `prmt`
               a byte), autotuned over a few block shapes: what a kernel outside inductor would reach.
With --swiglu (w2 only): bf16 and int8 w2 fed by silu(gate) * up as in the step, inlined by inductor,
materialised first (an opaque copy) or inlined unless large (realize_opcount_threshold=8).
Each form is checked against F.linear in float32 on the dequantized weight. With --code, inductor's generated
code for the w13 shape and the conversion instructions in every PTX file Triton wrote are saved/counted.
"""

import argparse
import glob
import json
import os
import re
import sys

import torch
import torch.nn.functional as F

from bench.bandwidth import measure_read_bandwidth
from llama.fast.quantize import quantize_int8
from llama.fast.step import compile_options

SHAPES = {"wqkv": (6144, 4096), "wo": (4096, 4096), "w13": (28672, 4096), "w2": (4096, 14336),
          "output": (128256, 4096)}
PER_STEP = {"wqkv": 32, "wo": 32, "w13": 32, "w2": 32, "output": 1}  # products of each shape in an 8B step


# 0x4B000000 is float32 2**23, whose last mantissa bit is worth 1, so with a byte u (0..255) in its low 8 bits
# the float is exactly 2**23 + u; 0x80808080 (as an int32) flips every byte's top bit, which maps a
# two's-complement byte b to the unsigned byte b + 128.
_TWO_POW_23_BITS = 0x4B000000
_FLIP_BYTE_SIGNS = 0x80808080 - 2**32
_BYTE_OFFSET = 2.0**23 + 128


def int8_matvec(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(x Q^T) * scale in float32, returned in x's dtype, without an int-to-float instruction: x (M, K), Q (N, K)
    int8 (K a multiple of 4, contiguous, little-endian), scale (N,). Q is read as int32 words (byte j of word i
    is column 4i + j); each byte's sign bit is flipped (b -> b + 128, unsigned) and the byte put into the low
    mantissa bits of float32 2**23, giving 2**23 + b + 128 exactly; subtracting 2**23 + 128 leaves b exactly.
    (Measured slower than the plain form on an H200: docs/quantization.md.)"""
    n, k = q.shape
    words = q.view(torch.int32) ^ _FLIP_BYTE_SIGNS  # (N, K/4)
    xs = x.float().unflatten(-1, (k // 4, 4))  # (M, K/4, 4): xs[m, i, j] multiplies byte j of word i
    acc = None
    for j in range(4):
        w = (((words >> (8 * j)) & 0xFF) | _TWO_POW_23_BITS).view(torch.float32) - _BYTE_OFFSET  # (N, K/4)
        term = w * xs[:, None, :, j]  # (M, N, K/4)
        acc = term if acc is None else acc + term
    return (acc.sum(-1) * scale.float()).to(x.dtype)


def matvec_perm(x: torch.Tensor, words: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8_matvec on permuted words: byte j of word i is column j * K/4 + i."""
    k4 = words.shape[1]
    wx = words ^ _FLIP_BYTE_SIGNS
    xf = x.float()
    acc = None
    for j in range(4):
        w = (((wx >> (8 * j)) & 0xFF) | _TWO_POW_23_BITS).view(torch.float32) - _BYTE_OFFSET
        term = w * xf[:, None, j * k4 : (j + 1) * k4]
        acc = term if acc is None else acc + term
    return (acc.sum(-1) * scale).to(x.dtype)


@torch.library.custom_op("int8_matvec_script::copy", mutates_args=())
def opaque_copy(x: torch.Tensor) -> torch.Tensor:
    """A copy inductor cannot see into: what goes in is materialised first (not inlined into the consumer)."""
    return x.clone()


@opaque_copy.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def swiglu_then(product, gate_up: torch.Tensor, materialise: bool = False) -> torch.Tensor:
    """product(silu(gate) * up), gate_up (1, 2 * hidden) as w13 writes it: the feed-forward's w2 step."""
    gate, up = gate_up.chunk(2, dim=-1)
    x = F.silu(gate) * up
    return product(opaque_copy(x) if materialise else x)


def read_only(words: torch.Tensor) -> torch.Tensor:
    return (words ^ _FLIP_BYTE_SIGNS).amax(-1)


try:  # the hand-written kernels: module-level, as Triton's JIT resolves names among a module's globals
    import triton
    import triton.language as tl
except ImportError:
    triton = None

if triton is not None:

    @triton.jit
    def _byte_bits(words, j: tl.constexpr, PRMT: tl.constexpr):
        """float32 bits of 2**23 + byte j of each word."""
        if PRMT:  # result bytes: byte j of the word, then bytes 1..3 of 0x4B000000 (selector 0x765j)
            magic = tl.full(words.shape, 0x4B000000, tl.int32)
            select = tl.full(words.shape, 0x7650 + j, tl.int32)
            return tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, $3;", "=r,r,r,r", [words, magic, select],
                                             dtype=tl.int32, is_pure=True, pack=1)
        return ((words >> (8 * j)) & 0xFF) | 0x4B000000

    @triton.autotune(
        configs=[triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=nw)
                 for bn, bk, nw in [(1, 256, 2), (1, 512, 4), (2, 256, 4), (2, 512, 4), (4, 256, 4), (4, 512, 8),
                                    (8, 128, 4), (8, 256, 8), (16, 128, 8)]],
        key=["N", "K4"],
    )
    @triton.jit
    def _matvec_kernel(x_ptr, w_ptr, s_ptr, y_ptr, N, K4: tl.constexpr, PRMT: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K4, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            words = tl.load(w_ptr + rows[:, None] * K4 + cols[None, :]) ^ -2139062144  # 0x80808080
            for j in tl.static_range(4):
                xj = tl.load(x_ptr + j * K4 + cols).to(tl.float32)
                w = _byte_bits(words, j, PRMT).to(tl.float32, bitcast=True) - 8388736.0
                acc += w * xj[None, :]
        y = tl.sum(acc, axis=1) * tl.load(s_ptr + rows)
        tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty))


def triton_forms():
    """{name: fn(x, words_perm, scale)} of the hand-written kernels, or {} without Triton."""
    if triton is None:
        return {}

    def make(prmt: bool):
        def run(x, words, scale):
            n, k4 = words.shape
            y = torch.empty(1, n, dtype=x.dtype, device=x.device)
            _matvec_kernel[lambda meta: (n // meta["BLOCK_N"],)](x, words, scale, y, n, k4, prmt)
            return y
        return run

    return {"triton": make(False), "triton-prmt": make(True)}


def count_conversions(cache_dir: str) -> dict:
    """{ptx file: {instruction: count}} for int-to-float conversions and prmt in Triton's cache."""
    out = {}
    for path in glob.glob(os.path.join(cache_dir, "**", "*.ptx"), recursive=True):
        text = open(path).read()
        name = re.search(r"\.entry\s+(\w+)", text)
        counts = {pat: len(re.findall(pat, text)) for pat in (r"cvt\.rn\.f32\.s(?:8|16|32)", r"cvt\.rn\.bf16\.s\d+",
                                                              r"prmt\.b32", r"ld\.global\.v4", r"shr\.s32|shr\.u32")}
        out[name.group(1) if name else path] = counts
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=list(SHAPES))
    p.add_argument("--diagnostic-shapes", nargs="+", choices=sorted(SHAPES), default=["w13", "w2"],
                   help="shapes for matvec-perm, read and the Triton kernels")
    p.add_argument("--swiglu", action="store_true",
                   help="w2 only: the product fed by silu(gate) * up, as in the step (inlined by inductor, "
                        "materialised first, or inlined unless large: realize_opcount_threshold=8)")
    p.add_argument("--out", default="int8_matvec.json")
    p.add_argument("--code", default=None, help="directory for inductor's code (w13) and the PTX counts")
    opts = p.parse_args()

    from triton.testing import do_bench

    torch._dynamo.config.cache_size_limit = 64
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    options = {k: v for k, v in compile_options().items() if k != "triton.cudagraphs"}
    bandwidth = measure_read_bandwidth(device)
    print(f"read bandwidth {bandwidth / 1e9:.0f} GB/s; inductor options {options}", flush=True)
    hand = triton_forms()
    results = {"read_bandwidth_bytes_s": bandwidth, "gpu": torch.cuda.get_device_name(device),
               "torch": torch.__version__, "options": options, "rows": []}
    g = torch.Generator(device=device).manual_seed(0)
    for shape in opts.shapes:
        n, k = SHAPES[shape]
        w = torch.randn(n, k, generator=g, device=device) / k**0.5
        q, scale = quantize_int8(w)
        del w
        wb = (q.float() * scale[:, None]).bfloat16()
        sb = scale.bfloat16()
        perm = q.view(n, 4, k // 4).transpose(1, 2).reshape(n, k).view(torch.int32)  # byte j of word i: col j*K/4+i
        x = torch.randn(1, k, generator=g, device=device).bfloat16()
        ref = F.linear(x.float(), q.float()) * scale  # (1, N) float32
        forms = {
            "bf16": (lambda x, wb=wb: F.linear(x, wb), 2 * n * k),
            "dequantize": (lambda x, q=q, sb=sb: F.linear(x, q.to(x.dtype)) * sb, n * k),
            "matvec": (lambda x, q=q, s=scale: int8_matvec(x, q, s), n * k),
        }
        if opts.swiglu:
            assert shape == "w2", "--swiglu goes with --shapes w2"
            gate_up = torch.randn(1, 2 * k, generator=g, device=device).bfloat16()
            gate, up = gate_up.float().chunk(2, dim=-1)
            x = (F.silu(gate) * up).bfloat16()  # what the forms below multiply (for the reference)
            ref = F.linear(x.float(), q.float()) * scale
            bf16 = lambda v, wb=wb: F.linear(v, wb)  # noqa: E731
            deq = lambda v, q=q, sb=sb: F.linear(v, q.to(v.dtype)) * sb  # noqa: E731
            forms = {
                "bf16+swiglu": (lambda gu, f=bf16: swiglu_then(f, gu), 2 * n * k),
                "bf16+swiglu-materialised": (lambda gu, f=bf16: swiglu_then(f, gu, True), 2 * n * k),
                "dequantize": (deq, n * k),
                "dequantize+swiglu": (lambda gu, f=deq: swiglu_then(f, gu), n * k),
                "dequantize+swiglu-materialised": (lambda gu, f=deq: swiglu_then(f, gu, True), n * k),
                "dequantize+swiglu-threshold8": (lambda gu, f=deq: swiglu_then(f, gu), n * k),
            }
        elif shape in opts.diagnostic_shapes:
            forms["matvec-perm"] = (lambda x, pw=perm, s=scale: matvec_perm(x, pw, s), n * k)
            forms["read"] = (lambda x, pw=perm: read_only(pw), n * k)
        for name, (fn, nbytes) in forms.items():
            extra = {"realize_opcount_threshold": 8} if name.endswith("threshold8") else {}
            compiled = torch.compile(fn, options={**options, **extra}, fullgraph=True, dynamic=False)
            arg = gate_up if "swiglu" in name else x
            try:
                if opts.code and (shape == "w13" and name in ("dequantize", "matvec", "matvec-perm")
                                  or "swiglu" in name and "bf16" not in name):
                    from torch._inductor.utils import run_and_get_code

                    _, codes = run_and_get_code(compiled, arg)
                    os.makedirs(opts.code, exist_ok=True)
                    with open(os.path.join(opts.code, f"inductor_{name}.py"), "w") as f:
                        f.write("\n\n# ----\n\n".join(codes))
                y = compiled(arg)
                t = do_bench(lambda: compiled(arg), warmup=25, rep=200, return_mode="median") * 1e-3
            except Exception as e:  # a form that fails to compile is reported, not fatal
                print(f"{shape:7s} {name:12s} FAILED: {type(e).__name__}: {str(e)[:300]}", flush=True)
                continue
            rel = None if name == "read" else ((y.float() - ref).norm() / ref.norm()).item()
            row = {"shape": shape, "N": n, "K": k, "form": name, "seconds": t, "bytes": nbytes,
                   "gb_s": nbytes / t / 1e9, "fraction_of_read_bandwidth": nbytes / t / bandwidth, "rel_error": rel}
            results["rows"].append(row)
            print(f"{shape:7s} {name:12s} {t * 1e6:8.1f} us {row['gb_s']:7.0f} GB/s "
                  f"{100 * row['fraction_of_read_bandwidth']:5.1f}%  rel err {rel}", flush=True)
        if shape in opts.diagnostic_shapes and not opts.swiglu:
            for name, fn in hand.items():
                try:
                    y = fn(x, perm, scale)
                    t = do_bench(lambda fn=fn, pw=perm: fn(x, pw, scale), warmup=25, rep=200,
                                 return_mode="median") * 1e-3
                except Exception as e:
                    print(f"{shape:7s} {name:12s} FAILED: {type(e).__name__}: {str(e)[:300]}", flush=True)
                    continue
                rel = ((y.float() - ref).norm() / ref.norm()).item()
                row = {"shape": shape, "N": n, "K": k, "form": name, "seconds": t, "bytes": n * k,
                       "gb_s": n * k / t / 1e9, "fraction_of_read_bandwidth": n * k / t / bandwidth,
                       "rel_error": rel}
                results["rows"].append(row)
                print(f"{shape:7s} {name:12s} {t * 1e6:8.1f} us {row['gb_s']:7.0f} GB/s "
                      f"{100 * row['fraction_of_read_bandwidth']:5.1f}%  rel err {rel}", flush=True)
        del q, wb, perm
        torch.cuda.empty_cache()
    # The products of one 8B decode step, per form measured at every shape.
    for form in ("bf16", "dequantize", "matvec"):
        rows = {r["shape"]: r for r in results["rows"] if r["form"] == form}
        if set(rows) == set(SHAPES):
            total = sum(PER_STEP[s] * rows[s]["seconds"] for s in SHAPES)
            results[f"step_products_seconds_{form}"] = total
            print(f"one 8B step's products, {form}: {total * 1e3:.3f} ms", flush=True)
    if opts.code:
        cache = os.environ.get("TRITON_CACHE_DIR", os.path.expanduser("~/.triton/cache"))
        results["ptx_counts"] = count_conversions(cache)
        with open(os.path.join(opts.code, "ptx_counts.json"), "w") as f:
            json.dump(results["ptx_counts"], f, indent=1)
    with open(opts.out, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
