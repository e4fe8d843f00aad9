"""The command line: `python -m llama` completes prompts in batches into JSON Lines; `python -m llama chat`
talks (see llama/chat.py). Under torchrun every rank computes and rank 0 alone reads, prints and writes.

    python -m llama --ckpt_dir DIR --prompts_file prompts.txt --output_file out.jsonl --batch_size 8
    python -m llama --ckpt_dir DIR --prompt "The capital of France is" --temperature 0
    python -m llama chat --ckpt_dir DIR --system "You are terse."
    torchrun --nproc_per_node 8 -m llama --ckpt_dir DIR_70B --prompts_file prompts.txt --output_file out.json
"""

import argparse
import codecs
import json
import os
import re
import sys
import time
from typing import Any, Dict, Iterator, List, Optional, Sequence, TextIO, Union

import torch

from llama.completion import Completion
from llama.config import DEFAULT_TEMPERATURE, DEFAULT_TOP_P, GenerationConfig
from llama.distributed import is_rank_zero
from llama.generation import Llama, PromptError
from llama.interrupt import report_interrupt
from llama.tokenizer import Dialog

Prompt = Union[str, Dialog]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Read the command line. Every sampling control of GenerationConfig has an option of the same name."""
    p = argparse.ArgumentParser(
        prog="python -m llama",
        description="Complete prompts in batches (into JSON Lines or JSON), or chat, with a Llama checkpoint. "
        "Under torchrun rank 0 reads, prints and writes.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("command", nargs="?", choices=["generate", "chat"], default="generate",
                   help="generate: complete prompts in batches; chat: talk interactively")
    model = p.add_argument_group("model")
    model.add_argument("--ckpt_dir", required=True, help="directory with params.json and consolidated.NN.pth")
    model.add_argument("--tokenizer_path", help="tokenizer.model (default: the one in --ckpt_dir or its original/)")
    model.add_argument("--chat_format", choices=["llama3", "llama2"], help="default: the tokenizer's family's")
    model.add_argument("--max_seq_len", type=int, default=512, help="longest prompt plus generation")
    model.add_argument("--model_parallel_size", type=int, help="default: the number of processes")
    model.add_argument("--device", help="cuda, cpu, ... (default: CUDA when available)")
    model.add_argument("--dtype", choices=sorted(DTYPES), help="default: bfloat16 on CUDA, float32 on the CPU")

    io = p.add_argument_group("prompts and output")
    io.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several)")
    io.add_argument("--prompts_file", help="one prompt per line (blank lines skipped); in a .jsonl file each "
                    'line is a JSON string, {"prompt": "..."} or {"dialog": [messages]}; a .json file holds a '
                    "JSON array of them")
    io.add_argument("--output_file", help=".jsonl: one JSON object per prompt and line; .json: an array")
    io.add_argument("--batch_size", type=int, default=4, help="prompts per batch")
    io.add_argument("--use_chat_template", action="store_true", help="send each prompt as a user message")
    io.add_argument("--system", help="a system message in front of each chat (chat template, chat mode)")
    io.add_argument("--max_display", type=int, help="print at most this many results (default: all without "
                    "--output_file, else 4)")
    io.add_argument("--no_progress", action="store_true", help="no progress bar on stderr")
    io.add_argument("--interactive", action="store_true", help="the same as the chat command")

    s = p.add_argument_group("generation controls (see GenerationConfig)")
    s.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE, help="0: greedy")
    s.add_argument("--top_p", type=float, default=DEFAULT_TOP_P)
    s.add_argument("--top_k", type=int, default=0, help="0: off")
    s.add_argument("--min_p", type=float, default=0.0, help="0: off")
    s.add_argument("--repetition_penalty", type=float, default=1.0, help="1: off")
    s.add_argument("--stop", action="append", default=[], type=_unescape,
                   help=r"a stop string (repeat for several); \n, \t, \r and \\ are understood")
    s.add_argument("--banned_words", action="append", default=[], help="a banned word (repeat for several)")
    s.add_argument("--banned_token_ids", type=_int_list, default=[], help="comma-separated token ids")
    s.add_argument("--seed", type=int, help="sampling seed (default: the global seed, 1)")
    s.add_argument("--n", type=int, default=1, help="samples per prompt")
    s.add_argument("--min_new_tokens", type=int, default=0)
    s.add_argument("--max_gen_len", "--max_new_tokens", dest="max_gen_len", type=int,
                   help="most tokens per answer (default: up to max_seq_len)")
    s.add_argument("--ignore_eos", action="store_true", help="do not stop at stop tokens")
    s.add_argument("--logprobs", action="store_true", help="write each generated token's logprob")
    s.add_argument("--top_logprobs", type=int, default=0, help="write this many alternatives per token")
    args = p.parse_args(argv)
    if args.interactive:
        args.command = "chat"
    if args.batch_size < 1:
        p.error(f"--batch_size must be at least 1, got {args.batch_size}")
    return args


def _unescape(text: str) -> str:
    r"""Read \n, \t, \r and \\ in a command-line string as the characters they name."""
    names = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}
    return re.sub(r"\\([ntr\\])", lambda m: names[m.group(1)], text)


def _int_list(text: str) -> List[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def generation_config(args: argparse.Namespace) -> GenerationConfig:
    """The GenerationConfig the options ask for (checked: bad values raise ValueError)."""
    return GenerationConfig(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
        repetition_penalty=args.repetition_penalty, stop=tuple(args.stop), banned_words=tuple(args.banned_words),
        banned_token_ids=tuple(args.banned_token_ids), seed=args.seed, n=args.n,
        min_new_tokens=args.min_new_tokens, max_new_tokens=args.max_gen_len, ignore_eos=args.ignore_eos,
    )


def build(args: argparse.Namespace, max_batch_size: int) -> Llama:
    return Llama.build(
        ckpt_dir=args.ckpt_dir, tokenizer_path=args.tokenizer_path, max_seq_len=args.max_seq_len,
        max_batch_size=max_batch_size, model_parallel_size=args.model_parallel_size, device=args.device,
        dtype=DTYPES[args.dtype] if args.dtype else None, chat_format=args.chat_format,
    )


def read_prompts(args: argparse.Namespace) -> List[Prompt]:
    """The --prompt values, then the prompts of --prompts_file."""
    prompts: List[Prompt] = []
    for i, text in enumerate(args.prompt, start=1):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # bytes of argv that are not UTF-8 arrive as lone surrogates
            code = ord(text[e.start])
            what = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"lone surrogate U+{code:04X}"
            raise ValueError(f"--prompt number {i} is not valid UTF-8: {what} at character {e.start + 1}") from None
        prompts.append(text)
    if args.prompts_file:
        prompts.extend(read_prompts_file(args.prompts_file))
    if not prompts:
        raise ValueError("no prompts: give --prompt TEXT or --prompts_file FILE")
    return prompts


def read_prompts_file(path: str) -> List[Prompt]:
    """The prompts of a file, by its extension: .json holds a JSON array of prompts; .jsonl one prompt per
    line; any other file one plain-text prompt per line. Blank lines are skipped. A JSON prompt is a string,
    {"prompt": "..."}, {"dialog": [messages]} or [messages]. Errors name the file and the line (or item)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompts file not found: {path!r}")
    with open(path, "rb") as f:
        data = f.read()
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
    if path.endswith(".json"):
        text = "\n".join(_decode_line(raw, path, n) for n, raw in enumerate(data.split(b"\n"), start=1))
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: not JSON ({e.msg}, column {e.colno})") from None
        if not isinstance(items, list):
            raise ValueError(f"{path}: a .json prompts file holds a JSON array of prompts, got a "
                             f"{type(items).__name__}; for one prompt per line use a .jsonl file")
        return [_prompt_value(item, f"{path}: item {i}") for i, item in enumerate(items)]
    prompts: List[Prompt] = []
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        line = _decode_line(raw, path, lineno).rstrip("\r")
        if not line.strip():
            continue
        if path.endswith(".jsonl"):
            prompts.append(_json_prompt(line, f"{path}:{lineno}"))
        else:
            prompts.append(line)
    return prompts


