"""The engine: requests join the running batch at any step and leave it as soon as they finish.

Each `step`:
1. schedules: the running sequences first, in the order they were admitted (a decoding one feeds its one new
   token; one still prefilling feeds its next chunk), then waiting ones, first come first served, while the
   step's token budget (max_step_tokens) and the free blocks last. A running sequence that needs a block when
   none is free takes it from the most recently admitted running sequence, which is preempted: its blocks are
   freed and it goes back to the front of the queue with everything it generated, to be recomputed (prefilled
   again, prompt and generation) when blocks free up. Its sampler, random stream included, is kept: the
   recomputed positions are not sampled again, so its output is what it would have been.
2. runs one forward over every scheduled chunk (llama.serve.decode.StepForward);
3. samples, for each sequence whose chunk reached its end, the next token with the request's own Sampler
   (llama.sampling: its own controls and, with a seed, its own random stream), records its logprob, and
   retires finished sequences at once, freeing their blocks.

A request's output is what `Llama.generate` gives for its prompt alone: the same greedy tokens, logprobs equal
to float32 rounding, and with a seed the same samples (the stream of sample number `sample_index`).
"""

import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Deque, Dict, Hashable, Iterable, List, Optional, Tuple

import fairscale.nn.model_parallel.initialize as fs_init
import torch
import torch.nn.functional as F

from llama.config import GenerationConfig, resolve_config
from llama.generation import Llama, check_prompt
from llama.sampling import Context, Sampler, greedy, make_sampler
from llama.serve import parallel
from llama.serve.decode import StepForward
from llama.serve.forward import Chunk
from llama.serve.kv_cache import DEFAULT_BLOCK_SIZE, PagedKVCache, blocks_for_budget
from llama.serve.prefix_cache import Session, block_keys, find_reusable
from llama.streaming import LENGTH, STOP_STRING, STOP_TOKEN, TextStream

# Tokens one step may feed (prefill chunks and decode tokens together): bounds a step's time and memory.
DEFAULT_MAX_STEP_TOKENS = 512


@dataclass
class RequestOutput:
    """A request's result so far (finished once finish_reason is set)."""

    request_id: int
    prompt_tokens: List[int]
    tokens: List[int]  # generated, without a final stop token
    logprobs: Optional[List[float]]  # one per token of `tokens`, when asked for
    top_logprobs: Optional[List[List[Tuple[int, float]]]] = None  # per token, the likeliest (id, logprob)
    text: str = ""  # the generated text so far (with a stop string, it ends just before it)
    finish_reason: Optional[str] = None  # "stop_token", "stop_string", "length" or "abort"; None while running
    stop_token: Optional[int] = None  # the stop token that ended it
    preemptions: int = 0  # times it was preempted and recomputed
    cached_tokens: int = 0  # prompt positions taken from blocks already computed (a session's, a shared prefix)
    session_id: Optional[Hashable] = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class TokenEvent:
    """What one step did for one request: a new token (with its logprob) and the text it completed, or
    (token None) its end, with the text still held back. A request's texts concatenate to its output's text
    (llama.streaming.TextStream: characters split over tokens, and text that may begin a stop string, wait)."""

    request_id: int
    token: Optional[int]
    text: str = ""
    logprob: Optional[float] = None
    finish_reason: Optional[str] = None
    top_logprobs: Optional[List[Tuple[int, float]]] = None  # the likeliest (id, logprob), when asked for


@dataclass(eq=False)  # one sequence is only ever itself: `in` and remove() on the queues compare identities
class _Sequence:
    """A request inside the engine: its tokens so far, how many of them are in its blocks, its blocks."""

    output: RequestOutput
    max_new_tokens: int
    sampler: Sampler
    stop_ids: frozenset
    logprobs: bool
    top_logprobs: int
    text: TextStream
    tokens: List[int] = field(default_factory=list)  # prompt, then generated (the last one not yet fed)
    n_cached: int = 0  # positions whose keys and values are in the blocks
    table: List[int] = field(default_factory=list)
    keys: List[bytes] = field(default_factory=list)  # prefix-cache keys of its first full blocks
    known: int = 0  # tokens it had when last admitted: positions below are prefill (or recompute)
    session: Optional[Session] = None

    @property
    def n_pending(self) -> int:
        return len(self.tokens) - self.n_cached


