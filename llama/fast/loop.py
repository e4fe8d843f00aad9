"""The fast decode loop: every prompt prefilled whole in one batched call, then one token per row per step,
each row at its own position, with no device-to-host copy in the step.

It produces what the reference loop (llama.reference) produces: the same greedy tokens, logits
equal to float32 rounding, the same samples for the same seed, with less work:
- the reference prefills only up to the shortest prompt and feeds the rest of longer prompts one position
  per step; here each row's whole prompt goes in the first call and its generation starts right after it,
  so a batch takes max_gen_len steps, not max_gen_len plus the spread of prompt lengths. (A row's n-th token
  is thus drawn at another step than in the reference: with per-row generators (a `seed` in the config)
  that changes nothing, but with torch's global random stream it would, so for that case, sampling from
  prompts of different lengths, `Llama` runs the reference loop.)
- the prefill computes logits only at each prompt's last position unless log-probabilities are asked for;
- when the prompts have one length, every row stays at one position and the step is the reference's own
  (an int position, no mask); otherwise each row's attention is masked to its own positions;
- stop tokens are checked on the device; the host looks at the flags only every `stop_check_every` steps,
  and then without waiting for the device (StopWatch). Extra steps after every row has stopped change
  nothing (outputs are cut at the first stop token); when sampling, though, they would draw from the random
  generator, so sampling looks every step;
- optionally (CUDA), the decode step is compiled with CUDA graphs: see DecodeStep.
"""

import functools
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import fairscale.nn.model_parallel.initialize as fs_init
import torch

from llama.completion import DecodeRun
from llama.model import Positions, Transformer
from llama.sampling import Context, Sampler
from llama.scoring import LogprobRecorder
from llama.streaming import RowTracker, StreamEvent


def compile_options() -> Dict[str, bool]:
    """Inductor's options for the compiled decode step (compile=True).

    CUDA graphs (one launch a step); max_autotune, which times inductor's own kernels for each matrix
    product against cuBLAS (at batch 1 it picks generated one-row products fused with the RMSNorm before
    them); coordinate-descent tuning of the generated kernels' block sizes; programmatic dependent launch
    where torch offers it (Hopper and later; inductor leaves it out elsewhere): each generated kernel starts
    while the one before finishes, waiting only where it reads that one's output.
    Measured on an H100, Llama 3 8B, batch 1: in one call, graphs and tuning 151.5 tok/s, with max_autotune
    167.9 (scripts/compile_variants.py); in one process, without and with the launch, 168.1 -> 172.6
    (scripts/compile_ab.py).
    """
    import torch._inductor.config as inductor_config  # (here: only compile=True needs it)

    options = {"triton.cudagraphs": True, "max_autotune": True, "coordinate_descent_tuning": True}
    if hasattr(inductor_config.triton, "enable_pdl"):  # an option of recent torch versions
        options["triton.enable_pdl"] = True
    return options


class DecodeStep:
    """One decode step: one new token per row, each at its own cache position -> next-token logits.

    With `compile=True` the step is compiled by torch.compile with CUDA graphs (on CUDA) and tuned
    generated kernels: shapes must not change between steps, so the step always reads the whole cache (max_seq_len
    positions), masked per row, instead of the part filled so far.
    """

    def __init__(self, model: Transformer, compile: bool = False):
        self.model = model
        self.forward = model.forward
        self.compiled = None
        if compile:
            if fs_init.get_model_parallel_world_size() > 1:
                raise ValueError("compile=True needs one model-parallel rank (fairscale's collectives don't compile)")
            # Compiled code cannot enter inference mode: compile forward's undecorated body (run under no_grad).
            self.forward = functools.partial(type(model).forward.__wrapped__, model)
            self.compiled = torch.compile(self._step, options=compile_options(), fullgraph=True, dynamic=False)

    def _step(self, tokens: torch.Tensor, positions: Positions, kv_len: int) -> torch.Tensor:
        if isinstance(positions, int):
            return self.forward(tokens[:, None], positions)[:, 0]
        return self.forward(tokens[:, None], positions, kv_len=kv_len)[:, 0]  # (bsz, vocab)

    def __call__(self, tokens: torch.Tensor, positions: Positions, kv_len: int) -> torch.Tensor:
        """tokens: (bsz,); positions: (bsz,), or an int when every row is at the same position (then the
        step reads the cache up to it, unmasked); kv_len: cache positions to read, beyond every row's."""
        if self.compiled is not None:
            if isinstance(positions, int):
                positions = torch.full_like(tokens, positions)
            # Compiled code cannot take inference tensors (those made under torch.inference_mode): run it
            # outside inference mode, on copies. Its outputs are overwritten by the next replay: copy them.
            with torch.inference_mode(False), torch.no_grad():
                logits = self.compiled(tokens.clone(), positions.clone(), self.model.params.max_seq_len)
                return logits.clone()
        return self._step(tokens, positions, kv_len)


