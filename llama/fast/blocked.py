"""The "blocked" form of a decode product on the CPU: the weight held in column blocks, summed by a kernel
inductor generates with several independent accumulators (one of llama.fast.cpu_forms' candidates).

The "compiled" form reads each weight row as stored and sums it in one vector register: every addition waits
for the one before (4 cycles), and each row ends in a horizontal sum. Where rows are short (K = 512: 1 KB of
bf16, 512 bytes of int8) that caps one thread below the memory's read speed. Here the weight W (N, K) is held
as blocks of `block` output rows, each block transposed:

    blocks[b, k, j] = W[b * block + j, k]        (N / block, K, block), rows past N are zeros

so that for one activation value x[k] the block's weights are contiguous: 128 bytes, two cache lines, for
every dtype (BLOCK_BYTES: 128 rows of int8, 64 of bf16, 32 of float32). Without AVX-512, int8 blocks are
held as 32 int32 words a k, each word four rows' bytes (rows j, 32 + j, 64 + j, 96 + j of the block:
`to_words`), and the kernel takes each byte out with two shifts: inductor loads int8 weights as many at a
time as float32 lanes (8 on AVX2), a partial load that torch's AVX2 vectors make through a copy in memory
(w13 at 1.3-1.4 GB/s, one thread), where 8 words fill a register (13-14 GB/s). AVX-512 loads 16 int8
with a plain 16-byte load: there the bytes read faster as they are (18-21 GB/s against 14-15 as words). The
product is written as one sum per 16 columns of the block (an AVX-512 register of float32; two AVX2 ones; 32
columns of 2-byte weights with AVX-512, `lanes`, so that no bf16 load is masked), side by side; inductor fuses them into
one loop nest whose inner loop (over k) updates those independent vector registers: no horizontal additions,
no chain of dependent additions across registers. Each output is still the plain float32 sum over k of
x[k] * W[n, k] (in order), times the row's scale for int8: the product to float32 summation error, the
activations unrounded.

The blocked copy replaces the layer's weight (llama.fast.cpu_forms.use_form): the form serves the layer's
other products too: `dense_weight()` rebuilds W (a temporary copy) where a path needs it (an int8 prefill,
state_dict()), and `full(x)` multiplies any number of rows of a float layer block by block (a batched matrix
product on the blocks as they are: a prefill copies no weight).
"""

from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F

from llama.fast.huge_pages import on_huge_pages
from llama.fast.layers import computed_once, half_products_in_float32

# Bytes of weights a block holds for one k (its rows), and float32 lanes each accumulator sums.
BLOCK_BYTES = 128
LANES = 16
# With AVX-512, 2-byte weights are summed 32 columns a time: torch's bf16 vector holds 32 values there, and
# one of 16 is loaded with a mask (on the AMD EPYC of issue 18's sixth pass, Zen 5, a masked 16-bit load
# from memory ran at a third of a plain load: 6.5 against 18-20 GB/s, one thread).
WIDE_LANES = 32
# Without AVX-512, float32 and int8 blocks are summed 8 columns a time (torch's float32 vector): lanes().
NARROW_LANES = 8


def block_rows(dtype: torch.dtype) -> int:
    """Output rows per block for a weight of `dtype`: 128 for int8, 64 for bf16/fp16, 32 for float32."""
    return BLOCK_BYTES // torch.empty((), dtype=dtype).element_size()


def lanes(dtype: torch.dtype) -> int:
    """Columns of a block one sum covers: as many values of `dtype` as torch's vector holds where that differs
    from LANES: 32 for 2-byte weights with AVX-512 (every weight load a whole vector, never masked), 8 for
    float32 and int8 weights without AVX-512 (a block is then read in one pass, four float32 sums a 32-row
    block; with 16, inductor's 8-wide vectors read it in two passes, the second from the cache: the step
    took 1.07x the time a token that way, float32 and int8 alike, emulated AVX2, docs/cpu-step.md). The sums
    are the same, bit for bit, for any grouping in whole vectors: each column's sum runs over K in order
    (tests/test_cpu_forms.py)."""
    avx512 = "AVX512" in torch.backends.cpu.get_cpu_capability()
    size = torch.empty((), dtype=dtype).element_size()
    if avx512 and size == 2:
        return WIDE_LANES
    if not avx512 and size != 2:
        return NARROW_LANES
    return LANES


