"""Reusing keys and values already in the paged cache: a prompt prefix shared by block, and sessions.

The keys and values at position p depend on every token at positions 0 .. p (attention) and on p itself
(rotary embedding). So a FULL block of a sequence is named by a key over all its tokens from position 0 to
the block's end: a hash chained block to block (`block_keys`). When a block's positions have all been
computed, the engine registers it under that key (BlockAllocator.register); a later sequence whose tokens give
the same key holds that block instead of computing it again. Only full blocks are shared and a registered
block is never written again (sequences write only past their own cached positions), so no block needs
copying on write.

A *session* (a multi-turn chat, one turn at a time) goes further: between turns it keeps holding the blocks
of everything its last turn computed, its last, partly filled block included, so that the next turn, whose
prompt repeats the conversation so far, computes only what is new. Matching is on tokens, never trusted: the
next turn reuses the longest prefix of its prompt that equals the tokens the session holds, so a prompt that
differs (an edited history, an answer that re-encodes to other tokens) only reuses less.
"""

import hashlib
from array import array
from dataclasses import dataclass, field
from typing import Hashable, List, Optional, Tuple

from llama.serve.kv_cache import BlockAllocator


def next_key(previous: bytes, block_tokens: List[int]) -> bytes:
    """The key of a full block: SHA-256 over the previous block's key and this block's token ids, so that it
    names every token from position 0 to the block's end (equal keys: equal tokens at equal positions)."""
    return hashlib.sha256(previous + array("q", block_tokens).tobytes()).digest()


def block_keys(tokens: List[int], block_size: int, keys: Optional[List[bytes]] = None) -> List[bytes]:
    """The keys of every full block of `tokens`, extending `keys` (those of its first blocks) in place."""
    keys = [] if keys is None else keys
    for i in range(len(keys), len(tokens) // block_size):
        keys.append(next_key(keys[-1] if keys else b"", tokens[i * block_size : (i + 1) * block_size]))
    return keys


@dataclass
class Session:
    """A conversation's state between turns: the tokens whose keys and values its blocks hold (positions
    0 .. len(tokens) - 1), and those blocks, held (one reference each) until the next turn takes them over, the
    session is ended, or memory runs short (then the idle session is evicted: its next turn recomputes)."""

    session_id: Hashable
    tokens: List[int] = field(default_factory=list)
    table: List[int] = field(default_factory=list)
    turn: Optional[int] = None  # the request id of its turn waiting or running, if any
    last_used: int = 0  # the engine's step count when last touched (idle sessions are evicted oldest first)
    turns: int = 0
    evictions: int = 0


def common_length(a: List[int], b: List[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def find_reusable(allocator: BlockAllocator, block_size: int, tokens: List[int], keys: List[bytes],
                  session: Optional[Session], use_cache: bool = True) -> Tuple[List[int], int, Optional[int]]:
    """The blocks that already hold a prefix of `tokens`: the session's own first, then (use_cache) any the
    prefix cache registered under the keys of the following full blocks. Nothing is held yet.

    At most len(tokens) - 1 positions are reused: the last token must be fed for its logits. Returns (blocks,
    positions reused, the block to take over or None): when the prompt leaves the session's tokens inside one
    of its blocks that nobody else holds, that block is reused up to there and written past it, so it must
    first be unregistered (taken over); a block someone else holds is never written: its positions are
    recomputed in a new block instead.
    """
    limit = len(tokens) - 1
    blocks: List[int] = []
    reused = 0
    takeover = None
    if session is not None:
        for i, block in enumerate(session.table):
            start = i * block_size
            held = session.tokens[start : start + block_size]
            same = common_length(tokens[start : min(start + len(held), limit)], held)
            if same == block_size:  # a full block, all equal
                blocks.append(block)
                reused += block_size
                continue
            if same > 0 and allocator.refs[block] == 1:  # only the session holds it: ours to write past `same`
                blocks.append(block)
                reused += same
                takeover = block
            break
    if use_cache and reused % block_size == 0 and takeover is None:
        for i in range(reused // block_size, len(keys)):
            if (i + 1) * block_size > limit:
                break
            block = allocator.lookup(keys[i])
            if block is None:
                break
            blocks.append(block)
            reused += block_size
    return blocks, reused, takeover
