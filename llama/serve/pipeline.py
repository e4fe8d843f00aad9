"""`pipeline`: the engine behind a call in the spirit of lmdeploy's, on text prompts and dialogs.

    pipe = pipeline("models/demo")                      # or a loaded Llama
    pipe(["It is a truth", "Emma Woodhouse"], GenerationConfig(temperature=0, max_new_tokens=32))
    for chunk in pipe.stream([[{"role": "user", "content": "Hello"}]], max_new_tokens=32):
        print(chunk.index, chunk.text, end="")

Every call queues its prompts on the pipeline's one Engine, so the rows of several calls (streams read in
turns) are batched together; each stream gets its own rows' events only.

Sessions (multi-turn chats): give each call the whole dialog so far and a `session_id` (one per prompt); the
engine keeps the session's blocks between calls, so a turn computes only its new messages, and the answer is
still chat_completion's on the whole dialog:

    dialog = [{"role": "user", "content": "Hello"}]
    answer = pipe(dialog, session_id="alice", max_new_tokens=32)
    dialog += [{"role": "assistant", "content": answer.text}, {"role": "user", "content": "And then?"}]
    answer = pipe(dialog, session_id="alice", max_new_tokens=32)   # only the new messages are prefilled
    pipe.end_session("alice")                                       # frees what the session holds
"""

import math
from dataclasses import dataclass
from typing import Any, Dict, Hashable, Iterator, List, Optional, Sequence, Tuple, Union

from llama.config import GenerationConfig, resolve_config
from llama.generation import Llama
from llama.serve.engine import DEFAULT_MAX_STEP_TOKENS, Engine, RequestOutput, TokenEvent
from llama.serve.kv_cache import DEFAULT_BLOCK_SIZE
from llama.tokenizer import Dialog

Prompt = Union[str, Dialog]  # a text to continue, or a dialog (a list of messages) to answer

# Without a budget the cache holds this many sequences of max_seq_len positions.
DEFAULT_FULL_SEQUENCES = 8


@dataclass
class Response:
    """One sample's answer to one prompt."""

    text: str  # the generated text (with a stop string, it ends just before it)
    tokens: List[int]  # the generated ids, without a final stop token
    logprobs: Optional[List[float]]  # one per id, when asked for
    top_logprobs: Optional[List[List[Tuple[int, float]]]]  # per id, the likeliest (id, logprob), when asked for
    finish_reason: str  # "stop_token", "stop_string", "length", or "abort" (a stopped session turn)
    prompt_len: int  # tokens in the prompt (usage counts)
    cached_tokens: int = 0  # of those, positions reused from blocks already computed (a session, a prefix)


@dataclass
class StreamChunk:
    """A piece of one sample's answer: `text` (maybe "") completed by `token`; the last chunk of a sample has
    token None and its finish_reason."""

    index: int  # which prompt of the call
    sample: int  # which of its n samples
    text: str
    token: Optional[int] = None
    logprob: Optional[float] = None
    finish_reason: Optional[str] = None
    top_logprobs: Optional[List[Tuple[int, float]]] = None


