"""Recording: run an engine over prompts and stream its records to a golden file, resumably.

`run_prompt` is the one place where an engine meets a prompt (recording and comparing both use it), so
every engine is asked exactly the same questions: the prompt's ids, a greedy continuation of up to
max_new_tokens (fewer when the context is full), and the teacher-forced logprobs of the prompt followed by
its continuation, with the top_k alternatives at every position.
"""

import datetime
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, TextIO, Union

import torch

from llama.golden.engines import Engine
from llama.golden.prompts import Prompt, prompt_key
from llama.golden.schema import (
    FORMAT, FORMAT_VERSION, Golden, Record, is_golden_header, open_text, read_lines, write_line,
)

DEFAULT_MAX_NEW_TOKENS = 32
DEFAULT_TOP_K = 20
# Header fields that must agree between a golden file and a run that appends to it.
RESUME_KEYS = ("settings", "files", "dtype", "device", "model_parallel_size", "tokenizer_md5")


def run_prompt(engine: Engine, prompt: Prompt, settings: Dict[str, Any], reference: Optional[Record] = None
               ) -> Record:
    """Ask `engine` about one prompt. An engine that does not tokenize (encode returns None) gets the ids
    of `reference` (a golden record for the same prompt).

    Raises ValueError: no ids to use, or a prompt too long for the context.
    """
    prompt_ids = engine.encode(prompt)
    if prompt_ids is None:
        if reference is None or reference.prompt_ids is None:
            raise ValueError(f"prompt {prompt.id!r}: engine {engine.name!r} does not tokenize, and no golden "
                             f"record gives this prompt's ids")
        prompt_ids = list(reference.prompt_ids)
    continuation_ids: List[int] = []
    if prompt.continuation is not None:
        continuation_ids = engine.encode_continuation(prompt.continuation)
        if continuation_ids is None:  # take the golden's: its scored ids are prompt ids + continuation ids
            if reference is None or reference.scored is None or reference.prompt_ids is None:
                raise ValueError(f"prompt {prompt.id!r}: no continuation ids to score")
            continuation_ids = reference.scored.ids[len(reference.prompt_ids):]
    max_seq_len = int(settings["max_seq_len"])
    scored_ids = prompt_ids + continuation_ids
    if len(scored_ids) > max_seq_len:
        raise ValueError(f"prompt {prompt.id!r}: {len(scored_ids)} tokens (prompt and continuation) is more "
                         f"than max_seq_len={max_seq_len}")
    max_new = min(int(settings["max_new_tokens"]), max_seq_len - len(prompt_ids))
    top_k = int(settings["top_k"])
    greedy = engine.greedy(prompt_ids, max_new, top_k) if max_new > 0 else None
    scored = engine.score(scored_ids, top_k) if len(scored_ids) >= 2 else None
    return Record(id=prompt.id, prompt=prompt.as_json(), prompt_ids=prompt_ids, greedy=greedy, scored=scored,
                  continuation=prompt.continuation)


def run_engine(engine: Engine, reference: Golden, progress: Optional[TextIO] = None) -> Golden:
    """Run `engine` on every prompt of a golden file, with the golden's settings; records in memory."""
    settings = reference.header.get("settings") or {}
    missing = [k for k in ("max_new_tokens", "top_k", "max_seq_len") if k not in settings]
    if missing:
        raise ValueError(f"the golden header's settings lack {missing}: cannot rerun its prompts")
    records = []
    started = time.time()
    for n, ref in enumerate(reference.records, start=1):
        prompt = Prompt.from_record(ref.id, ref.prompt, ref.continuation)
        records.append(run_prompt(engine, prompt, settings, reference=ref))
        _progress(progress, n, len(reference.records), ref.id, records[-1], started)
    header = dict(engine.describe(), format=FORMAT, version=FORMAT_VERSION, settings=settings)
    return Golden(header=header, records=records)


