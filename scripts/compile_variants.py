"""Time the compiled decode step under other torch.compile settings: one GPU call, several variants.

    python scripts/compile_variants.py VARIANT [python -m llama.bench options ...]

VARIANT names what changes from `compile=True` (CUDA graphs + max_autotune + coordinate-descent tuning +
programmatic dependent launch where torch has it, llama/fast/loop.py):
  default      nothing (the baseline for the others, measured in the same call)
  no-autotune  without max_autotune (cuBLAS for every matrix product)
  no-pdl       without programmatic dependent launch
  math         attention through SDPA's math backend, which inductor fuses into its own kernels
  gemv         one-row products written as multiply-and-sum, so inductor generates (and tunes) their kernels
               instead of choosing between its templates and cuBLAS
  cublaslt     cuBLASLt as torch's preferred BLAS library
  (several may be joined with '+', e.g. no-autotune+math). Run each in its own process, e.g.

    B="--shape llama3-8b --device cuda --batch 1 --dtype bfloat16 --prompt-len 128 --repeats 3 --no-hf --compile"
    for v in default no-autotune gemv cublaslt; do python scripts/compile_variants.py $v $B --out $v.json; done

Measured on an H100, batch 1 (bench/results/GPU_RESULTS.md), before max_autotune joined compile=True, in one call:
graphs + tuning 151.5 tok/s, with max_autotune 167.9, gemv 150.9, cublaslt 156.0; an earlier call: graphs
alone 152.1, graphs + tuning 167.6, max_autotune without the tuning 165.3, math 161.8.
"""

import sys

import torch

import llama.fast.step as decoding
from bench.run import main
from llama.fast.step import DecodeStep

KNOWN = {"default", "no-autotune", "no-pdl", "math", "gemv", "cublaslt"}


def apply(variants: set) -> None:
    """Patch llama.fast.step (compile_options, DecodeStep) for the duration of this process."""
    dropped = {"no-autotune": "max_autotune", "no-pdl": "triton.enable_pdl"}
    if variants & dropped.keys():
        options = decoding.compile_options()
        for variant in variants & dropped.keys():
            options.pop(dropped[variant], None)
        decoding.compile_options = lambda: options  # what DecodeStep compiles with
    if "math" in variants:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        step = DecodeStep._step

        def step_with_math_attention(self, *args):
            with sdpa_kernel([SDPBackend.MATH]):
                return step(self, *args)

        DecodeStep._step = step_with_math_attention
    if "gemv" in variants:
        from llama.fast.layers import FastLinear

        linear = FastLinear.forward

        def forward_as_sum(self, x):
            if x.shape[-2] != 1 or self.weight is None:
                return linear(self, x)
            # x (bsz, 1, in) -> (bsz, 1, 1, in) * W (out, in) -> sum over in: (bsz, 1, out)
            return (x.unsqueeze(-2) * self.weight).sum(-1)

        FastLinear.forward = forward_as_sum
    if "cublaslt" in variants:
        torch.backends.cuda.preferred_blas_library("cublaslt")


if __name__ == "__main__":
    if len(sys.argv) < 2 or not set(sys.argv[1].split("+")) <= KNOWN:
        sys.exit(f"usage: python scripts/compile_variants.py {'|'.join(sorted(KNOWN))}[+...] [bench options]")
    apply(set(sys.argv[1].split("+")))
    print(f"variant {sys.argv[1]}", flush=True)
    main(sys.argv[2:])
