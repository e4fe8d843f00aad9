"""`python -m llama` (the batch command): complete prompts in batches, into JSON Lines or JSON, with a progress
bar. Under torchrun every rank computes and rank 0 alone reads, prints and writes."""

import argparse
import json
import os
import sys
import time
from typing import Any, Dict, Iterator, List, Optional, Sequence, TextIO

from llama.cli.options import build, check_speculative, generation_config, speculation
from llama.cli.prompts import Prompt, read_prompts
from llama.completion import Completion
from llama.config import GenerationConfig
from llama.distributed import is_rank_zero
from llama.generation import Llama, PromptError
from llama.speculative import Speculation
from llama.tokenizer import Dialog


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
    llama: Llama, prompts: Sequence[Prompt], first_index: int, config: GenerationConfig, args: argparse.Namespace,
    speculative: Optional[Speculation] = None,
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
                [tokens[i] for i in ready], config=config, logprobs=args.logprobs, top_logprobs=args.top_logprobs,
                speculative=speculative,
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
    if samples[0].speculative is not None:  # --speculative: each sample's drafts and acceptance
        fields["speculative"] = [c.speculative.as_dict() for c in samples]
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
    check_speculative(args)
    prompts = read_prompts(args)
    llama = build(args, max_batch_size=args.batch_size * config.n)
    speculative = speculation(args, llama)
    rank_zero = is_rank_zero()
    max_display = args.max_display if args.max_display is not None else (4 if args.output_file else len(prompts))
    writer = RecordWriter(args.output_file) if args.output_file and rank_zero else None
    n_batches = (len(prompts) + args.batch_size - 1) // args.batch_size
    progress = Progress(n_batches) if rank_zero and not args.no_progress else None
    shown = failed = 0
    try:
        for b, batch in enumerate(batches(prompts, args.batch_size)):
            records = complete_batch(llama, batch, b * args.batch_size, config, args, speculative)
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
