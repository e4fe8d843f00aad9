"""Run by test_quantize.py, under torchrun or alone: build with quantize="int8", then save this rank's int8
weights and scales under Meta's names (fused layers split into their parts), and on rank 0 the logits of fixed
tokens and a greedy generation."""

import sys

import torch
import torch.distributed as dist

from llama import Llama
from llama.fast.quantize import Int8Linear


def meta_pieces(llama: Llama) -> dict:
    """{Meta's name: (int8 rows, scales)} of this rank's slice of every quantized layer."""
    pieces = {}
    for path, layer in llama.model.named_modules():
        if not isinstance(layer, Int8Linear):
            continue
        owner = path.rsplit(".", 1)[0] + "." if "." in path else ""
        parts = layer.parts or [(path.rsplit(".", 1)[-1], layer.out_features)]
        sizes = [rows for _, rows in parts]
        for (name, _), q, scale in zip(parts, layer.weight.split(sizes), layer.scale.split(sizes)):
            pieces[owner + name] = (q.clone(), scale.clone())
    return pieces


def main(ckpt_dir: str, out_path: str) -> None:
    llama = Llama.build(ckpt_dir, None, max_seq_len=48, max_batch_size=2, device="cpu", quantize="int8")
    tokens = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(0))
    logits = llama.model.forward(tokens, 0)
    generated, _ = llama.generate([[256, 5, 6, 7], [256, 1]], max_gen_len=12, temperature=0)
    rank, world = dist.get_rank(), dist.get_world_size()
    gathered = [None] * world
    dist.all_gather_object(gathered, meta_pieces(llama))
    if rank == 0:
        torch.save({"logits": logits, "generated": generated, "world": world, "ranks": gathered}, out_path)


if __name__ == "__main__":
    main(*sys.argv[1:3])
