"""`Llama`: build a model from a checkpoint directory, then generate, complete text and chat.

The story of a request: prompts are encoded to token ids, the decode loop (`_decode`) runs the model over
them, a Sampler picks each next token under the call's GenerationConfig, and the ids produced are cut at the
first stop token (or stop string) and decoded. `generate`, `complete`, `generate_stream`, `text_completion`
and `chat_completion` are views of that one loop. It comes in two versions with the same results: the fast
loop of llama.decoding (the default) and Meta's reference loop of llama.reference (`fast=False`): one
position at a time, the first positions shared by every prompt in a single batched call. The prediction
types and PromptError live in llama.predictions, the choice of tokenizer and chat format in llama.families.
"""

import time
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import fairscale.nn.model_parallel.initialize as fs_init
import torch

from llama.checkpoint import find_tokenizer, load_checkpoint, load_into
from llama.completion import Completion, DecodeRun, cut_completions
from llama.config import GenerationConfig, resolve_config
from llama.decoding import DecodeStep, decode
from llama.distributed import default_dtype, init_distributed, is_rank_zero, pick_device, pick_dtype
from llama.families import AnyChatFormat, AnyTokenizer, load_tokenizer, make_chat_format
from llama.fast_layers import use_fast_layers
from llama.model import ModelArgs, Transformer
from llama.predictions import ChatPrediction, CompletionPrediction, PromptError, run_valid, to_prediction
from llama.reference import decode_reference
from llama.sampling import Sampler, build_processors, row_generators, sample_top_p  # noqa: F401 (Meta's name)
from llama.scoring import ScorePrediction, score_sequences
from llama.streaming import StreamEvent
# Meta's llama.generation also offers these names (the Llama 2 one its chat tags): scripts import them from here.
from llama.tokenizer import ChatFormat, Dialog, Message, Role, Tokenizer  # noqa: F401
from llama.tokenizer_llama2 import B_INST, B_SYS, E_INST, E_SYS, SPECIAL_TAGS, UNSAFE_ERROR  # noqa: F401
from llama.tool_calls import reply_message


