"""`Llama`: build a model from a checkpoint directory, then generate, complete text and chat.

The story of one request. The checks it meets come first, as plain functions; then `Llama`, whose methods
follow the request:
1. `Llama.build` reads the tokenizer, starts torch.distributed and fairscale, and loads this rank's share of
   the weights into the Transformer of llama.model.
2. `complete` checks the prompts (`check_prompt`) and the settings, and repeats each prompt n times: one
   row per sample.
3. A decode loop runs the rows. `decode_reference` is Meta's: prefill up to the shortest prompt, then one
   position per step: sample each row's next token (llama.sampling), write it, stop once every row has
   reached a stop token. With fast=True its faster twin in llama.fast.loop runs instead, with the same
   results; `uses_reference_loop` is the rule that picks.
4. Each row is cut at its first stop token into a Completion (llama.completion), which `generate`,
   `text_completion` and `chat_completion` shape as Meta's return values (llama.predictions).
"""

import time
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import fairscale.nn.model_parallel.initialize as fs_init
import torch

from llama.checkpoints.meta import find_tokenizer, load_checkpoint, load_into
from llama.checkpoints.quantized import int8_scales
from llama.completion import Completion, DecodeLoop, Decoded, Rows, cut_completions, run_to_end
from llama.config import GenerationConfig, resolve_config
from llama.distributed import default_dtype, init_distributed, is_rank_zero, pick_device, pick_dtype
from llama.families import AnyChatFormat, AnyTokenizer, load_tokenizer, make_chat_format
from llama.fast.cpu_forms import pick_cpu_forms
from llama.fast.cpu_step import compiles_on_cpu, cpu_decode_step
from llama.fast.decode_attention import use_decode_attention
from llama.fast.layers import use_fast_layers
from llama.fast.loop import decode, stop_check_interval
from llama.fast.quantize import check_quantize, use_int8_layers
from llama.fast.quantize_int4 import check_int4_source, use_int4_layers
from llama.fast.step import DecodeStep
from llama.model import ModelArgs, Transformer
from llama.predictions import ChatPrediction, CompletionPrediction, PromptError, chat_predictions, to_predictions
from llama.sampling import Context, Sampler, make_sampler, sample_top_p  # noqa: F401 (Meta's name)
from llama.scoring import LogprobRecorder, ScorePrediction, score_sequences
from llama.speculative import SpeculativeSetting, resolve_speculation
from llama.streaming import RowTracker, StreamEvent
# Meta's llama.generation also offers these names (the Llama 2 one its chat tags): scripts import them from here.
from llama.tokenizer import ChatFormat, Dialog, Message, Role, Tokenizer  # noqa: F401
from llama.tokenizer_llama2 import B_INST, B_SYS, E_INST, E_SYS, SPECIAL_TAGS, UNSAFE_ERROR  # noqa: F401


def check_prompt(tokens: Sequence[int], params: ModelArgs) -> Optional[str]:
    """Why these prompt tokens cannot be generated from, or None if they can."""
    if len(tokens) == 0:
        return "the prompt is empty (no tokens)"
    if len(tokens) > params.max_seq_len:
        return f"the prompt has {len(tokens)} tokens, more than max_seq_len={params.max_seq_len}"
    bad = [t for t in tokens if not 0 <= t < params.vocab_size]
    if bad:
        return f"token ids {bad[:5]} are outside the vocabulary [0, {params.vocab_size})"
    return None


def check_settings(
    params: ModelArgs,
    n_prompts: int,
    config: Optional[GenerationConfig],
    max_gen_len: Optional[int],
    controls: Dict[str, Any],
) -> Tuple[GenerationConfig, int]:
    """The checked settings of one call: its GenerationConfig (`config` updated by `controls`), and
    max_gen_len (the argument, else config.max_new_tokens, else max_seq_len - 1). Raises ValueError for no
    prompts, more rows than max_batch_size, or settings that contradict each other or the model."""
    cfg = resolve_config(config, **controls)
    if n_prompts == 0:
        raise ValueError("no prompts given: pass a non-empty list")
    if n_prompts * cfg.n > params.max_batch_size:
        samples = f" x n={cfg.n} samples" if cfg.n > 1 else ""
        raise ValueError(f"{n_prompts} prompts{samples} is more than max_batch_size={params.max_batch_size}")
    if max_gen_len is None:
        max_gen_len = cfg.max_new_tokens or params.max_seq_len - 1
    if isinstance(max_gen_len, bool) or not isinstance(max_gen_len, int) or max_gen_len < 1:
        raise ValueError(f"max_gen_len must be a positive integer, got {max_gen_len!r}")
    if cfg.min_new_tokens > max_gen_len:
        raise ValueError(f"min_new_tokens={cfg.min_new_tokens} is more than max_gen_len={max_gen_len}")
    bad = [t for t in cfg.banned_token_ids if t >= params.vocab_size]
    if bad:
        raise ValueError(f"banned_token_ids {bad[:5]} are outside the vocabulary [0, {params.vocab_size})")
    return cfg, max_gen_len


