"""Which block shapes of the decode attention kernel give the attention within its float64 bound on this GPU
(tests/test_decode_attention.py's bound), with Triton's default software pipelining and with none
(num_stages=1): a pass/fail table per block shape and case. Also the kernel's loop, which the library never
runs (launch's chunk_blocks: each program walking 2 or 4 blocks, or all of them): the forms that a bug planted
by mistake kept from being tested on an H200 (bench/results/GPU_RESULTS.md, issue 18, eighth session).

    python scripts/decode_attention_check.py
"""

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
import test_decode_attention as T  # noqa: E402

from llama.fast import decode_attention as A  # noqa: E402
from llama.fast import decode_attention_kernels as AK  # noqa: E402

CASES = [((32, 8, 128), torch.bfloat16, 160, 160, [0, 159, 77]), ((8, 2, 8), torch.float32, 17, 20, [16]),
         ((32, 8, 128), torch.float32, 500, 512, [499, 250, 31])]


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cases = []
    for i, (heads, dtype, kv_len, max_seq, positions) in enumerate(CASES):
        q, k, v, pos = T.random_attention(len(positions), heads, max_seq, dtype, 30 + i, device, positions)
        cases.append((q, k, v, pos, kv_len) + T.attention_bound(q, k, v, pos, kv_len, dtype))
    for cfg in A.CANDIDATES[::2]:  # (16, 4), (32, 4), (32, 4, 4)
        for chunk_blocks, stages in ((1, None), (1, 1), (2, None), (4, None), (64, None)):  # 64: all in one
            row = []
            for q, k, v, pos, kv_len, exact, bound in cases:
                out = AK.launch(q, k, v, pos, kv_len, cfg, num_stages=stages, chunk_blocks=chunk_blocks)
                row.append(((out.double().cpu() - exact).abs() / bound).max().item())
            print(f"{str(tuple(cfg)):18s} blocks a program {chunk_blocks:3d} stages {stages!s:4s} " + " ".join(
                f"{'ok ' if w <= 1 else 'BAD'} {w:9.3g}" for w in row), flush=True)


if __name__ == "__main__":
    main()
