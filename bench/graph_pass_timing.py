"""Where a speculative pass's time goes (a measurement, not a test): bench.speculative --breakdown calls it.

For a GraphPass (llama.speculative.graph_pass) set up on a real prompt: the time of each stage alone (draft,
verify with acceptance, advance: the head's catch-up and the state update) and of the whole pass, each
replayed from its own CUDA graph back to back (device time: CUDA events around 20 replays, the median of 15
rounds; the state is put back before each round so that the positions stay where a row's are), and the
host's share: launching a replay and reading a result back (a replay, a copy to pinned memory, an event,
waiting for it). For the plain decode step (Llama.decode_step, torch.compile's CUDA graphs) the same
back-to-back time per call. On the CPU the stages run eagerly, timed by the wall clock.
"""

import statistics
import time
from typing import Any, Callable, Dict, List, Optional

import torch

from llama.speculative.graph_pass import GraphPass


def _median_ms(fn: Callable[[], None], reset: Optional[Callable[[], None]], cuda: bool, reps: int = 20,
               rounds: int = 15) -> float:
    times = []
    for _ in range(rounds):
        if reset is not None:
            reset()
        if cuda:
            torch.cuda.synchronize()
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            for _ in range(reps):
                fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end) / reps)
        else:
            t = time.perf_counter()
            for _ in range(reps):
                fn()
            times.append((time.perf_counter() - t) * 1e3 / reps)
    return statistics.median(times)


@torch.no_grad()
def time_graph_pass(gp: GraphPass, prompt: List[int]) -> Dict[str, Any]:
    """Milliseconds per pass of each stage, the whole pass, and a pass with its result read back."""
    cuda = gp.graph is not None
    with torch.inference_mode():
        gp.start(prompt)
    with torch.inference_mode(False):
        saved = [t.clone() for t in (gp.pos, gp.fed, gp.feature, gp.history)]

    def reset() -> None:
        for t, s in zip((gp.pos, gp.fed, gp.feature, gp.history), saved):
            t.copy_(s)

    out: Dict[str, Any] = {"kind": gp.kind, "k": gp.k, "device_time": cuda}
    names = ("draft", "verify_and_accept", "advance")
    if cuda:
        stage_graphs = []
        with torch.inference_mode(False):
            for stage in gp.stages:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    stage()
                stage_graphs.append(graph)
        for name, graph in zip(names, stage_graphs):
            out[name + "_ms"] = _median_ms(graph.replay, reset, cuda)
        out["pass_ms"] = _median_ms(gp.graph.replay, reset, cuda)
        pinned = torch.empty(gp.k + 3, dtype=torch.long, pin_memory=True)
        event = torch.cuda.Event()

        def pass_and_read() -> None:  # what the loop does per pass when it does not queue ahead
            gp.graph.replay()
            pinned.copy_(gp.result, non_blocking=True)
            event.record()
            event.synchronize()
            pinned.tolist()

        out["pass_synced_ms"] = _median_ms(pass_and_read, reset, cuda)
    else:
        for name, stage in zip(names, gp.stages):
            out[name + "_ms"] = _median_ms(stage, reset, cuda, reps=10, rounds=5)
        out["pass_ms"] = _median_ms(gp.run_pass, reset, cuda, reps=10, rounds=5)
    reset()
    return out


@torch.no_grad()
def time_plain_step(llama: Any, position: int) -> Dict[str, float]:
    """Milliseconds per call of the plain decode step, 20 calls back to back (on CUDA the time the device
    takes to get through them: the step's own time if the host keeps ahead, the host's if it does not)."""
    device = llama.model.rope_cos.device
    cuda = device.type == "cuda"
    tokens = torch.ones(1, dtype=torch.long, device=device)
    positions = torch.full((1,), position, dtype=torch.long, device=device)
    step = lambda: llama.decode_step(tokens, positions, position + 1)  # noqa: E731
    with torch.inference_mode():
        step()
        return {"plain_step_ms": _median_ms(step, None, cuda)}
