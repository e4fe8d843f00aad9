"""Which block shapes of the decode attention kernel give the attention within its float64 bound on this GPU
(tests/test_decode_attention.py's bound), with Triton's default software pipelining and with none
(num_stages=1): a pass/fail table per block shape and case.

    python scripts/decode_attention_check.py
"""

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
import test_decode_attention as T  # noqa: E402

from llama.fast import decode_attention as A  # noqa: E402
from llama.fast import decode_attention_kernels as AK  # noqa: E402

CASES = [((32, 8, 128), torch.bfloat16, 160, 160, [0, 159, 77]), ((8, 2, 8), torch.float32, 17, 20, [16])]


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cases = []
    for i, (heads, dtype, kv_len, max_seq, positions) in enumerate(CASES):
        q, k, v, pos = T.random_attention(len(positions), heads, max_seq, dtype, 30 + i, device, positions)
        cases.append((q, k, v, pos, kv_len) + T.attention_bound(q, k, v, pos, kv_len, dtype))
    for cfg in A.CANDIDATES:
        for stages in (None, 1):
            row = []
            for q, k, v, pos, kv_len, exact, bound in cases:
                out = AK.launch(q, k, v, pos, kv_len, cfg, num_stages=stages)
                row.append(((out.double().cpu() - exact).abs() / bound).max().item())
            print(f"{str(tuple(cfg)):18s} stages {stages!s:4s} " + " ".join(
                f"{'ok ' if w <= 1 else 'BAD'} {w:9.3g}" for w in row), flush=True)


if __name__ == "__main__":
    main()