def check_text_prompts(prompts: Any) -> None:
    """Raise TypeError unless `prompts` is a list of strings (one str would run one prompt per character)."""
    if isinstance(prompts, (str, bytes)):
        raise TypeError(f"text_completion takes a list of prompts; got one {type(prompts).__name__} "
                        f"{prompts!r:.60}: pass [prompt]")
    for prompt in prompts:
        if not isinstance(prompt, str):
            raise TypeError(f"prompts must be strings, got {type(prompt).__name__}: {prompt!r:.80}")


def check_dialog_list(dialogs: Any) -> None:
    """Raise TypeError for one dialog (or one message) where a list of dialogs belongs: it would otherwise run
    as one failing "dialog" per message."""
    if isinstance(dialogs, (str, bytes, dict)) or (
        isinstance(dialogs, (list, tuple)) and dialogs and isinstance(dialogs[0], dict)
    ):
        what = "one message" if isinstance(dialogs, dict) else (
            "one dialog" if isinstance(dialogs, (list, tuple)) else f"a {type(dialogs).__name__}")
        raise TypeError(f"chat_completion takes a list of dialogs, each a list of messages; got {what} "
                        f"{dialogs!r:.60}: pass [dialog]")


def uses_reference_loop(fast: bool, config: GenerationConfig, prompt_tokens: Sequence[Sequence[int]]) -> bool:
    """Whether a call runs Meta's reference loop (`Llama.decode_reference`) rather than the fast one.

    Always with fast=False. With fast=True only where the fast loop cannot reproduce the reference's
    samples: sampling from torch's global random stream (temperature > 0 and no seed) from prompts of
    different lengths. The reference loop draws for every row at every step, rows still inside their
    prompt too; the fast loop starts every row at once, so it would draw other numbers.
    """
    mixed_lengths = len(set(map(len, prompt_tokens))) > 1
    return not fast or (config.temperature > 0 and config.seed is None and mixed_lengths)


