"""`Llama`: build a model from a checkpoint directory, then generate, complete text and chat.

The story of a request: prompts are encoded to token ids, `generate` runs the model over them one position
at a time (the first positions shared by every prompt in a single batched call), and the ids it produces
are cut at the first stop token and decoded.
"""

import contextlib
import time
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, TypedDict, Union

import fairscale.nn.model_parallel.initialize as fs_init
import torch
import torch.nn.functional as F

from llama.checkpoint import find_tokenizer, load_checkpoint, load_into, tokenizer_kind
from llama.distributed import init_distributed, is_rank_zero, pick_device, pick_dtype
from llama.model import ModelArgs, Transformer
from llama.sampling import next_token
from llama.tokenizer import ChatFormat, Dialog, Message, Tokenizer, check_dialog
from llama.tokenizer_llama2 import Llama2ChatFormat, SentencePieceTokenizer

AnyTokenizer = Union[Tokenizer, SentencePieceTokenizer]
AnyChatFormat = Union[ChatFormat, Llama2ChatFormat]
CHAT_FORMATS = {"llama3": ChatFormat, "llama2": Llama2ChatFormat}


class CompletionPrediction(TypedDict, total=False):
    generation: str
    tokens: List[str]  # each token decoded on its own; only with logprobs=True
    logprobs: List[float]  # only with logprobs=True


class ChatPrediction(TypedDict, total=False):
    generation: Message
    tokens: List[str]  # only with logprobs=True
    logprobs: List[float]  # only with logprobs=True


class PromptError(ValueError):
    """Some prompts of a batch were invalid. The valid ones were still completed: `results` holds their
    predictions in order (None where a prompt failed) and `errors` maps each failed index to its message."""

    def __init__(self, errors: Dict[int, str], results: list):
        self.errors = errors
        self.results = results
        details = "; ".join(f"prompt {i}: {msg}" for i, msg in sorted(errors.items()))
        super().__init__(f"{len(errors)} of {len(results)} prompts failed ({details})")


def load_tokenizer(path: str) -> AnyTokenizer:
    """Llama 3's tiktoken tokenizer or Llama 2's SentencePiece one, whichever the file holds."""
    if tokenizer_kind(path) == "sentencepiece":
        return SentencePieceTokenizer(path)
    return Tokenizer(path)