class Engine:
    """Continuous batching over a paged KV cache for one `Llama` (on one model-parallel rank).

    Args:
        llama: the loaded model (fast or reference layers); its own KV cache is not used.
        n_blocks, memory_bytes, memory_fraction: the KV cache budget, exactly one of them (see
            llama.serve.kv_cache.blocks_for_budget).
        block_size: positions per block.
        max_step_tokens: most tokens fed in one step; longer prompts are prefilled in chunks.
        max_running: most sequences in the running batch.
        prefix_caching: reuse full blocks that already hold a prompt's prefix (llama.serve.prefix_cache);
            sessions keep their own blocks between turns either way.
        decode: how decode-only steps run (llama.serve.decode.DECODE_MODES): "auto" (CUDA graphs over a
            paged attention kernel on CUDA with Triton, the simple gather path elsewhere and under torchrun),
            "simple", "kernel" or "graphs".

    Under torchrun with model parallelism every rank builds its Engine (the same budget: the smallest of the
    ranks' is taken); rank 0 is the leader, which takes requests and schedules, and the others call
    `follow()`, which runs the steps the leader sends them until it calls `release_followers()`.
    """

    def __init__(
        self,
        llama: Llama,
        *,
        n_blocks: Optional[int] = None,
        memory_bytes: Optional[int] = None,
        memory_fraction: Optional[float] = None,
        block_size: int = DEFAULT_BLOCK_SIZE,
        max_step_tokens: int = DEFAULT_MAX_STEP_TOKENS,
        max_running: int = 256,
        prefix_caching: bool = True,
        decode: str = "auto",
    ):
        for name, value in (("max_step_tokens", max_step_tokens), ("max_running", max_running)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.llama = llama
        self.model = llama.model
        blocks = blocks_for_budget(self.model, block_size, n_blocks=n_blocks, memory_bytes=memory_bytes,
                                   memory_fraction=memory_fraction)
        self.ranks = parallel.Ranks.of_model_parallel_group(self.model.rope_cos.device)
        blocks = self.ranks.smallest(blocks)  # every rank's pool must hold the leader's block ids
        self.cache = PagedKVCache(self.model, blocks, block_size)
        self.prefix_caching = bool(prefix_caching)
        self.sessions: Dict[Hashable, Session] = {}
        # several ranks: the plain path (collectives inside captured CUDA graphs are not tried yet)
        self.forward = StepForward(self.model, self.cache, max_running,
                                   "simple" if self.ranks.world > 1 and decode == "auto" else decode)
        self.max_step_tokens = max_step_tokens
        self.max_running = max_running
        self.waiting: Deque[_Sequence] = deque()
        self.running: List[_Sequence] = []  # in the order admitted
        self.outputs: Dict[int, RequestOutput] = {}
        self._ids = itertools.count()
        self.steps = 0
        self.preemptions = 0
        self.prefill_tokens = 0  # positions computed for tokens a sequence had when admitted (prompt, recompute)
        self.reused_tokens = 0  # positions taken from blocks already computed instead
        self.session_evictions = 0  # idle sessions whose blocks were taken back under memory pressure

    # ---- requests ----

    def add_request(
        self,
        prompt_tokens: List[int],
        config: Optional[GenerationConfig] = None,
        *,
        logprobs: bool = False,
        top_logprobs: int = 0,
        sample_index: int = 0,
        session_id: Optional[Hashable] = None,
        **controls: Any,
    ) -> int:
        """Queue a request; it joins the running batch at the next step that has room. Returns its id.

        config, **controls: GenerationConfig and overrides, as for Llama.generate (Meta's defaults, temperature
        0.6 and top_p 0.9, when not given). max_new_tokens defaults to max_seq_len - 1, and a request never
        goes past max_seq_len positions.
        logprobs: record each generated token's logprob; top_logprobs: also that many likeliest (id, logprob)
        at each (implies logprobs).
        sample_index: which random stream a seeded request draws from (sample j of a prompt with n samples
        draws from stream j, as in Llama.generate).
        session_id: a turn of this session (any hashable id; a new one starts a session): the prompt is the
            whole conversation so far, and the part of it the session's blocks already hold is not computed
            again. One turn at a time per session; `stop_session` and `end_session` end turns and sessions.

        Raises:
            ValueError: a bad prompt or setting, n > 1 (add one request per sample), a request that could
                not fit in the whole KV cache even alone, or a session with a turn already under way.
        """
        if not self.ranks.leader:
            raise ValueError(f"requests go to the leader (model-parallel rank 0), not rank {self.ranks.rank}: "
                             f"this rank calls follow()")
        cfg = resolve_config(config, **controls)
        params = self.model.params
        problem = check_prompt(prompt_tokens, params)
        if problem:
            raise ValueError(f"prompt: {problem}")
        if cfg.n != 1:
            raise ValueError(f"the engine runs one sample per request, got n={cfg.n}: add n requests with "
                             f"sample_index 0 .. n-1 (llama.serve.pipeline does)")
        if isinstance(top_logprobs, bool) or not isinstance(top_logprobs, int) or top_logprobs < 0:
            raise ValueError(f"top_logprobs must be an integer >= 0, got {top_logprobs!r}")
        logprobs = logprobs or top_logprobs > 0
        if isinstance(sample_index, bool) or not isinstance(sample_index, int) or sample_index < 0:
            raise ValueError(f"sample_index must be an integer >= 0, got {sample_index!r}")
        if session_id is not None:
            try:
                hash(session_id)
            except TypeError:
                raise ValueError(f"session_id must be hashable (a str or an int), got {session_id!r}") from None
            busy = self.sessions.get(session_id)
            if busy is not None and busy.turn is not None:
                raise ValueError(f"session {session_id!r} already has a turn under way (request {busy.turn}): "
                                 f"wait for it to end or stop_session({session_id!r}) first")
        bad = [t for t in cfg.banned_token_ids if t >= params.vocab_size]
        if bad:
            raise ValueError(f"banned_token_ids {bad[:5]} are outside the vocabulary [0, {params.vocab_size})")
        max_new = min(cfg.max_new_tokens or params.max_seq_len - 1, params.max_seq_len - len(prompt_tokens))
        if cfg.min_new_tokens > max_new:
            raise ValueError(f"min_new_tokens={cfg.min_new_tokens} is more than the {max_new} tokens this prompt "
                             f"can generate")
        # The last generated token is never fed, so a request holds at most prompt + max_new - 1 positions.
        need = self.cache.blocks_needed(len(prompt_tokens) + max_new - 1)
        if need > self.cache.n_blocks:
            raise ValueError(f"a prompt of {len(prompt_tokens)} tokens generating up to {max_new} needs {need} KV "
                             f"blocks, more than the cache's {self.cache.n_blocks}: lower max_new_tokens or "
                             f"raise the budget")
        request_id = next(self._ids)
        output = RequestOutput(request_id, list(prompt_tokens), [], [] if logprobs else None,
                               [] if top_logprobs else None, session_id=session_id)
        stop_ids = frozenset() if cfg.ignore_eos else frozenset(self.llama.tokenizer.stop_tokens)
        sampler = make_sampler(cfg, self.llama.tokenizer, [sample_index], self.llama.device,
                               prefilter=self.llama.fast)
        text = TextStream(self.llama.tokenizer.decode, cfg.stop)
        seq = _Sequence(output, max_new, sampler, stop_ids, logprobs, min(top_logprobs, params.vocab_size), text,
                        tokens=list(prompt_tokens))
        self.outputs[request_id] = output
        if max_new == 0:  # the prompt fills the context: nothing to generate (as Llama.generate)
            output.finish_reason = LENGTH
            return request_id
        if session_id is not None:
            seq.session = self.sessions.setdefault(session_id, Session(session_id))
            seq.session.turn = request_id
            seq.session.last_used = self.steps
        self.waiting.append(seq)
        return request_id

    def abort(self, request_id: int) -> Optional[TokenEvent]:
        """Drop a request, waiting or running, and free its blocks (a client that went away); a session's
        turn keeps what it computed for the next turn. Returns the request's last event (finish_reason
        "abort"), or None if it was not waiting or running."""
        for seq in list(self.waiting) + self.running:
            if seq.output.request_id == request_id:
                return self._retire(seq, "abort")
        return None

    # ---- sessions ----

    def stop_session(self, session_id: Hashable) -> Optional[TokenEvent]:
        """Abort the session's turn under way, if any (its output ends with finish_reason "abort"), keeping
        its history: the next turn reuses what was computed, the tokens generated so far included. Returns
        the aborted turn's last event, or None."""
        session = self.sessions.get(session_id)
        if session is None or session.turn is None:
            return None
        return self.abort(session.turn)

    def end_session(self, session_id: Hashable) -> Optional[TokenEvent]:
        """Stop the session (as stop_session) and let go of its blocks: nothing of it is held any more (full
        blocks stay findable by the prefix cache until their memory is needed). Returns stop_session's event.
        An unknown id is not an error (it may have ended already)."""
        event = self.stop_session(session_id)
        session = self.sessions.pop(session_id, None)
        if session is not None:
            self.cache.free(session.table)
            session.tokens = []
        return event

    def _evict_idle_session(self) -> bool:
        """Take back the blocks of the idle session least recently used (its next turn recomputes). False if
        no session holds any block."""
        idle = [s for s in self.sessions.values() if s.table]
        if not idle:
            return False
        session = min(idle, key=lambda s: (s.turn is not None, s.last_used))  # truly idle ones first
        self.cache.free(session.table)
        session.tokens = []
        session.evictions += 1
        self.session_evictions += 1
        return True

    def _make_room(self, n: int) -> bool:
        """Whether n blocks can be allocated, evicting idle sessions (least recently used first) if needed.
        Cached blocks nobody holds are already counted free (the allocator evicts them as it hands out)."""
        while self.cache.allocator.n_free < n:
            if not self._evict_idle_session():
                return False
        return True

    def _reuse(self, seq: _Sequence) -> None:
        """Give a sequence being admitted the blocks that already hold a prefix of its tokens (its session's,
        then any the prefix cache knows), holding them: seq.n_cached becomes the positions reused. The
        session hands its blocks over (it holds none while its turn runs)."""
        alloc = self.cache.allocator
        if self.prefix_caching:
            block_keys(seq.tokens, self.cache.block_size, seq.keys)
        blocks, reused, takeover = find_reusable(alloc, self.cache.block_size, seq.tokens, seq.keys,
                                                 seq.session, self.prefix_caching)
        if takeover is not None:
            alloc.forget(takeover)  # about to be written past the reused positions
        for block in blocks:
            alloc.hold(block)
        if seq.session is not None:
            self.cache.free(seq.session.table)
            seq.session.tokens = []
        seq.table, seq.n_cached = blocks, reused

    def _unreuse(self, seq: _Sequence) -> None:
        """Undo _reuse for a sequence that could not be admitted after all: its session holds the blocks
        again (nothing lost), or they are let go."""
        if seq.session is not None:
            seq.session.table, seq.session.tokens = seq.table, seq.tokens[: seq.n_cached]
            seq.table = []
        else:
            self.cache.free(seq.table)
        seq.n_cached = 0

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step ----

    def _preempt(self, seq: _Sequence) -> None:
        """Free seq's blocks and queue it first, to be recomputed from its tokens so far (the full blocks of
        which the prefix cache may still hold when it is admitted again)."""
        self.cache.free(seq.table)
        seq.n_cached = 0
        self.running.remove(seq)
        self.waiting.appendleft(seq)
        seq.output.preemptions += 1
        self.preemptions += 1

    def _schedule(self) -> List[tuple]:
        """This step's (sequence, tokens to feed), growing their block tables; preempts when blocks run out."""
        scheduled: List[tuple] = []
        budget = self.max_step_tokens
        preempted = False
        for seq in list(self.running):
            if seq not in self.running:  # preempted by an older sequence of this step
                continue
            n = min(seq.n_pending, budget)
            if n == 0:
                break
            # Idle sessions are evicted (and cached blocks reused) before any running sequence is preempted.
            while not self._make_room(self.cache.blocks_needed(seq.n_cached + n) - len(seq.table)):
                victim = self.running[-1]  # the most recently admitted
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq in self.running:
                self.cache.grow(seq.table, seq.n_cached + n)
                scheduled.append((seq, n))
                budget -= n
        # Newcomers (and preempted sequences, first) while there is room; none in a step that had to preempt.
        while self.waiting and not preempted and budget > 0 and len(self.running) < self.max_running:
            seq = self.waiting[0]
            self._reuse(seq)
            n = min(seq.n_pending, budget)
            if not self._make_room(self.cache.blocks_needed(seq.n_cached + n) - len(seq.table)):
                self._unreuse(seq)
                break
            self.waiting.popleft()
            self.running.append(seq)
            self.cache.grow(seq.table, seq.n_cached + n)
            seq.known = len(seq.tokens)
            self.reused_tokens += seq.n_cached
            if not seq.output.preemptions:
                seq.output.cached_tokens = seq.n_cached
            scheduled.append((seq, n))
            budget -= n
        if self.waiting and not self.running:
            # Every block is free or evictable now and add_request checked the request fits alone: a waiting
            # request that still cannot start would wait forever. Say so rather than spin.
            raise RuntimeError(f"request {self.waiting[0].output.request_id} cannot be admitted with "
                               f"{self.cache.allocator.n_free} of {self.cache.n_blocks} KV blocks free")
        return scheduled

    def step(self) -> List[TokenEvent]:
        """Run one step: schedule, one forward over every scheduled chunk, sample, retire. Returns the
        step's events: each new token, and each request that finished."""
        scheduled = self._schedule()
        if not scheduled:
            return []
        chunks = [Chunk(seq.tokens[seq.n_cached : seq.n_cached + n], seq.n_cached, seq.table) for seq, n in scheduled]
        self.ranks.send(chunks)  # the followers run the same forward on their shards
        logits = self.forward(chunks)  # (S, vocab)
        self.steps += 1
        ready = []  # the sequences whose chunk reached their end, and their logits' rows
        bs = self.cache.block_size
        for k, (seq, n) in enumerate(scheduled):
            self.prefill_tokens += max(0, min(seq.n_cached + n, seq.known) - seq.n_cached)
            if self.prefix_caching:  # blocks just filled can be shared from now on
                full = (seq.n_cached + n) // bs
                if full > seq.n_cached // bs:
                    block_keys(seq.tokens[: full * bs], bs, seq.keys)
                    for i in range(seq.n_cached // bs, full):
                        self.cache.allocator.register(seq.table[i], seq.keys[i])
            seq.n_cached += n
            if not seq.n_pending:  # (a prefill chunk short of the end has nothing to sample yet)
                ready.append((seq, k))
        if not ready:
            return []
        return self._sample([seq for seq, _ in ready], logits[[k for _, k in ready]])

    @torch.inference_mode()
    def _sample(self, seqs: List[_Sequence], logits: torch.Tensor) -> List[TokenEvent]:
        """Choose each sequence's next token from its logits (row i of (len(seqs), vocab)), record it, retire
        the sequences that are done. Greedy sequences with no processors are chosen in one batched argmax,
        and logprobs are computed for all rows at once: one device-to-host copy each, not one per row."""
        device = logits.device
        plain = [i for i, seq in enumerate(seqs) if seq.sampler.temperature == 0 and not seq.sampler.processors]
        tokens: List[int] = [0] * len(seqs)
        if plain:
            for i, token in zip(plain, greedy(logits[plain]).tolist()):
                tokens[i] = token
        for i, seq in enumerate(seqs):
            if i in plain:
                continue
            context = None  # only processors and seeded draws read the tokens so far: built only for those
            if seq.sampler.processors or seq.sampler.generators is not None:
                context = Context(torch.tensor([seq.tokens], device=device),
                                  torch.tensor([len(seq.tokens)], device=device),
                                  torch.tensor([len(seq.output.prompt_tokens)], device=device))
            tokens[i] = int(seq.sampler(logits[i : i + 1], context)[0])
        logprobs: List[Optional[float]] = [None] * len(seqs)
        want = [i for i, seq in enumerate(seqs) if seq.logprobs]
        if want:  # from the raw logits, as llama.scoring.LogprobRecorder
            chosen = torch.tensor([tokens[i] for i in want], device=device)
            for i, lp in zip(want, (-F.cross_entropy(logits[want], chosen, reduction="none")).tolist()):
                logprobs[i] = lp
        events: List[TokenEvent] = []
        for i, seq in enumerate(seqs):
            top = None
            if seq.top_logprobs:
                values, ids = torch.log_softmax(logits[i], dim=-1).topk(seq.top_logprobs)
                top = list(zip(ids.tolist(), values.tolist()))
            events.extend(self._record(seq, tokens[i], logprobs[i], top))
        return events

    def _record(self, seq: _Sequence, token: int, logprob: Optional[float], top) -> List[TokenEvent]:
        """Append seq's new token (or end it at a stop token, a stop string, its length) and say so."""
        out = seq.output
        if token in seq.stop_ids:
            out.stop_token = token
            return [self._retire(seq, STOP_TOKEN)]
        seq.tokens.append(token)
        out.tokens.append(token)
        if logprob is not None:
            out.logprobs.append(logprob)
        if top is not None:
            out.top_logprobs.append(top)
        events = [TokenEvent(out.request_id, token, seq.text.push(token), logprob, None, top)]
        out.text = seq.text.text
        if seq.text.stopped:  # as Llama's rows: the token that completed the stop string is kept
            events.append(self._retire(seq, STOP_STRING))
        elif len(out.tokens) >= seq.max_new_tokens:
            events.append(self._retire(seq, LENGTH))
        return events

    def _retire(self, seq: _Sequence, reason: str) -> TokenEvent:
        """Finish seq (free its blocks, take it out of the queues) and return its last event."""
        rest = seq.text.flush()
        seq.output.text = seq.text.text
        seq.output.finish_reason = reason
        if seq.session is not None:
            seq.session.turn = None
            seq.session.last_used = self.steps
            seq.session.turns += 1
            if seq.table:  # it was admitted: the session holds what it computed until the next turn
                seq.session.table, seq.session.tokens = seq.table, seq.tokens[: seq.n_cached]
                seq.table = []
        if seq.table:
            self.cache.free(seq.table)
        if seq in self.running:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        return TokenEvent(seq.output.request_id, None, rest, None, reason)

    # ---- model parallelism: the other ranks ----

    def follow(self) -> int:
        """On a follower rank (model-parallel rank > 0): run every step the leader sends, on this rank's
        shard and cache, until the leader calls release_followers(). Returns the number of steps run."""
        if self.ranks.leader:
            raise ValueError("follow() is for model-parallel ranks > 0: rank 0 takes the requests")
        steps = 0
        while True:
            chunks = self.ranks.receive()
            if chunks is None:
                return steps
            self.forward(chunks)
            steps += 1

    def release_followers(self) -> None:
        """On the leader: tell the follower ranks that no step is coming (their follow() returns). Nothing to
        do in one process."""
        self.ranks.send(None)

    # ---- run to the end ----

    def run(self) -> Iterable[TokenEvent]:
        """Step until every request has finished, yielding each step's events."""
        while self.has_unfinished():
            yield from self.step()

    def generate(self, prompts: List[List[int]], config: Optional[GenerationConfig] = None, *,
                 logprobs: bool = False, **controls: Any) -> List[RequestOutput]:
        """Queue every prompt with the same settings, run until all are done, return their outputs in order."""
        ids = [self.add_request(p, config, logprobs=logprobs, **controls) for p in prompts]
        for _ in self.run():
            pass
        return [self.outputs.pop(i) for i in ids]
