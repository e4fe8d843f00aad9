"""Decode attention that reads the paged KV cache in place: one new token per sequence.

llama.serve.forward's simple path gathers every sequence's blocks into a padded, contiguous K/V at every
layer and step, then calls torch's scaled_dot_product_attention with a mask: easy to read, but it copies the
whole context once per layer and step, its shapes change with every step (so it cannot be captured in a CUDA
graph), and on the GPU the masked grouped-query call falls back to unfused kernels. Here a decode step's
attention takes, for each row (sequence) b:

    q       (B, n_heads, head_dim)      its one new query (rotated)
    tables  (B, width)                  its block table, padded to a fixed width with any block id
    lengths (B,)                        how many positions it has, its new one included (0: a padding row)

and reads key/value position p of row b at slot `tables[b, p // block_size] * block_size + p % block_size` of
the layer's pool (n_slots, n_kv_heads, head_dim): only the positions the row has, whatever the width. Shapes
depend on B and width only, so a step can be captured once per batch size and replayed (llama.serve.graphs).

Two implementations of each operation, tested equal (tests/test_serve_paged_attention.py):
- a Triton kernel on CUDA: one program per (row, key/value head), the group of query heads sharing that head
  in one tile, an online softmax over the row's positions in float32 (as FlashAttention);
- torch on any device (the CPU above all): the row's `width` blocks gathered, masked past its length, then
  scaled_dot_product_attention; the reference the kernel is tested against.
"""

import math
import os
from typing import Optional

import torch
import torch.nn.functional as F

try:  # Triton ships with CUDA builds of torch; CPU-only installs use the torch implementations.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None


def has_triton_kernels(device: torch.device) -> bool:
    """True where the Triton kernels run: CUDA with Triton installed (or Triton's CPU interpreter, for tests)."""
    if triton is None:
        return False
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


# ---- torch: the readable form, and the CPU's --------------------------------------------------------------


def write_kv_torch(keys: torch.Tensor, values: torch.Tensor, xk: torch.Tensor, xv: torch.Tensor,
                   slots: torch.Tensor) -> None:
    """Write row b's new key and value, xk[b] and xv[b] (n_kv_heads, head_dim), to slot slots[b] of the
    pools; rows with slot -1 are padding and write nothing."""
    real = slots >= 0  # (a boolean index syncs with the device: this form is for the CPU)
    keys.index_copy_(0, slots[real], xk[real])
    values.index_copy_(0, slots[real], xv[real])


