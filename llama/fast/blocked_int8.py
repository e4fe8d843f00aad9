"""The "blocked" form of an int8 decode product on the CPU: the weight held in column blocks, summed by a kernel
inductor generates with many independent accumulators (one of llama.fast.cpu_forms' candidates).

The "compiled" form reads each weight row as stored and sums it in one vector register: every addition waits
for the one before (4 cycles), which caps one thread near 10-16 GB/s of int8, below the memory's read speed.
Here the int8 weight Q (N, K) is held as blocks of BLOCK output rows, each block transposed:

    blocks[b, k, j] = Q[b * BLOCK + j, k]        (N / BLOCK, K, BLOCK), int8, rows past N are zeros

so that for one activation value x[k] the block's BLOCK weights are contiguous. The product is written as
ACCUMULATORS sums side by side, each over k for BLOCK / ACCUMULATORS output columns; inductor fuses them into one
loop nest whose inner loop (over k) updates ACCUMULATORS independent vector registers from one cache line of
weights: no horizontal additions, no chain of dependent additions across registers. Each output is still the
plain float32 sum over k of x[k] * Q[n, k] (in order), times the row's scale: the dequantized product to
float32 summation error, the activations unrounded.

The blocked copy replaces the layer's int8 weight (llama.fast.cpu_forms.use_form): `int8_weight()` rebuilds
Q (N, K) where another path needs it (a prefill, state_dict()), a temporary copy of the int8 weight.
"""

from typing import Callable, Dict

import torch
import torch.nn.functional as F

# Output rows per block, and accumulators (vector registers) per block: 8 accumulators of 16 floats (one
# AVX-512 register, two AVX2 ones) cover 128 rows, and each k reads 128 contiguous bytes, two cache lines.
BLOCK = 128
ACCUMULATORS = 8


def to_blocks(q: torch.Tensor) -> torch.Tensor:
    """Q (N, K) int8 -> blocks (ceil(N / BLOCK), K, BLOCK), zero rows padding N to a multiple of BLOCK."""
    n, k = q.shape
    pad = -n % BLOCK
    if pad:
        q = F.pad(q, (0, 0, 0, pad))
    return q.view(-1, BLOCK, k).transpose(1, 2).contiguous()


def from_blocks(blocks: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of to_blocks: Q (n, K), a new contiguous tensor."""
    nb, k, block = blocks.shape
    return blocks.transpose(1, 2).reshape(nb * block, k)[:n].contiguous()


def _blocked_multiply_sum(x: torch.Tensor, blocks: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype
                          ) -> torch.Tensor:
    """x (M, K) float32 times the blocked weight, times scale (N_padded,) -> (M, N_padded) in out_dtype. The
    activation rows sit inside the block loop (x's transpose broadcast per block), so a block read for the
    first row is in the cache for the others."""
    nb, _, block = blocks.shape
    lanes = block // ACCUMULATORS
    xt = x.t()[None, :, :, None]  # (1, K, M, 1)
    parts = [(blocks[:, :, None, a * lanes:(a + 1) * lanes].to(torch.float32) * xt).sum(1)  # (NB, M, lanes)
             for a in range(ACCUMULATORS)]
    y = torch.cat(parts, -1).permute(1, 0, 2).reshape(x.shape[0], nb * block)  # (M, N_padded)
    return (y * scale.to(torch.float32)).to(out_dtype)


_KERNELS: Dict[tuple, Callable] = {}


def blocked_kernel(x: torch.Tensor, blocks: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype) -> Callable:
    """Inductor's kernel for _blocked_multiply_sum at exactly these shapes (compiled once per process; inductor
    also caches it on disk), called directly as llama.fast.cpu_forms.compiled_kernel does."""
    from torch.fx.experimental.proxy_tensor import make_fx

    key = (tuple(x.shape), tuple(blocks.shape), scale.dtype, out_dtype)
    if key not in _KERNELS:
        def fn(a, b, c):
            return _blocked_multiply_sum(a, b, c, out_dtype)

        with torch.inference_mode(False), torch.no_grad():
            example = [torch.zeros(t.shape, dtype=t.dtype) for t in (x, blocks, scale)]  # not inference tensors
            _KERNELS[key] = torch._inductor.compile(make_fx(fn)(*example), example)
    return _KERNELS[key]


class BlockedInt8Product:
    """`form(x (..., K)) -> (..., N)`: the product with int8 weight q (N, K) and row scales (N,), read from its
    blocked copy (made here; the caller may then drop q). bf16/fp16 activations are converted to float32 once
    and the result rounded back once, as in CompiledProduct."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor):
        self.out_features = q.shape[0]
        self.blocks = to_blocks(q)
        self.scale = F.pad(scale, (0, self.blocks.shape[0] * BLOCK - self.out_features))

    def int8_weight(self) -> torch.Tensor:
        """Q (N, K), rebuilt from the blocks (a new tensor)."""
        return from_blocks(self.blocks, self.out_features)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1]).to(torch.float32).contiguous()  # (M, K)
        y = blocked_kernel(x2, self.blocks, self.scale, x.dtype)(x2, self.blocks, self.scale)  # (M, N_padded)
        if y.shape[-1] != self.out_features:
            y = y[:, :self.out_features].contiguous()
        return y.view(*x.shape[:-1], self.out_features)  # (..., N)

    def traced(self, x: torch.Tensor) -> torch.Tensor:
        """The same product as torch operations, for a step compiled whole (llama.fast.cpu_step)."""
        x2 = x.reshape(-1, x.shape[-1]).to(torch.float32)  # (M, K)
        y = _blocked_multiply_sum(x2, self.blocks, self.scale, x.dtype)[:, :self.out_features]
        return y.reshape(*x.shape[:-1], self.out_features)  # (..., N)

