"""The paged KV cache: one pool of fixed-size blocks of key/value slots per layer, handed out to sequences a
block at a time, and each sequence's block table (which blocks hold its positions, in order).

The reference model's cache (llama.model.Attention) holds max_batch_size x max_seq_len positions whether a row
needs them or not. Here memory is a budget of blocks: a sequence holds ceil(its length / block_size) blocks,
takes one more when its length crosses a block boundary, and gives them all back when it finishes or is
preempted. Position p of a sequence lives in slot `table[p // block_size] * block_size + p % block_size`.
"""

import math
from collections import OrderedDict
from typing import Dict, List, Optional

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
    """Hands out block ids 0 .. n_blocks - 1 and counts who holds each (running sequences, idle sessions).

    A block nobody holds is either empty (on the free stack) or, when the prefix cache registered it under the
    key of the tokens it holds (llama.serve.prefix_cache), *cached*: still found by that key, and handed out
    again (its contents forgotten) only once no empty block is left, least recently released first. Lowest
    empty ids first, so runs repeat.
    """

    def __init__(self, n_blocks: int):
        self.n_blocks = n_blocks
        self.free: List[int] = list(range(n_blocks - 1, -1, -1))  # a stack: pop() gives the lowest id
        self.refs: List[int] = [0] * n_blocks  # holders of each block
        self.cached: "OrderedDict[int, None]" = OrderedDict()  # held by none, contents kept: oldest first
        self.key_of: Dict[int, bytes] = {}  # registered blocks: block -> key of its tokens
        self.block_of: Dict[bytes, int] = {}  # and key -> block
        self.evictions = 0  # cached blocks handed out again (their contents dropped)

    @property
    def n_free(self) -> int:
        """Blocks allocate() can hand out: the empty ones and the cached ones nobody holds."""
        return len(self.free) + len(self.cached)

    @property
    def n_held(self) -> int:
        return self.n_blocks - self.n_free

    def allocate(self, n: int) -> List[int]:
        """n blocks for a new holder: empty ones first, then the least recently released cached ones (whose
        keys are forgotten). Raises RuntimeError if fewer are free: callers check n_free first."""
        if n > self.n_free:
            raise RuntimeError(f"asked for {n} KV blocks with {self.n_free} free")
        blocks = []
        for _ in range(n):
            if self.free:
                block = self.free.pop()
            else:
                block, _ = self.cached.popitem(last=False)
                self.forget(block)
                self.evictions += 1
            self.refs[block] = 1
            blocks.append(block)
        return blocks

    def hold(self, block: int) -> None:
        """One more holder of a block that is held or cached (a prefix shared, a session's blocks resumed)."""
        if self.refs[block] == 0:
            if block not in self.cached:
                raise RuntimeError(f"KV block {block} is empty: there is nothing in it to share")
            del self.cached[block]
        self.refs[block] += 1

    def release(self, blocks: List[int]) -> None:
        """One holder lets go of each of `blocks` (a sequence's table, in order). A block nobody holds any more
        becomes cached if registered, else empty; the table's tail is queued for eviction before its head (a
        later block is of no use without the ones before it). Releasing more often than held would hand one
        block to two sequences, so it is refused before anything changes."""
        counts: Dict[int, int] = {}
        for block in blocks:
            counts[block] = counts.get(block, 0) + 1
        over = sorted(b for b, c in counts.items() if c > self.refs[b])
        if over:
            raise RuntimeError(f"KV blocks {over} released twice (more often than they are held)")
        for block in reversed(blocks):
            self.refs[block] -= 1
            if self.refs[block] == 0:
                if block in self.key_of:
                    self.cached[block] = None
                else:
                    self.free.append(block)
        self.free.sort(reverse=True)

    def register(self, block: int, key: bytes) -> None:
        """Record that `block` holds the tokens whose key is `key` (the first block registered under a key
        keeps it; a block is registered once: its contents never change while it is)."""
        if key not in self.block_of and block not in self.key_of:
            self.block_of[key] = block
            self.key_of[block] = key

    def lookup(self, key: bytes) -> Optional[int]:
        return self.block_of.get(key)

    def forget(self, block: int) -> None:
        """Unregister a block (it is about to be written or handed out afresh)."""
        key = self.key_of.pop(block, None)
        if key is not None:
            del self.block_of[key]


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
        """Let go of every block of `table` (a block others hold stays theirs) and empty it."""
        self.allocator.release(list(table))
        table.clear()

    def slots(self, table: List[int], start: int, end: int, device: torch.device) -> torch.Tensor:
        """(end - start,) slot rows of positions start .. end - 1 of the sequence whose blocks are `table`."""
        positions = torch.arange(start, end, device=device)
        blocks = torch.tensor(table, dtype=torch.long, device=device)[positions // self.block_size]
        return blocks * self.block_size + positions % self.block_size
