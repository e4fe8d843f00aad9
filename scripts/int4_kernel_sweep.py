"""torch's int4 CUDA kernel (`aten._weight_int4pack_mm`, tinygemm) on the 8B shape's products, one row (a batch-1
decode step), for each group size and inner_k_tiles, beside bf16's F.linear: microseconds per product and the
bytes it must read (codes, scales and zeros; bf16 weights) over that time (a measurement, not a test; figures
in docs/quantization.md).

    python scripts/int4_kernel_sweep.py [--out FILE.json]

Each product is captured 50 times into a CUDA graph (no launch overhead between them) and the graph replayed;
the best of 5 replays counts.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llama.fast.quantize_int4 import _scales_and_zeros, pack_nibbles, quantize_int4  # noqa: E402

# (name, out_features N, in_features K) of Llama 3 8B's products, the fast path's fused ones.
SHAPES = [("wqkv", 6144, 4096), ("wo", 4096, 4096), ("w13", 28672, 4096), ("w2", 4096, 14336),
          ("output", 128256, 4096)]
CALLS = 50


def time_us(fn) -> float:
    """Microseconds per call of fn(), from CUDA graph replays of CALLS calls (best of 5)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # warm up outside the graph
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(CALLS):
            fn()
    best = float("inf")
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) * 1e3 / CALLS)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="")
    opts = p.parse_args()
    torch.manual_seed(0)
    rows = []
    for name, n, k in SHAPES:
        w = (torch.randn(n, k, device="cuda") / k**0.5).to(torch.bfloat16)
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        us = time_us(lambda: F.linear(x, w))
        rows.append(dict(product=name, n=n, k=k, form="bf16 F.linear", us=us, gb_s=2 * n * k / us / 1e3))
        print(rows[-1], flush=True)
        for group in (32, 64, 128, 256):
            q, scale, zero = quantize_int4(w, group)
            sz = _scales_and_zeros(scale, zero, torch.bfloat16)
            for tiles in (2, 4, 8):
                packed = torch.ops.aten._convert_weight_to_int4pack(pack_nibbles(q).contiguous(), tiles)
                us = time_us(lambda: torch.ops.aten._weight_int4pack_mm(x, packed, group, sz))
                nbytes = n * k // 2 + sz.numel() * 2
                rows.append(dict(product=name, n=n, k=k, form=f"int4 group {group} inner_k_tiles {tiles}", us=us,
                                 gb_s=nbytes / us / 1e3))
                print(rows[-1], flush=True)
            del q, scale, zero, sz, packed
        del w
    report = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows,
                  command="python " + " ".join(sys.argv))
    if opts.out:
        Path(opts.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
