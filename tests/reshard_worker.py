"""One rank of a multi-process test (tests/test_reshard.py starts it like torchrun would, with RANK,
WORLD_SIZE, MASTER_ADDR/PORT): builds each checkpoint of a job at each model-parallel size and, on rank 0,
saves the logits and a greedy generation."""

import json
import os
import sys

import torch

from llama import Llama


def main(job_path: str) -> None:
    job = json.loads(open(job_path).read())
    tokens = torch.tensor(job["tokens"])
    for mp in job["mp_sizes"]:
        for case in job["cases"]:
            generator = Llama.build(case["ckpt"], case["tokenizer"], max_seq_len=32, max_batch_size=2,
                                    model_parallel_size=mp, device="cpu")
            logits = generator.model.forward(tokens, 0)
            generated, _ = generator.generate(job["tokens"], max_gen_len=4, temperature=0)
            if int(os.environ["RANK"]) == 0:
                torch.save({"logits": logits, "generated": generated},
                           os.path.join(job["out"], f"{case['name']}-mp{mp}.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
