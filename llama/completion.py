"""What one pass of the decode loop is asked for and what it produces: its rows cut into Completions
(llama.predictions shapes those as the prediction dicts of Meta's API)."""

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from llama.config import GenerationConfig
from llama.scoring import LogprobRecorder
from llama.streaming import LENGTH, STOP_STRING, STOP_TOKEN, RowTracker
from llama.tokenizer import Tokenizer


@dataclass
class Completion:
    """One sample for one prompt, as `Llama.complete` returns it."""

    prompt_len: int  # tokens in the prompt
    generated_len: int  # tokens generated (a final stop token not counted)
    tokens: List[int]  # the generated ids (with echo, the prompt's first), without a final stop token
    text: str  # the decoded tokens; with a stop string, the text ends just before it
    stop_reason: str  # "stop_token", "stop_string" or "length"
    logprobs: Optional[List[float]] = None  # one per id in `tokens`, with logprobs or top_logprobs
    top_logprobs: Optional[List[List[Tuple[int, float]]]] = None  # per id, the likeliest (id, logprob)
    stop_token: Optional[int] = None  # the stop token that ended it (stop_reason "stop_token"), e.g. <|eom_id|>


@dataclass
class DecodeRun:
    """One pass of the decode loop: its rows (each prompt repeated n times) and, once done, its results."""

    prompt_tokens: List[List[int]]  # one per row
    sample_index: List[int]  # which of its prompt's n samples each row is
    max_gen_len: int
    config: GenerationConfig
    logprobs: bool = False
    top_logprobs: int = 0
    track: bool = False  # follow every row's text on the host at each step (streaming, stop strings)
    # Filled by the loop:
    tokens: Optional[torch.Tensor] = None  # (bsz, total_len)
    total_len: int = 0
    recorder: Optional[LogprobRecorder] = None
    tracker: Optional[RowTracker] = None


def cut_completions(run: DecodeRun, tokenizer: Tokenizer, echo: bool) -> List[Completion]:
    """Cut each row of a finished run into a Completion: the prompt (with echo) and the generation up to
    its first stop token, max_gen_len tokens or the end of the batch."""
    stop_tokens = set() if run.config.ignore_eos else tokenizer.stop_tokens
    logprobs, top = run.recorder.lists() if run.recorder else (None, None)
    out = []
    for i, row in enumerate(run.tokens.tolist()):
        prompt_len = len(run.prompt_tokens[i])
        if run.tracker:  # the tracker saw every step: it knows where the row stopped and why
            generated, reason = run.tracker.rows[i].tokens, run.tracker.rows[i].stop_reason
        else:
            generated = row[prompt_len : min(prompt_len + run.max_gen_len, run.total_len)]
            # Cut the generation (never the echoed prompt) before its first stop token.
            stops = [j for j, t in enumerate(generated) if t in stop_tokens]
            reason = STOP_TOKEN if stops else LENGTH
            generated = generated[: stops[0]] if stops else generated
        start = 0 if echo else prompt_len
        end = prompt_len + len(generated)
        if reason == STOP_STRING:  # the text ends before the stop string, inside the last token's text
            text = tokenizer.decode(row[start:prompt_len]) + run.tracker.rows[i].text.text
        else:
            text = tokenizer.decode(row[start:end])
        out.append(
            Completion(
                prompt_len=prompt_len,
                generated_len=len(generated),
                tokens=row[start:end],
                text=text,
                stop_reason=reason,
                logprobs=logprobs[i][start:end] if logprobs else None,
                top_logprobs=top[i][start:end] if top else None,
                stop_token=row[prompt_len + len(generated)] if reason == STOP_TOKEN else None,
            )
        )
    return out
