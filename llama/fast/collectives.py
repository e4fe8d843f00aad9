"""Model parallelism inside a compiled step: the fast layers' collectives in a form torch.compile traces.

fairscale's collectives are autograd Functions that all-reduce their input in place; torch.compile cannot
trace them ("Unsupported autograd.Function context `mark_dirty`", torch 2.13). torch's functional
collectives (`torch.distributed._functional_collectives`) compute the same sums and gathers out of place,
and compile: into NCCL kernels between inductor's kernels on GPUs (captured in the step's CUDA graph with
them), into gloo calls on the CPU. So `across_ranks` (llama.fast.layers) takes these while compiling and
fairscale's otherwise; both sum the same partial products over the same process group, in rank order, with
the backend's own all-reduce, so compiled and eager steps make the same tokens.
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
