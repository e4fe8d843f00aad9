"""What a decode loop is asked for (`Rows`), what it returns (`Decoded`), and how each row of the result is
cut into a `Completion` (llama.predictions shapes those as the prediction dicts of Meta's API)."""

from dataclasses import dataclass
from typing import Any, Generator, List, Optional, Tuple

import torch

from llama.config import GenerationConfig
from llama.scoring import LogprobRecorder
from llama.streaming import LENGTH, STOP_STRING, STOP_TOKEN, RowTracker, StreamEvent
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
    speculative: Optional[Any] = None  # with speculative decoding: its SpeculativeStats (llama.speculative)


@dataclass
class Rows:
    """The rows of one decode loop: each prompt repeated n times (one row per sample), and what to record."""

    prompt_tokens: List[List[int]]  # one per row
    sample_index: List[int]  # which of its prompt's n samples each row is
    max_gen_len: int
    config: GenerationConfig
    logprobs: bool = False
    top_logprobs: int = 0
    track: bool = False  # follow every row's text on the host at each step (streaming, stop strings)
    speculative: Optional[Any] = None  # a llama.speculative.Speculation: decode by drafting and verifying


@dataclass
class Decoded:
    """What a decode loop returns."""

    tokens: torch.Tensor  # (bsz, total_len or more): row i's prompt, then its generation from len(prompt i) on
    total_len: int  # positions the loop could fill: min(max_seq_len, max_gen_len + longest prompt)
    recorder: Optional[LogprobRecorder]  # the logprobs, with rows.logprobs
    tracker: Optional[RowTracker]  # each row's text and stop reason, with rows.track
    speculative: Optional[List[Any]] = None  # with rows.speculative: each row's SpeculativeStats


# A decode loop: yields each step's StreamEvents (with rows.track; nothing otherwise), returns a Decoded.
DecodeLoop = Generator[List[StreamEvent], None, Decoded]


def run_to_end(loop: DecodeLoop) -> Decoded:
    """Run a decode loop to its end, dropping the events it streams, and return its result."""
    while True:
        try:
            next(loop)
        except StopIteration as end:
            return end.value


def cut_completions(rows: Rows, decoded: Decoded, tokenizer: Tokenizer, echo: bool) -> List[Completion]:
    """Cut each row of a finished loop into a Completion: the prompt (with echo) and the generation up to
    its first stop token, max_gen_len tokens or the end of the batch."""
    stop_tokens = set() if rows.config.ignore_eos else tokenizer.stop_tokens
    logprobs, top = decoded.recorder.lists() if decoded.recorder else (None, None)
    out = []
    for i, row in enumerate(decoded.tokens.tolist()):
        prompt_len = len(rows.prompt_tokens[i])
        if decoded.tracker:  # the tracker saw every step: it knows where the row stopped and why
            generated, reason = decoded.tracker.rows[i].tokens, decoded.tracker.rows[i].stop_reason
        else:
            generated = row[prompt_len : min(prompt_len + rows.max_gen_len, decoded.total_len)]
            # Cut the generation (never the echoed prompt) before its first stop token.
            stops = [j for j, t in enumerate(generated) if t in stop_tokens]
            reason = STOP_TOKEN if stops else LENGTH
            generated = generated[: stops[0]] if stops else generated
        start = 0 if echo else prompt_len
        end = prompt_len + len(generated)
        if reason == STOP_STRING:  # the text ends before the stop string, inside the last token's text
            text = tokenizer.decode(row[start:prompt_len]) + decoded.tracker.rows[i].text.text
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
                speculative=decoded.speculative[i] if decoded.speculative else None,
            )
        )
    return out
