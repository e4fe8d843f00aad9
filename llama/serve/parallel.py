"""The engine under torchrun with model parallelism: rank 0 schedules, every rank runs the same steps.

Each rank holds a shard of the model (fairscale's column- and row-parallel layers, as Llama.build makes them)
and the keys and values of its own heads in its own block pool. Only the leader (model-parallel rank 0) takes
requests, schedules, samples and keeps the block tables; before each forward it broadcasts the step's chunks
(each sequence's new tokens, first position and block table) and the followers run the same `paged_forward`
on them, so every rank writes the same blocks and joins the same collectives (the all-reduce after each
row-parallel product, the gather of the logits) in the same order. Sampling needs no broadcast: the logits
are gathered on every rank and only the leader samples.

One step goes as two broadcasts of int64 tensors on the model's device (NCCL needs CUDA tensors, gloo takes
CPU ones): the length of the step's description, then the description; a length of 0 releases the followers.
"""

from dataclasses import dataclass
from typing import List, Optional

import fairscale.nn.model_parallel.initialize as fs_init
import torch
import torch.distributed as dist

from llama.serve.forward import Chunk


def encode(chunks: List[Chunk]) -> List[int]:
    """[S, then (start, n_tokens, n_blocks) of each chunk, then each chunk's tokens and block table]."""
    flat = [len(chunks)]
    for c in chunks:
        flat += [c.start, len(c.tokens), len(c.table)]
    for c in chunks:
        flat += list(c.tokens) + list(c.table)
    return flat


def decode(flat: List[int]) -> List[Chunk]:
    n = flat[0]
    heads = [flat[1 + 3 * i : 4 + 3 * i] for i in range(n)]
    at = 1 + 3 * n
    chunks = []
    for start, n_tokens, n_blocks in heads:
        tokens, table = flat[at : at + n_tokens], flat[at + n_tokens : at + n_tokens + n_blocks]
        chunks.append(Chunk(tokens, start, table))
        at += n_tokens + n_blocks
    return chunks


@dataclass
class Ranks:
    """This process's place in the model-parallel group: one rank alone (world 1) sends nothing."""

    rank: int
    world: int
    device: torch.device
    group: Optional[object] = None
    src: int = 0  # the global rank of model-parallel rank 0

    @classmethod
    def of_model_parallel_group(cls, device: torch.device) -> "Ranks":
        if not (dist.is_available() and dist.is_initialized() and fs_init.model_parallel_is_initialized()):
            return cls(0, 1, device)
        world = fs_init.get_model_parallel_world_size()
        if world == 1:
            return cls(0, 1, device)
        return cls(fs_init.get_model_parallel_rank(), world, device, fs_init.get_model_parallel_group(),
                   fs_init.get_model_parallel_src_rank())

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def smallest(self, n: int) -> int:
        """The smallest of every rank's n (each rank's KV budget: the pools must hold the same block ids)."""
        if self.world == 1:
            return n
        t = torch.tensor([n], dtype=torch.long, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return int(t.item())

    def send(self, chunks: Optional[List[Chunk]]) -> None:
        """On the leader: broadcast a step's chunks (None: no more steps) to the followers."""
        if self.world == 1:
            return
        flat = encode(chunks) if chunks is not None else []
        size = torch.tensor([len(flat)], dtype=torch.long, device=self.device)
        dist.broadcast(size, self.src, group=self.group)
        if flat:
            dist.broadcast(torch.tensor(flat, dtype=torch.long, device=self.device), self.src, group=self.group)

    def receive(self) -> Optional[List[Chunk]]:
        """On a follower: the leader's next step (None when released)."""
        size = torch.zeros(1, dtype=torch.long, device=self.device)
        dist.broadcast(size, self.src, group=self.group)
        if size.item() == 0:
            return None
        flat = torch.empty(int(size.item()), dtype=torch.long, device=self.device)
        dist.broadcast(flat, self.src, group=self.group)
        return decode(flat.tolist())
