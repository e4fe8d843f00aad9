"""The paged KV cache: one pool of fixed-size blocks of key/value slots per layer, handed out to sequences a
block at a time, and each sequence's block table (which blocks hold its positions, in order).

The reference model's cache (llama.model.Attention) holds max_batch_size x max_seq_len positions whether a row
needs them or not. Here memory is a budget of blocks: a sequence holds ceil(its length / block_size) blocks,
takes one more when its length crosses a block boundary, and gives them all back when it finishes or is
preempted. Position p of a sequence lives in slot `table[p // block_size] * block_size + p % block_size`.
"""

import math
from typing import List, Optional

import torch

from llama.model import Transformer

# Positions per block, as in vLLM's default: small enough that a sequence wastes at most 15 slots.
DEFAULT_BLOCK_SIZE = 16


def bytes_per_block(model: Transformer, block_size: int) -> int:
    """The memory one block takes over every layer: keys and values of block_size positions."""
    attention = model.layers[0].attention
    element = model.rope_cos.new_empty((), dtype=model.tok_embeddings.weight.dtype).element_size()
    return 2 * model.n_layers * block_size * attention.n_local_kv_heads * attention.head_dim * element


def blocks_for_budget(
    model: Transformer,
    block_size: int = DEFAULT_BLOCK_SIZE,
    *,
    n_blocks: Optional[int] = None,
    memory_bytes: Optional[int] = None,
    memory_fraction: Optional[float] = None,
) -> int:
    """How many blocks a budget buys: n_blocks as given, or as many as fit in memory_bytes, or in
    memory_fraction of the device's free memory (CUDA only). Exactly one of the three must be given.

    Raises:
        ValueError: none or several budgets given, a budget out of range, or one that buys no block.
    """
    given = {k: v for k, v in dict(n_blocks=n_blocks, memory_bytes=memory_bytes,
                                   memory_fraction=memory_fraction).items() if v is not None}
    if len(given) != 1:
        raise ValueError(f"give exactly one of n_blocks, memory_bytes, memory_fraction; got {sorted(given) or 'none'}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    per_block = bytes_per_block(model, block_size)
    if n_blocks is not None:
        blocks = n_blocks
    elif memory_bytes is not None:
        if isinstance(memory_bytes, bool) or not isinstance(memory_bytes, int) or memory_bytes < 1:
            raise ValueError(f"memory_bytes must be a positive integer, got {memory_bytes!r}")
        blocks = memory_bytes // per_block
    else:
        if not 0 < memory_fraction <= 1:
            raise ValueError(f"memory_fraction must be in (0, 1], got {memory_fraction!r}")
        device = model.rope_cos.device
        if device.type != "cuda":
            raise ValueError(f"memory_fraction needs a CUDA device (the model is on {device}): give memory_bytes")
        free, _ = torch.cuda.mem_get_info(device)
        blocks = int(free * memory_fraction) // per_block
    if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1:
        raise ValueError(f"the KV cache budget {given} buys {blocks!r} blocks of {per_block} bytes: need at least 1")
    return blocks


class BlockAllocator:
    """Hands out block ids 0 .. n_blocks - 1 and takes them back. Lowest free ids first, so runs repeat."""

    def __init__(self, n_blocks: int):
        self.n_blocks = n_blocks
        self.free: List[int] = list(range(n_blocks - 1, -1, -1))  # a stack: pop() gives the lowest id

    @property
    def n_free(self) -> int:
        return len(self.free)

    def allocate(self, n: int) -> List[int]:
        """n fresh block ids. Raises RuntimeError if fewer are free: callers check n_free first."""
        if n > len(self.free):
            raise RuntimeError(f"asked for {n} KV blocks with {len(self.free)} free")
        return [self.free.pop() for _ in range(n)]

    def release(self, blocks: List[int]) -> None:
        """Give blocks back; a block released twice would be handed to two sequences, so it is refused."""
        if len(set(blocks)) != len(blocks) or set(blocks) & set(self.free):
            raise RuntimeError(f"KV blocks {blocks} released twice")
        self.free.extend(blocks)
        self.free.sort(reverse=True)


class PagedKVCache:
    """Keys and values of every layer in blocks: `keys[layer]` and `values[layer]` are each
    (n_blocks * block_size, n_kv_heads, head_dim), slot s of block b at row b * block_size + s; the layout lets
    one index_copy_ write a step's new positions and one index_select gather a sequence's."""

    def __init__(self, model: Transformer, n_blocks: int, block_size: int = DEFAULT_BLOCK_SIZE):
        attention = model.layers[0].attention
        dtype = model.tok_embeddings.weight.dtype
        device = model.rope_cos.device
        shape = (n_blocks * block_size, attention.n_local_kv_heads, attention.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(model.n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(model.n_layers)]
        self.block_size = block_size
        self.allocator = BlockAllocator(n_blocks)

    @property
    def n_blocks(self) -> int:
        return self.allocator.n_blocks

    def blocks_needed(self, n_positions: int) -> int:
        return math.ceil(n_positions / self.block_size)

    def grow(self, table: List[int], n_positions: int) -> None:
        """Extend `table` (in place) so that it covers n_positions; the caller checked there are enough free."""
        missing = self.blocks_needed(n_positions) - len(table)
        if missing > 0:
            table.extend(self.allocator.allocate(missing))

    def free(self, table: List[int]) -> None:
        """Give every block of `table` back and empty it."""
        self.allocator.release(list(table))
        table.clear()

    def slots(self, table: List[int], start: int, end: int, device: torch.device) -> torch.Tensor:
        """(end - start,) slot rows of positions start .. end - 1 of the sequence whose blocks are `table`."""
        positions = torch.arange(start, end, device=device)
        blocks = torch.tensor(table, dtype=torch.long, device=device)[positions // self.block_size]
        return blocks * self.block_size + positions % self.block_size
