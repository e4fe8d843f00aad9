"""What a speculative verify pass costs (a measurement, not a test): the time of a forward pass over T = k + 1
positions against the KV cache, over the time of a one-token decode step, for chains (k = 1 .. 8) and
tree-sized passes (16, 32, 64 positions), and the speed-up each mean accepted length would then buy.

    python -m bench.verify_cost --shape llama3-8b --device cuda [--context 512] [--out FILE.json]

Random weights (bench.run's shapes; random weights cannot agree with a drafter, so only the cost is
measured). Each width is timed two ways on the fast layers, row 0 at position --context:
- eager: the speculative loop's verify pass (model.forward over T tokens, the cache sliced to its end);
- graph: llama.speculative.verify_step's fixed-width pass (per-row positions, the whole cache under a mask)
  captured once in a CUDA graph and replayed: what a compiled verify step launches, with eager's kernels.
Ratios are each way's T-position time over its own 1-position time. A pass of mean accepted length tau
(tokens per pass) then runs tau / ratio times as fast as plain decoding, when drafting is free.
"""

import argparse
import json
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional

import torch

from bench.run import SHAPES, build_ours, machine_info, random_weights
from llama.distributed import init_distributed, pick_device
from llama.fast.step import fast_forward
from llama.model import ModelArgs

CHAIN_WIDTHS = list(range(1, 10))  # 1 (plain) and k + 1 for k = 1 .. 8
TREE_WIDTHS = [16, 32, 64]
TAUS = [1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0]


def median_ms(fn: Callable[[], Any], device: torch.device, iters: int, warmup: int = 3) -> float:
    """Median wall time of fn() in ms (each call synchronised: a verify pass waits for its logits anyway)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def graphed(fn: Callable[[], torch.Tensor], device: torch.device) -> Callable[[], torch.Tensor]:
    """fn captured in a CUDA graph (after warm-up on a side stream, as torch asks); returns its replay."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.verify_cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="small")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--context", type=int, default=512, help="tokens already in the cache")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--widths", default=",".join(map(str, CHAIN_WIDTHS + TREE_WIDTHS)))
    p.add_argument("--out", default=None)
    opts = p.parse_args(argv)
    device = pick_device(opts.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    init_distributed(device)
    dtype = getattr(torch, opts.dtype)
    widths = [int(w) for w in opts.widths.split(",")]
    max_seq_len = opts.context + max(widths) + 1
    args = ModelArgs.from_params(SHAPES[opts.shape], max_seq_len=max_seq_len, max_batch_size=1)
    print(f"building {opts.shape} ({dtype}) on {device} ...", file=sys.stderr, flush=True)
    llama = build_ours(args, random_weights(args, dtype, device, seed=0), device, dtype, fast=True, compile=False)
    model = llama.model
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        model.forward(torch.randint(0, args.vocab_size, (1, opts.context), generator=g).to(device), 0)
    report: Dict[str, Any] = {"machine": machine_info(device), "shape": opts.shape, "dtype": opts.dtype,
                              "context": opts.context, "iters": opts.iters, "widths": {},
                              "command": "python -m bench.verify_cost " + " ".join(sys.argv[1:] if argv is None
                                                                                    else argv)}
    start = torch.tensor([opts.context], device=device)
    for width in widths:
        tokens = torch.randint(0, args.vocab_size, (1, width), generator=g).to(device)
        with torch.inference_mode():
            eager = median_ms(lambda: model.forward(tokens, opts.context), device, opts.iters)
        row = {"eager_ms": eager}
        if device.type == "cuda":
            try:
                with torch.no_grad():  # (not inference mode: graph capture keeps its tensors for the replays)
                    replay = graphed(lambda: fast_forward(model, tokens, start, kv_len=max_seq_len), device)
                    row["graph_ms"] = median_ms(replay, device, opts.iters)
            except RuntimeError as e:  # keep the eager figures of a run whose capture fails
                row["graph_error"] = str(e)[:300]
        report["widths"][str(width)] = row
        print(f"width {width:3}: eager {eager:7.3f} ms" + (f"  graph {row['graph_ms']:7.3f} ms" if "graph_ms" in row
                                                            else ""), flush=True)
        if opts.out:  # as it goes: a run cut short keeps what it measured
            with open(opts.out, "w") as f:
                json.dump(report, f, indent=1)
    base = report["widths"].get("1")
    if base:
        table = {}
        for width, row in report["widths"].items():
            entry = {}
            for way in ("eager", "graph"):
                if f"{way}_ms" in row:
                    ratio = row[f"{way}_ms"] / base[f"{way}_ms"]
                    entry[f"{way}_ratio"] = ratio
                    entry[f"{way}_speed_up_at_tau"] = {str(t): t / ratio for t in TAUS if t <= int(width) or
                                                       int(width) > 9}
            table[width] = entry
            print(f"width {width:>3}: " + "  ".join(f"{way} x{entry[f'{way}_ratio']:.3f}" for way in ("eager", "graph")
                                                     if f"{way}_ratio" in entry), flush=True)
        report["ratios"] = table
    if opts.out:
        with open(opts.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