class Llama:
    """A loaded model, its tokenizer and chat format: Meta's `Llama`, with the generation controls, streaming,
    scoring and the fast path added (see the module's docstring for a request's way through it)."""

    @staticmethod
    def build(
        ckpt_dir: str,
        tokenizer_path: Optional[str],
        max_seq_len: int,
        max_batch_size: int,
        model_parallel_size: Optional[int] = None,
        seed: int = 1,
        *,
        device: Optional[str] = None,
        dtype: Optional[Union[str, torch.dtype]] = None,
        chat_format: Optional[str] = None,
        fast: bool = True,
        compile: bool = False,
        quantize: Optional[str] = None,
    ) -> "Llama":
        """Load a checkpoint and its tokenizer, starting torch.distributed and fairscale model parallelism if
        they are not started yet.

        Args:
            ckpt_dir: a Meta checkpoint (params.json and consolidated.NN.pth files, any number of them: they
                are resharded for this run), a Hugging Face directory (config.json and *.safetensors), or a
                Hugging Face repo with Meta's files under original/.
            tokenizer_path: tokenizer.model: Llama 3's tiktoken file or Llama 2's SentencePiece model (told
                apart by their contents); None to use the one in ckpt_dir or ckpt_dir/original.
            max_seq_len: longest prompt plus generation; sizes the KV cache.
            max_batch_size: most prompts per call; sizes the KV cache.
            model_parallel_size: ranks the model is split over; default the world size (1 without torchrun).
            seed: the random seed, the same on every rank so that all ranks sample the same tokens.
            device: "cuda", "cpu", ...; default CUDA when available, else the CPU.
            dtype: weight and activation dtype, or its name ("bfloat16"); default bf16 on CUDA (fp16 where
                bf16 is not supported), float32 on the CPU. On CPUs with native bf16 (AVX512-BF16, AMX), bf16
                is faster.
            chat_format: "llama3" or "llama2"; default the one of the tokenizer's family.
            fast: decode with the fast loop (llama.fast.loop) on the fast layers (llama.fast.layers: fused
                projections, on the CPU weights packed for oneDNN); False runs Meta's reference loop
                (`decode_reference`) on the reference model. Same results.
            compile: compile the decode step with torch.compile (CUDA graphs and tuned kernels on CUDA);
                needs `fast`. The first batch of each size is slow (a minute or more at 8B) while it compiles.
            quantize: "int8": every linear layer (not the embedding) holds int8 weights with one scale per
                output row, quantized at load from the checkpoint's values (llama.fast.quantize;
                docs/quantization.md); "int4": 4-bit codes with a scale and zero per group of 128 inputs
                (llama.fast.quantize_int4; for CUDA with bf16); None: as stored. A checkpoint stored int8
                loads int8 either way (and is refused with "int4").

        Raises:
            FileNotFoundError: a missing directory, params.json, shard or tokenizer file.
            TypeError: a params.json value of the wrong type.
            ValueError: bad sizes, an unknown device, dtype or quantize value, a corrupt or unsafe shard, a
                model that cannot be split over model_parallel_size ranks, a vocabulary size that differs from
                the tokenizer's, tensors that do not match the model, a config.json for another architecture, a
                directory mixing layouts, a Llama 2 `rope.freqs` tensor that disagrees with the RoPE base
                params.json gives, an unknown "quantization" in params.json.
        """
        for name, value in (("max_seq_len", max_seq_len), ("max_batch_size", max_batch_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        check_quantize(quantize)
        start_time = time.time()
        tokenizer_path = tokenizer_path or find_tokenizer(ckpt_dir)
        tokenizer = load_tokenizer(tokenizer_path)
        formatter = make_chat_format(tokenizer, chat_format)

        device_ = pick_device(device)
        dtype = pick_dtype(device_, dtype)
        if device_.type == "cuda":
            torch.cuda.set_device(device_)
        model_parallel_size = init_distributed(device_, model_parallel_size)
        torch.manual_seed(seed)  # the same seed in every rank: they must all sample the same tokens

        # This rank's share of the weights, however many files (Meta or Hugging Face) hold them.
        state, params = load_checkpoint(ckpt_dir, model_parallel_size, fs_init.get_model_parallel_rank())
        params, int8 = int8_scales(state, params, quantize, device_, ckpt_dir)  # int8 weights: their scales
        if quantize == "int4":  # a float checkpoint, and a group for every linear layer, before any real work
            check_int4_source(state, int8 is not None, ckpt_dir)
        model_args = ModelArgs.from_params(params, max_seq_len=max_seq_len, max_batch_size=max_batch_size)
        if model_args.vocab_size == -1:
            model_args.vocab_size = tokenizer.n_words
        if model_args.vocab_size != tokenizer.n_words:
            raise ValueError(
                f"the checkpoint {ckpt_dir!r} says vocab_size={model_args.vocab_size} but the tokenizer "
                f"{tokenizer_path!r} has {tokenizer.n_words} tokens"
            )
        # Parameters are created uninitialised on the CPU (no memory is touched), then replaced by the
        # checkpoint's tensors on `device`; the KV cache and RoPE tables follow with .to(device).
        with default_dtype(dtype):
            model = Transformer(model_args)
        load_into(model, state, device_, dtype, source=ckpt_dir)
        model.to(device_).eval()
        if int8 is not None:  # layered on from outside, as the fast path is (and with it, for fast=True)
            use_int8_layers(model, dtype, fast=fast, scales=int8)
        elif quantize == "int4":  # quantized from the checkpoint's tensors as stored
            use_int4_layers(model, dtype, fast=fast, source=state)
        if is_rank_zero():
            print(f"Loaded in {time.time() - start_time:.2f} seconds")
        return Llama(model, tokenizer, formatter, fast=fast, compile=compile)

    def __init__(
        self,
        model: Transformer,
        tokenizer: AnyTokenizer,
        formatter: Optional[AnyChatFormat] = None,
        fast: bool = True,
        compile: bool = False,
    ):
        """Wrap a loaded model. fast: swap in the fast layers and decode with the fast loop; compile: compile
        its step (see build)."""
        if compile and not fast:
            raise ValueError("compile=True compiles the fast decode loop's step: it needs fast=True")
        cpu_step = None
        if fast:  # the fast path is layered on from outside; the reference modules are left as they are
            # On the CPU (one rank) compile=True compiles the step with the picked forms inside (cpu_step.py).
            cpu_compile = compile and compiles_on_cpu(model)
            use_fast_layers(model, pack=not compile or cpu_compile)
            if compile and not cpu_compile:  # on CUDA: the decode attention kernel, where it times faster
                use_decode_attention(model)
            if not compile or cpu_compile:  # on the CPU: each product's fastest form for decode steps, timed here
                pick_cpu_forms(model)
                cpu_step = cpu_decode_step(model, compile=cpu_compile)  # where compiling the step whole wins
        self.model = model
        self.tokenizer = tokenizer
        self.formatter = formatter or make_chat_format(tokenizer)
        self.fast = fast
        self.decode_step = (cpu_step or DecodeStep(model, compile=compile and not cpu_compile)) if fast else None

    @property
    def device(self) -> torch.device:
        return self.model.rope_cos.device

    @torch.inference_mode()
    def generate(
        self,
        prompt_tokens: List[List[int]],
        max_gen_len: Optional[int] = None,
        temperature: Optional[float] = None,
        top_p: Optional[float] = None,
        logprobs: bool = False,
        echo: bool = False,
        *,
        config: Optional[GenerationConfig] = None,
        speculative: SpeculativeSetting = None,
        **controls: Any,
    ) -> Tuple[List[List[int]], Optional[List[List[float]]]]:
        """Continue each prompt by up to `max_gen_len` tokens (Meta's signature and return value).

        Args:
            prompt_tokens: one list of token ids per prompt; lengths may differ.
            max_gen_len: most tokens to generate per prompt (also limited by max_seq_len); default
                config.max_new_tokens, else max_seq_len - 1.
            temperature: 0 for greedy decoding; higher values flatten the distribution (default 0.6).
            top_p: nucleus-sampling threshold (default 0.9).
            logprobs: also return the log-probability of each returned token.
            echo: return the prompt tokens (and their logprobs) in front of the generation.
            config, **controls: the other controls of GenerationConfig (top_k, stop, seed, n, ...); keyword
                controls override the config's. With n samples, prompt i's samples are rows i*n .. i*n+n-1.
            speculative: decode by drafting and verifying several tokens a pass, with the same output
                (docs/speculative.md): a llama.speculative.Speculation (its `stats` then describe the
                call), or "lookup", "draft:CKPT_DIR", "eagle", "plain" (llama.speculative.settings).

        Returns:
            (tokens, logprobs): per row, the generated ids cut before the first stop token, and their
            log-probabilities (None unless `logprobs`).

        Raises:
            ValueError: no prompts, more rows than max_batch_size, an empty or too long prompt, bad settings.
        """
        if not prompt_tokens:
            raise ValueError("generate needs at least one prompt, got an empty list")
        for i, tokens in enumerate(prompt_tokens):
            problem = check_prompt(tokens, self.model.params)
            if problem:
                raise ValueError(f"prompt {i}: {problem}")
        completions = self.complete(
            prompt_tokens, max_gen_len, config=config, temperature=temperature, top_p=top_p,
            logprobs=logprobs, echo=echo, speculative=speculative, **controls,
        )
        rows = [c for samples in completions for c in samples]
        return [c.tokens for c in rows], ([c.logprobs for c in rows] if logprobs else None)

    def complete(
        self,
        prompt_tokens: List[List[int]],
        max_gen_len: Optional[int] = None,
        *,
        config: Optional[GenerationConfig] = None,
        logprobs: bool = False,
        top_logprobs: int = 0,
        echo: bool = False,
        speculative: SpeculativeSetting = None,
        **controls: Any,
    ) -> List[Optional[List[Completion]]]:
        """Generate for token prompts and return everything known about each sample: per prompt, its
        `config.n` Completions. Arguments as for `generate`; `top_logprobs` > 0 also returns that many most
        likely alternatives (and their logprobs) at each returned position.

        Raises:
            ValueError: no prompts, more rows than max_batch_size, bad settings.
            PromptError: some prompts cannot run (empty, too long, unknown ids); the others were completed
                and are in its `.results` (None for the failed ones).
        """
        if isinstance(top_logprobs, bool) or not isinstance(top_logprobs, int) or top_logprobs < 0:
            raise ValueError(f"top_logprobs must be an integer >= 0, got {top_logprobs!r}")
        cfg, max_gen_len = check_settings(self.model.params, len(prompt_tokens), config, max_gen_len, controls)
        problems = [check_prompt(tokens, self.model.params) for tokens in prompt_tokens]
        valid = [i for i, problem in enumerate(problems) if problem is None]
        results: List[Optional[List[Completion]]] = [None] * len(prompt_tokens)
        if valid:
            rows = Rows(
                prompt_tokens=[prompt_tokens[i] for i in valid for _ in range(cfg.n)],
                sample_index=[j for _ in valid for j in range(cfg.n)],
                max_gen_len=max_gen_len,
                config=cfg,
                logprobs=logprobs or top_logprobs > 0,
                top_logprobs=min(top_logprobs, self.model.vocab_size),
                track=bool(cfg.stop),  # stop strings need the text of every row at every step
                speculative=resolve_speculation(speculative, self),
            )
            completions = cut_completions(rows, run_to_end(self.decode(rows)), self.tokenizer, echo)
            for k, i in enumerate(valid):
                results[i] = completions[k * cfg.n : (k + 1) * cfg.n]
        errors = {i: problem for i, problem in enumerate(problems) if problem is not None}
        if errors:
            raise PromptError(errors, results)
        return results

    def decode(self, rows: Rows) -> DecodeLoop:
        """The decode loop over `rows`: Meta's (decode_reference) or the fast one (llama.fast.loop), as
        `uses_reference_loop` decides. Yields each step's StreamEvents with rows.track; returns a Decoded."""
        if rows.speculative is not None:  # drafts verified several at a time (llama.speculative)
            return rows.speculative.decode(self, rows)
        cfg = rows.config
        stop_ids = [] if cfg.ignore_eos else sorted(self.tokenizer.stop_tokens)
        sampler = make_sampler(cfg, self.tokenizer, rows.sample_index, self.device, prefilter=self.fast)
        if uses_reference_loop(self.fast, cfg, rows.prompt_tokens):
            return self.decode_reference(rows, sampler, stop_ids)
        total_len = min(self.model.params.max_seq_len, rows.max_gen_len + max(map(len, rows.prompt_tokens)))
        every = stop_check_interval(self.device, cfg.temperature, rows.track)
        return decode(
            self.model, self.decode_step, rows, total_len, sampler, stop_ids, self.tokenizer.decode,
            self.tokenizer.pad_id, stop_check_every=every,
        )

    @torch.inference_mode()
    def decode_reference(self, rows: Rows, sampler: Sampler, stop_ids: List[int]) -> DecodeLoop:
        """Meta's decode loop: the prompts left-aligned in one (bsz, total_len) buffer; the first call feeds
        every position up to the shortest prompt's end, then each step one position of every row. Rows still
        inside their prompt keep their prompt token there (the sampled one is thrown away), so every row draws
        from the sampler at every step, as in Meta's llama3 `generate`. Rows stop at a token of `stop_ids`;
        positions past a row's end are left as they are (the caller cuts)."""
        cfg = rows.config
        bsz = len(rows.prompt_tokens)
        prompt_lens = [len(t) for t in rows.prompt_tokens]
        min_prompt_len, max_prompt_len = min(prompt_lens), max(prompt_lens)
        total_len = min(self.model.params.max_seq_len, rows.max_gen_len + max_prompt_len)

        device = self.device
        tokens = torch.full((bsz, total_len), self.tokenizer.pad_id, dtype=torch.long, device=device)
        for k, t in enumerate(rows.prompt_tokens):
            tokens[k, : len(t)] = torch.tensor(t, dtype=torch.long, device=device)
        prompt_lens_t = torch.tensor(prompt_lens, device=device)
        # True where a row still holds its own prompt: those positions keep the prompt token.
        input_text_mask = torch.arange(total_len, device=device)[None, :] < prompt_lens_t[:, None]
        recorder = LogprobRecorder(bsz, total_len, rows.top_logprobs, device) if rows.logprobs else None
        tracker = None
        if rows.track:
            ends = [min(p + rows.max_gen_len, total_len) for p in prompt_lens]
            tracker = RowTracker(self.tokenizer.decode, prompt_lens, ends, stop_ids, cfg.stop)
        stop_tokens = torch.tensor(stop_ids, dtype=torch.long, device=device)
        eos_reached = torch.zeros(bsz, dtype=torch.bool, device=device)

        prev_pos = 0
        if min_prompt_len == total_len and recorder:  # nothing to generate: just score the prompts
            logits = self.model.forward(tokens, prev_pos)
            recorder.record(logits[:, :-1], tokens, first_target=1)
        for cur_pos in range(min_prompt_len, total_len):
            logits = self.model.forward(tokens[:, prev_pos:cur_pos], prev_pos)  # (bsz, cur_pos - prev_pos, vocab)
            # Sampling sees the last position's logits and every row's tokens so far (all rows are at
            # cur_pos; those still in their prompt have n_generated < 0).
            context = Context(tokens[:, :cur_pos], torch.full_like(prompt_lens_t, cur_pos), prompt_lens_t)
            next_tok = sampler(logits[:, -1], context)  # (bsz,)
            next_tok = torch.where(input_text_mask[:, cur_pos], tokens[:, cur_pos], next_tok)
            tokens[:, cur_pos] = next_tok
            if recorder:  # logits at positions prev_pos .. cur_pos - 1 predict the tokens at prev_pos + 1 .. cur_pos
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
        return Decoded(tokens, total_len, recorder, tracker)

    def text_completion(
        self,
        prompts: List[str],
        temperature: Optional[float] = None,
        top_p: Optional[float] = None,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
        echo: bool = False,
        *,
        config: Optional[GenerationConfig] = None,
        top_logprobs: int = 0,
        speculative: SpeculativeSetting = None,
        **controls: Any,
    ) -> List[Union[CompletionPrediction, List[CompletionPrediction]]]:
        """Continue each text prompt. `max_gen_len` defaults to max_seq_len - 1; temperature and top_p to
        Meta's 0.6 and 0.9; the other controls (GenerationConfig fields) are off unless given. `speculative`
        as for `generate`: each prediction then also holds its "speculative" statistics.

        Returns one CompletionPrediction per prompt, or with n > 1 a list of n per prompt. With
        top_logprobs > 0 each prediction also holds, per token, the most likely (token, logprob) pairs.

        Raises TypeError for one str instead of a list of them; PromptError (a ValueError) naming the
        prompts that cannot run (empty, too long) after completing the others, whose predictions it carries
        in `.results`.
        """
        check_text_prompts(prompts)
        prompt_tokens = [self.tokenizer.encode(prompt, bos=True, eos=False) for prompt in prompts]

        def shape(results: List[Optional[List[Completion]]]) -> list:
            return to_predictions(results, self.tokenizer, lambda c: c.text, logprobs, top_logprobs)

        try:
            completions = self.complete(
                prompt_tokens, max_gen_len, config=config, temperature=temperature, top_p=top_p,
                logprobs=logprobs, top_logprobs=top_logprobs, echo=echo, speculative=speculative, **controls,
            )
        except PromptError as e:
            raise PromptError(e.errors, shape(e.results)) from None
        return shape(completions)

    def chat_completion(
        self,
        dialogs: List[Dialog],
        temperature: Optional[float] = None,
        top_p: Optional[float] = None,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
        *,
        config: Optional[GenerationConfig] = None,
        top_logprobs: int = 0,
        speculative: SpeculativeSetting = None,
        **controls: Any,
    ) -> List[Union[ChatPrediction, List[ChatPrediction]]]:
        """Answer each dialog as the assistant. Defaults and controls as for `text_completion`.

        A dialog must be an optional system message, then (Llama 3) user, assistant and ipython messages
        ending with user or ipython, or (Llama 2) user/assistant turns alternating and ending with the user.
        Returns one ChatPrediction per dialog (a list of n with n > 1). When a Llama 3.1+ reply calls a tool,
        its message also holds "tool_calls", "python_tag" and "stop_reason" (llama.tool_calls). Raises
        TypeError for one dialog instead of a list of them; PromptError (a ValueError) naming the dialogs that
        cannot run, after answering the others, whose predictions it carries in `.results`. With the Llama 2
        chat format, a dialog containing its tags ([INST], <<SYS>>, ...) is run as any other, and its
        answer's content replaced by "Error: special tags are not allowed as part of the prompt.", as Meta's
        Llama 2 code does (tokens and logprobs are the generated ones).
        """
        check_dialog_list(dialogs)
        prompt_tokens: List[List[int]] = []
        dialog_errors: Dict[int, str] = {}
        for i, dialog in enumerate(dialogs):
            try:
                self.formatter.check_dialog(dialog)
            except ValueError as e:
                dialog_errors[i] = str(e)
            prompt_tokens.append([] if i in dialog_errors else self.formatter.encode_dialog_prompt(dialog))
        replies = [None if i in dialog_errors else self.formatter.fixed_reply(d) for i, d in enumerate(dialogs)]

        def shape(results: List[Optional[List[Completion]]]) -> list:
            return chat_predictions(results, self.tokenizer, replies, logprobs, top_logprobs)

        try:
            completions = self.complete(
                prompt_tokens, max_gen_len, config=config, temperature=temperature, top_p=top_p,
                logprobs=logprobs, top_logprobs=top_logprobs, speculative=speculative, **controls,
            )
        except PromptError as e:  # a dialog that failed its checks has no prompt: say why it failed instead
            raise PromptError({**e.errors, **dialog_errors}, shape(e.results)) from None
        return shape(completions)

    def generate_stream(
        self,
        prompt_tokens: List[List[int]],
        max_gen_len: Optional[int] = None,
        *,
        config: Optional[GenerationConfig] = None,
        speculative: SpeculativeSetting = None,
        **controls: Any,
    ) -> Iterator[StreamEvent]:
        """Generate as `generate` does, yielding each row's tokens as they are produced.

        Yields StreamEvents (row, token, text, stop_reason): one per new token with the text it completed
        (characters split over tokens, and text that may begin a stop string, wait for the following
        tokens), then one per row with token None, the text still held back and the stop reason
        ("stop_token", "stop_string" or "length"). A row's texts concatenate to its `text_completion`
        generation. Closing the generator early stops the generation.

        Raises:
            ValueError: as `generate`, before anything is yielded.
        """
        cfg, max_gen_len = check_settings(self.model.params, len(prompt_tokens), config, max_gen_len, controls)
        for i, tokens in enumerate(prompt_tokens):
            problem = check_prompt(tokens, self.model.params)
            if problem:
                raise ValueError(f"prompt {i}: {problem}")
        rows = Rows(
            prompt_tokens=[t for t in prompt_tokens for _ in range(cfg.n)],
            sample_index=[j for _ in prompt_tokens for j in range(cfg.n)],
            max_gen_len=max_gen_len,
            config=cfg,
            track=True,
            speculative=resolve_speculation(speculative, self),
        )
        return (event for events in self.decode(rows) for event in events)

    def score(self, prompts: Sequence[Union[str, Sequence[int]]]) -> List[ScorePrediction]:
        """Log-likelihood and perplexity of each text (encoded with <|begin_of_text|>) or token list:
        the sum and mean of the logprobs of every token after the first, each given the ones before.

        Any number of prompts (run max_batch_size at a time). Raises PromptError (a ValueError) naming the
        prompts that cannot be scored (fewer than 2 tokens, longer than max_seq_len), after scoring the
        others, which it carries in `.results`.
        """
        if not prompts:
            raise ValueError("no prompts given: pass a non-empty list")
        prompt_tokens = [
            self.tokenizer.encode(p, bos=True, eos=False) if isinstance(p, str) else list(p) for p in prompts
        ]
        errors: Dict[int, str] = {}
        for i, tokens in enumerate(prompt_tokens):
            problem = check_prompt(tokens, self.model.params)
            if problem is None and len(tokens) < 2:
                problem = f"scoring needs at least 2 tokens, got {len(tokens)}"
            if problem:
                errors[i] = problem
        valid = [i for i in range(len(prompt_tokens)) if i not in errors]
        results: List[Optional[ScorePrediction]] = [None] * len(prompt_tokens)
        for i, result in zip(valid, score_sequences(self.model, [prompt_tokens[i] for i in valid])):
            results[i] = result
        if errors:
            raise PromptError(errors, results)
        return results