class Pipeline:
    """A Llama and the Engine that serves it. Build it with `pipeline(...)`."""

    def __init__(self, llama: Llama, engine: Engine):
        self.llama = llama
        self.engine = engine
        self._inbox: Dict[int, List[TokenEvent]] = {}  # events of the requests some call is waiting for

    def encode(self, prompt: Prompt) -> List[int]:
        """The prompt's tokens: a text with <|begin_of_text|> (as text_completion), a dialog in the model's
        chat format (as chat_completion). Raises TypeError / ValueError for anything else or a bad dialog."""
        if isinstance(prompt, str):
            return self.llama.tokenizer.encode(prompt, bos=True, eos=False)
        if isinstance(prompt, (list, tuple)) and all(isinstance(m, dict) for m in prompt):
            self.llama.formatter.check_dialog(list(prompt))
            return self.llama.formatter.encode_dialog_prompt(list(prompt))
        raise TypeError(f"a prompt is a string or a dialog (a list of message dicts), got {prompt!r:.80}")

    def _submit(self, prompts: Union[Prompt, Sequence[Prompt]], config: Optional[GenerationConfig],
                logprobs: bool, top_logprobs: int, controls: Dict[str, Any], session_id: Any = None):
        """Queue every sample of every prompt; returns (one prompt given alone?, cfg, request ids per prompt).
        Nothing stays queued if a prompt or a setting is refused."""
        single = isinstance(prompts, str) or (
            isinstance(prompts, (list, tuple)) and bool(prompts) and all(isinstance(m, dict) for m in prompts))
        batch = [prompts] if single else list(prompts)
        if not batch:
            raise ValueError("no prompts given: pass a prompt or a non-empty list of them")
        cfg = resolve_config(config, **controls)
        sessions = self._session_ids(session_id, single, len(batch), cfg.n)
        encoded = [self.encode(p) for p in batch]
        ids: List[List[int]] = []
        try:
            for i, tokens in enumerate(encoded):
                ids.append([])
                for j in range(cfg.n):
                    try:
                        rid = self.engine.add_request(tokens, cfg.updated(n=1), logprobs=logprobs,
                                                      top_logprobs=top_logprobs, sample_index=j,
                                                      session_id=sessions[i])
                    except ValueError as e:
                        raise ValueError(f"prompt {i}: {e}") from None
                    ids[-1].append(rid)
                    self._inbox[rid] = []
        except ValueError:
            for rid in (r for row in ids for r in row):
                self.engine.abort(rid)
                self._inbox.pop(rid, None)
                self.engine.outputs.pop(rid, None)
            raise
        return single, cfg, ids

    @staticmethod
    def _session_ids(session_id: Any, single: bool, n_prompts: int, n: int) -> List[Optional[Hashable]]:
        """One session id (or None) per prompt: session_id is an id for a prompt given alone, a list of one
        per prompt (None where a prompt has no session) for a list."""
        if session_id is None:
            return [None] * n_prompts
        ids = [session_id] if single else session_id
        if single and isinstance(session_id, (list, tuple)) or not single and (
                not isinstance(session_id, (list, tuple)) or len(session_id) != n_prompts):
            raise ValueError(f"session_id: give one id for one prompt, or a list of one per prompt "
                             f"({n_prompts} here), got {session_id!r}")
        given = [s for s in ids if s is not None]
        if len(set(given)) != len(given):
            raise ValueError(f"session_id: a session runs one turn at a time, got {session_id!r}")
        if given and n != 1:
            raise ValueError(f"a session continues one answer: n must be 1 with session_id, got n={n}")
        return list(ids)

    def stop_session(self, session_id: Hashable) -> None:
        """End the session's turn under way, if any (its stream ends with finish_reason "abort"), keeping the
        history for its next turn."""
        event = self.engine.stop_session(session_id)
        if event is not None and event.request_id in self._inbox:
            self._inbox[event.request_id].append(event)

    def end_session(self, session_id: Hashable) -> None:
        """Stop the session and let go of every block it holds."""
        event = self.engine.end_session(session_id)
        if event is not None and event.request_id in self._inbox:
            self._inbox[event.request_id].append(event)

    def _pump(self) -> None:
        """One engine step; its events go to the inboxes of the calls waiting for them."""
        for event in self.engine.step():
            if event.request_id in self._inbox:
                self._inbox[event.request_id].append(event)

    def __call__(self, prompts: Union[Prompt, Sequence[Prompt]], config: Optional[GenerationConfig] = None, *,
                 logprobs: bool = False, top_logprobs: int = 0, session_id: Any = None,
                 **controls: Any) -> Union[Response, List[Response], List[List[Response]]]:
        """Answer each prompt (a text or a dialog; or one of them alone): one Response each, or with n > 1 a
        list of n. config, **controls: GenerationConfig and overrides, as for Llama.text_completion;
        logprobs, top_logprobs: each token's logprob, and that many likeliest (id, logprob) at each;
        session_id: this call is a turn of that session (a list: one id per prompt), see the module's doc.

        Raises:
            TypeError, ValueError: a bad prompt or setting, naming the prompt, before anything runs.
        """
        single, cfg, ids = self._submit(prompts, config, logprobs, top_logprobs, controls, session_id)
        wanted = [r for row in ids for r in row]
        while any(not self.engine.outputs[r].finished for r in wanted):
            self._pump()
        for r in wanted:
            self._inbox.pop(r)
        results = [[self._response(self.engine.outputs.pop(r)) for r in row] for row in ids]
        shaped = [row if cfg.n > 1 else row[0] for row in results]
        return shaped[0] if single else shaped

    def stream(self, prompts: Union[Prompt, Sequence[Prompt]], config: Optional[GenerationConfig] = None, *,
               logprobs: bool = False, top_logprobs: int = 0, session_id: Any = None,
               **controls: Any) -> Iterator[StreamChunk]:
        """Answer as __call__ does, yielding each sample's pieces as they are generated (the texts of a sample
        concatenate to its Response's text). Closing the iterator early drops its requests and frees their
        blocks. Prompts and settings are checked before the first chunk: errors raise at the call."""
        submitted = self._submit(prompts, config, logprobs, top_logprobs, controls, session_id)
        return self._events(*submitted)

    def _events(self, single: bool, cfg: GenerationConfig, ids: List[List[int]]) -> Iterator[StreamChunk]:
        where = {r: (i, j) for i, row in enumerate(ids) for j, r in enumerate(row)}
        remaining = set(where)
        try:
            while remaining:
                if not any(self._inbox[r] for r in remaining):
                    self._pump()
                for r in sorted(remaining):
                    for event in self._inbox[r]:
                        i, j = where[r]
                        yield StreamChunk(i, j, event.text, event.token, event.logprob, event.finish_reason,
                                          event.top_logprobs)
                        if event.finish_reason is not None:
                            remaining.discard(r)
                    self._inbox[r] = []
        finally:  # finished, or closed early: free what is left
            for r in where:
                if r in remaining:
                    self.engine.abort(r)
                self._inbox.pop(r, None)
                self.engine.outputs.pop(r, None)

    @staticmethod
    def _response(out: RequestOutput) -> Response:
        return Response(out.text, out.tokens, out.logprobs, out.top_logprobs, out.finish_reason,
                        len(out.prompt_tokens), out.cached_tokens)


