"""How fast each form torch offers for a decode step's one-row product reads its weight on this CPU, against
the read bandwidth (bench.bandwidth) measured in the same process, round by round (a measurement, not a
test; figures in docs/cpu-forms.md).

    python scripts/cpu_product_forms.py [--rows 1] [--threads 1] [--rounds 7] [--out bench/results/X.json]

For each of the bench's small shape's products (the output projection is the largest) and each weight
dtype, the weight is held in enough copies to pass 128 MiB (4x the L3 cache here), so that a pass over the
copies reads them from memory as a decode step does (one product alone would stay in the cache); every
form does the same pass, the forms alternating round by round with a bandwidth reading. Reported: the best
pass's GB/s, that over the best bandwidth reading, and the largest error against float64 on the
(dequantized) weights, relative to the largest |output|. Forms marked "other numerics" compute another
product (activations rounded to bf16 or quantized to int8): measured to say what they would give, never
picked by llama.fast.cpu_forms.
"""

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable, Dict

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.bandwidth import measure_read_bandwidth  # noqa: E402
from bench.run import cpu_description  # noqa: E402
from llama.fast.blocked import BlockedProduct  # noqa: E402
from llama.fast.cpu_forms import CompiledProduct  # noqa: E402
from llama.fast.quantize import quantize_int8  # noqa: E402

# (name, out_features, in_features): the small shape's products (dim 512, hidden 1792, vocab 128256).
PRODUCTS = [("wqkv", 768, 512), ("w13", 3584, 512), ("w2", 512, 1792), ("output", 128256, 512)]
COPIES_BYTES = 128 * 2**20