def make_chat_format(tokenizer: AnyTokenizer, name: Optional[str] = None) -> AnyChatFormat:
    """The chat format `name` ("llama3" or "llama2"); by default the one of the tokenizer's family."""
    if name is None:
        name = "llama2" if isinstance(tokenizer, SentencePieceTokenizer) else "llama3"
    if name not in CHAT_FORMATS:
        raise ValueError(f"unknown chat_format {name!r}; expected one of {sorted(CHAT_FORMATS)}")
    if name == "llama3" and "<|start_header_id|>" not in tokenizer.special_tokens:
        raise ValueError("chat_format 'llama3' needs Llama 3's special tokens, which this tokenizer lacks")
    return CHAT_FORMATS[name](tokenizer)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


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
                float32 on the CPU.
            chat_format: "llama3" or "llama2"; default the one of the tokenizer's family.

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
        with _default_dtype(dtype):
            model = Transformer(model_args)
        load_into(model, state, device_, dtype, source=ckpt_dir)
        model.to(device_).eval()
        if is_rank_zero():
            print(f"Loaded in {time.time() - start_time:.2f} seconds")
        return Llama(model, tokenizer, formatter)

    def __init__(self, model: Transformer, tokenizer: AnyTokenizer, formatter: Optional[AnyChatFormat] = None):
        self.model = model
        self.tokenizer = tokenizer
        self.formatter = formatter or make_chat_format(tokenizer)

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
        max_gen_len: int,
        temperature: float = 0.6,
        top_p: float = 0.9,
        logprobs: bool = False,
        echo: bool = False,
    ) -> Tuple[List[List[int]], Optional[List[List[float]]]]:
        """Continue each prompt by up to `max_gen_len` tokens.

        Args:
            prompt_tokens: one list of token ids per prompt; lengths may differ.
            max_gen_len: most tokens to generate per prompt (also limited by max_seq_len).
            temperature: 0 for greedy decoding; higher values flatten the distribution.
            top_p: nucleus-sampling threshold.
            logprobs: also return the log-probability of each returned token.
            echo: return the prompt tokens (and their logprobs) in front of the generation.

        Returns:
            (tokens, logprobs): per prompt, the generated ids cut before the first stop token, and their
            log-probabilities (None unless `logprobs`).

        Raises:
            ValueError: no prompts, more than max_batch_size, an empty or too long prompt, bad settings.
        """
        params = self.model.params
        bsz = len(prompt_tokens)
        if bsz == 0:
            raise ValueError("generate needs at least one prompt, got an empty list")
        if bsz > params.max_batch_size:
            raise ValueError(f"{bsz} prompts is more than max_batch_size={params.max_batch_size}")
        for i, tokens in enumerate(prompt_tokens):
            problem = self._check_prompt(tokens)
            if problem:
                raise ValueError(f"prompt {i}: {problem}")
        if not isinstance(max_gen_len, int) or max_gen_len < 1:
            raise ValueError(f"max_gen_len must be a positive integer, got {max_gen_len!r}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")

        prompt_lens = [len(t) for t in prompt_tokens]
        min_prompt_len, max_prompt_len = min(prompt_lens), max(prompt_lens)
        total_len = min(params.max_seq_len, max_gen_len + max_prompt_len)

        device = self.device
        pad_id = self.tokenizer.pad_id
        tokens = torch.full((bsz, total_len), pad_id, dtype=torch.long, device=device)
        for k, t in enumerate(prompt_tokens):
            tokens[k, : len(t)] = torch.tensor(t, dtype=torch.long, device=device)
        positions = torch.arange(total_len, device=device)
        # True where a row still holds its own prompt: those positions keep the prompt token.
        input_text_mask = positions[None, :] < torch.tensor(prompt_lens, device=device)[:, None]
        token_logprobs = torch.zeros((bsz, total_len), dtype=torch.float, device=device) if logprobs else None

        stop_tokens = torch.tensor(sorted(self.tokenizer.stop_tokens), device=device)
        eos_reached = torch.zeros(bsz, dtype=torch.bool, device=device)
        prev_pos = 0
        if min_prompt_len == total_len and logprobs:  # nothing to generate: just score the prompts
            logits = self.model.forward(tokens, prev_pos)
            # Logits at position i predict token i + 1; the first token has no prediction (logprob 0).
            token_logprobs[:, 1:] = -F.cross_entropy(
                logits[:, :-1].transpose(1, 2), target=tokens[:, 1:], reduction="none"
            )

        for cur_pos in range(min_prompt_len, total_len):
            # The first call feeds every position up to the shortest prompt's end; then one token a step.
            logits = self.model.forward(tokens[:, prev_pos:cur_pos], prev_pos)  # (bsz, cur-prev, vocab)
            next_tok = next_token(logits[:, -1], temperature, top_p)
            next_tok = torch.where(input_text_mask[:, cur_pos], tokens[:, cur_pos], next_tok)
            tokens[:, cur_pos] = next_tok
            if logprobs:
                # Logits at positions prev_pos..cur_pos-1 predict the tokens at prev_pos+1..cur_pos.
                token_logprobs[:, prev_pos + 1 : cur_pos + 1] = -F.cross_entropy(
                    logits.transpose(1, 2), target=tokens[:, prev_pos + 1 : cur_pos + 1], reduction="none"
                )
            eos_reached |= ~input_text_mask[:, cur_pos] & torch.isin(next_tok, stop_tokens)
            prev_pos = cur_pos
            if bool(eos_reached.all()):
                break

        all_logprobs = token_logprobs.tolist() if logprobs else None
        out_tokens, out_logprobs = [], []
        for i, row in enumerate(tokens.tolist()):
            prompt_len = prompt_lens[i]
            end = min(prompt_len + max_gen_len, total_len)
            generated = row[prompt_len:end]
            # Cut the generation (never the echoed prompt) before its first stop token.
            stops = [j for j, t in enumerate(generated) if t in self.tokenizer.stop_tokens]
            if stops:
                end = prompt_len + stops[0]
            start = 0 if echo else prompt_len
            out_tokens.append(row[start:end])
            if all_logprobs is not None:
                out_logprobs.append(all_logprobs[i][start:end])
        return out_tokens, (out_logprobs if logprobs else None)

    def text_completion(
        self,
        prompts: List[str],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
        echo: bool = False,
    ) -> List[CompletionPrediction]:
        """Continue each text prompt. `max_gen_len` defaults to max_seq_len - 1.

        Raises PromptError (a ValueError) naming the prompts that cannot run (empty, too long) after
        completing the others, which it carries in `.results`.
        """
        if max_gen_len is None:
            max_gen_len = self.model.params.max_seq_len - 1
        prompt_tokens = []
        for prompt in prompts:
            if not isinstance(prompt, str):
                raise TypeError(f"prompts must be strings, got {type(prompt).__name__}: {prompt!r:.80}")
            prompt_tokens.append(self.tokenizer.encode(prompt, bos=True, eos=False))
        return self._complete(
            prompt_tokens, [None] * len(prompt_tokens), max_gen_len, temperature, top_p, logprobs, echo,
            lambda text: text,
        )

    def chat_completion(
        self,
        dialogs: List[Dialog],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
    ) -> List[ChatPrediction]:
        """Answer each dialog as the assistant. `max_gen_len` defaults to max_seq_len - 1.

        A dialog must be an optional system message, then user/assistant turns alternating and ending with
        the user. Raises PromptError (a ValueError) naming the dialogs that cannot run, after answering the
        others, which it carries in `.results`. With the Llama 2 chat format, a dialog containing its tags
        ([INST], <<SYS>>, ...) is answered "Error: special tags are not allowed as part of the prompt."
        without running the model (empty tokens and logprobs), as Meta's Llama 2 code answers it.
        """
        if max_gen_len is None:
            max_gen_len = self.model.params.max_seq_len - 1
        prompt_tokens: List[List[int]] = []
        problems: List[Optional[str]] = []
        fixed: Dict[int, ChatPrediction] = {}
        for i, dialog in enumerate(dialogs):
            try:
                check_dialog(dialog)
            except ValueError as e:
                prompt_tokens.append([])
                problems.append(str(e))
                continue
            reply = self.formatter.fixed_reply(dialog)
            if reply is not None:
                fixed[i] = {"generation": {"role": "assistant", "content": reply}}
                if logprobs:
                    fixed[i].update(tokens=[], logprobs=[])
            prompt_tokens.append([] if reply is not None else self.formatter.encode_dialog_prompt(dialog))
            problems.append(None)
        return self._complete(
            prompt_tokens, problems, max_gen_len, temperature, top_p, logprobs, False,
            lambda text: {"role": "assistant", "content": text}, fixed,
        )

    def _complete(self, prompt_tokens, problems, max_gen_len, temperature, top_p, logprobs, echo, wrap, fixed=None):
        """Generate for the valid prompts in one batch, decode, and raise PromptError afterwards for the
        invalid ones. Prompts in `fixed` (index -> result) are answered with that result, without the model."""
        fixed = fixed or {}
        if not prompt_tokens:
            raise ValueError("no prompts given: pass a non-empty list")
        if len(prompt_tokens) > self.model.params.max_batch_size:
            raise ValueError(
                f"{len(prompt_tokens)} prompts is more than max_batch_size={self.model.params.max_batch_size}"
            )
        errors = {}
        for i, tokens in enumerate(prompt_tokens):
            if i in fixed:
                continue
            problem = problems[i] or self._check_prompt(tokens)
            if problem:
                errors[i] = problem
        valid = [i for i in range(len(prompt_tokens)) if i not in errors and i not in fixed]
        results: list = [fixed.get(i) for i in range(len(prompt_tokens))]
        if valid:
            out_tokens, out_logprobs = self.generate(
                [prompt_tokens[i] for i in valid], max_gen_len, temperature, top_p, logprobs, echo
            )
            for j, i in enumerate(valid):
                result = {"generation": wrap(self.tokenizer.decode(out_tokens[j]))}
                if logprobs:
                    result["tokens"] = [self.tokenizer.decode([t]) for t in out_tokens[j]]
                    result["logprobs"] = out_logprobs[j]
                results[i] = result
        if errors:
            raise PromptError(errors, results)
        return results
