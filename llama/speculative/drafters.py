"""Drafters: cheap guesses of the next few tokens, which the model then verifies (llama.speculative.verify).

Every drafter has one method that matters, `propose(tokens, k)`: up to k tokens that might follow `tokens`
(the prompt and everything accepted so far). It must be deterministic (a function of `tokens`): the
verification rule treats each draft as a point mass, which is what makes sampling exact. A drafter may keep
state between calls of one generation (a KV cache); `reset` starts a new generation, `check` refuses a
target model it cannot draft for. A drafter that also has `observe_features(start_pos, features)` (the
EAGLE-style head, llama.speculative.eagle) is handed the model's top-layer features of every accepted position.
"""

from typing import Any, List, Sequence

import torch

from llama.sampling import greedy
from llama.speculative.forward import forward_last


class Drafter:
    """The interface: override `propose`; `reset` and `check` are optional."""

    def propose(self, tokens: Sequence[int], k: int) -> List[int]:
        """Up to k token ids that may follow `tokens`; fewer (or none) when it has no guess."""
        raise NotImplementedError

    def reset(self) -> None:
        """Forget everything from an earlier generation (called at the start of each one)."""

    def check(self, target: Any) -> None:
        """Raise ValueError if this drafter cannot draft for `target` (a Llama)."""


class PromptLookup(Drafter):
    """Prompt-lookup decoding: find the latest earlier occurrence of the last n tokens (n from max_ngram
    down to min_ngram) in the prompt and the text so far, and propose the tokens that followed it. No
    weights; it pays where the output copies its input (quoting, summarising, editing, code)."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        for name, value in (("max_ngram", max_ngram), ("min_ngram", min_ngram)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if min_ngram > max_ngram:
            raise ValueError(f"min_ngram={min_ngram} is more than max_ngram={max_ngram}")
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram

    def propose(self, tokens: Sequence[int], k: int) -> List[int]:
        tokens = list(tokens)
        length = len(tokens)
        for n in range(min(self.max_ngram, length - 1), self.min_ngram - 1, -1):
            pattern = tokens[length - n :]
            # The latest match wins: recent text predicts the next tokens best. A match must end before
            # the last token, so that at least one token follows it.
            for start in range(length - n - 1, -1, -1):
                if tokens[start : start + n] == pattern:
                    return tokens[start + n : start + n + k]
        return []

    def __repr__(self) -> str:
        return f"PromptLookup(max_ngram={self.max_ngram}, min_ngram={self.min_ngram})"


class DraftModel(Drafter):
    """A smaller Llama sharing the target's tokenizer (e.g. Llama 3.2 1B for Llama 3.1 8B) proposes its
    greedy continuation, one token per step, with its own KV cache.

    Its cache is kept in step with the accepted text: it remembers the tokens whose keys and values it holds
    and, at each call, rewinds its position to the longest prefix they share with the new `tokens` (the
    rejected drafts' entries are overwritten before they can be read, as in the target: see
    llama.speculative.generate), then feeds only the tokens it has not seen.
    """

    def __init__(self, draft: Any):
        """draft: a built `Llama` (Llama.build on the draft checkpoint, any layout it loads)."""
        if not hasattr(draft, "model") or not hasattr(draft, "tokenizer"):
            raise TypeError(f"DraftModel takes a Llama (Llama.build(...)), got {type(draft).__name__}")
        self.draft = draft
        self.cached: List[int] = []  # the tokens at positions 0 .. len - 1 of the draft's cache (row 0)

    def reset(self) -> None:
        self.cached = []

    def check(self, target: Any) -> None:
        ours, theirs = self.draft.model.vocab_size, target.model.vocab_size
        if ours != theirs:
            raise ValueError(f"the draft model has vocab_size={ours}, the target {theirs}: they must share a tokenizer")
        probe = "The quick brown fox, 1234 <|x|>."
        ours_ids = self.draft.tokenizer.encode(probe, bos=True, eos=False)
        if ours_ids != target.tokenizer.encode(probe, bos=True, eos=False):
            raise ValueError("the draft model's tokenizer encodes text differently from the target's")

    @torch.inference_mode()
    def propose(self, tokens: Sequence[int], k: int) -> List[int]:
        tokens = list(tokens)
        model = self.draft.model
        # Its cache must hold every token fed: tokens and the first k - 1 drafts.
        k = min(k, model.params.max_seq_len - len(tokens) + 1)
        if k <= 0 or not tokens:
            return []
        shared = 0
        for a, b in zip(self.cached, tokens):
            if a != b:
                break
            shared += 1
        shared = min(shared, len(tokens) - 1)  # feed at least the last token: its logits give the first draft
        device = model.rope_cos.device
        feed = torch.tensor([tokens[shared:]], dtype=torch.long, device=device)  # (1, new tokens)
        logits = forward_last(model, feed, shared)  # (1, vocab)
        drafts: List[int] = []
        for i in range(k):
            drafts.append(int(greedy(logits)[0]))
            if i == k - 1:
                break
            step = torch.tensor([[drafts[-1]]], dtype=torch.long, device=device)
            logits = forward_last(model, step, len(tokens) + i)
        self.cached = tokens + drafts[:-1]  # the last draft was never fed
        return drafts

    def __repr__(self) -> str:
        return f"DraftModel({self.draft.model.params.n_layers} layers, dim {self.draft.model.params.dim})"