class StopWatch:
    """Tells the loop when every row has stopped, looking at the device's flags every `every` steps.

    A look is a device-to-host copy: the host waits for the device, which then idles while the host queues
    the next step (on an H100, 8B, batch 1, about 1% of the decode time with a look every 8 steps). So with
    every > 1 a look only starts the copy of the flag and reads the one started at the look before: if the
    host has to wait for that copy, the device still has the steps queued since to work on. Rows may thus
    run up to 2 * every - 1 steps past the last stop, which changes no output (outputs are cut at the first
    stop token).
    """

    def __init__(self, every: int):
        self.every = every
        self.pending: Optional[tuple] = None  # (host copy of the flag, its copy's completion event or None)

    def all_stopped(self, step: int, stopped: torch.Tensor) -> bool:
        """stopped: (bsz,) bool flags on the device, after step `step` (0-based)."""
        if (step + 1) % self.every:
            return False
        if self.every == 1:
            return bool(stopped.all())
        seen = self.pending is not None and self._read(*self.pending)
        flag = stopped.all()  # a new tensor: later steps' in-place updates of `stopped` don't reach it
        if flag.is_cuda:
            host = torch.empty((), dtype=torch.bool, pin_memory=True)
            host.copy_(flag, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self.pending = (host, event)
        else:
            self.pending = (flag, None)
        return seen

    @staticmethod
    def _read(flag: torch.Tensor, event: Optional["torch.cuda.Event"]) -> bool:
        if event is not None:
            event.synchronize()
        return bool(flag)


@dataclass
class Batch:
    """The prompts of one decode run laid out on the device."""

    tokens: torch.Tensor  # (bsz, total_len + 1): prompts, then generations; the last column is scratch
    prompt_lens: List[int]
    ends: List[int]  # row i generates positions prompt_lens[i] .. ends[i] - 1
    total_len: int


def lay_out(
    prompt_tokens: List[List[int]], max_gen_len: int, total_len: int, pad_id: int, device: torch.device
) -> Batch:
    """Prompts left-aligned in a (bsz, total_len + 1) buffer filled with pad_id."""
    bsz = len(prompt_tokens)
    tokens = torch.full((bsz, total_len + 1), pad_id, dtype=torch.long, device=device)
    for k, t in enumerate(prompt_tokens):
        tokens[k, : len(t)] = torch.tensor(t, dtype=torch.long, device=device)
    prompt_lens = [len(t) for t in prompt_tokens]
    ends = [min(n + max_gen_len, total_len) for n in prompt_lens]
    return Batch(tokens, prompt_lens, ends, total_len)


def prefill(model: Transformer, batch: Batch, recorder: Optional[LogprobRecorder]) -> torch.Tensor:
    """Run every prompt through the model in one call; return each row's next-token logits (bsz, vocab).

    Shorter prompts are padded (with token 0) to the longest; what the padding writes into a row's cache is
    overwritten, position by position, before that row's attention can reach it. With a `recorder`, record
    the log-probability of every prompt token after the first.
    """
    bsz = len(batch.prompt_lens)
    max_len = max(batch.prompt_lens)
    device = batch.tokens.device
    lens = torch.tensor(batch.prompt_lens, device=device)
    inputs = batch.tokens[:, :max_len]
    inputs = torch.where(torch.arange(max_len, device=device)[None, :] < lens[:, None], inputs, 0)
    last = lens - 1  # (bsz,) each prompt's last position
    if recorder is None:
        return model.forward(inputs, 0, last_pos=last)[:, 0]
    logits = model.forward(inputs, 0)  # (bsz, max_len, vocab)
    # Logits at position i predict token i + 1 (padding gives junk there: cut, or overwritten later).
    recorder.record(logits[:, :-1], inputs, first_target=1)
    return logits[torch.arange(bsz, device=device), last]


@torch.inference_mode()
def decode(
    model: Transformer,
    step: DecodeStep,
    run: DecodeRun,
    total_len: int,
    sampler: Sampler,
    stop_ids: List[int],
    detokenize: Callable[[Sequence[int]], str],
    pad_id: int,
    stop_check_every: int = 1,
) -> Iterator[List[StreamEvent]]:
    """The fast decode loop over the rows of `run`, as llama.reference's loop runs it: leaves on `run`
    the tokens (bsz, total_len (+ 1 scratch column)) laid out as the reference lays them out (row i's
    generation from position len(prompt i) on), the logprob recorder and the row tracker; with run.track,
    yields each step's StreamEvents. Positions past a row's end are left as they are: the caller cuts."""
    device = model.rope_cos.device
    batch = lay_out(run.prompt_tokens, run.max_gen_len, total_len, pad_id, device)
    bsz = len(run.prompt_tokens)
    recorder = LogprobRecorder(bsz, total_len + 1, run.top_logprobs, device) if run.logprobs else None
    tracker = None
    if run.track:
        tracker = RowTracker(detokenize, batch.prompt_lens, batch.ends, stop_ids, run.config.stop)
    run.tokens, run.recorder, run.tracker, run.total_len = batch.tokens, recorder, tracker, total_len

    n_steps = max(e - n for e, n in zip(batch.ends, batch.prompt_lens))  # the longest-running row's
    if n_steps == 0 and recorder is None:  # every prompt fills the context: nothing to do
        if tracker:
            yield tracker.finish_all()
        return
    logits = prefill(model, batch, recorder)  # (bsz, vocab)

    stop_tokens = torch.tensor(stop_ids, dtype=torch.long, device=device)
    prompt_lens = torch.tensor(batch.prompt_lens, device=device)
    positions = prompt_lens.clone()  # (bsz,) where each row's next token goes
    ends = torch.tensor(batch.ends, device=device)
    sink = torch.full_like(positions, total_len)  # the scratch column, for rows already at their end
    stopped = torch.zeros(bsz, dtype=torch.bool, device=device)
    # Prompts of one length keep every row at one position: the step then needs no per-row mask.
    aligned = len(set(batch.prompt_lens)) == 1
    watch = StopWatch(stop_check_every)
    for i in range(n_steps):
        # Each row's tokens so far: its prompt and what it generated (rows past their end: up to it).
        context = Context(batch.tokens, torch.minimum(positions, ends), prompt_lens)
        next_tok = sampler(logits, context)  # (bsz,)
        write_at = torch.where(positions < ends, positions, sink)[:, None]  # (bsz, 1)
        batch.tokens.scatter_(1, write_at, next_tok[:, None])
        if recorder is not None:
            recorder.record_rows(logits, next_tok, write_at[:, 0])
        stopped |= torch.isin(next_tok, stop_tokens) | (positions + 1 >= ends)
        if tracker:  # host-side rows: the text so far, stop strings, lengths
            yield tracker.step(positions.tolist(), next_tok.tolist())
            stopped |= torch.tensor(tracker.done, device=device)
        if i == n_steps - 1 or watch.all_stopped(i, stopped):
            break
        # Feed the new tokens. Rows past their end keep running (a batch runs as one) on a clamped position.
        feed_at = torch.clamp(positions, max=total_len - 1)
        kv_len = min(max(batch.prompt_lens) + i + 1, total_len)  # every row's position is below it
        logits = step(next_tok, batch.prompt_lens[0] + i if aligned else feed_at, kv_len)
        positions += 1
    if tracker:
        yield tracker.finish_all()