def _decode_line(raw: bytes, path: str, lineno: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                         "save the file as UTF-8") from None


def _json_prompt(line: str, where: str) -> Prompt:
    try:
        value = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not JSON ({e})") from None
    return _prompt_value(value, where)


def _prompt_value(value: Any, where: str) -> Prompt:
    """The prompt a JSON value stands for: a string, or a dialog (a list of messages, checked later)."""
    if isinstance(value, dict):
        keys = sorted(value)
        if keys not in (["prompt"], ["dialog"]):
            raise ValueError(f'{where}: an object holds exactly one key, "prompt" (a string) or "dialog" (a list of '
                             f"messages); got keys {keys}")
        key, value = keys[0], value[keys[0]]
        if key == "prompt" and not isinstance(value, str):
            raise ValueError(f'{where}: "prompt" must be a string, got {json.dumps(value):.80}')
        if key == "dialog" and not isinstance(value, list):
            raise ValueError(f'{where}: "dialog" must be a list of messages, got {json.dumps(value):.80}; for '
                             'plain text write {"prompt": ...}')
        return value
    if not isinstance(value, (str, list)):
        raise ValueError(f'{where}: expected a string, {{"prompt": ...}} or {{"dialog": [...]}}, got '
                         f"{json.dumps(value):.80}")
    return value


