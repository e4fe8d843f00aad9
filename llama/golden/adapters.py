"""Other engines, run directly by `compare`: Hugging Face transformers and llama.cpp (llama-cpp-python).

Both are optional: constructing one without its package raises ImportError naming the pip command. They
take the golden file's prompt ids (they do not tokenize), so that a difference they show is the model's;
a test of another engine's tokenizer passes a `tokenize` function. `HFEngine` decodes the way engines do,
with a KV cache, one token per step; `decode_position` is the one place that says which position a new
token is at (a test overrides it to break it).
"""

from typing import Any, Callable, Dict, List, Optional, Set, Union

import torch

from llama.golden.engines import cut_at_stop
from llama.golden.prompts import Prompt
from llama.golden.schema import Sequence

HF_INSTALL = "pip install transformers safetensors"
LLAMACPP_INSTALL = "pip install llama-cpp-python"


def _top(logprobs: torch.Tensor, top_k: int):
    """(ids, values) lists of the top_k of each row of (n, vocab) logprobs."""
    if top_k == 0:
        return [[] for _ in range(logprobs.shape[0])], [[] for _ in range(logprobs.shape[0])]
    values, ids = logprobs.topk(min(top_k, logprobs.shape[-1]), dim=-1)
    return ids.tolist(), values.tolist()


