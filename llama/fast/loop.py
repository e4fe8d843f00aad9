"""The fast decode loop: every prompt prefilled whole in one batched call, then one token per row per step,
each row at its own position, with no device-to-host copy in the step.

It produces what the reference loop (`Llama.decode_reference`, llama/generation.py) produces: the same greedy
tokens, logits equal to float32 rounding, the same samples for the same seed, with less work:
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
- optionally (CUDA), the decode step is compiled with CUDA graphs: see llama.fast.step.DecodeStep.
"""

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch

from llama.completion import DecodeLoop, Decoded, Rows
from llama.fast.step import DecodeStep, fast_forward
from llama.model import Transformer
from llama.sampling import Context, Sampler
from llama.scoring import LogprobRecorder
from llama.streaming import RowTracker


# Greedy decoding on an accelerator looks at the stop flags every this many steps (see stop_check_interval).
GREEDY_STOP_CHECK_EVERY = 4


def stop_check_interval(device: torch.device, temperature: float, track: bool) -> int:
    """How many steps the loop runs between looks at its stop flags.

    A look is a device sync on accelerators: greedy decoding there looks every GREEDY_STOP_CHECK_EVERY steps,
    without waiting, at the copy started at the look before (StopWatch), so a batch runs at most
    2 * GREEDY_STOP_CHECK_EVERY - 1 steps past its last stop. The CPU has no sync to save; sampling looks
    every step, to draw from the random stream as the reference does; tracked rows (streaming, stop
    strings) are looked at on the host at every step anyway.
    """
    if device.type == "cpu" or temperature > 0 or track:
        return 1
    return GREEDY_STOP_CHECK_EVERY


class StopWatch:
    """Tells the loop when every row has stopped, looking at the device's flags every `every` steps.

    A look is a device-to-host copy: the host waits for the device, which then idles while the host queues
    the next step (about 1% of an 8B decode step on a GPU at batch 1, with a look every 8 steps). So with
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
        return fast_forward(model, inputs, 0, last_pos=last)[:, 0]
    logits = fast_forward(model, inputs, 0)  # (bsz, max_len, vocab)
    # Logits at position i predict token i + 1 (padding gives junk there: cut, or overwritten later).
    recorder.record(logits[:, :-1], inputs, first_target=1)
    return logits[torch.arange(bsz, device=device), last]


@torch.inference_mode()
def decode(
    model: Transformer,
    step: DecodeStep,
    rows: Rows,
    total_len: int,
    sampler: Sampler,
    stop_ids: List[int],
    detokenize: Callable[[Sequence[int]], str],
    pad_id: int,
    stop_check_every: int = 1,
) -> DecodeLoop:
    """The fast decode loop over `rows`, with the results of the reference loop (Llama.decode_reference):
    returns the tokens (bsz, total_len + 1 scratch column) laid out as the reference lays them out (row i's
    generation from position len(prompt i) on), the logprob recorder and the row tracker; with rows.track,
    yields each step's StreamEvents. Positions past a row's end are left as they are: the caller cuts."""
    device = model.rope_cos.device
    batch = lay_out(rows.prompt_tokens, rows.max_gen_len, total_len, pad_id, device)
    bsz = len(rows.prompt_tokens)
    recorder = LogprobRecorder(bsz, total_len + 1, rows.top_logprobs, device) if rows.logprobs else None
    tracker = None
    if rows.track:
        tracker = RowTracker(detokenize, batch.prompt_lens, batch.ends, stop_ids, rows.config.stop)
    decoded = Decoded(batch.tokens, total_len, recorder, tracker)

    n_steps = max(e - n for e, n in zip(batch.ends, batch.prompt_lens))  # the longest-running row's
    if n_steps == 0 and recorder is None:  # every prompt fills the context: nothing to do
        if tracker:
            yield tracker.finish_all()
        return decoded
    logits = prefill(model, batch, recorder)  # (bsz, vocab)

    stop_tokens = torch.tensor(stop_ids, dtype=torch.long, device=device)
    prompt_lens = torch.tensor(batch.prompt_lens, device=device)
    positions = prompt_lens.clone()  # (bsz,) where each row's next token goes
    ends = torch.tensor(batch.ends, device=device)
    last = ends - 1  # (bsz,) each row's last position: it stops after writing there
    sink = torch.full_like(positions, total_len)  # the scratch column, for rows already at their end
    stopped = torch.zeros(bsz, dtype=torch.bool, device=device)
    # Prompts of one length keep every row at one position: the step then needs no per-row mask.
    aligned = len(set(batch.prompt_lens)) == 1
    watch = StopWatch(stop_check_every)
    # A step that makes the greedy pick itself (the CPU step compiled whole, llama.fast.cpu_step) hands it back
    # with its logits, where the sampler would only take that pick.
    pick_in_step = sampler.plain_greedy and hasattr(step, "decode_and_pick")
    picked = None  # (bsz,) the last step's own pick, or None
    for i in range(n_steps):
        if picked is not None:
            next_tok = picked
        else:  # each row's tokens so far: its prompt and what it generated (rows past their end: up to it)
            context = Context(batch.tokens, torch.minimum(positions, ends), prompt_lens)
            next_tok = sampler(logits, context)  # (bsz,)
        write_at = torch.where(positions < ends, positions, sink)[:, None]  # (bsz, 1)
        batch.tokens.scatter_(1, write_at, next_tok[:, None])
        if recorder is not None:
            recorder.record_rows(logits, next_tok, write_at[:, 0])
        stopped |= torch.isin(next_tok, stop_tokens) | (positions >= last)
        if tracker:  # host-side rows: the text so far, stop strings, lengths
            yield tracker.step(positions.tolist(), next_tok.tolist())
            stopped |= torch.tensor(tracker.done, device=device)
        if i == n_steps - 1 or watch.all_stopped(i, stopped):
            break
        # Feed the new tokens. Rows past their end keep running (a batch runs as one) on a clamped position.
        kv_len = min(max(batch.prompt_lens) + i + 1, total_len)  # every row's position is below it
        at = batch.prompt_lens[0] + i if aligned else torch.clamp(positions, max=total_len - 1)
        if pick_in_step:
            logits, picked = step.decode_and_pick(next_tok, at, kv_len)
        else:
            logits = step(next_tok, at, kv_len)
        positions += 1
    if tracker:
        yield tracker.finish_all()
    return decoded
