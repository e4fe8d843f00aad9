"""Run under torchrun by test_model_parallel.py: build from a sharded checkpoint, then rank 0 saves the
logits of fixed tokens and a greedy generation."""

import os
import sys

import torch
import torch.distributed as dist

from llama import Llama


def main(ckpt_dir: str, tokenizer_path: str, out_path: str) -> None:
    device = os.environ.get("LLAMA_TEST_DEVICE", "cpu")
    llama = Llama.build(ckpt_dir, tokenizer_path, max_seq_len=48, max_batch_size=2, device=device)
    tokens = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(0))
    logits = llama.model.forward(tokens.to(llama.device), 0).cpu()
    generated, _ = llama.generate([[256, 5, 6, 7], [256, 1]], max_gen_len=12, temperature=0)
    text = llama.text_completion(["Hello"], max_gen_len=8, temperature=0)
    if dist.get_rank() == 0:
        torch.save({"logits": logits, "generated": generated, "text": text,
                    "world": dist.get_world_size()}, out_path)


if __name__ == "__main__":
    main(*sys.argv[1:4])