class HFEngine:
    """transformers' LlamaForCausalLM (or any causal LM returning .logits and taking past_key_values)."""

    name = "transformers"

    def __init__(self, model: Any, stop_ids: Set[int], *, tokenize: Optional[Callable[[Prompt], List[int]]] = None,
                 info: Optional[Dict[str, Any]] = None):
        self.model = model.eval()
        self._stop_ids = set(stop_ids)
        self.tokenize = tokenize
        self.info = dict(info or {})
        # transformers renamed past_key_values to cache (5.x); take whichever this version's forward has.
        import inspect

        params = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

    @staticmethod
    def from_pretrained(path: str, stop_ids: Set[int], dtype: Optional[torch.dtype] = None,
                        device: str = "cpu") -> "HFEngine":
        """A Hugging Face directory (config.json and safetensors), e.g. `python -m llama.convert`'s export."""
        try:
            from transformers import AutoModelForCausalLM
        except ImportError as e:
            raise ImportError(f"the transformers adapter needs transformers: {HF_INSTALL}") from e
        dtype = dtype or torch.float32
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager").to(device)
        return HFEngine(model, stop_ids, info={"hf_dir": path})

    def describe(self) -> Dict[str, Any]:
        import transformers

        param = next(self.model.parameters())
        return dict(self.info, engine=self.name, transformers=transformers.__version__,
                    dtype=str(param.dtype).replace("torch.", ""), device=str(param.device))

    def stop_ids(self) -> Set[int]:
        return set(self._stop_ids)

    def encode(self, prompt: Prompt) -> Optional[List[int]]:
        if self.tokenize is not None:
            return self.tokenize(prompt)
        return list(prompt.value) if prompt.kind == "tokens" else None

    def encode_continuation(self, continuation: Union[str, List[int]]) -> Optional[List[int]]:
        return list(continuation) if isinstance(continuation, list) else None

    def decode_position(self, n_past: int) -> int:
        """The position of a token that follows n_past cached tokens."""
        return n_past

    def _logprobs(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(logits.float(), dim=-1)

    @torch.inference_mode()
    def greedy(self, prompt_ids: List[int], max_new_tokens: int, top_k: int) -> Sequence:
        device = next(self.model.parameters()).device
        out = self.model(input_ids=torch.tensor([prompt_ids], device=device), use_cache=True)
        state = {"past": getattr(out, self._cache_arg), "n_past": len(prompt_ids)}

        def feed(token: int) -> torch.Tensor:
            position = torch.tensor([[self.decode_position(state["n_past"])]], device=device)
            out = self.model(input_ids=torch.tensor([[token]], device=device), position_ids=position,
                             use_cache=True, **{self._cache_arg: state["past"]})
            state["past"], state["n_past"] = getattr(out, self._cache_arg), state["n_past"] + 1
            return self._logprobs(out.logits[0, -1])

        return greedy_loop(self._logprobs(out.logits[0, -1]), feed, self._stop_ids, max_new_tokens, top_k)

    @torch.inference_mode()
    def score(self, ids: List[int], top_k: int) -> Sequence:
        device = next(self.model.parameters()).device
        logits = self.model(input_ids=torch.tensor([ids], device=device)).logits[0, :-1]  # (n - 1, vocab)
        return scored(ids, self._logprobs(logits), top_k)


class LlamaCppEngine:
    """llama.cpp through llama-cpp-python, on a GGUF file (e.g. one written by
    llama.checkpoints.gguf.write_gguf). It is given the golden's ids, since our GGUF export carries no
    vocabulary."""

    name = "llama.cpp"

    def __init__(self, gguf_path: str, stop_ids: Set[int], n_ctx: int = 2048, threads: Optional[int] = None):
        try:
            import llama_cpp
        except ImportError as e:
            raise ImportError(f"the llama.cpp adapter needs llama-cpp-python (not a project dependency): "
                              f"{LLAMACPP_INSTALL}") from e
        self.llama_cpp_version = getattr(llama_cpp, "__version__", "unknown")
        # logits_all: keep the logits of every position, which teacher forcing needs.
        self.llm = llama_cpp.Llama(model_path=gguf_path, n_ctx=n_ctx, n_batch=n_ctx, logits_all=True,
                                   n_threads=threads, verbose=False)
        self.path = gguf_path
        self._stop_ids = set(stop_ids)

    def describe(self) -> Dict[str, Any]:
        return {"engine": self.name, "gguf": self.path, "llama_cpp_python": self.llama_cpp_version}

    def stop_ids(self) -> Set[int]:
        return set(self._stop_ids)

    def encode(self, prompt: Prompt) -> Optional[List[int]]:
        return list(prompt.value) if prompt.kind == "tokens" else None

    def encode_continuation(self, continuation: Union[str, List[int]]) -> Optional[List[int]]:
        return list(continuation) if isinstance(continuation, list) else None

    def _eval(self, ids: List[int]) -> torch.Tensor:
        """Logprobs (len(ids), vocab) after evaluating ids from an empty cache."""
        self.llm.reset()
        self.llm.eval(ids)
        scores = torch.from_numpy(self.llm.scores[: self.llm.n_tokens].copy())
        return torch.log_softmax(scores.float(), dim=-1)

    def _last_logprobs(self) -> torch.Tensor:
        logits = torch.from_numpy(self.llm.scores[self.llm.n_tokens - 1].copy())
        return torch.log_softmax(logits.float(), dim=-1)

    def greedy(self, prompt_ids: List[int], max_new_tokens: int, top_k: int) -> Sequence:
        self.llm.reset()
        self.llm.eval(prompt_ids)

        def feed(token: int) -> torch.Tensor:
            self.llm.eval([token])
            return self._last_logprobs()

        return greedy_loop(self._last_logprobs(), feed, self._stop_ids, max_new_tokens, top_k)

    def score(self, ids: List[int], top_k: int) -> Sequence:
        return scored(ids, self._eval(ids)[:-1], top_k)


def greedy_loop(
    logprobs: torch.Tensor, feed: Callable[[int], torch.Tensor], stop_ids: Set[int], max_new_tokens: int, top_k: int
) -> Sequence:
    """Greedy decoding from the logprobs (vocab,) after the prompt: take the argmax, record it and the top_k,
    stop at a stop token (kept) or after max_new_tokens, else `feed` the token and get the next logprobs."""
    chosen: List[int] = []
    chosen_lp: List[float] = []
    tops_ids, tops_lp = [], []
    while True:
        token = int(torch.argmax(logprobs))
        chosen.append(token)
        chosen_lp.append(float(logprobs[token]))
        t_ids, t_lp = _top(logprobs[None], top_k)
        tops_ids.append(t_ids[0])
        tops_lp.append(t_lp[0])
        if token in stop_ids or len(chosen) == max_new_tokens:
            break
        logprobs = feed(token)
    ids, reason = cut_at_stop(chosen, stop_ids)
    return Sequence(ids=ids, logprobs=chosen_lp, top_ids=tops_ids, top_logprobs=tops_lp, stop_reason=reason)


def scored(ids: List[int], logprobs: torch.Tensor, top_k: int) -> Sequence:
    """Teacher-forced scores of ids[1:] from logprobs (len(ids) - 1, vocab), each row predicting the next id."""
    targets = torch.tensor(ids[1:], device=logprobs.device)
    chosen = logprobs.gather(1, targets[:, None])[:, 0].tolist()
    t_ids, t_lp = _top(logprobs, top_k)
    return Sequence(ids=list(ids), logprobs=chosen, top_ids=t_ids, top_logprobs=t_lp)
