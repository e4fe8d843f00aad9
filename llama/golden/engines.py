"""What an engine must do to be recorded or compared, and this package's own engine (through its public API).

An engine answers three questions about token ids, each with the natural-log probabilities of the chosen
tokens and the k most likely alternatives at every position:
- `encode`: how do you tokenize this prompt? (None: "I don't tokenize: use the golden file's ids")
- `greedy`: what do you generate after these ids, always taking the most likely token?
- `score`: how likely is each of these ids given the ones before it (teacher forcing)?
Other engines (Hugging Face transformers, llama.cpp) are in llama.golden.adapters; a test can subclass
one to break it on purpose.
"""

from typing import Any, Dict, List, Optional, Protocol, Set, Tuple, Union

import torch

from llama import Llama
from llama.golden.prompts import Prompt
from llama.golden.schema import Sequence


class Engine(Protocol):
    name: str

    def describe(self) -> Dict[str, Any]:
        """What to write in a golden header about this engine (dtype, device, ...)."""

    def stop_ids(self) -> Set[int]:
        """The ids that end a greedy generation."""

    def encode(self, prompt: Prompt) -> Optional[List[int]]:
        """The prompt's ids, or None when this engine takes the ids it is given."""

    def encode_continuation(self, continuation: Union[str, List[int]]) -> Optional[List[int]]:
        """A continuation's ids (text is encoded without <|begin_of_text|>), or None as for encode."""

    def greedy(self, prompt_ids: List[int], max_new_tokens: int, top_k: int) -> Sequence:
        """Greedy decoding: at most max_new_tokens ids, ending with the stop token if one was chosen."""

    def score(self, ids: List[int], top_k: int) -> Sequence:
        """Teacher forcing: logprobs (and top_k alternatives) for positions 1 .. len(ids) - 1."""


def cut_at_stop(ids: List[int], stop_ids: Set[int]) -> Tuple[List[int], str]:
    """(ids up to and including the first stop id, "stop_token") or (ids, "length")."""
    for j, t in enumerate(ids):
        if t in stop_ids:
            return ids[: j + 1], "stop_token"
    return ids, "length"


class OursEngine:
    """This package's Llama, through its public API: `Llama.complete` with temperature 0 for greedy decoding
    and with echo for teacher forcing. One prompt per call, so that a prompt's numbers never depend on
    which prompts shared its batch."""

    name = "llama"

    def __init__(self, llama: Llama, info: Optional[Dict[str, Any]] = None):
        self.llama = llama
        self.info = dict(info or {})

    @staticmethod
    def build(ckpt_dir: str, tokenizer_path: Optional[str] = None, max_seq_len: int = 512,
              dtype: Optional[torch.dtype] = None, device: Optional[str] = None,
              model_parallel_size: Optional[int] = None) -> "OursEngine":
        llama = Llama.build(ckpt_dir, tokenizer_path, max_seq_len=max_seq_len, max_batch_size=1,
                            model_parallel_size=model_parallel_size, device=device, dtype=dtype)
        return OursEngine(llama, {"ckpt_dir": ckpt_dir, "model_parallel_size": _world_size()})

    @property
    def max_seq_len(self) -> int:
        return self.llama.model.params.max_seq_len

    def describe(self) -> Dict[str, Any]:
        param = next(self.llama.model.parameters())
        return dict(self.info, engine=self.name, dtype=str(param.dtype).replace("torch.", ""),
                    device=str(self.llama.device), max_seq_len=self.max_seq_len)

    def stop_ids(self) -> Set[int]:
        return set(self.llama.tokenizer.stop_tokens)

    def encode(self, prompt: Prompt) -> List[int]:
        if prompt.kind == "text":
            return self.llama.tokenizer.encode(prompt.value, bos=True, eos=False)
        if prompt.kind == "dialog":
            return self.llama.formatter.encode_dialog_prompt(prompt.value)
        return list(prompt.value)

    def encode_continuation(self, continuation: Union[str, List[int]]) -> List[int]:
        if isinstance(continuation, str):
            return self.llama.tokenizer.encode(continuation, bos=False, eos=False)
        return list(continuation)

    def greedy(self, prompt_ids: List[int], max_new_tokens: int, top_k: int) -> Sequence:
        # ignore_eos, then cut after the first stop id ourselves: the stop token and its logprob are kept.
        c = self.llama.complete([prompt_ids], max_new_tokens, temperature=0, logprobs=True,
                                top_logprobs=top_k, ignore_eos=True)[0][0]
        ids, reason = cut_at_stop(c.tokens, self.stop_ids())
        n = len(ids)
        text_ids = ids[:-1] if reason == "stop_token" else ids
        return Sequence(
            ids=ids, logprobs=c.logprobs[:n],
            top_ids=[[t for t, _ in pos] for pos in (c.top_logprobs or [])[:n]],
            top_logprobs=[[lp for _, lp in pos] for pos in (c.top_logprobs or [])[:n]],
            text=self.llama.tokenizer.decode(text_ids), stop_reason=reason,
        )

    def score(self, ids: List[int], top_k: int) -> Sequence:
        # echo returns the prompt's own logprobs (position 0 has none); the one generated token is dropped.
        c = self.llama.complete([ids], 1, temperature=0, logprobs=True, top_logprobs=top_k, echo=True,
                                ignore_eos=True)[0][0]
        n = len(ids)
        top = (c.top_logprobs or [])[1:n]
        return Sequence(ids=list(ids), logprobs=c.logprobs[1:n], top_ids=[[t for t, _ in pos] for pos in top],
                        top_logprobs=[[lp for _, lp in pos] for pos in top])


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