def forms_for(kind: str, act: torch.dtype, w: torch.Tensor) -> Dict[str, Callable]:
    """Candidate forms of x (M, K) @ weight^T for a float weight `w` stored as `kind` ("float32", "bfloat16"
    or "int8"), with activations in `act`: name -> make(weight copy) -> fn(x)."""
    forms: Dict[str, Callable] = {}
    if kind == "int8":
        forms["int8pack"] = lambda q, s: (lambda x: torch.ops.aten._weight_int8pack_mm(x, q, s.to(act)))
        forms["dequantize"] = lambda q, s: (lambda x: F.linear(x, q.to(act)) * s.to(act))
        forms["compiled"] = lambda q, s: CompiledProduct(q, s.to(act))
        forms["blocked"] = lambda q, s: BlockedProduct(q, s.to(act))
        if act == torch.float32:
            forms["int8pack, x cast to bf16 (other numerics)"] = lambda q, s: (
                lambda x: torch.ops.aten._weight_int8pack_mm(x.bfloat16(), q, s.bfloat16()).float())

            def int_mm(q, s):
                def fn(x):  # dynamic symmetric per-row int8 activations, int32 accumulation
                    xs = x.abs().amax(-1, keepdim=True).clamp_min(1e-30) / 127
                    xq = torch.round(x / xs).clamp(-127, 127).to(torch.int8)
                    return torch._int_mm(xq, q.t()).float() * xs * s
                return fn

            forms["torch._int_mm, x quantized per row (other numerics)"] = int_mm

            def fbgemm(q, s):
                wq = torch._make_per_channel_quantized_tensor(q, s.double(), torch.zeros(len(s), dtype=torch.long), 0)
                packed = torch.ops.quantized.linear_prepack(wq, None)
                return lambda x: torch.ops.quantized.linear_dynamic(x, packed)

            forms["fbgemm linear_dynamic, x quantized per tensor (other numerics)"] = fbgemm
    else:
        forms["linear"] = lambda wt, s: (lambda x: F.linear(x, wt))

        def packed(wt, s):
            p = torch.ops.mkldnn._reorder_linear_weight(wt, 16)
            return lambda x: torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "")

        if kind == "float32" or torch.ops.mkldnn._is_mkldnn_bf16_supported():
            forms["packed"] = packed
        forms["compiled"] = lambda wt, s: CompiledProduct(wt)
        forms["blocked"] = lambda wt, s: BlockedProduct(wt)
    return forms


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--products", nargs="+", default=[n for n, _, _ in PRODUCTS])
    p.add_argument("--weights", nargs="+", default=["float32", "bfloat16", "int8"], help="weight kinds to measure")
    p.add_argument("--out", default="cpu_product_forms.json")
    opts = p.parse_args()
    torch.set_num_threads(opts.threads)
    g = torch.Generator().manual_seed(0)
    cpu = torch.device("cpu")
    report = {"command": "python scripts/cpu_product_forms.py " + " ".join(sys.argv[1:]), "threads": opts.threads,
              "rows": opts.rows, "torch": torch.__version__, "platform": platform.platform(), **cpu_description(),
              "results": []}
    best_bw = 0.0
    for name, n, k in PRODUCTS:
        if name not in opts.products:
            continue
        w = torch.randn(n, k, generator=g) / k**0.5
        for kind, act in (("float32", torch.float32), ("bfloat16", torch.bfloat16), ("int8", torch.float32),
                          ("int8", torch.bfloat16)):
            if kind not in opts.weights:
                continue
            x = torch.randn(opts.rows, k, generator=g).to(act)
            if kind == "int8":
                q, s = quantize_int8(w)
                weight, w64, nbytes = q, q.double() * s.double()[:, None], n * k
            else:
                weight, s = w.to(getattr(torch, kind)), None
                w64, nbytes = weight.double(), n * k * weight.element_size()
            exact = x.double() @ w64.T
            copies = max(1, COPIES_BYTES // nbytes)
            timings: Dict[str, float] = {}
            fns: Dict[str, list] = {}
            errors: Dict[str, float] = {}
            for form, make in forms_for(kind, act, w).items():
                try:
                    fns[form] = [make(weight.clone(), s) for _ in range(copies)]
                    y = fns[form][0](x)
                    errors[form] = float((y.double() - exact).abs().max() / exact.abs().max())
                    timings[form] = float("inf")
                except Exception as e:  # noqa: BLE001  (a form this torch or CPU lacks)
                    print(f"  {name} {kind} x {act}: {form} unavailable ({type(e).__name__}: {str(e)[:120]})")
                    fns.pop(form, None)
            rounds_bw = []
            for r in range(opts.rounds):
                rounds_bw.append(measure_read_bandwidth(cpu, repeats=3))
                for form in list(fns) if r % 2 == 0 else list(fns)[::-1]:
                    start = time.perf_counter()
                    for fn in fns[form]:
                        fn(x)
                    timings[form] = min(timings[form], (time.perf_counter() - start) / copies)
            bw = max(rounds_bw)
            best_bw = max(best_bw, bw)
            for form, t in timings.items():
                res = {"product": name, "shape": [n, k], "weight": kind, "activations": str(act).replace("torch.", ""),
                       "form": form, "seconds": t, "bytes": nbytes, "gb_s": nbytes / t / 1e9,
                       "fraction_of_read_bandwidth": nbytes / t / bw, "read_bandwidth_gb_s": bw / 1e9,
                       "max_error_relative_to_max_output": errors[form], "copies": copies}
                report["results"].append(res)
                print(f"{name:7s} {n}x{k} {kind:8s} x {res['activations']:8s} {form:60s} {t * 1e6:9.1f} us "
                      f"{res['gb_s']:6.1f} GB/s {res['fraction_of_read_bandwidth']:5.0%}  err {errors[form]:.1e}",
                      flush=True)
            del fns
    report["best_read_bandwidth_gb_s"] = best_bw / 1e9
    with contextlib.suppress(OSError):
        report["load_average_end"] = os.getloadavg()
    with open(opts.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {opts.out}")


if __name__ == "__main__":
    main()