def decode_attention_torch(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, tables: torch.Tensor,
                           lengths: torch.Tensor, block_size: int) -> torch.Tensor:
    """(B, n_heads, head_dim): row b's query attending to its positions 0 .. lengths[b] - 1 (zeros for a
    padding row, length 0)."""
    n_rows, width = tables.shape
    cols = torch.arange(width * block_size, device=q.device)
    slots = tables[:, cols // block_size] * block_size + cols % block_size  # (B, width * block_size)
    k, v = keys[slots], values[slots]  # (B, width * block_size, n_kv_heads, head_dim)
    mask = cols[None, :] < lengths[:, None]  # (B, width * block_size)
    # A padding row reads position 0 (a fully masked row would give NaN); its output is zeroed below.
    mask[:, 0] = True
    out = F.scaled_dot_product_attention(
        q[:, :, None], k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask[:, None, None, :],
        enable_gqa=q.shape[1] != keys.shape[1],
    )[:, :, 0]  # (B, n_heads, head_dim)
    return torch.where((lengths > 0)[:, None, None], out, 0)


# ---- Triton: the CUDA kernels ---------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _write_kv_kernel(keys, values, xk, xv, slots, stride_slot, stride_k_row, stride_v_row, stride_slots,
                         N_ELEMENTS: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        slot = tl.load(slots + row * stride_slots)
        if slot >= 0:  # padding rows (slot -1) write nothing
            offsets = tl.arange(0, BLOCK)
            inside = offsets < N_ELEMENTS
            # A slot's n_kv_heads x head_dim values are contiguous in the pool and in the row.
            tl.store(keys + slot * stride_slot + offsets, tl.load(xk + row * stride_k_row + offsets, mask=inside),
                     mask=inside)
            tl.store(values + slot * stride_slot + offsets, tl.load(xv + row * stride_v_row + offsets, mask=inside),
                     mask=inside)

    @triton.jit
    def _attend_tile(query, top, total, acc, keys, values, tables, row, kv_head, length, start, scale, d,
                     stride_slot, stride_kv_head, stride_table,
                     BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, TILE: tl.constexpr, PRECISION: tl.constexpr):
        """Positions start .. start + TILE - 1 of the row folded into the running softmax (top, total, acc)."""
        p = start + tl.arange(0, TILE)
        have = p < length
        block = tl.load(tables + row * stride_table + p // BLOCK_SIZE, mask=have, other=0)
        slot = block.to(tl.int64) * BLOCK_SIZE + p % BLOCK_SIZE
        kv_offsets = slot[:, None] * stride_slot + kv_head * stride_kv_head + d[None, :]
        k = tl.load(keys + kv_offsets, mask=have[:, None] & (d[None, :] < HEAD_DIM), other=0.0)  # (TILE, HEAD_TILE)
        scores = tl.dot(query, tl.trans(k), input_precision=PRECISION) * scale  # (GROUP_TILE, TILE)
        scores = tl.where(have[None, :], scores, float("-inf"))
        new_top = tl.maximum(top, tl.max(scores, axis=1))
        base = tl.where(new_top == float("-inf"), 0.0, new_top)  # no position yet: no inf - inf
        weights = tl.exp(scores - base[:, None])
        shrink = tl.exp(top - base)
        total = total * shrink + tl.sum(weights, axis=1)
        v = tl.load(values + kv_offsets, mask=have[:, None] & (d[None, :] < HEAD_DIM), other=0.0)
        acc = acc * shrink[:, None] + tl.dot(weights.to(v.dtype), v, input_precision=PRECISION)
        return new_top, total, acc

    @triton.jit
    def _decode_attention_kernel(
        q, keys, values, out, tables, lengths, scale, stride_lengths,
        stride_q_row, stride_q_head, stride_slot, stride_kv_head, stride_out_row, stride_out_head, stride_table,
        BLOCK_SIZE: tl.constexpr, GROUP: tl.constexpr, GROUP_TILE: tl.constexpr, HEAD_DIM: tl.constexpr,
        HEAD_TILE: tl.constexpr, TILE: tl.constexpr, PRECISION: tl.constexpr, MAX_POSITIONS: tl.constexpr,
    ):
        row = tl.program_id(0)
        kv_head = tl.program_id(1)
        length = tl.load(lengths + row * stride_lengths)
        g = tl.arange(0, GROUP_TILE)  # the query heads of this key/value head, padded to a tile tl.dot takes
        d = tl.arange(0, HEAD_TILE)  # head_dim padded likewise
        heads = kv_head * GROUP + g
        in_tile = (g[:, None] < GROUP) & (d[None, :] < HEAD_DIM)
        query = tl.load(q + row * stride_q_row + heads[:, None] * stride_q_head + d[None, :],
                        mask=in_tile, other=0.0)  # (GROUP_TILE, HEAD_TILE)
        top = tl.full((GROUP_TILE,), float("-inf"), tl.float32)  # running max of each head's scores
        total = tl.zeros((GROUP_TILE,), tl.float32)  # running sum of exp(score - top)
        acc = tl.zeros((GROUP_TILE, HEAD_TILE), tl.float32)  # running sum of exp(score - top) * value
        if MAX_POSITIONS > 0:  # Triton's CPU interpreter takes no loop bound read from memory: the masks do it
            for start in range(0, MAX_POSITIONS, TILE):
                top, total, acc = _attend_tile(query, top, total, acc, keys, values, tables, row, kv_head, length,
                                               start, scale, d, stride_slot, stride_kv_head, stride_table,
                                               BLOCK_SIZE, HEAD_DIM, TILE, PRECISION)
        else:  # on the GPU: the row's own positions only
            for start in range(0, length, TILE):
                top, total, acc = _attend_tile(query, top, total, acc, keys, values, tables, row, kv_head, length,
                                               start, scale, d, stride_slot, stride_kv_head, stride_table,
                                               BLOCK_SIZE, HEAD_DIM, TILE, PRECISION)
        result = acc / tl.where(total > 0, total, 1.0)[:, None]  # a padding row (length 0) gives zeros
        tl.store(out + row * stride_out_row + heads[:, None] * stride_out_head + d[None, :],
                 result.to(out.dtype.element_ty), mask=in_tile)


def write_kv_triton(keys: torch.Tensor, values: torch.Tensor, xk: torch.Tensor, xv: torch.Tensor,
                    slots: torch.Tensor) -> None:
    """write_kv_torch as a Triton kernel: no host sync, so it can be captured in a CUDA graph."""
    n_rows = slots.shape[0]
    head_dim = keys.shape[2]
    # Each row's heads must be contiguous (a row may sit inside a wider one, as in a fused product).
    if any(t.stride()[1:] != (head_dim, 1) for t in (keys, values)):
        raise ValueError("the KV pools must be (n_slots, n_kv_heads, head_dim), contiguous")
    if any(t.stride()[1:] != (head_dim, 1) for t in (xk, xv)):
        xk, xv = xk.contiguous(), xv.contiguous()
    n_elements = keys.shape[1] * head_dim
    _write_kv_kernel[(n_rows,)](keys, values, xk, xv, slots, keys.stride(0), xk.stride(0), xv.stride(0), slots.stride(0),
                                N_ELEMENTS=n_elements, BLOCK=triton.next_power_of_2(n_elements))


def decode_attention_triton(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, tables: torch.Tensor,
                            lengths: torch.Tensor, block_size: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """decode_attention_torch as a Triton kernel reading the blocks in place."""
    n_rows, n_heads, head_dim = q.shape
    n_kv_heads = keys.shape[1]
    if (keys.stride(2) != 1 or q.stride(2) != 1 or tables.stride(1) != 1 or keys.stride() != values.stride()
            or out is not None and out.stride(2) != 1):
        raise ValueError("the Triton decode attention takes pools of one layout with contiguous heads")
    group = n_heads // n_kv_heads
    out = torch.empty_like(q) if out is None else out
    # float32 products in full precision (Triton's default rounds float32 inputs to tf32): exact as the torch form.
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    _decode_attention_kernel[(n_rows, n_kv_heads)](
        q, keys, values, out, tables, lengths, 1.0 / math.sqrt(head_dim), lengths.stride(0),
        q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), out.stride(0), out.stride(1), tables.stride(0),
        # tl.dot takes tiles of at least 16 x 16: small groups and heads are padded (and masked) up to that.
        BLOCK_SIZE=block_size, GROUP=group, GROUP_TILE=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        HEAD_TILE=max(16, triton.next_power_of_2(head_dim)),
        TILE=64, PRECISION=precision, MAX_POSITIONS=tables.shape[1] * block_size if q.device.type == "cpu" else 0,
    )
    return out


# ---- the choice -----------------------------------------------------------------------------------------


def write_kv(keys: torch.Tensor, values: torch.Tensor, xk: torch.Tensor, xv: torch.Tensor, slots: torch.Tensor,
             use_triton: bool) -> None:
    """write_kv_triton or write_kv_torch."""
    (write_kv_triton if use_triton else write_kv_torch)(keys, values, xk, xv, slots)


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, tables: torch.Tensor,
                     lengths: torch.Tensor, block_size: int, use_triton: bool) -> torch.Tensor:
    """decode_attention_triton or decode_attention_torch: (B, n_heads, head_dim)."""
    if use_triton:
        return decode_attention_triton(q, keys, values, tables, lengths, block_size)
    return decode_attention_torch(q, keys, values, tables, lengths, block_size)
