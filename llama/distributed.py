"""Process group and model-parallel set-up, and the choice of device and dtype.

Works under `torchrun` (which sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) and under plain `python`
(one process, an in-process store: nothing to configure, no port to pick).
"""

import atexit
import contextlib
import io
import os
from typing import Iterator, Optional, Union

import fairscale.nn.model_parallel.initialize as fs_init
import torch
import torch.distributed as dist


def pick_device(device: Optional[Union[str, torch.device]] = None) -> torch.device:
    """`device` if given, else this rank's CUDA device when CUDA is available, else the CPU. Raises ValueError
    for a name torch does not know (such as "gpu"), listing the usual ones."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"unknown device {device!r}: expected cpu, cuda or cuda:N (or another device type torch knows, "
            "such as mps or xpu)"
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device='cuda' was asked for but torch.cuda.is_available() is False")
        if device.index is None:
            if local_rank() >= torch.cuda.device_count():
                raise ValueError(
                    f"this is local rank {local_rank()} but only {torch.cuda.device_count()} CUDA device(s) "
                    "are visible: start at most one process per GPU, or pass device='cpu'"
                )
            device = torch.device("cuda", local_rank())
    return device


def pick_dtype(device: torch.device, dtype: Optional[Union[str, torch.dtype]] = None) -> torch.dtype:
    """`dtype` if given, a torch dtype or its name ("bfloat16", "torch.float16", "half", ...); else bf16 on
    CUDA where supported (fp16 where not), float32 on the CPU. Raises ValueError for another name or a type
    that is not floating-point."""
    if isinstance(dtype, str):
        dtype = _dtype_named(dtype)
    if dtype is not None:
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"dtype must be a torch.dtype or its name, got {dtype!r}")
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point type, got {dtype}")
        return dtype
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _dtype_named(name: str) -> torch.dtype:
    """The torch dtype called `name`, with or without its "torch." prefix."""
    found = getattr(torch, name[len("torch."):] if name.startswith("torch.") else name, None)
    if not isinstance(found, torch.dtype):
        raise ValueError(
            f"unknown dtype {name!r}: expected a torch.dtype or the name of one, such as 'bfloat16', 'float16' "
            "or 'float32'"
        )
    return found


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Make `dtype` torch's default inside the block (fairscale's layers create their weights with it)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def init_distributed(device: torch.device, model_parallel_size: Optional[int] = None) -> int:
    """Start torch.distributed and fairscale model parallelism unless already started; return the
    model-parallel size. NCCL for CUDA, gloo for the CPU.

    Without torchrun's environment this is a one-process group. Calling it again is harmless; asking for a
    different model-parallel size rebuilds the model-parallel groups.
    """
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend)  # torchrun's env:// rendezvous
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        # A group left to the interpreter's teardown can abort the process ("terminate called without an
        # active exception" from gloo's threads): close the one we opened at exit.
        atexit.register(_destroy_process_group)
    world_size = dist.get_world_size()
    if model_parallel_size is None:
        model_parallel_size = world_size
    if model_parallel_size < 1 or world_size % model_parallel_size != 0:
        raise ValueError(
            f"model_parallel_size={model_parallel_size} must be a positive divisor of the world size {world_size}"
        )
    if fs_init.model_parallel_is_initialized():
        if fs_init.get_model_parallel_world_size() == model_parallel_size:
            return model_parallel_size
        fs_init.destroy_model_parallel()
    with contextlib.redirect_stdout(io.StringIO()):  # fairscale prints "> initializing ..." lines
        fs_init.initialize_model_parallel(model_parallel_size)
    return model_parallel_size


def _destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def is_rank_zero() -> bool:
    """True in the process that should print: global rank 0, or the only process. Before the process group
    starts, torchrun's RANK says (so that an error found early is printed once, not by every rank)."""
    if dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"
