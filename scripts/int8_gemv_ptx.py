"""Where the int8 GEMV's loads fall around its programmatic-dependent-launch wait, read from the PTX Triton
makes (llama.fast.int8_gemv._gemv_kernel with PDL): the first tile of Q should be loaded before
`griddepcontrol.wait`, x, the norm's input, the residual and the store after it. Also registers and spills.

    python scripts/int8_gemv_ptx.py [--out ptx.json]     (CUDA, a Hopper GPU)
"""

import argparse
import json
import re

import torch
import triton

from llama.fast import int8_gemv as G

# Global loads and stores (predicated or not: Q's tiles are masked loads), the wait and trigger, and the opaque
# moves that keep Q's first tile ahead of the wait.
MEMORY = re.compile(r"^\s*(?:@!?%p\d+\s+)?(ld\.global\S*|st\.global\S*|griddepcontrol\.\S+|mov\.b32 %r\d+, %r\d+;)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="int8_gemv_ptx.json")
    opts = p.parse_args()
    n, k = 4096, 4096
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda")
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    scale = torch.rand(n, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(1, n, device="cuda", dtype=torch.bfloat16)
    report = {"triton": triton.__version__, "torch": torch.__version__, "kernels": []}
    for cfg in (G.GemvConfig(2, 2048, 1, 4), G.GemvConfig(16, 256, 1, 4)):
        for prologue, residual in ((G.PLAIN, True), (G.RMS_NORM, False)):
            norm_block = 4096 if prologue == G.RMS_NORM else 16
            kern = G._gemv_kernel[(n // cfg.block_n, 1)](
                x, scale, q, scale, out, out, n, k, k, 1e-5, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                PARTIAL=False, EVEN=True, PROLOGUE=prologue, RESIDUAL=residual, NORM_BLOCK=norm_block, PDL=True,
                num_warps=cfg.num_warps, launch_pdl=True)
            ops = [m.group(1) for m in map(MEMORY.match, kern.asm["ptx"].splitlines()) if m]
            row = {"config": list(cfg), "prologue": prologue, "residual": residual, "n_regs": kern.n_regs,
                   "n_spills": kern.n_spills, "memory_ops_in_order": ops}
            report["kernels"].append(row)
            print(f"{tuple(cfg)} prologue {prologue} residual {residual}: regs {kern.n_regs} spills "
                  f"{kern.n_spills}; {' | '.join(ops[:14])}", flush=True)
    torch.cuda.synchronize()
    with open(opts.out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
