"""How fast a device reads memory: the ceiling for a decode step, which reads every weight once."""

import time

import torch


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU), so that a host clock times it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_read_bandwidth(device: torch.device, nbytes: int = 1 << 30, repeats: int = 7) -> float:
    """Bytes per second read by summing a float32 buffer of `nbytes` (far larger than the caches), with
    every thread torch uses; the best of `repeats` runs after one warm-up."""
    x = torch.ones(nbytes // 4, dtype=torch.float32, device=device)  # written once, so it is paged in
    best = float("inf")
    for i in range(repeats + 1):
        synchronize(device)
        start = time.perf_counter()
        x.sum()
        synchronize(device)
        if i > 0:
            best = min(best, time.perf_counter() - start)
    return x.numel() * x.element_size() / best
