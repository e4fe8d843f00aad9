"""Time the compiled decode step under other torch.compile settings: one GPU call, several variants.

    python scripts/compile_variants.py VARIANT [python -m llama.bench options ...]

VARIANT names what changes from `compile=True` (CUDA graphs + coordinate-descent tuning, llama/decoding.py):
  default    nothing (the baseline for the others, measured in the same call)
  autotune   + inductor's max_autotune (Triton matrix-product templates tried against cuBLAS)
  math       attention through SDPA's math backend, which inductor fuses into its own kernels
  (several may be joined with '+', e.g. autotune+math). Run each in its own process, e.g.

    B="--shape llama3-8b --device cuda --batch 1 --dtype bfloat16 --prompt-len 128 --repeats 3 --no-hf --compile"
    for v in default autotune math autotune+math; do python scripts/compile_variants.py $v $B --out $v.json; done

Measured on an H100 (bench/GPU_RESULTS.md): default 167.6 tok/s, autotune alone (without the tuning) 165.3,
math 161.8.
"""

import sys

import torch

from llama.bench import main
from llama.decoding import DecodeStep

KNOWN = {"default", "autotune", "math"}


def apply(variants: set) -> None:
    """Patch torch.compile / DecodeStep for the duration of this process."""
    if "autotune" in variants:
        compile_fn = torch.compile

        def compile_with_autotune(fn, **kwargs):
            kwargs["options"] = dict(kwargs.get("options") or {}, max_autotune=True)
            return compile_fn(fn, **kwargs)

        torch.compile = compile_with_autotune
    if "math" in variants:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        step = DecodeStep._step

        def step_with_math_attention(self, *args):
            with sdpa_kernel([SDPBackend.MATH]):
                return step(self, *args)

        DecodeStep._step = step_with_math_attention


if __name__ == "__main__":
    if len(sys.argv) < 2 or not set(sys.argv[1].split("+")) <= KNOWN:
        sys.exit(f"usage: python scripts/compile_variants.py {'|'.join(sorted(KNOWN))}[+...] [bench options]")
    apply(set(sys.argv[1].split("+")))
    print(f"variant {sys.argv[1]}", flush=True)
    main(sys.argv[2:])
