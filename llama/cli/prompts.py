"""Reading prompts for the command line: --prompt values and prompts files (text lines, JSON Lines, a JSON
array), each prompt a text or a dialog; a bad line is named by file and line number."""

import argparse
import codecs
import json
import os
from typing import Any, List, Union

from llama.tokenizer import Dialog

Prompt = Union[str, Dialog]


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
