"""Run by test_speculative_api.py, under torchrun or alone: build the target (split over the ranks) and a
draft model, decode greedily plainly and speculatively (prompt lookup, the draft model); rank 0 writes the
tokens as JSON."""

import json
import sys

import torch.distributed as dist

from llama import Llama
from llama.speculative import DraftModel, PromptLookup, Speculation

BANNED = [t for t in range(512) if not ord("a") <= t <= ord("z") and t not in (257, 264, 265)]
PROMPTS = [list(b"abcabcabcab"), list(b"xyz")]


def main(ckpt_dir: str, draft_dir: str, out_path: str) -> None:
    llama = Llama.build(ckpt_dir, None, max_seq_len=64, max_batch_size=2, device="cpu")
    draft = Llama.build(draft_dir, None, max_seq_len=64, max_batch_size=1, device="cpu")
    kw = dict(temperature=0, banned_token_ids=BANNED)
    result = {"world": dist.get_world_size(), "plain": llama.generate(PROMPTS, 30, **kw)[0]}
    lookup = Speculation(PromptLookup(), k=4)
    result["lookup"] = llama.generate(PROMPTS, 30, speculative=lookup, **kw)[0]
    result["draft"] = llama.generate(PROMPTS, 30, speculative=Speculation(DraftModel(draft), k=3), **kw)[0]
    result["accepted"] = lookup.stats.accepted
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main(*sys.argv[1:4])