def int8_as_words() -> bool:
    """Whether int8 blocks are held as words here: where torch's vectors are narrower than AVX-512's."""
    return "AVX512" not in torch.backends.cpu.get_cpu_capability()


def to_blocks(w: torch.Tensor, words: bool = False) -> torch.Tensor:
    """W (N, K) -> blocks (ceil(N / block), K, block), zero rows padding N to a multiple of block; int8 blocks
    with `words`: (ceil(N / 128), K, 32) int32 (`to_words`). A new contiguous tensor, on huge pages where
    llama.fast.huge_pages can have them (the transpose copied there directly: one copy of the weight)."""
    n, k = w.shape
    block = block_rows(w.dtype)
    pad = -n % block
    if pad:
        w = F.pad(w, (0, 0, 0, pad))
    blocks = w.view(-1, block, k).transpose(1, 2)  # (NB, K, block)
    if words and w.dtype == torch.int8:
        return on_huge_pages(to_words(blocks))
    return on_huge_pages(blocks).contiguous()  # (a no-op on the huge-page copy; the copy where there is none)


def from_blocks(blocks: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of to_blocks: W (n, K), a new contiguous tensor."""
    if blocks.dtype == torch.int32:
        blocks = from_words(blocks)
    nb, k, block = blocks.shape
    return blocks.transpose(1, 2).reshape(nb * block, k)[:n].contiguous()


# Rows of an int8 block whose bytes one word holds: row j + 32 * c of the block is byte c of word j.
WORD_ROWS = 4


def to_words(blocks: torch.Tensor) -> torch.Tensor:
    """int8 blocks (NB, K, 128) -> (NB, K, 32) int32, byte c (bits 8c..8c+7) of word j = row 32c + j. Built
    with arithmetic, so the same on any byte order; no step overflows int32 (the top byte keeps its sign)."""
    b = blocks.to(torch.int32).unflatten(-1, (WORD_ROWS, -1))  # (NB, K, 4, 32): [.., c, j] = row 32c + j
    low = b[..., :3, :] & 0xFF  # bytes 0-2 as unsigned
    return (low[..., 0, :] + low[..., 1, :] * 2**8 + low[..., 2, :] * 2**16 + b[..., 3, :] * 2**24).contiguous()


def word_byte(words: torch.Tensor, c: int) -> torch.Tensor:
    """Byte c of each word, sign-extended to int32: shifted to the top, then back down arithmetically."""
    top = words if c == WORD_ROWS - 1 else torch.bitwise_left_shift(words, 8 * (WORD_ROWS - 1 - c))
    return torch.bitwise_right_shift(top, 8 * (WORD_ROWS - 1))


def from_words(words: torch.Tensor) -> torch.Tensor:
    """The inverse of to_words: (NB, K, 32) int32 -> (NB, K, 128) int8."""
    return torch.cat([word_byte(words, c) for c in range(WORD_ROWS)], -1).to(torch.int8)


def _blocked_multiply_sum(x: torch.Tensor, blocks: torch.Tensor, scale: Optional[torch.Tensor],
                          out_dtype: torch.dtype, step: int = LANES) -> torch.Tensor:
    """x (M, K) float32 times the blocked weight, times scale (N_padded,) if any -> (M, N_padded) in out_dtype,
    one sum per `step` columns of a block.
    The activation rows sit inside the block loop (x's transpose broadcast per block), so a block read for the
    first row is in the cache for the others."""
    xt = x.t()[None, :, :, None]  # (1, K, M, 1)
    # int8 words: the four bytes in order, each (NB, K, 32), rows 32c + j of the block
    columns = [word_byte(blocks, c) for c in range(WORD_ROWS)] if blocks.dtype == torch.int32 else [blocks]
    parts = [(col[:, :, None, a:a + step].to(torch.float32) * xt).sum(1)  # (NB, M, step) each
             for col in columns for a in range(0, col.shape[-1], step)]
    y = torch.cat(parts, -1).permute(1, 0, 2)  # (M, NB, block)
    y = y.reshape(x.shape[0], -1)  # (M, N_padded)
    if scale is not None:
        y = y * scale.to(torch.float32)
    return y.to(out_dtype)


_KERNELS: Dict[tuple, Callable] = {}


def blocked_kernel(x: torch.Tensor, blocks: torch.Tensor, scale: Optional[torch.Tensor], out_dtype: torch.dtype,
                   step: int = LANES) -> Callable:
    """Inductor's kernel for _blocked_multiply_sum at exactly these shapes (compiled once per process; inductor
    also caches it on disk), called directly as llama.fast.cpu_forms.compiled_kernel does."""
    from torch.fx.experimental.proxy_tensor import make_fx

    key = (tuple(x.shape), tuple(blocks.shape), blocks.dtype, None if scale is None else scale.dtype, out_dtype, step)
    if key not in _KERNELS:
        tensors = (x, blocks) if scale is None else (x, blocks, scale)

        def fn(*args):
            return _blocked_multiply_sum(args[0], args[1], args[2] if len(args) > 2 else None, out_dtype, step)

        with torch.inference_mode(False), torch.no_grad():
            example = [torch.zeros(t.shape, dtype=t.dtype) for t in tensors]  # not inference tensors
            _KERNELS[key] = torch._inductor.compile(make_fx(fn)(*example), example)
    return _KERNELS[key]


class BlockedProduct:
    """`form(x (..., K)) -> (..., N)`: the product with weight w (N, K) (float, or int8 with row scales (N,)),
    read from its blocked copy (made here; the caller may then drop w). bf16/fp16 activations are converted to
    float32 once and the result rounded back once, as in CompiledProduct."""

    def __init__(self, w: torch.Tensor, scale: Optional[torch.Tensor] = None, words: Optional[bool] = None):
        self.out_features = w.shape[0]
        self.lanes = lanes(w.dtype)  # columns a sum covers
        words = int8_as_words() if words is None else words  # (int8 only; see the module docstring)
        self.blocks = to_blocks(w, words)  # (NB, K, block); int8 words: (NB, K, 32) int32
        padded = self.blocks.shape[0] * block_rows(w.dtype)
        self.scale = None if scale is None else F.pad(scale, (0, padded - self.out_features))

    def dense_weight(self) -> torch.Tensor:
        """W (N, K), rebuilt from the blocks (a new tensor)."""
        return from_blocks(self.blocks, self.out_features)

    def _tensors(self, x2: torch.Tensor) -> tuple:
        return (x2, self.blocks) if self.scale is None else (x2, self.blocks, self.scale)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1]).to(torch.float32).contiguous()  # (M, K)
        y = blocked_kernel(x2, self.blocks, self.scale, x.dtype, self.lanes)(*self._tensors(x2))  # (M, N_padded)
        if y.shape[-1] != self.out_features:
            y = y[:, :self.out_features].contiguous()
        return y.view(*x.shape[:-1], self.out_features)  # (..., N)

    def traced(self, x: torch.Tensor) -> torch.Tensor:
        """The same product as torch operations, for a step compiled whole (llama.fast.cpu_step)."""
        x2 = computed_once(x.reshape(-1, x.shape[-1]).to(torch.float32))  # (M, K), not recomputed per row
        y = _blocked_multiply_sum(x2, self.blocks, self.scale, x.dtype, self.lanes)[:, :self.out_features]
        return y.reshape(*x.shape[:-1], self.out_features)  # (..., N)

    def full(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., K) times a float weight for any number of rows (a prefill), block by block: one batched
        matrix product over the blocks as stored, in x's dtype (as F.linear), no copy of the weight."""
        if self.scale is not None:
            raise ValueError("full() serves float weights; an int8 layer rebuilds its weight (Int8Linear)")
        x2 = x.reshape(-1, x.shape[-1])  # (M, K)
        if half_products_in_float32(self.blocks.dtype):
            y = torch.matmul(x2.float(), self.blocks.float()).to(x.dtype)  # (NB, M, block)
        else:
            y = torch.matmul(x2.to(self.blocks.dtype), self.blocks)  # (NB, M, block)
        y = y.permute(1, 0, 2).reshape(x2.shape[0], -1)[:, :self.out_features]  # (M, N)
        return y.reshape(*x.shape[:-1], self.out_features)  # (..., N)