def md5_of(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_files(ckpt_dir: Union[str, Path]) -> Dict[str, Any]:
    """md5 of each model file: from checklist.chk when the directory has one (as Meta ships it), else
    computed over params.json / config.json and the weight files."""
    d = Path(ckpt_dir)
    checklist = d / "checklist.chk"
    if checklist.is_file():
        sums = {}
        for line in checklist.read_text().splitlines():
            parts = line.split()
            if len(parts) == 2:
                sums[parts[1].lstrip("*")] = parts[0]
        return {"md5": sums, "md5_source": "checklist.chk"}
    names = sorted(p.name for p in d.iterdir() if p.is_file() and (
        p.suffix in (".pth", ".safetensors") or p.name in ("params.json", "config.json", "tokenizer.model")))
    return {"md5": {name: md5_of(d / name) for name in names}, "md5_source": "computed"}


def make_header(engine: Engine, settings: Dict[str, Any], ckpt_dir: Optional[str], tokenizer_path: Optional[str]
                ) -> Dict[str, Any]:
    """What makes the numbers reproducible: the model files, params, tokenizer, dtype, device, versions."""
    import llama

    header: Dict[str, Any] = {"format": FORMAT, "version": FORMAT_VERSION}
    header.update(engine.describe())
    if ckpt_dir is not None:
        header["files"] = model_files(ckpt_dir)
        params = Path(ckpt_dir) / "params.json"
        if params.is_file():
            header["params"] = json.loads(params.read_text())
    if tokenizer_path is not None:
        header["tokenizer"] = tokenizer_path
        header["tokenizer_md5"] = md5_of(Path(tokenizer_path))
    header["stop_ids"] = sorted(engine.stop_ids())
    header["settings"] = settings
    header["torch"] = torch.__version__
    header["llama"] = _package_version()
    header["created"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return header


def record(engine: Engine, prompts: List[Prompt], out: Union[str, Path], header: Dict[str, Any],
           progress: Optional[TextIO] = sys.stderr, writer: bool = True,
           share: Callable[[Any], Any] = lambda obj: obj) -> Golden:
    """Run `engine` on `prompts` and append one record per prompt to `out` as soon as it is done.

    If `out` exists, its header must agree with `header` on the model, dtype, device and settings, and
    prompts it already holds (same id and same prompt) are skipped: an interrupted run picks up where it
    stopped. Under torchrun every rank runs the model and only the `writer` (rank 0) reads and writes the
    file; `share` sends the writer's object to every rank (torch.distributed.broadcast_object_list), so
    that all ranks skip the same prompts without needing the file. Other ranks' header only needs
    "settings".

    Raises:
        ValueError: an existing file for another model or settings, or for other prompts under these ids.
    """
    out = Path(out)
    done: Dict[str, Record] = {}
    existing_header = None
    intact = True
    problem = None
    if writer and out.exists():
        try:
            existing_header, done, intact = _read_existing(out)
            problem = _resume_problem(out, existing_header, header, done, prompts)
        except ValueError as e:
            problem = str(e)
    shared = share({"problem": problem, "done": sorted(done)} if writer else None)
    if shared["problem"]:
        raise ValueError(shared["problem"])
    done_ids = set(shared["done"])
    todo = [p for p in prompts if p.id not in done_ids]
    _check_lengths(engine, todo, int(header["settings"]["max_seq_len"]))
    if progress and writer and done:
        print(f"{out}: {len(done)} of {len(prompts)} prompts already recorded, {len(todo)} to go",
              file=progress)
    f = None
    if writer:
        if existing_header is None or not intact:  # new file, or one cut short by a crash: write it whole
            f = open_text(out, "w")
            write_line(f, existing_header or header)
            for rec in done.values():
                write_line(f, rec.to_json())
        elif todo:
            f = open_text(out, "a")
    settings = header["settings"]
    records = list(done.values())
    started = time.time()
    try:
        for n, prompt in enumerate(todo, start=1):
            rec = run_prompt(engine, prompt, settings)
            records.append(rec)
            if f is not None:
                write_line(f, rec.to_json())
            if writer:
                _progress(progress, len(done) + n, len(prompts), prompt.id, rec, started)
    finally:
        if f is not None:
            f.close()
    return Golden(header=existing_header or header, records=records, path=str(out))


def _check_lengths(engine: Engine, prompts: List[Prompt], max_seq_len: int) -> None:
    """Encode every prompt before running any: ValueError naming those that do not fit the context."""
    problems = []
    for p in prompts:
        ids = engine.encode(p)
        if ids is None:
            continue
        extra = engine.encode_continuation(p.continuation) if p.continuation is not None else []
        n = len(ids) + len(extra or [])
        if not ids or n > max_seq_len:
            problems.append(f"{p.id!r} ({n} tokens)")
    if problems:
        raise ValueError(f"prompts empty or longer than max_seq_len={max_seq_len} with their continuation: "
                         f"{', '.join(problems[:10])}; raise --max_seq_len or shorten them")


def _resume_problem(out: Path, existing: Dict[str, Any], header: Dict[str, Any], done: Dict[str, Record],
                    prompts: List[Prompt]) -> Optional[str]:
    """Why the records in `out` cannot be continued with this run, or None."""
    mismatched = [k for k in RESUME_KEYS if existing.get(k) != header.get(k)]
    if mismatched:
        return (f"{str(out)!r} was recorded with other {mismatched} ("
                + "; ".join(f"{k}: {existing.get(k)!r} there, {header.get(k)!r} now" for k in mismatched)
                + "): write to a new file, or delete it to start again")
    by_id = {p.id: p for p in prompts}
    for rid, rec in done.items():
        if rid in by_id and prompt_key(by_id[rid]) != prompt_key(Prompt.from_record(rid, rec.prompt,
                                                                                      rec.continuation)):
            return (f"{str(out)!r} holds a record {rid!r} for another prompt than the prompts file's "
                    f"{rid!r}: give the prompts new ids or write to a new file")
    return None


def _read_existing(out: Path):
    """(header, records by id, intact) of an existing golden file; intact is False when its tail was cut."""
    lines = list(read_lines(out))
    if not lines or not is_golden_header(lines[0][1]):
        raise ValueError(f"{str(out)!r} exists and is not a golden file: choose another --out")
    done = {}
    for n, obj in lines[1:]:
        rec = Record.from_json(obj, f"{out}:{n}")
        done[rec.id] = rec
    # A file that reads back as fewer lines than it holds was cut short: rewrite rather than append.
    with open_text(out, "r") as f:
        try:
            intact = sum(1 for _ in f) == lines[-1][0]
        except (EOFError, OSError):
            intact = False
    return lines[0][1], done, intact


def _progress(stream: Optional[TextIO], n: int, total: int, prompt_id: str, rec: Record, started: float) -> None:
    if stream is None:
        return
    generated = len(rec.greedy.ids) if rec.greedy else 0
    scored = len(rec.scored.ids) if rec.scored else 0
    elapsed = time.time() - started
    print(f"[{n}/{total}] {prompt_id}: {len(rec.prompt_ids or [])} prompt tokens, {generated} generated, "
          f"{scored} scored ({elapsed:.1f} s)", file=stream, flush=True)


def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("llama")
    except Exception:  # not installed as a distribution (run from a checkout): read pyproject.toml
        pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
        if pyproject.is_file():
            for line in pyproject.read_text().splitlines():
                if line.startswith("version"):
                    return line.split("=", 1)[1].strip().strip('"')
        return "unknown"

