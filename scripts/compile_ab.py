"""compile=True against compile=True without one of its options, in one process, on one model.

    python scripts/compile_ab.py OPTION [--shape llama3-8b] [--batch 1] [--rounds 8]

OPTION is one of llama.fast.loop.compile_options()'s keys (e.g. triton.enable_pdl, max_autotune). Both
steps decode the same prompts greedily; rounds alternate, the order flipping every round, and each round
times a 1-token and a full run of each (decode tok/s = the difference). Prints every round, the medians
and whether the two steps chose the same tokens.

Why one process: each process autotunes afresh, and the kernels it picks move the 8B batch-1 step by a few
percent from process to process (bench/results/GPU_RESULTS.md, fourth session), more than most changes worth
measuring; two steps compiled in one process share inductor's choices for the same matrix products.
Measured on an H100, Llama 3 8B, batch 1, OPTION triton.enable_pdl: 172.6 tok/s with it, 168.1 without
(medians of 8 rounds; the same tokens).
"""

import argparse
import statistics

import torch

from llama import Llama
from bench.run import SHAPES, build_ours, random_weights, timed
from llama.fast.step import compile_options
from llama.distributed import init_distributed, pick_device
from llama.model import ModelArgs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("option", choices=sorted(compile_options()))
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--device", default=None, help="default: CUDA if available")
    opts = p.parse_args()

    device = pick_device(opts.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    init_distributed(device)
    args = ModelArgs.from_params(SHAPES[opts.shape], max_seq_len=opts.prompt_len + opts.new_tokens,
                                 max_batch_size=opts.batch)
    dtype = torch.bfloat16
    with_option = build_ours(args, random_weights(args, dtype, device, seed=0), device, dtype, True, True)
    without = Llama(with_option.model, with_option.tokenizer, with_option.formatter, compile=True)
    step = without.decode_step
    options = {k: v for k, v in compile_options().items() if k != opts.option}
    step.compiled = torch.compile(step._step, options=options, fullgraph=True, dynamic=False)
    contenders = {"with": with_option, "without": without}
    prompts = torch.randint(0, args.vocab_size, (opts.batch, opts.prompt_len)).tolist()

    def run(llama: Llama, n: int):
        """(seconds, tokens) of a greedy generation of n tokens."""
        return timed(lambda: llama.generate(prompts, max_gen_len=n, temperature=0)[0], device)

    tokens = {}
    for name, llama in contenders.items():  # compiles, autotunes, records the graphs
        for _ in range(2):
            run(llama, 1)
            _, tokens[name] = run(llama, opts.new_tokens)
    print(f"same tokens: {tokens['with'] == tokens['without']}", flush=True)
    speeds = {name: [] for name in contenders}
    for r in range(opts.rounds):
        for name in list(contenders) if r % 2 == 0 else list(contenders)[::-1]:
            full, _ = run(contenders[name], opts.new_tokens)
            first, _ = run(contenders[name], 1)
            speeds[name].append(opts.batch * (opts.new_tokens - 1) / (full - first))
        print(f"round {r + 1}: " + "  ".join(f"{n} {s[-1]:.1f}" for n, s in speeds.items()), flush=True)
    for name, s in speeds.items():
        print(f"{name} {opts.option}: median {statistics.median(s):.1f} tok/s, best {max(s):.1f}")


if __name__ == "__main__":
    main()