class Llama:
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
        dtype: Optional[torch.dtype] = None,
        chat_format: Optional[str] = None,
        fast: bool = True,
        compile: bool = False,
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
            dtype: weight and activation dtype; default bf16 on CUDA (fp16 where bf16 is not supported),
                float32 on the CPU. On CPUs with native bf16 (AVX512-BF16, AMX), bf16 is about twice as fast.
            chat_format: "llama3" or "llama2"; default the one of the tokenizer's family.
            fast: decode with the fast loop (llama.decoding) on the fast layers (llama.fast_layers: fused
                projections, on the CPU weights packed for oneDNN); False runs Meta's reference loop on
                fairscale's layers. Same results.
            compile: compile the decode step with torch.compile (CUDA graphs and tuned kernels on CUDA);
                needs `fast`. The first batch of each size is slow (a minute or more at 8B) while it compiles.

        Raises:
            FileNotFoundError: a missing directory, params.json, shard or tokenizer file.
            ValueError: bad sizes, a corrupt or unsafe shard, a model that cannot be split over
                model_parallel_size ranks, a vocabulary size that differs from the tokenizer's, tensors that
                do not match the model, a config.json for another architecture, a directory mixing layouts.
        """
        for name, value in (("max_seq_len", max_seq_len), ("max_batch_size", max_batch_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
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
        if fast:
            use_fast_layers(model, pack=not compile)
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
        """Wrap a loaded model. fast: decode with the fast loop; compile: compile its step (see build)."""
        if compile and not fast:
            raise ValueError("compile=True compiles the fast decode loop's step: it needs fast=True")
        self.model = model
        self.tokenizer = tokenizer
        self.formatter = formatter or make_chat_format(tokenizer)
        self.fast = fast
        self.decode_step = DecodeStep(model, compile=compile) if fast else None

    @property
    def device(self) -> torch.device:
        return self.model.rope_cos.device

    def _check_prompt(self, tokens: Sequence[int]) -> Optional[str]:
        """Why these prompt tokens cannot be generated from, or None if they can."""
        max_seq_len = self.model.params.max_seq_len
        if len(tokens) == 0:
            return "the prompt is empty (no tokens)"
        if len(tokens) > max_seq_len:
            return f"the prompt has {len(tokens)} tokens, more than max_seq_len={max_seq_len}"
        bad = [t for t in tokens if not 0 <= t < self.model.vocab_size]
        if bad:
            return f"token ids {bad[:5]} are outside the vocabulary [0, {self.model.vocab_size})"
        return None

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
        **controls: Any,
    ) -> Tuple[List[List[int]], Optional[List[List[float]]]]:
        """Continue each prompt by up to `max_gen_len` tokens.

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

        Returns:
            (tokens, logprobs): per row, the generated ids cut before the first stop token, and their
            log-probabilities (None unless `logprobs`).

        Raises:
            ValueError: no prompts, more rows than max_batch_size, an empty or too long prompt, bad settings.
        """
        if not prompt_tokens:
            raise ValueError("generate needs at least one prompt, got an empty list")
        for i, tokens in enumerate(prompt_tokens):
            problem = self._check_prompt(tokens)
            if problem:
                raise ValueError(f"prompt {i}: {problem}")
        completions = self.complete(
            prompt_tokens, max_gen_len, config=config, temperature=temperature, top_p=top_p,
            logprobs=logprobs, echo=echo, **controls,
        )
        rows = [c for samples in completions for c in samples]
        return [c.tokens for c in rows], ([c.logprobs for c in rows] if logprobs else None)

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
        **controls: Any,
    ) -> List[Union[CompletionPrediction, List[CompletionPrediction]]]:
        """Continue each text prompt. `max_gen_len` defaults to max_seq_len - 1; temperature and top_p to
        Meta's 0.6 and 0.9; the other controls (GenerationConfig fields) are off unless given.

        Returns one CompletionPrediction per prompt, or with n > 1 a list of n per prompt. With
        top_logprobs > 0 each prediction also holds, per token, the most likely (token, logprob) pairs.

        Raises PromptError (a ValueError) naming the prompts that cannot run (empty, too long) after
        completing the others, which it carries in `.results`.
        """
        prompt_tokens = []
        for prompt in prompts:
            if not isinstance(prompt, str):
                raise TypeError(f"prompts must be strings, got {type(prompt).__name__}: {prompt!r:.80}")
            prompt_tokens.append(self.tokenizer.encode(prompt, bos=True, eos=False))
        settings = dict(temperature=temperature, top_p=top_p, max_gen_len=max_gen_len, config=config,
                        logprobs=logprobs, top_logprobs=top_logprobs, echo=echo, **controls)
        return self._complete(prompt_tokens, [None] * len(prompt_tokens), settings, lambda c: c.text)

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
        **controls: Any,
    ) -> List[Union[ChatPrediction, List[ChatPrediction]]]:
        """Answer each dialog as the assistant. Defaults and controls as for `text_completion`.

        A dialog must be an optional system message, then (Llama 3) user, assistant and ipython messages
        ending with user or ipython, or (Llama 2) user/assistant turns alternating and ending with the user.
        Returns one ChatPrediction per dialog (a list of n with n > 1). When a Llama 3.1+ reply calls a tool,
        its message also holds "tool_calls", "python_tag" and "stop_reason" (llama.tool_calls). Raises
        PromptError (a ValueError) naming the dialogs that cannot run, after answering the others, which it
        carries in `.results`. With the Llama 2 chat format, a dialog containing its tags ([INST], <<SYS>>,
        ...) is answered "Error: special tags are not allowed as part of the prompt.", as Meta's Llama 2 code
        answers it: the model still runs, and with logprobs its tokens and logprobs are returned beside it.
        """
        prompt_tokens: List[List[int]] = []
        problems: List[Optional[str]] = []
        fixed: Dict[int, str] = {}
        for i, dialog in enumerate(dialogs):
            try:
                self.formatter.check_dialog(dialog)
            except ValueError as e:
                prompt_tokens.append([])
                problems.append(str(e))
                continue
            reply = self.formatter.fixed_reply(dialog)
            if reply is not None:
                fixed[i] = reply
            prompt_tokens.append(self.formatter.encode_dialog_prompt(dialog))
            problems.append(None)
        settings = dict(temperature=temperature, top_p=top_p, max_gen_len=max_gen_len, config=config,
                        logprobs=logprobs, top_logprobs=top_logprobs, **controls)
        special_tokens = self.tokenizer.special_tokens
        return self._complete(prompt_tokens, problems, settings, lambda c: reply_message(c, special_tokens), fixed)

    def _complete(self, prompt_tokens, problems, settings, wrap, fixed=None) -> list:
        """Complete the prompts without a problem, shape each sample as Meta's predictions, and raise
        PromptError afterwards for the others (dialog problems, then prompt problems). Prompts in `fixed`
        (index -> text) run as the others do, but their generation's content is that text."""
        fixed = fixed or {}
        if not prompt_tokens:
            raise ValueError("no prompts given: pass a non-empty list")
        errors = {i: problem for i, problem in enumerate(problems) if problem}
        ready = [i for i in range(len(prompt_tokens)) if i not in errors]
        completions: List[Optional[List[Completion]]] = [None] * len(prompt_tokens)
        if ready:
            try:
                done = self.complete([prompt_tokens[i] for i in ready], **settings)
            except PromptError as e:
                done = e.results
                errors.update({ready[j]: message for j, message in e.errors.items()})
            for j, i in enumerate(ready):
                completions[i] = done[j]
        results: list = []
        for i, samples in enumerate(completions):
            if samples is None:
                results.append(None)
                continue
            predictions = [
                to_prediction(c, self.tokenizer, wrap, settings["logprobs"], settings["top_logprobs"] > 0)
                for c in samples
            ]
            for prediction in predictions if i in fixed else []:
                prediction["generation"] = {"role": "assistant", "content": fixed[i]}
            results.append(predictions if len(predictions) > 1 else predictions[0])
        if errors:
            raise PromptError(errors, results)
        return results

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
            problem = self._check_prompt(tokens)
            if problem is None and len(tokens) < 2:
                problem = f"scoring needs at least 2 tokens, got {len(tokens)}"
            if problem:
                errors[i] = problem
        score_valid = lambda valid: score_sequences(self.model, [prompt_tokens[i] for i in valid])  # noqa: E731
        return run_valid(len(prompt_tokens), errors, score_valid)

    def complete(
        self,
        prompt_tokens: List[List[int]],
        max_gen_len: Optional[int] = None,
        *,
        config: Optional[GenerationConfig] = None,
        logprobs: bool = False,
        top_logprobs: int = 0,
        echo: bool = False,
        **controls: Any,
    ) -> List[Optional[List[Completion]]]:
        """Generate for token prompts and return everything known about each sample.

        Arguments as for `generate`; `top_logprobs` > 0 also returns that many most likely alternatives
        (and their logprobs) at each returned position.

        Returns:
            per prompt, its `config.n` Completions.

        Raises:
            ValueError: no prompts, more rows than max_batch_size, bad settings.
            PromptError: some prompts cannot run (empty, too long, unknown ids); the others were completed
                and are in its `.results` (None for the failed ones).
        """
        if isinstance(top_logprobs, bool) or not isinstance(top_logprobs, int) or top_logprobs < 0:
            raise ValueError(f"top_logprobs must be an integer >= 0, got {top_logprobs!r}")
        cfg, max_gen_len = self._settings(config, max_gen_len, controls)
        self._check_batch(prompt_tokens, cfg)
        errors = {i: p for i, p in enumerate(map(self._check_prompt, prompt_tokens)) if p}

        def complete_valid(valid: List[int]) -> List[List[Completion]]:
            run = DecodeRun(
                prompt_tokens=[prompt_tokens[i] for i in valid for _ in range(cfg.n)],
                sample_index=[j for _ in valid for j in range(cfg.n)],
                max_gen_len=max_gen_len,
                config=cfg,
                logprobs=logprobs or top_logprobs > 0,
                top_logprobs=min(top_logprobs, self.model.vocab_size),
                track=bool(cfg.stop),  # stop strings need the text of every row at every step
            )
            for _ in self._decode(run):
                pass
            rows = cut_completions(run, self.tokenizer, echo)
            return [rows[k * cfg.n : (k + 1) * cfg.n] for k in range(len(valid))]

        return run_valid(len(prompt_tokens), errors, complete_valid)

    def generate_stream(
        self,
        prompt_tokens: List[List[int]],
        max_gen_len: Optional[int] = None,
        *,
        config: Optional[GenerationConfig] = None,
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
        cfg, max_gen_len = self._settings(config, max_gen_len, controls)
        self._check_batch(prompt_tokens, cfg)
        for i, tokens in enumerate(prompt_tokens):
            problem = self._check_prompt(tokens)
            if problem:
                raise ValueError(f"prompt {i}: {problem}")
        run = DecodeRun(
            prompt_tokens=[t for t in prompt_tokens for _ in range(cfg.n)],
            sample_index=[j for _ in prompt_tokens for j in range(cfg.n)],
            max_gen_len=max_gen_len,
            config=cfg,
            track=True,
        )
        return (event for events in self._decode(run) for event in events)

    def _decode(self, run: DecodeRun) -> Iterator[List[StreamEvent]]:
        """The decode loop over the rows of `run`: the fast one, or with fast=False Meta's (llama.reference).
        With run.track it yields each step's StreamEvents; it leaves the token ids (bsz, total_len), their
        logprobs and the row states on `run`."""
        cfg = run.config
        stop_ids = [] if cfg.ignore_eos else sorted(self.tokenizer.stop_tokens)
        mixed_lengths = len(set(map(len, run.prompt_tokens))) > 1
        if not self.fast or (cfg.temperature > 0 and cfg.seed is None and mixed_lengths):
            # Sampling from torch's global random stream: the reference loop draws for every row at every
            # step, rows still in their prompt too, so the fast loop, which starts every row at once, would
            # draw other numbers. Only the reference loop reproduces Meta's samples for a given seed there.
            return decode_reference(
                self.model, run, self._sampler(cfg, run.sample_index), stop_ids, self.tokenizer.decode,
                self.tokenizer.pad_id,
            )
        total_len = min(self.model.params.max_seq_len, run.max_gen_len + max(map(len, run.prompt_tokens)))
        # A look at the stop flags is a device sync on accelerators: greedy decoding there looks every 4
        # steps without waiting, at the copy started 4 steps before (decoding.StopWatch), so a batch runs at
        # most 7 steps past its last stop. Sampling looks every step, to draw from the random stream as the
        # reference does.
        every = 1 if self.device.type == "cpu" or cfg.temperature > 0 or run.track else 4
        return decode(
            self.model, self.decode_step, run, total_len, self._sampler(cfg, run.sample_index), stop_ids,
            self.tokenizer.decode, self.tokenizer.pad_id, stop_check_every=every,
        )

    def _check_batch(self, prompt_tokens: List[List[int]], cfg: GenerationConfig) -> None:
        if not prompt_tokens:
            raise ValueError("no prompts given: pass a non-empty list")
        max_batch_size = self.model.params.max_batch_size
        if len(prompt_tokens) * cfg.n > max_batch_size:
            samples = f" x n={cfg.n} samples" if cfg.n > 1 else ""
            raise ValueError(f"{len(prompt_tokens)} prompts{samples} is more than max_batch_size={max_batch_size}")

    def _settings(
        self, config: Optional[GenerationConfig], max_gen_len: Optional[int], controls: Dict[str, Any]
    ) -> Tuple[GenerationConfig, int]:
        """The checked config for one call, and max_gen_len (argument, else max_new_tokens, else
        max_seq_len - 1)."""
        cfg = resolve_config(config, **controls)
        if max_gen_len is None:
            max_gen_len = cfg.max_new_tokens or self.model.params.max_seq_len - 1
        if isinstance(max_gen_len, bool) or not isinstance(max_gen_len, int) or max_gen_len < 1:
            raise ValueError(f"max_gen_len must be a positive integer, got {max_gen_len!r}")
        if cfg.min_new_tokens > max_gen_len:
            raise ValueError(f"min_new_tokens={cfg.min_new_tokens} is more than max_gen_len={max_gen_len}")
        bad = [t for t in cfg.banned_token_ids if t >= self.model.vocab_size]
        if bad:
            raise ValueError(f"banned_token_ids {bad[:5]} are outside the vocabulary [0, {self.model.vocab_size})")
        return cfg, max_gen_len

    def _sampler(self, cfg: GenerationConfig, sample_index: List[int]) -> Sampler:
        banned: List[List[int]] = []
        for word in cfg.banned_words:
            # A word is spelt by different tokens at the start of a text and after a space.
            for variant in dict.fromkeys([word, " " + word.lstrip(" ")]):
                banned.append(self.tokenizer.encode(variant, bos=False, eos=False))
        processors = build_processors(cfg, sorted(self.tokenizer.stop_tokens), banned)
        generators = row_generators(cfg.seed, sample_index, self.device) if cfg.seed is not None else None
        # The prefiltered top-p reads a flag on the host at each draw: free on the CPU only.
        return Sampler(cfg, processors, generators, prefilter=self.fast and self.device.type == "cpu")
