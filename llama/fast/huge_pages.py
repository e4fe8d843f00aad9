"""Weights on transparent huge pages: a decode step streams every weight once, and reads it faster from 2 MiB
pages than from 4 KiB ones (fewer TLB misses; the hardware prefetchers stop at page boundaries).

Linux backs memory with huge pages only where asked (`/sys/kernel/mm/transparent_hugepage/enabled` is
"madvise" on many machines, this project's among them) and torch never asks. `on_huge_pages(t)` returns a copy
of t in memory advised MADV_HUGEPAGE before its first touch, so the kernel maps it with huge pages as the copy
writes it. Measured on the project's CPU (AMD EPYC, Zen 5; `torch.sum` over 256 MiB of float32, best of 5, five
rounds): 2 threads 38-42 GB/s against 35-37 from ordinary pages, 1 thread 31.6-33.9 against 27.4-29.1
(docs/cpu-step.md, "Huge pages"). Used for the CPU decode forms' weight copies (llama.fast.blocked), which are
made at load anyway. Elsewhere (another OS, THP off, a tensor under MIN_BYTES, `LLAMA_HUGE_PAGES=off`) the
tensor comes back as it is: same values either way, only the memory's page size differs.
"""

import mmap
import os
import sys

import torch

ENV = "LLAMA_HUGE_PAGES"
HUGE_PAGE = 2 * 2**20
# Smaller tensors are left where they are: they gain little, and each copy costs up to a huge page of padding.
MIN_BYTES = 16 * 2**20
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def available() -> bool:
    """Whether memory can be asked for huge pages here: Linux (Python's mmap has MADV_HUGEPAGE), transparent
    huge pages not "never", and LLAMA_HUGE_PAGES not "off"."""
    setting = os.environ.get(ENV, "auto")
    if setting not in ("auto", "off"):
        raise ValueError(f"{ENV} must be 'auto' or 'off', got {setting!r}")
    if setting == "off" or not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        with open(THP_SETTING) as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def on_huge_pages(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of CPU tensor `t` on memory advised for huge pages, or `t` itself where that cannot be
    had (see the module docstring). The copy is a view into an anonymous mapping of its own (fresh memory, so
    no page of it is mapped before the advice: memory malloc hands back may have been touched), up to one huge
    page longer, the copy aligned to a huge page; it holds the same values, dtype and shape."""
    n_bytes = t.numel() * t.element_size()
    if t.device.type != "cpu" or n_bytes < MIN_BYTES or not available():
        return t
    # Private anonymous memory (a shared mapping would be shmem, which THP's "madvise" does not cover); freed
    # when the last view of the copy goes.
    region = mmap.mmap(-1, n_bytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buffer = torch.frombuffer(region, dtype=torch.uint8)
    start = -buffer.data_ptr() % HUGE_PAGE  # the first huge-page boundary inside the mapping (a page multiple)
    try:
        region.madvise(mmap.MADV_HUGEPAGE, start, len(region) - start)
    except OSError:  # (an older kernel, a seccomp filter: ordinary pages then)
        return t
    copy = buffer[start:start + n_bytes].view(t.dtype).view(t.shape)
    copy.copy_(t)  # the first touch: the kernel maps huge pages here
    return copy