def pipeline(
    model: Union[str, Llama],
    *,
    tokenizer_path: Optional[str] = None,
    max_seq_len: int = 2048,
    n_blocks: Optional[int] = None,
    memory_bytes: Optional[int] = None,
    memory_fraction: Optional[float] = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    max_step_tokens: int = DEFAULT_MAX_STEP_TOKENS,
    max_running: int = 256,
    prefix_caching: bool = True,
    **build_kwargs: Any,
) -> Pipeline:
    """A Pipeline over a checkpoint directory (loaded by Llama.build with max_seq_len, and build_kwargs:
    device, dtype, fast, ...) or an already loaded Llama (max_seq_len is then its own).

    The KV cache budget is one of n_blocks, memory_bytes, memory_fraction (of free CUDA memory); none given:
    room for DEFAULT_FULL_SEQUENCES (8) sequences of max_seq_len.
    """
    if isinstance(model, Llama):
        llama = model
    elif isinstance(model, str):
        # The engine keeps its own paged cache: the model's own (max_batch_size rows) is left at one row.
        llama = Llama.build(model, tokenizer_path, max_seq_len, 1, **build_kwargs)
    else:
        raise TypeError(f"model must be a checkpoint directory or a Llama, got {type(model).__name__}")
    if n_blocks is None and memory_bytes is None and memory_fraction is None:
        if isinstance(block_size, int) and not isinstance(block_size, bool) and block_size > 0:
            n_blocks = DEFAULT_FULL_SEQUENCES * math.ceil(llama.model.params.max_seq_len / block_size)
    engine = Engine(llama, n_blocks=n_blocks, memory_bytes=memory_bytes, memory_fraction=memory_fraction,
                    block_size=block_size, max_step_tokens=max_step_tokens, max_running=max_running,
                    prefix_caching=prefix_caching)
    return Pipeline(llama, engine)
