"""A/B of the CPU decode step compiled whole (llama.fast.cpu_step), in one process, the two sides taking turns
(the order reversed every round), on the bench's small shape with random weights (a measurement, not part of
the library; figures: docs/cpu-step.md, "Seventh pass" and "Eighth pass"):

- `pick`: greedy decoding (64 tokens) with the greedy pick made inside the step (decode_and_pick) against the
  pick made by the loop's sampler; reports each side's time a token and the part of it spent outside the step.
- `fma`: two models on the same weights, their steps compiled with multiplies and adds fused
  (`-ffp-contract=fast`) and apart; reports the time a step and the median of the paired ratios.
- `direct`: greedy decoding (64 tokens) with the compiled graph called directly after the first step
  (cpu_step.DirectCall) against every step through torch.compile's frame; reports each side's time a token.
- `lanes`: two models on the same weights, every product in its default form (LLAMA_CPU_FORMS=off, so both
  hold the same forms), the blocked forms summing `--lanes` columns a sum in the second (llama.fast.blocked's
  lanes()); greedy decoding (64 tokens), each side's time a token.

    python scripts/cpu_step_ab.py pick --dtype float32 --quantize int8
    ATEN_CPU_CAPABILITY=avx2 TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python scripts/cpu_step_ab.py fma --quantize int8

(Emulating AVX2 on an AVX-512 machine needs an inductor cache of its own: llama.fast.cpu_forms.cache_per_isa.)
"""

import argparse
import os
import statistics
import sys
import time
from typing import Callable, Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch._inductor.config as inductor_config  # noqa: E402
from bench.run import SHAPES, build_ours, random_weights  # noqa: E402
from llama.distributed import init_distributed  # noqa: E402
from llama.fast import blocked  # noqa: E402
from llama.model import ModelArgs  # noqa: E402
from llama.sampling import Sampler  # noqa: E402


def build(args: ModelArgs, sd: Dict[str, torch.Tensor], dtype: torch.dtype, quantize: str):
    llama = build_ours(args, sd, torch.device("cpu"), dtype, fast=True, compile=False, quantize=quantize or None)
    if not hasattr(llama.decode_step, "decode_and_pick"):
        raise SystemExit("the compiled step was not chosen: run with LLAMA_CPU_STEP=on")
    return llama


def turns(sides: Dict[str, Callable[[], float]], rounds: int) -> Dict[str, List[float]]:
    """Each side's figure per round, the sides taking turns (the order reversed every round)."""
    out: Dict[str, List[float]] = {name: [] for name in sides}
    for r in range(rounds):
        for name in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
            out[name].append(sides[name]())
    return out


def report(figures: Dict[str, List[float]], unit: str) -> None:
    for name, v in figures.items():
        print(f"  {name:24s} best {min(v):.3f} median {statistics.median(v):.3f} {unit}")
    a, b = figures.values()
    ratios = sorted(x / y for x, y in zip(a, b))
    print(f"  paired ratio {list(figures)[0]} / {list(figures)[1]}: median {statistics.median(ratios):.3f}, "
          f"quartiles {ratios[len(ratios) // 4]:.3f}-{ratios[3 * len(ratios) // 4]:.3f}")


def time_a_token(llm, prompts: List[List[int]], n: int) -> float:
    """ms a decoded token: greedy decoding of n tokens, less a 1-token run (the prefill and first pick)."""
    t0 = time.perf_counter()
    llm.generate(prompts, max_gen_len=n, temperature=0.0)
    total = time.perf_counter() - t0
    t1 = time.perf_counter()
    llm.generate(prompts, max_gen_len=1, temperature=0.0)
    return (total - (time.perf_counter() - t1)) / (n - 1) * 1e3


def ab_pick(args: ModelArgs, sd, dtype: torch.dtype, quantize: str, rounds: int) -> None:
    llm = build(args, sd, dtype, quantize)
    step, plain = llm.decode_step, Sampler.plain_greedy
    in_step = {"total": 0.0}

    class TimedStep:  # the step, timed: the rest of a token's time is the loop's
        def __call__(self, *a):
            return self.timed(step, *a)

        def decode_and_pick(self, *a):
            return self.timed(step.decode_and_pick, *a)

        @staticmethod
        def timed(fn, *a):
            t0 = time.perf_counter()
            out = fn(*a)
            in_step["total"] += time.perf_counter() - t0
            return out

    llm.decode_step = TimedStep()
    prompts, n = [[1] * 16], 64
    outside: Dict[str, List[float]] = {"pick in the step": [], "pick by the sampler": []}

    def side(name: str) -> Callable[[], float]:
        def run() -> float:
            Sampler.plain_greedy = plain if name == "pick in the step" else property(lambda s: False)
            in_step["total"] = 0.0
            t0 = time.perf_counter()
            llm.generate(prompts, max_gen_len=n, temperature=0.0)
            total = time.perf_counter() - t0
            steps = in_step["total"]
            t1 = time.perf_counter()
            llm.generate(prompts, max_gen_len=1, temperature=0.0)  # the prefill and first pick, taken off
            decode = total - (time.perf_counter() - t1)
            outside[name].append((decode - steps) / (n - 1) * 1e3)
            return decode / (n - 1) * 1e3
        return run

    try:
        side("pick in the step")(), side("pick by the sampler")()  # warm-up
        for v in outside.values():
            v.clear()
        figures = turns({name: side(name) for name in outside}, rounds)
    finally:
        Sampler.plain_greedy = plain
    print("time a token:")
    report(figures, "ms")
    print("of which outside the step:")
    report(outside, "ms")


