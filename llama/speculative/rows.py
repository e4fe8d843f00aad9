"""Speculative decoding as a decode loop of `Llama` (llama.completion's interface: Rows in, StreamEvents
yielded, a Decoded returned), so that everything built on the loops works with speculation as without:
text_completion, chat_completion, generate_stream, stop tokens and strings, n samples, logprobs and
top_logprobs, echo, max_gen_len, and every logits processor (repetition penalty, banned words and ids,
min_new_tokens).

Each row is decoded on its own, one after another, on the model's cache row 0: rows accept different
numbers of drafts per pass, so a batch would spread over different positions at every pass. A batch of
several rows (several prompts, or n samples of one) thus gives each row exactly what plain decoding gives
it, without the speed of a batched pass (with streaming, a row's events all come before the next row's).
Rows sampled without a `seed` draw from torch's global random stream one row after the other.
"""

from typing import Any, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from llama.completion import DecodeLoop, Decoded, Rows
from llama.sampling import make_sampler
from llama.scoring import LogprobRecorder
from llama.speculative.generate import SpeculativeStats, _run
from llama.speculative.verify_step import use_verify_step
from llama.streaming import RowTracker, StreamEvent


class RowOutput:
    """Where row `row`'s tokens go: the loop's token buffer (bsz, total_len), its logprob recorder and its
    row tracker (text, stop strings). Decides when the row is done."""

    def __init__(self, row: int, buffer: torch.Tensor, end: int, stop_ids: Sequence[int],
                 recorder: Optional[LogprobRecorder], tracker: Optional[RowTracker]):
        self.row, self.buffer, self.end = row, buffer, end
        self.stop_ids = set(stop_ids)
        self.recorder, self.tracker = recorder, tracker

    @property
    def wants_prompt_logits(self) -> bool:
        """Whether the prompt's logprobs are recorded (plain decoding records them with logprobs, for echo)."""
        return self.recorder is not None

    def prompt_logits(self, logits: torch.Tensor) -> None:
        """logits (len(prompt) - 1, vocab) at positions 0 .. len(prompt) - 2, predicting tokens 1 ..."""
        targets = self.buffer[self.row, 1 : 1 + logits.shape[0]]
        self._record(1, logits, targets)

    def take(self, first_pos: int, emitted: List[int], logits: torch.Tensor) -> Tuple[List[StreamEvent], bool]:
        """The tokens of one pass, at positions first_pos ...; logits (>= len(emitted), vocab): the raw
        logits that predicted them. Returns the stream events and whether the row is done (a stop token,
        a stop string, its end); tokens after the one that ends it are dropped."""
        events, done, kept = self.track(first_pos, emitted)
        kept_tokens = self.write(first_pos, emitted[:kept])
        if self.recorder is not None:
            self._record(first_pos, logits[:kept], kept_tokens)
        return events, done

    def track(self, first_pos: int, emitted: List[int]) -> Tuple[List[StreamEvent], bool, int]:
        """take's host side, without touching the device: (stream events, done, how many tokens are kept)."""
        events: List[StreamEvent] = []
        kept = 0
        done = False
        for token in emitted:
            pos = first_pos + kept
            kept += 1
            if self.tracker is not None:
                # The tracker steps every row; the others get position -1, "still in its prompt", and skip.
                positions = [-1] * len(self.tracker.rows)
                positions[self.row] = pos
                events += self.tracker.step(positions, [token] * len(positions))
                done = self.tracker.rows[self.row].stop_reason is not None
            else:
                done = token in self.stop_ids or pos + 1 >= self.end
            if done:
                break
        return events, done, kept

    def write(self, first_pos: int, tokens: List[int]) -> torch.Tensor:
        """Put tokens into the row's buffer at positions first_pos ...; returns them as a tensor."""
        kept_tokens = torch.tensor(tokens, dtype=torch.long, device=self.buffer.device)
        self.buffer[self.row, first_pos : first_pos + len(tokens)] = kept_tokens
        return kept_tokens

    def _record(self, first_pos: int, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """What LogprobRecorder.record does for a batch, for this row alone."""
        rec, end = self.recorder, first_pos + logits.shape[0]
        rec.token_logprobs[self.row, first_pos:end] = -F.cross_entropy(logits, targets, reduction="none")
        if rec.top_k:
            values, ids = torch.log_softmax(logits, dim=-1).topk(rec.top_k, dim=-1)  # (n, top_k)
            rec.top_values[self.row, first_pos:end] = values
            rec.top_ids[self.row, first_pos:end] = ids


@torch.inference_mode()
def decode_rows(llama: Any, rows: Rows, speculation: Any) -> DecodeLoop:
    """Llama's decode loop over `rows`, each row speculated on its own with `speculation` (a Speculation:
    drafter, k); its `stats` become the call's (all rows), and the Decoded carries each row's."""
    cfg = rows.config
    model = llama.model
    device = model.rope_cos.device
    bsz = len(rows.prompt_tokens)
    prompt_lens = [len(t) for t in rows.prompt_tokens]
    total_len = min(model.params.max_seq_len, rows.max_gen_len + max(prompt_lens))
    ends = [min(p + rows.max_gen_len, total_len) for p in prompt_lens]
    stop_ids = [] if cfg.ignore_eos else sorted(llama.tokenizer.stop_tokens)

    buffer = torch.full((bsz, total_len), llama.tokenizer.pad_id, dtype=torch.long, device=device)
    for i, t in enumerate(rows.prompt_tokens):
        buffer[i, : len(t)] = torch.tensor(t, dtype=torch.long, device=device)
    recorder = LogprobRecorder(bsz, total_len, rows.top_logprobs, device) if rows.logprobs else None
    tracker = None
    if rows.track:
        tracker = RowTracker(llama.tokenizer.decode, prompt_lens, ends, stop_ids, cfg.stop)
    # The plain loop's sampler, for its processors (banned words as the tokenizer spells them) and its
    # per-row random streams (with a seed: row i draws from (seed, its sample number), as there).
    sampler = make_sampler(cfg, llama.tokenizer, rows.sample_index, device, prefilter=False)
    if getattr(llama.decode_step, "compiled", None) is not None and speculation.k > 0:
        use_verify_step(llama, speculation.k + 1)  # compile=True: verify passes replay a CUDA graph too
    row_stats: List[SpeculativeStats] = []
    drafter = speculation.drafter
    speculation.stats = None  # set when every row is done (a stream closed early leaves it None)
    for i, prompt in enumerate(rows.prompt_tokens):
        if hasattr(drafter, "reset"):
            drafter.reset()
        stats = SpeculativeStats(speculation.k)
        row_stats.append(stats)
        out = RowOutput(i, buffer, ends[i], stop_ids, recorder, tracker)
        generator = sampler.generators[i] if sampler.generators is not None else None
        yield from _run(llama, list(prompt), ends[i], drafter, speculation.k, cfg, out, stats, generator,
                        sampler.processors)
    if tracker:
        yield tracker.finish_all()
    total = SpeculativeStats(speculation.k)
    for stats in row_stats:
        total = total.add(stats)
    speculation.stats = total
    return Decoded(buffer, total_len, recorder, tracker, speculative=row_stats)
