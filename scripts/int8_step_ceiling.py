"""The int8 CPU decode step against a hand-written stand-in that only reads its weights (a measurement, not
part of the library; figures: docs/cpu-step.md, "Tenth pass").

The stand-in (scripts/int8_step_ceiling.cpp, compiled here with g++ and OpenMP, loaded with ctypes) holds the
bench's small shape as int8 blocks and computes every product the way inductor's blocked form does (widen,
multiply, add into independent accumulators, scale), with a layer's glue between products, in one OpenMP
region a step: no attention, no cache, no Python, no allocation. It is what this CPU gives a step that does
nothing but read and multiply the weights with the step's arithmetic: a ceiling for the compiled step, and
a yardstick that moves with the machine's read speed, unlike a fixed share of the read probe.

Every round, in turn (the order reversed each round): the read probe (bench.bandwidth), the compiled step's
graph called directly (scripts/cpu_step_parts.graph_loop, 64 steps), the probe, the stand-in (64 steps), the
probe. Printed: each side's ms a step and its read speed, each against the probe's readings just before and
after it (the median over rounds), and the paired ratio stand-in / step (the step's speed as a share of the
stand-in's).

    python scripts/int8_step_ceiling.py [--rounds 10] [--threads 2] [--vocab 512]
"""

import argparse
import ctypes
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.bandwidth import measure_read_bandwidth  # noqa: E402
from bench.run import SHAPES  # noqa: E402
from cpu_step_parts import build, graph_loop  # noqa: E402  (this script's folder is on the path when it runs)
from llama.distributed import init_distributed  # noqa: E402

STEPS = 64


def compile_stand_in(out_dir: str) -> ctypes.CDLL:
    """g++ the stand-in for the ISA torch uses (AVX-512 or AVX2), without contracting multiplies and adds
    (inductor's code does not either); torch's libgomp is already loaded, so both share one OpenMP runtime."""
    source = os.path.join(os.path.dirname(os.path.abspath(__file__)), "int8_step_ceiling.cpp")
    library = os.path.join(out_dir, "int8_step_ceiling.so")
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX512", "AVX2"):
        raise SystemExit(f"the stand-in is written for AVX-512 or AVX2; torch's CPU capability here is {capability}")
    isa = ["-march=native"] if capability == "AVX512" else ["-mavx2", "-mfma"]
    subprocess.run(["g++", "-O3", *isa, "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC", source,
                    "-o", library], check=True)
    lib = ctypes.CDLL(library)
    lib.ceiling_new.restype = ctypes.c_void_p
    lib.ceiling_new.argtypes = [ctypes.c_int] * 5
    lib.ceiling_bytes.restype = ctypes.c_double
    lib.ceiling_bytes.argtypes = [ctypes.c_void_p]
    lib.ceiling_steps.restype = ctypes.c_double
    lib.ceiling_steps.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    lib.ceiling_output.argtypes = [ctypes.c_void_p] + [ctypes.c_void_p] * 3
    lib.ceiling_free.argtypes = [ctypes.c_void_p]
    return lib


def check_output_product(lib: ctypes.CDLL, stand_in: int, vocab: int, dim: int) -> None:
    """The stand-in's last output product against torch's on the same weight (float64): it reads the whole
    weight, in its blocked layout, and multiplies as the step does. SystemExit where it does not."""
    q = torch.empty(vocab // 128, dim, 128, dtype=torch.int8)  # (NB, K, 128) as the stand-in holds it
    x, logits = torch.empty(dim), torch.empty(vocab)
    lib.ceiling_output(stand_in, q.data_ptr(), x.data_ptr(), logits.data_ptr())
    w = q.transpose(1, 2).reshape(vocab, dim).double()  # (N, K)
    want = (w @ x.double()) / 127
    bound = 1e-5 * (w.abs() @ x.double().abs()) / 127 + 1e-30
    if not bool(((logits.double() - want).abs() <= bound).all()):
        raise SystemExit(f"the stand-in's output product is off: max error {(logits.double() - want).abs().max():.3g}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=SHAPES["small"]["vocab_size"],
                   help="vocabulary size (512: both keep their weights in a 32 MiB L3 from step to step)")
    opts = p.parse_args()
    os.environ.setdefault("LLAMA_CPU_STEP", "on")
    torch.set_num_threads(opts.threads)
    init_distributed(torch.device("cpu"))
    shape = SHAPES["small"]
    llm, step_bytes = build(shape["n_layers"], torch.float32, "int8", opts.vocab)

    head_dim = shape["dim"] // shape["n_heads"]
    hidden = llm.model.layers[0].feed_forward.w2.in_features
    qkv_rows = (shape["n_heads"] + 2 * shape["n_kv_heads"]) * head_dim
    with tempfile.TemporaryDirectory() as tmp:
        lib = compile_stand_in(tmp)
        stand_in = lib.ceiling_new(shape["n_layers"], shape["dim"], hidden, qkv_rows, opts.vocab)
        stand_in_bytes = lib.ceiling_bytes(stand_in)
        lib.ceiling_steps(stand_in, 4, opts.threads)
        check_output_product(lib, stand_in, opts.vocab, shape["dim"])
        sides: Dict[str, Callable[[], float]] = {
            "compiled step": graph_loop(llm, STEPS),
            "stand-in": lambda: lib.ceiling_steps(stand_in, STEPS, opts.threads) / STEPS * 1e3,
        }
        sizes = {"compiled step": step_bytes, "stand-in": stand_in_bytes}
        ms: Dict[str, List[float]] = {name: [] for name in sides}
        beside: Dict[str, List[float]] = {name: [] for name in sides}
        reads: List[float] = []
        for r in range(opts.rounds):
            reads.append(measure_read_bandwidth(torch.device("cpu")))
            for name in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
                time.sleep(0.05)  # the other side's threads back asleep
                ms[name].append(sides[name]())
                reads.append(measure_read_bandwidth(torch.device("cpu")))
                speed = sizes[name] / (ms[name][-1] / 1e3)
                beside[name].append(speed / ((reads[-1] + reads[-2]) / 2))
        lib.ceiling_free(stand_in)

    print(f"{torch.backends.cpu.get_cpu_capability()}, int8 weights, float32 activations, {opts.threads} threads; "
          f"the step reads {step_bytes / 1e6:.1f} MB, the stand-in {stand_in_bytes / 1e6:.1f} MB")
    for name in sides:
        v = ms[name]
        print(f"  {name:14s} median {statistics.median(v):.3f} ms (best {min(v):.3f}): "
              f"{sizes[name] / statistics.median(v) / 1e6:.1f} GB/s; against the reads beside it: median "
              f"{statistics.median(beside[name]):.0%} (range {min(beside[name]):.0%}-{max(beside[name]):.0%})")
    ratios = sorted(c / s for s, c in zip(ms["compiled step"], ms["stand-in"]))
    print(f"  the step's speed as a share of the stand-in's (paired by round): median {statistics.median(ratios):.0%}"
          f" (quartiles {ratios[len(ratios) // 4]:.0%}-{ratios[3 * len(ratios) // 4]:.0%})")
    print(f"  read probe: median {statistics.median(reads) / 1e9:.1f} GB/s "
          f"(range {min(reads) / 1e9:.1f}-{max(reads) / 1e9:.1f})")


if __name__ == "__main__":
    main()
