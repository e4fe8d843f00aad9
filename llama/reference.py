"""Meta's decode loop: the reference the fast loop of llama.fast.loop is tested against.

Prompts are laid out left-aligned in one (bsz, total_len) buffer. The first call feeds every position up to
the shortest prompt's end; then each step feeds one position for every row at once. Rows still inside
their prompt keep their prompt token at that position (the sampled one is thrown away), so every row
draws from the sampler at every step, as in Meta's llama3 `generate`. `Llama` runs this loop with
fast=False, and with fast=True where only it reproduces Meta's samples (sampling from torch's global random
stream, prompts of different lengths).
"""

from typing import Callable, Iterator, List, Sequence

import torch

from llama.completion import DecodeRun
from llama.model import Transformer
from llama.sampling import Context, Sampler
from llama.scoring import LogprobRecorder
from llama.streaming import RowTracker, StreamEvent


@torch.inference_mode()
def decode_reference(
    model: Transformer,
    run: DecodeRun,
    sampler: Sampler,
    stop_ids: List[int],
    detokenize: Callable[[Sequence[int]], str],
    pad_id: int,
) -> Iterator[List[StreamEvent]]:
    """Meta's decode loop over the rows of `run`, the reference for llama.fast.loop's `decode`: leaves on
    `run` the tokens (bsz, total_len) (row i's generation from position len(prompt i) on), the logprob
    recorder and the row tracker; with run.track, yields each step's StreamEvents. The rows stop at a
    token of `stop_ids`; positions past a row's end are left as they are: the caller cuts."""
    params = model.params
    cfg = run.config
    bsz = len(run.prompt_tokens)
    prompt_lens = [len(t) for t in run.prompt_tokens]
    min_prompt_len, max_prompt_len = min(prompt_lens), max(prompt_lens)
    total_len = min(params.max_seq_len, run.max_gen_len + max_prompt_len)

    device = model.rope_cos.device
    tokens = torch.full((bsz, total_len), pad_id, dtype=torch.long, device=device)
    for k, t in enumerate(run.prompt_tokens):
        tokens[k, : len(t)] = torch.tensor(t, dtype=torch.long, device=device)
    positions = torch.arange(total_len, device=device)
    prompt_lens_t = torch.tensor(prompt_lens, device=device)
    # True where a row still holds its own prompt: those positions keep the prompt token.
    input_text_mask = positions[None, :] < prompt_lens_t[:, None]
    recorder = LogprobRecorder(bsz, total_len, run.top_logprobs, device) if run.logprobs else None

    stop_tokens = torch.tensor(stop_ids, dtype=torch.long, device=device)
    tracker = None
    if run.track:
        ends = [min(p + run.max_gen_len, total_len) for p in prompt_lens]
        tracker = RowTracker(detokenize, prompt_lens, ends, stop_ids, cfg.stop)
    eos_reached = torch.zeros(bsz, dtype=torch.bool, device=device)
    prev_pos = 0
    if min_prompt_len == total_len and recorder:  # nothing to generate: just score the prompts
        logits = model.forward(tokens, prev_pos)
        recorder.record(logits[:, :-1], tokens, first_target=1)

    for cur_pos in range(min_prompt_len, total_len):
        # The first call feeds every position up to the shortest prompt's end; then one token a step.
        logits = model.forward(tokens[:, prev_pos:cur_pos], prev_pos)  # (bsz, cur-prev, vocab)
        # Processing and sampling see the last position's logits and every row's tokens so far (here
        # all rows are at cur_pos, those still in their prompt with n_generated < 0).
        context = Context(tokens[:, :cur_pos], torch.full_like(prompt_lens_t, cur_pos), prompt_lens_t)
        next_tok = sampler(logits[:, -1], context)
        next_tok = torch.where(input_text_mask[:, cur_pos], tokens[:, cur_pos], next_tok)
        tokens[:, cur_pos] = next_tok
        if recorder:
            # Logits at positions prev_pos..cur_pos-1 predict the tokens at prev_pos+1..cur_pos.
            recorder.record(logits, tokens, first_target=prev_pos + 1)
        eos_reached |= ~input_text_mask[:, cur_pos] & torch.isin(next_tok, stop_tokens)
        prev_pos = cur_pos
        if tracker:  # host-side rows: the text so far, stop strings, lengths
            yield tracker.step([cur_pos] * bsz, next_tok.tolist())
            eos_reached |= torch.tensor(tracker.done, device=device)
        if bool(eos_reached.all()):
            break
    if tracker:
        yield tracker.finish_all()
    run.tokens, run.recorder, run.tracker, run.total_len = tokens, recorder, tracker, total_len