def ab_direct(args: ModelArgs, sd, dtype: torch.dtype, quantize: str, rounds: int) -> None:
    llm = build(args, sd, dtype, quantize)
    step = llm.decode_step
    direct = step.direct  # (batch size, threads) -> DirectCall, filled at the first step of a batch size

    class Never(dict):  # no DirectCall ever found or kept: every step through torch.compile
        def get(self, key, default=None):
            return None

        def __setitem__(self, key, value):
            pass

        def __contains__(self, key):
            return True

    prompts, n = [[1] * 16], 64

    def side(use_direct: bool) -> Callable[[], float]:
        def run() -> float:
            step.direct = direct if use_direct else Never()
            return time_a_token(llm, prompts, n)
        return run

    sides = {"graph called directly": side(True), "through torch.compile": side(False)}
    for run in sides.values():
        run()  # warm-up
    step.direct = direct
    tokens = [llm.generate(prompts, max_gen_len=n, temperature=0.0)[0]]
    step.direct = Never()
    tokens.append(llm.generate(prompts, max_gen_len=n, temperature=0.0)[0])
    print(f"same tokens both ways: {tokens[0] == tokens[1]}")
    print("time a token:")
    report(turns(sides, rounds), "ms")
    step.direct = direct


def ab_lanes(args: ModelArgs, sd, dtype: torch.dtype, quantize: str, rounds: int, columns: int) -> None:
    os.environ["LLAMA_CPU_FORMS"] = "off"
    default = blocked.lanes
    models = {}
    for name, lanes in ((f"lanes() ({default(torch.int8 if quantize else dtype)})", default),
                        (f"{columns} columns a sum", lambda dt: columns)):
        blocked.lanes = lanes  # read as each blocked form is made, below
        try:
            models[name] = build(args, sd, dtype, quantize)
        finally:
            blocked.lanes = default
    prompts, n = [[1] * 16], 64
    tokens = {name: llm.generate(prompts, max_gen_len=n, temperature=0.0)[0] for name, llm in models.items()}
    print(f"same tokens both ways: {len({str(t) for t in tokens.values()}) == 1}")

    print("time a token:")
    report(turns({name: (lambda llm=llm: time_a_token(llm, prompts, n)) for name, llm in models.items()}, rounds),
           "ms")


def ab_fma(args: ModelArgs, sd, dtype: torch.dtype, quantize: str, rounds: int) -> None:
    tokens, positions, kv_len = torch.zeros(1, dtype=torch.long), torch.full((1,), 40), 64
    steps = {}
    previous = inductor_config.cpp.enable_floating_point_contract_flag
    for name, flag in (("fused (-ffp-contract=fast)", "fast"), ("apart (off)", "off")):
        inductor_config.cpp.enable_floating_point_contract_flag = flag  # read when the step compiles, below
        step = build(args, sd, dtype, quantize).decode_step
        with torch.inference_mode():
            step.run(tokens, positions, kv_len)
        steps[name] = step.run
    inductor_config.cpp.enable_floating_point_contract_flag = previous

    def side(run: Callable) -> Callable[[], float]:
        def timed() -> float:
            with torch.inference_mode():
                t0 = time.perf_counter()
                for _ in range(4):
                    run(tokens, positions, kv_len)
                return (time.perf_counter() - t0) / 4 * 1e3
        return timed

    print("time a step:")
    report(turns({name: side(run) for name, run in steps.items()}, rounds), "ms")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["pick", "fma", "direct", "lanes"])
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--quantize", choices=["", "int8"], default="")
    p.add_argument("--rounds", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--lanes", type=int, default=16, help="lanes: columns a sum in the second model")
    opts = p.parse_args()
    os.environ.setdefault("LLAMA_CPU_STEP", "on")
    torch.set_num_threads(opts.threads)
    init_distributed(torch.device("cpu"))
    dtype = getattr(torch, opts.dtype)
    args = ModelArgs(**SHAPES["small"], max_batch_size=1, max_seq_len=256)
    sd = random_weights(args, dtype, torch.device("cpu"), 0)
    print(f"{torch.backends.cpu.get_cpu_capability()}, {opts.dtype}, {opts.quantize or 'no quantization'}, "
          f"{opts.threads} threads")
    if opts.what == "lanes":
        ab_lanes(args, sd, dtype, opts.quantize, opts.rounds, opts.lanes)
    else:
        {"pick": ab_pick, "fma": ab_fma, "direct": ab_direct}[opts.what](args, sd, dtype, opts.quantize, opts.rounds)


if __name__ == "__main__":
    main()
