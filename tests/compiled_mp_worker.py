"""Run by test_model_parallel.py, under torchrun or alone: build from a (sharded) checkpoint in float32 on the
CPU, with compile=True or not, and on rank 0 save the greedy tokens and log-probabilities of two generations
(batch 1 and batch 2: the one-row and the several-row compiled steps)."""

import sys

import torch
import torch.distributed as dist

from llama import Llama


def main(ckpt_dir: str, out_path: str, compile: str, quantize: str = "none") -> None:
    llama = Llama.build(ckpt_dir, None, max_seq_len=48, max_batch_size=2, device="cpu", dtype=torch.float32,
                        compile=compile == "compile", quantize=None if quantize == "none" else quantize)
    results = {}
    for name, prompts in (("one", [[256, 5, 6, 7]]), ("two", [[256, 5, 6, 7], [256, 1]])):
        tokens, logprobs = llama.generate(prompts, max_gen_len=10, temperature=0, logprobs=True)
        results[name] = (tokens, logprobs)
    if dist.get_rank() == 0:
        torch.save({"results": results, "world": dist.get_world_size()}, out_path)


if __name__ == "__main__":
    main(*sys.argv[1:])