def check_output_file(path: str) -> None:
    """Raise ValueError or FileNotFoundError unless `path` can be written as --output_file: checked before
    the model loads (minutes for a large one) rather than found when the first result is written. Nothing
    is created or truncated here."""
    if not path.endswith((".jsonl", ".json")):
        raise ValueError(f"--output_file must end in .jsonl or .json, got {path!r}")
    if os.path.isdir(path):
        raise ValueError(f"--output_file {path!r} is a directory")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--output_file {path!r}: the directory {folder!r} does not exist")
    if not os.access(path if os.path.exists(path) else folder, os.W_OK):
        raise ValueError(f"--output_file {path!r} cannot be written here (permission denied)")


class RecordWriter:
    """Writes records to a .jsonl file (one object per line) or a .json file (an array), as they come, so a
    run that stops early keeps what it finished."""

    def __init__(self, path: str):
        if not path.endswith((".jsonl", ".json")):
            raise ValueError(f"--output_file must end in .jsonl or .json, got {path!r}")
        self.array = path.endswith(".json")
        self.file = open(path, "w", encoding="utf-8")
        self.count = 0
        if self.array:
            self.file.write("[")

    def write(self, record: Dict[str, Any]) -> None:
        text = json.dumps(record, ensure_ascii=False)
        if self.array:
            text = ("," if self.count else "") + "\n  " + text
        else:
            text += "\n"
        self.file.write(text)
        self.file.flush()
        self.count += 1

    def close(self) -> None:
        if self.array:
            self.file.write("\n]\n")
        self.file.close()


class Progress:
    """A one-line progress bar over batches on stderr (a line per update when stderr is not a terminal)."""

    def __init__(self, total: int, stream: Optional[TextIO] = None, width: int = 30):
        self.total, self.stream, self.width = total, stream or sys.stderr, width
        self.start = time.time()
        self.tty = self.stream.isatty()

    def update(self, done: int, failed: int) -> None:
        filled = self.width * done // self.total
        bar = "#" * filled + "-" * (self.width - filled)
        line = f"[{bar}] {done}/{self.total} batches, {failed} failed prompts, {time.time() - self.start:.1f} s"
        self.stream.write(("\r" + line) if self.tty else (line + "\n"))
        if self.tty and done == self.total:
            self.stream.write("\n")
        self.stream.flush()


def as_dialog(prompt: Prompt, args: argparse.Namespace) -> Optional[Dialog]:
    """The dialog a prompt stands for (a user message with --use_chat_template, after --system), or None
    for plain text to continue."""
    if isinstance(prompt, str) and not args.use_chat_template:
        return None
    dialog = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    has_system = bool(dialog) and isinstance(dialog[0], dict) and dialog[0].get("role") == "system"
    if args.system and not has_system:
        dialog = [{"role": "system", "content": args.system}] + list(dialog)
    return dialog


def complete_batch(
    llama: Llama, prompts: Sequence[Prompt], first_index: int, config: GenerationConfig, args: argparse.Namespace
) -> List[Dict[str, Any]]:
    """One record per prompt: its generation(s), token counts and stop reason(s), or its error."""
    errors: Dict[int, str] = {}
    tokens: Dict[int, List[int]] = {}
    fixed: Dict[int, str] = {}  # Llama 2's answer to a dialog holding its chat tags, given without the model
    for i, prompt in enumerate(prompts):
        dialog = as_dialog(prompt, args)
        try:
            if dialog is None:
                tokens[i] = llama.tokenizer.encode(prompt, bos=True, eos=False)
                continue
            llama.formatter.check_dialog(dialog)
            reply = llama.formatter.fixed_reply(dialog)
            if reply is not None:
                fixed[i] = reply
            else:
                tokens[i] = llama.formatter.encode_dialog_prompt(dialog)
        except ValueError as e:
            errors[i] = str(e)
    ready = sorted(tokens)
    completions: List[Any] = [None] * len(ready)
    if ready:
        try:
            completions = llama.complete(
                [tokens[i] for i in ready], config=config, logprobs=args.logprobs, top_logprobs=args.top_logprobs
            )
        except PromptError as e:
            completions = e.results
            errors.update({ready[j]: message for j, message in e.errors.items()})
    by_prompt = dict(zip(ready, completions))
    records = []
    for i, prompt in enumerate(prompts):
        record: Dict[str, Any] = {"index": first_index + i, "prompt": prompt}
        if i in errors:
            record.update(generation=None, error=errors[i])
            records.append(record)
            continue
        if i in fixed:
            reply = Completion(prompt_len=0, generated_len=0, tokens=[], text=fixed[i], stop_reason="fixed_reply",
                               logprobs=[], top_logprobs=[])
            samples = [reply] * config.n
        else:
            samples = by_prompt[i]
        record.update(_sample_fields(llama, samples, config.n > 1, args))
        record["error"] = None
        records.append(record)
    return records


