"""The fast decode loop: every prompt prefilled whole in one batched call, then one token per row per step,
each row at its own position, with no device-to-host copy in the step.

It produces what the reference loop in `Llama.generate` produces (the same greedy tokens, logits equal to
float32 rounding; sampled tokens too when the prompts have equal lengths) with less work:
- the reference prefills only up to the shortest prompt and feeds the rest of longer prompts one position
  per step; here each row's whole prompt goes in the first call and its generation starts right after it,
  so a batch takes max_gen_len steps, not max_gen_len plus the spread of prompt lengths. (With prompts of
  different lengths a row's n-th token is thus drawn at another step than in the reference, from another
  part of the random stream: sampled tokens then differ from the reference's for the same seed, though each
  is drawn from the same distribution.)
- the prefill computes logits only at each prompt's last position unless log-probabilities are asked for;
- when the prompts have one length, every row stays at one position and the step is the reference's own
  (an int position, no mask); otherwise each row's attention is masked to its own positions;
- stop tokens are checked on the device; the host looks at the flags only every `stop_check_every` steps
  (extra steps after every row has stopped change nothing: outputs are cut at the first stop token; when
  sampling, though, they would draw from the random generator, so sampling looks every step);
- optionally (CUDA), the decode step is compiled with CUDA graphs: see DecodeStep.
"""

import functools
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from llama.model import Positions, Transformer
from llama.sampling import next_token


class DecodeStep:
    """One decode step: one new token per row, each at its own cache position -> next-token logits.

    With `compile=True` the step is compiled by torch.compile in "reduce-overhead" mode (CUDA graphs on
    CUDA): shapes must not change between steps, so the step always reads the whole cache (max_seq_len
    positions), masked per row, instead of the part filled so far.
    """

    def __init__(self, model: Transformer, compile: bool = False):
        self.model = model
        self.forward = model.forward
        self.compiled = None
        if compile:
            # Compiled code cannot enter inference mode: compile forward's undecorated body (run under no_grad).
            self.forward = functools.partial(type(model).forward.__wrapped__, model)
            self.compiled = torch.compile(self._step, mode="reduce-overhead", fullgraph=True, dynamic=False)

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


@dataclass
class Batch:
    """The prompts of one generate call laid out on the device."""

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


def prefill(
    model: Transformer, batch: Batch, token_logprobs: Optional[torch.Tensor]
) -> torch.Tensor:
    """Run every prompt through the model in one call; return each row's next-token logits (bsz, vocab).

    Shorter prompts are padded (with token 0) to the longest; what the padding writes into a row's cache is
    overwritten, position by position, before that row's attention can reach it. With `token_logprobs`
    (bsz, total_len + 1), fill in the log-probability of every prompt token after the first.
    """
    bsz = len(batch.prompt_lens)
    max_len = max(batch.prompt_lens)
    device = batch.tokens.device
    lens = torch.tensor(batch.prompt_lens, device=device)
    inputs = batch.tokens[:, :max_len]
    inputs = torch.where(torch.arange(max_len, device=device)[None, :] < lens[:, None], inputs, 0)
    last = lens - 1  # (bsz,) each prompt's last position
    if token_logprobs is None:
        return model.forward(inputs, 0, last_pos=last)[:, 0]
    logits = model.forward(inputs, 0)  # (bsz, max_len, vocab)
    if max_len > 1:
        # Logits at position i predict token i + 1 (pad positions give junk, cut or overwritten later).
        token_logprobs[:, 1:max_len] = -F.cross_entropy(
            logits[:, :-1].transpose(1, 2), target=inputs[:, 1:], reduction="none"
        )
    return logits[torch.arange(bsz, device=device), last]


def decode(
    model: Transformer,
    step: DecodeStep,
    prompt_tokens: List[List[int]],
    max_gen_len: int,
    total_len: int,
    temperature: float,
    top_p: float,
    logprobs: bool,
    stop_tokens: torch.Tensor,
    pad_id: int,
    stop_check_every: int = 1,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Generate for every prompt: tokens (bsz, total_len) laid out as the reference loop lays them out
    (row i's generation from position len(prompt i) on), and token log-probabilities (bsz, total_len)
    when `logprobs`. Positions past a row's end are left as they are; the caller cuts at stop tokens."""
    device = stop_tokens.device
    batch = lay_out(prompt_tokens, max_gen_len, total_len, pad_id, device)
    bsz = len(prompt_tokens)
    token_logprobs = torch.zeros(batch.tokens.shape, dtype=torch.float, device=device) if logprobs else None
    n_steps = max(e - n for e, n in zip(batch.ends, batch.prompt_lens))  # the longest-running row's
    if n_steps == 0 and token_logprobs is None:  # every prompt fills the context: nothing to do
        return batch.tokens[:, :total_len], None
    logits = prefill(model, batch, token_logprobs)  # (bsz, vocab)

    positions = torch.tensor(batch.prompt_lens, device=device)  # (bsz,) where each row's next token goes
    ends = torch.tensor(batch.ends, device=device)
    sink = torch.full_like(positions, total_len)  # the scratch column, for rows already at their end
    stopped = torch.zeros(bsz, dtype=torch.bool, device=device)
    # Prompts of one length keep every row at one position: the step then needs no per-row mask.
    aligned = len(set(batch.prompt_lens)) == 1
    prefilter = device.type == "cpu"  # its fallback test reads a flag on the host: free on the CPU only
    for i in range(n_steps):
        next_tok = next_token(logits, temperature, top_p, prefilter=prefilter)  # (bsz,)
        write_at = torch.where(positions < ends, positions, sink)[:, None]  # (bsz, 1)
        batch.tokens.scatter_(1, write_at, next_tok[:, None])
        if token_logprobs is not None:
            token_logprobs.scatter_(1, write_at, -F.cross_entropy(logits, next_tok, reduction="none")[:, None])
        stopped |= torch.isin(next_tok, stop_tokens) | (positions + 1 >= ends)
        if i == n_steps - 1 or ((i + 1) % stop_check_every == 0 and bool(stopped.all())):
            break
        # Feed the new tokens. Rows past their end keep running (a batch runs as one) on a clamped position.
        feed_at = torch.clamp(positions, max=total_len - 1)
        kv_len = min(max(batch.prompt_lens) + i + 1, total_len)  # every row's position is below it
        logits = step(next_tok, batch.prompt_lens[0] + i if aligned else feed_at, kv_len)
        positions += 1
    out_logprobs = token_logprobs[:, :total_len] if token_logprobs is not None else None
    return batch.tokens[:, :total_len], out_logprobs
