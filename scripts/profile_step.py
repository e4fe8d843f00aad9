"""Where a compiled decode step's GPU time goes: torch's profiler over greedy generations at the 8B shape.

    python scripts/profile_step.py [--systems int8 bf16] [--new-tokens 64] [--out profile.json]

For each system (bf16 weights, or the same weights quantized to int8) the model is built as the bench builds
it (random weights, compile=True), compiled by a first generation, timed (decode tok/s: a full generation
less a 1-token one, the best of 3), then profiled twice, a 1-token and a full generation: per kernel name, the
difference is the decode steps' share. Kernels are put in three groups by name: the one-row products
(inductor's reductions, named after the `mm` they replace, often fused with the norm or SiLU before them),
attention, and the rest. Prints per step: each group's time, the products' bandwidth over the weight bytes
they read, the kernels' sum against the step's wall time, and the largest kernels.
"""

import argparse
import json
import re
import time
from typing import Dict

import torch
from torch.profiler import ProfilerActivity, profile

from bench.run import SHAPES, build_ours, bytes_per_decode_step, random_weights
from llama.distributed import init_distributed
from llama.model import ModelArgs

GROUPS = (("attention", r"flash|fmha|attention|cudnn|sdpa|efficient"), ("products", r"mm|gemv|gemm"), ("rest", r""))


def kernel_times(fn, device: torch.device) -> Dict[str, list]:
    """{kernel name: [calls, total microseconds]} of the CUDA kernels `fn` ran (on the CPU: its operators)."""
    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        fn()
    out = {}
    for item in prof.key_averages():
        us = item.self_device_time_total if cuda else item.self_cpu_time_total
        if us > 0:
            out[item.key] = [item.count, us]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--systems", nargs="+", choices=["int8", "bf16"], default=["int8"])
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--out", default="profile.json")
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    p.add_argument("--device", default="cuda", help="cuda (or cpu, to try the script)")
    opts = p.parse_args()
    device = torch.device("cuda", 0) if opts.device == "cuda" else torch.device(opts.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    init_distributed(device)
    dtype = torch.bfloat16
    args = ModelArgs.from_params(SHAPES[opts.shape], max_seq_len=opts.prompt_len + opts.new_tokens, max_batch_size=1)
    sd = random_weights(args, dtype, device, seed=0)
    prompts = torch.randint(0, args.vocab_size, (1, opts.prompt_len), generator=torch.Generator().manual_seed(0))
    prompts = prompts.tolist()
    steps = opts.new_tokens - 1
    report = {"gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "torch": torch.__version__, "systems": {}}
    for system in opts.systems:
        start = time.perf_counter()
        llama = build_ours(args, sd, device, dtype, True, True, "int8" if system == "int8" else None)

        def gen(n: int) -> None:
            llama.generate(prompts, max_gen_len=n, temperature=0)
            if device.type == "cuda":
                torch.cuda.synchronize()

        gen(opts.new_tokens)  # compiles, autotunes, records the graphs
        gen(1)
        compile_s = time.perf_counter() - start
        decode_s = []
        for _ in range(3):
            t0 = time.perf_counter()
            gen(1)
            t1 = time.perf_counter()
            gen(opts.new_tokens)
            t2 = time.perf_counter()
            decode_s.append((t2 - t1) - (t1 - t0))
        step_s = min(decode_s) / steps
        one, full = kernel_times(lambda: gen(1), device), kernel_times(lambda: gen(opts.new_tokens), device)
        per_step = {}  # name: (calls a step, microseconds a step)
        for name, (calls, us) in full.items():
            c0, u0 = one.get(name, (0, 0.0))
            if us - u0 > 0:
                per_step[name] = ((calls - c0) / steps, (us - u0) / steps)
        groups = {g: 0.0 for g, _ in GROUPS}
        for name, (_, us) in per_step.items():
            group = next(g for g, pattern in GROUPS if re.search(pattern, name, re.I))
            groups[group] += us
        kernels_us = sum(groups.values())
        traffic = bytes_per_decode_step(sd, args, dtype, 1, opts.prompt_len, opts.new_tokens, int8=system == "int8")
        weights = traffic["weight_bytes"] - sum(v.numel() * v.element_size() for k, v in sd.items()
                                                if v.dim() == 1)  # the products' weights (and scales)
        top = sorted(per_step.items(), key=lambda kv: -kv[1][1])[:16]
        res = {"tok_s": 1 / step_s, "step_us": step_s * 1e6, "kernels_us_per_step": kernels_us,
               "groups_us_per_step": groups, "product_weight_bytes": weights,
               "products_bandwidth_bytes_s": weights / (groups["products"] * 1e-6) if groups["products"] else None,
               "kernels_per_step": sum(c for c, _ in per_step.values()), "compile_and_first_runs_s": compile_s,
               "top_kernels": [(name, calls, us) for name, (calls, us) in top], "decode_runs_s": decode_s}
        report["systems"][system] = res
        print(f"{system}: {res['tok_s']:.1f} tok/s, step {res['step_us']:.0f} us, kernels {kernels_us:.0f} us "
              f"({res['kernels_per_step']:.0f} a step); products {groups['products']:.0f} us "
              f"({weights / 1e9:.2f} GB at {res['products_bandwidth_bytes_s'] / 1e9:.0f} GB/s), attention "
              f"{groups['attention']:.0f} us, rest {groups['rest']:.0f} us; built+compiled in {compile_s:.0f} s",
              flush=True)
        for name, calls, us in res["top_kernels"]:
            print(f"   {us:8.1f} us  {calls:5.1f}x  {us / max(calls, 1e-9):7.2f} us/call  {name[:110]}", flush=True)
        del llama
        if device.type == "cuda":
            torch.cuda.empty_cache()
        with open(opts.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
