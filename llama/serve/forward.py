"""One forward step over several sequences at once, each at its own positions, on the paged KV cache.

Every sequence of a step brings a chunk of new tokens: a whole prompt (or a piece of one) for a newcomer, one
token for a sequence that is decoding. The chunks are packed into one row of T tokens for everything that acts
on tokens one at a time (embedding, RMSNorm, the projections, the feed-forward network), using the reference
model's own modules (llama.model) or the fast layers' fused products (llama.fast.layers) as they are. Only
attention looks across positions: each chunk's keys and values are written to its sequence's blocks, then each
sequence's blocks are gathered into a contiguous (padded) K/V for torch's scaled_dot_product_attention, with a
mask per sequence. (The gather copies the context once per layer and step, and its shapes change every step:
the simple, readable form, and the one every step with a prefill chunk takes. Decode-only steps can instead
read the blocks in place and replay a CUDA graph: llama.serve.decode.)
"""

from dataclasses import dataclass
from typing import List

import torch
import torch.nn.functional as F

from llama.fast.layers import FastAttention
from llama.model import Transformer, apply_rotary_emb
from llama.serve.kv_cache import PagedKVCache


@dataclass
class Chunk:
    """The new tokens of one sequence in one step, at positions start .. start + len(tokens) - 1, and the
    blocks holding (and to hold) its positions."""

    tokens: List[int]
    start: int
    table: List[int]


@dataclass
class Packed:
    """Where each token of a step's packed row comes from and where its keys and values go."""

    tokens: torch.Tensor  # (T,) every chunk's tokens, one after the other
    positions: torch.Tensor  # (T,) each token's position in its sequence
    write_slots: torch.Tensor  # (T,) the cache slot of each token
    seq: torch.Tensor  # (T,) which chunk each token belongs to
    row: torch.Tensor  # (T,) its index within its chunk
    read_slots: torch.Tensor  # (S, max_ctx) each sequence's slots, positions 0 .. its end (padded with slot 0)
    mask: torch.Tensor  # (S, 1, max_q, max_ctx) True where query row i of sequence s may read key position j
    last: torch.Tensor  # (S,) the packed index of each chunk's last token


