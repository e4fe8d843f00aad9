"""A verify pass that CUDA graphs can replay: always `width` positions (k + 1), at a position held in a tensor,
reading the whole KV cache under a mask (as the compiled decode step, llama.fast.step.DecodeStep, does for
one token). The eager verify pass (llama.speculative.forward.forward_all) slices the cache up to its own end:
its shapes change at every pass, which no graph can replay.

Fewer than `width` tokens are padded (with the last one): the padding writes keys and values past the last
verified position, which the next pass overwrites before anything reads them, exactly as the entries of
rejected drafts (llama.speculative.generate's docstring); its logits are dropped.

`use_verify_step(llama, width)` turns it on for a Llama's model (Llama built with compile=True: the
speculative loop does it itself); forward_all then runs it wherever a pass fits: at most `width` tokens,
ending within max_seq_len.
"""

import weakref
from typing import Any, Optional

import torch

from llama.fast.layers import is_fast
from llama.fast.step import compile_options, fast_forward
from llama.model import Transformer

# The verify step of each model that has one.
_steps: "weakref.WeakKeyDictionary[Transformer, VerifyStep]" = weakref.WeakKeyDictionary()


class VerifyStep:
    """One verify pass of `width` positions of row 0 -> logits (width, vocab); compiled (torch.compile with
    CUDA graphs and tuned kernels, the decode step's options) unless compile=False (the same computation
    eagerly: what the CPU tests run)."""

    def __init__(self, model: Transformer, width: int, compile: bool = True):
        if not is_fast(model):
            raise ValueError("VerifyStep runs on the fast layers (Llama.build(..., fast=True))")
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"width must be an integer >= 1, got {width!r}")
        self.model, self.width = model, width
        self.compiled = None
        if compile:
            self.compiled = torch.compile(self._step, options=compile_options(), fullgraph=True, dynamic=False)

    def _step(self, tokens: torch.Tensor, start: torch.Tensor, kv_len: int) -> torch.Tensor:
        return fast_forward(self.model, tokens, start, kv_len=kv_len)[0]  # (width, vocab)

    def fits(self, n_tokens: int, start_pos: int) -> bool:
        return n_tokens <= self.width and start_pos + self.width <= self.model.params.max_seq_len

    def __call__(self, tokens: torch.Tensor, start_pos: int) -> torch.Tensor:
        """tokens (1, n), n <= width, appended to the cache at start_pos -> float32 logits (1, n, vocab)."""
        n = tokens.shape[1]
        padded = torch.cat([tokens, tokens[:, -1:].expand(1, self.width - n)], dim=1)  # (1, width)
        start = torch.tensor([start_pos], device=tokens.device)
        kv_len = self.model.params.max_seq_len  # the whole cache: one shape for every pass
        if self.compiled is None:
            return self._step(padded, start, kv_len)[None, :n]
        # As DecodeStep: compiled code takes no inference tensors, and the next replay overwrites its output.
        with torch.inference_mode(False), torch.no_grad():
            logits = self.compiled(padded.clone(), start.clone(), kv_len)
            return logits[None, :n].clone()


def use_verify_step(llama: Any, width: int, compile: bool = True) -> VerifyStep:
    """Give llama's model a verify step of `width` positions (kept: one compilation per model and width)."""
    step = _steps.get(llama.model)
    if step is None or step.width != width or (step.compiled is None) == compile:
        step = _steps[llama.model] = VerifyStep(llama.model, width, compile)
    return step


def verify_step_of(model: Transformer) -> Optional[VerifyStep]:
    """The verify step use_verify_step gave `model`, or None."""
    return _steps.get(model)


def drop_verify_step(model: Transformer) -> None:
    _steps.pop(model, None)
