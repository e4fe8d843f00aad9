"""Model parallelism inside a compiled step: the fast layers' collectives in a form torch.compile traces.

fairscale's collectives are autograd Functions that all-reduce their input in place; torch.compile cannot
trace them ("Unsupported autograd.Function context `mark_dirty`", torch 2.13). torch's functional
collectives (`torch.distributed._functional_collectives`) compute the same sums and gathers out of place,
and torch.compile traces them into its graph (as collective calls of the process group's backend between
inductor's kernels). So `across_ranks` (llama.fast.layers) takes these while compiling and fairscale's
otherwise; both sum the same partial products over the same process group with the backend's own
all-reduce, so compiled and eager steps make the same float32 tokens. Tested on the CPU with gloo
(tests/test_model_parallel.py); NCCL, and CUDA graphs around its collectives, have not been run yet.
"""

import fairscale.nn.model_parallel.initialize as fs_init
import torch
from torch.distributed import _functional_collectives as funcol


def traced_across_ranks(y: torch.Tensor, reduce: bool, gather: bool) -> torch.Tensor:
    """What fairscale's reduce_from_model_parallel_region / gather_from_model_parallel_region do, written
    with functional collectives: y summed over the model-parallel ranks, and/or the ranks' y put side by
    side along the last dimension, in rank order."""
    group = fs_init.get_model_parallel_group()
    if reduce:
        y = funcol.all_reduce(y, "sum", group)
    if gather:
        y = funcol.all_gather_tensor(y.contiguous(), gather_dim=y.dim() - 1, group=group)  # (..., ranks * n)
    return y