def pack(chunks: List[Chunk], cache: PagedKVCache, device: torch.device) -> Packed:
    """Lay the chunks out for paged_forward (index tensors only; no model state)."""
    lens = [len(c.tokens) for c in chunks]
    max_q, max_ctx = max(lens), max(c.start + n for c, n in zip(chunks, lens))
    bs = cache.block_size
    n_table = -(-max_ctx // bs)
    # Each sequence's block table, padded with block 0 (the padding is masked out), (S, n_table); then the
    # slot of every position up to the longest end, (S, max_ctx).
    tables = torch.tensor([c.table[:n_table] + [0] * (n_table - len(c.table[:n_table])) for c in chunks],
                          dtype=torch.long, device=device)
    cols = torch.arange(max_ctx, device=device)
    read_slots = tables[:, cols // bs] * bs + cols % bs
    info = torch.tensor([[c.start, n] for c, n in zip(chunks, lens)], dtype=torch.long, device=device)
    starts, n_new = info[:, 0], info[:, 1]
    rows = torch.arange(max_q, device=device)
    # Query row i of chunk s sits at position start_s + i: it reads positions 0 .. start_s + i (causal). Rows
    # past a chunk's end are padding: they read position 0 only (a fully masked row would give NaN), and
    # their output is dropped.
    valid = rows[None, :] < n_new[:, None]  # (S, max_q)
    query_pos = torch.where(valid, starts[:, None] + rows[None, :], 0)
    mask = cols[None, None, :] <= query_pos[:, :, None]  # (S, max_q, max_ctx)
    seq, row = valid.nonzero(as_tuple=True)  # (T,) each, in chunk order
    positions = starts[seq] + row
    tokens = torch.tensor([t for c in chunks for t in c.tokens], dtype=torch.long, device=device)
    return Packed(tokens, positions, read_slots[seq, positions], seq, row, read_slots, mask[:, None],
                  n_new.cumsum(0) - 1)


def project_qkv(attention: torch.nn.Module, x: torch.Tensor):
    """Queries, keys, values (1, T, heads, head_dim) of x (1, T, dim) with the layer's own weights: the fast
    layers' one fused product, or the reference Attention's three."""
    n_q, n_kv, head_dim = attention.n_local_heads, attention.n_local_kv_heads, attention.head_dim
    if isinstance(attention, FastAttention):
        xq, xk, xv = attention.wqkv(x).split([n_q * head_dim, n_kv * head_dim, n_kv * head_dim], dim=-1)
    else:
        xq, xk, xv = attention.wq(x), attention.wk(x), attention.wv(x)
    return (xq.unflatten(-1, (n_q, head_dim)), xk.unflatten(-1, (n_kv, head_dim)),
            xv.unflatten(-1, (n_kv, head_dim)))


def paged_attention(
    attention: torch.nn.Module,
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    packed: Packed,
) -> torch.Tensor:
    """The attention of one layer over a packed row x (1, T, dim): writes the new keys and values to their
    slots of `keys` / `values` (this layer's pool, (n_slots, n_kv_heads, head_dim)), then attends each token to
    its own sequence's positions up to its own. Returns (1, T, dim), after the output projection wo."""
    xq, xk, xv = project_qkv(attention, x)
    xq = apply_rotary_emb(xq, cos, sin)  # cos, sin: (T, head_dim), each token at its own position
    xk = apply_rotary_emb(xk, cos, sin)
    keys.index_copy_(0, packed.write_slots, xk[0])
    values.index_copy_(0, packed.write_slots, xv[0])

    n_seqs, max_ctx = packed.read_slots.shape
    max_q = packed.mask.shape[2]
    uniform = n_seqs * max_q == xq.shape[1]  # every chunk of one length (a decode step): no padding
    if uniform:
        q = xq.view(n_seqs, max_q, attention.n_local_heads, attention.head_dim)
    else:  # (S, max_q, n_heads, head_dim): each chunk's queries in a row of its own
        q = xq.new_zeros((n_seqs, max_q, attention.n_local_heads, attention.head_dim))
        q[packed.seq, packed.row] = xq[0]
    k = keys[packed.read_slots]  # (S, max_ctx, n_kv_heads, head_dim): the gather from the blocks
    v = values[packed.read_slots]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=packed.mask,
        enable_gqa=attention.n_local_heads != attention.n_local_kv_heads,
    )  # (S, n_heads, max_q, head_dim)
    out = out.transpose(1, 2)  # (S, max_q, n_heads, head_dim)
    out = out.reshape(-1, *out.shape[2:]) if uniform else out[packed.seq, packed.row]  # (T, n_heads, head_dim)
    return attention.wo(out.reshape(1, out.shape[0], -1))


@torch.inference_mode()
def paged_forward(model: Transformer, cache: PagedKVCache, chunks: List[Chunk]) -> torch.Tensor:
    """Append each chunk's tokens to its sequence's blocks and return float32 logits at each chunk's last
    token, (len(chunks), vocab_size): the next-token logits of every sequence that reached its end.

    The blocks of each chunk's table must already cover its positions (PagedKVCache.grow).
    """
    device = model.rope_cos.device
    packed = pack(chunks, cache, device)
    cos = model.rope_cos[packed.positions]  # (T, head_dim)
    sin = model.rope_sin[packed.positions]
    h = model.tok_embeddings(packed.tokens[None])  # (1, T, dim)
    for i, layer in enumerate(model.layers):
        # TransformerBlock.forward, with the attention over blocks.
        h = h + paged_attention(layer.attention, layer.attention_norm(h), cos, sin, cache.keys[i],
                                cache.values[i], packed)
        h = h + layer.feed_forward(layer.ffn_norm(h))
    h = h[:, packed.last]  # (1, S, dim): only the last token of each chunk predicts a token
    return model.output(model.norm(h))[0].float()  # (S, vocab_size)
