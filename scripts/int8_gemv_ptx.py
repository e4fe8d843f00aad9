"""Where the int8 GEMV's loads fall around its programmatic-dependent-launch wait, read from the PTX Triton
makes (llama.fast.int8_gemv_kernels._gemv_kernel with PDL): the first tile of Q should be loaded before
`griddepcontrol.wait`, x, the norm's input, the residual and the store after it. Also registers and spills.

    python scripts/int8_gemv_ptx.py [--out ptx.json]     (CUDA, a Hopper GPU)
    python scripts/int8_gemv_ptx.py --offline              (no GPU: Triton's compiler for sm_90 alone)

--offline needs only Triton installed (e.g. `pip install --target DIR triton==3.6.0`, then PYTHONPATH=DIR),
so the order can be read at no device time.
"""

import argparse
import json
import re

import torch
import triton

from llama.fast import int8_gemv_kernels as GK

# Global loads and stores (predicated or not: Q's tiles are masked loads), the wait and trigger, and the opaque
# moves that keep Q's first tile ahead of the wait.
MEMORY = re.compile(r"^\s*(?:@!?%p\d+\s+)?(ld\.global\S*|st\.global\S*|griddepcontrol\.\S+|mov\.b32 %r\d+, %r\d+;)")


SIGNATURE = {"x_ptr": "*bf16", "norm_ptr": "*bf16", "w_ptr": "*i8", "scale_ptr": "*bf16", "res_ptr": "*bf16",
             "out_ptr": "*bf16", "N": "i32", "K": "i32", "k_split": "i32", "eps": "fp32"}


def compile_offline(cfg: GK.GemvConfig, prologue: int, residual: bool):
    """_gemv_kernel compiled for sm_90 (bf16 activations, even blocks, PDL) without a GPU."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    q_ahead, x_ahead, q8 = GK.LOOPS[cfg.loop]
    consts = {"BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k, "PARTIAL": False, "EVEN": True, "PROLOGUE": prologue,
              "RESIDUAL": residual, "NORM_BLOCK": 4096 if prologue == GK.RMS_NORM else 16, "PDL": True,
              "Q_AHEAD": q_ahead, "X_AHEAD": x_ahead, "Q8": q8}
    signature = dict(SIGNATURE, **{name: "constexpr" for name in consts})
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(len(SIGNATURE) - 1)}  # pointers and ints, not eps
    return triton.compile(ASTSource(GK._gemv_kernel, signature, consts, attrs), target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": cfg.num_warps})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="int8_gemv_ptx.json")
    p.add_argument("--offline", action="store_true", help="compile for sm_90 without a GPU; launch nothing")
    opts = p.parse_args()
    n, k = 4096, 4096
    if not opts.offline:
        q = torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda")
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        scale = torch.rand(n, device="cuda", dtype=torch.bfloat16)
        out = torch.empty(1, n, device="cuda", dtype=torch.bfloat16)
    report = {"triton": triton.__version__, "torch": torch.__version__, "offline": opts.offline, "kernels": []}
    for cfg in (GK.GemvConfig(2, 2048, 1, 4), GK.GemvConfig(16, 256, 1, 4)):
        for prologue, residual in ((GK.PLAIN, True), (GK.RMS_NORM, False)):
            norm_block = 4096 if prologue == GK.RMS_NORM else 16
            if opts.offline:
                kern = compile_offline(cfg, prologue, residual)
            else:
                kern = GK._gemv_kernel[(n // cfg.block_n, 1)](
                    x, scale, q, scale, out, out, n, k, k, 1e-5, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                    PARTIAL=False, EVEN=True, PROLOGUE=prologue, RESIDUAL=residual, NORM_BLOCK=norm_block,
                    PDL=True, Q_AHEAD=1, X_AHEAD=False, Q8=False, num_warps=cfg.num_warps, launch_pdl=True)
            ops = [m.group(1) for m in map(MEMORY.match, kern.asm["ptx"].splitlines()) if m]
            row = {"config": list(cfg), "prologue": prologue, "residual": residual,  # registers: None offline
                   "n_regs": getattr(kern, "n_regs", None), "n_spills": getattr(kern, "n_spills", None),
                   "memory_ops_in_order": ops}
            report["kernels"].append(row)
            shown = [o.split(" ")[0] for o in ops if not o.startswith("mov")][:10]  # the moves: in the JSON
            print(f"{tuple(cfg)} prologue {prologue} residual {residual}: regs {row['n_regs']} spills "
                  f"{row['n_spills']}; {' | '.join(shown)}", flush=True)
    if not opts.offline:
        torch.cuda.synchronize()
    with open(opts.out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