def _sample_fields(llama: Llama, samples: list, many: bool, args: argparse.Namespace) -> Dict[str, Any]:
    """The record fields of a prompt's samples: plain values for one sample, lists of them for n > 1."""
    fields: Dict[str, List[Any]] = {"generation": [], "generated_tokens": [], "stop_reason": []}
    if args.logprobs or args.top_logprobs:
        fields.update(tokens=[], logprobs=[])
    if args.top_logprobs:
        fields["top_logprobs"] = []
    for c in samples:
        fields["generation"].append(c.text)
        fields["generated_tokens"].append(c.generated_len)
        fields["stop_reason"].append(c.stop_reason)
        if "tokens" in fields:
            fields["tokens"].append([llama.tokenizer.decode([t]) for t in c.tokens])
            fields["logprobs"].append(c.logprobs)
        if "top_logprobs" in fields:
            fields["top_logprobs"].append(
                [[[llama.tokenizer.decode([t]), lp] for t, lp in position] for position in c.top_logprobs]
            )
    out: Dict[str, Any] = {k: (v if many else v[0]) for k, v in fields.items()}
    out["prompt_tokens"] = samples[0].prompt_len
    return out


def display(record: Dict[str, Any]) -> None:
    """Print one record for people: the prompt, then each generation and its stop reason, or the error."""
    stream = sys.stdout
    prompt = record["prompt"] if isinstance(record["prompt"], str) else json.dumps(record["prompt"])
    stream.write(f"[{record['index']}] {prompt}\n")
    if record["error"]:
        stream.write(f"! error: {record['error']}\n")
    else:
        generations = record["generation"] if isinstance(record["generation"], list) else [record["generation"]]
        reasons = record["stop_reason"] if isinstance(record["stop_reason"], list) else [record["stop_reason"]]
        for text, reason in zip(generations, reasons):
            stream.write(f"> {text}\n  ({reason})\n")
    stream.write("\n==================================\n\n")
    stream.flush()


def batches(items: Sequence[Prompt], size: int) -> Iterator[Sequence[Prompt]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def run_batch(args: argparse.Namespace) -> int:
    """Complete every prompt, batch by batch; failing prompts get an error record and the rest go on.
    Returns 0, or 1 when some prompts failed (after a summary on stderr)."""
    config = generation_config(args)
    if args.output_file:
        check_output_file(args.output_file)
    prompts = read_prompts(args)
    llama = build(args, max_batch_size=args.batch_size * config.n)
    rank_zero = is_rank_zero()
    max_display = args.max_display if args.max_display is not None else (4 if args.output_file else len(prompts))
    writer = RecordWriter(args.output_file) if args.output_file and rank_zero else None
    n_batches = (len(prompts) + args.batch_size - 1) // args.batch_size
    progress = Progress(n_batches) if rank_zero and not args.no_progress else None
    shown = failed = 0
    try:
        for b, batch in enumerate(batches(prompts, args.batch_size)):
            records = complete_batch(llama, batch, b * args.batch_size, config, args)
            failed += sum(r["error"] is not None for r in records)
            if rank_zero:
                for record in records:
                    if writer:
                        writer.write(record)
                    if shown < max_display:
                        display(record)
                        shown += 1
            if progress:
                progress.update(b + 1, failed)
    finally:
        if writer:
            writer.close()
    if failed:
        if rank_zero:
            print(f"error: {failed} of {len(prompts)} prompts failed (their records say why)", file=sys.stderr)
        return 1
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; return the exit status: 0, 1 when some prompts failed, 2 for a usage or input
    error, 130 after Ctrl-C. Under torchrun, rank 0 alone reports."""
    args = parse_args(argv)
    try:
        if args.command == "chat":
            from llama.chat import run_chat

            return run_chat(args)
        return run_batch(args)
    except (OSError, ValueError, TypeError) as e:
        if is_rank_zero():
            print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return report_interrupt()
