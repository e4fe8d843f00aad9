"""Run by test_serve_parallel.py, under torchrun or alone: the serving engine on a (sharded) checkpoint. The
leader (rank 0) runs a fixed mix (mixed lengths, mid-decode arrivals, a shared prefix, a two-turn session,
a budget tight enough to preempt) while the other ranks follow; then every rank runs each prompt alone
through Llama.generate (Meta's model-parallel loop). Rank 0 saves both."""

import sys

import torch
import torch.distributed as dist

from llama import Llama
from llama.serve.engine import Engine

GREEDY = dict(temperature=0, ignore_eos=True)


def prompt(n: int, seed: int):
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def lead(engine: Engine):
    """The mix; returns [(prompt, max_new, tokens, logprobs)] of every request."""
    common = prompt(10, 99)
    first = [(common + prompt(3 + k, k), 8 + k) for k in range(3)] + [(prompt(30, 5), 14), (prompt(4, 6), 9)]
    done, ids = [], []
    for k, (p, new) in enumerate(first):
        ids.append((p, new, engine.add_request(p, logprobs=True, max_new_tokens=new, session_id=k, **GREEDY)))
        if k == 0:
            engine.step()  # the first prefills the common prefix; the others arrive as it decodes
    list(engine.run())
    assert engine.preemptions > 0 and engine.reused_tokens > 0, (engine.preemptions, engine.reused_tokens)
    second = []
    for k, (p, new, rid) in enumerate(ids):  # a second turn of every session
        out = engine.outputs[rid]
        done.append((p, new, out.tokens, out.logprobs))
        nxt = p + out.tokens + prompt(2, 50 + k)
        second.append((nxt, 6, engine.add_request(nxt, logprobs=True, max_new_tokens=6, session_id=k, **GREEDY)))
    list(engine.run())
    for p, new, rid in second:
        out = engine.outputs[rid]
        done.append((p, new, out.tokens, out.logprobs))
    assert any(engine.outputs[rid].cached_tokens for *_, rid in second)  # sessions resumed
    engine.release_followers()
    return done


def main(ckpt_dir: str, tokenizer_path: str, out_path: str) -> None:
    llama = Llama.build(ckpt_dir, tokenizer_path, max_seq_len=64, max_batch_size=1, device="cpu")
    engine = Engine(llama, n_blocks=22, block_size=4)
    rank = dist.get_rank()
    if rank == 0:
        done = lead(engine)
    else:
        assert engine.follow() > 0
    # Every rank runs each prompt alone through Meta's loop, together: the leader says which.
    box = [[(p, new) for p, new, *_ in done] if rank == 0 else None]
    dist.broadcast_object_list(box, 0)
    alone = [llama.generate([p], new, logprobs=True, **GREEDY) for p, new in box[0]]
    if rank == 0:
        torch.save({"world": dist.get_world_size(), "engine": done,
                    "alone": [(t[0], lp[0]) for t, lp in alone]}, out_path)


if __name__ == "__main__":
    main(*sys.argv[1:4])
