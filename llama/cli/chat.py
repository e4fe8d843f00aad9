"""Interactive chat for the command line (`python -m llama chat`): answers stream as they are generated,
the history is trimmed from its oldest exchanges to fit max_seq_len, /reset forgets it, /exit (or Ctrl-D)
quits, and Ctrl-C stops the answer being written, not the session.

Under torchrun rank 0 reads the terminal and sends each line to the other ranks, which must generate with
it; there Ctrl-C ends every process (torchrun stops the group), so use /exit.
"""

import argparse
import sys
from typing import Callable, List, Optional, Sequence, Tuple

import torch.distributed as dist

from llama.cli.options import build, check_speculative, generation_config, speculation
from llama.config import GenerationConfig
from llama.distributed import is_rank_zero
from llama.generation import Llama
from llama.speculative import Speculation
from llama.tokenizer import Message

HELP = "Type a message. /reset forgets the conversation, /exit quits; Ctrl-C stops an answer."
USER_PROMPT = "user> "
ASSISTANT_PROMPT = "assistant> "


def fit_history(
    messages: Sequence[Message], count_tokens: Callable[[Sequence[Message]], int], budget: int
) -> Tuple[Optional[List[Message]], int]:
    """Drop the oldest user/assistant exchanges (never a leading system message, never the last user
    message) until the prompt is at most `budget` tokens.

    Returns (the messages kept, how many exchanges were dropped); the messages are None when even the
    system message and the last user message alone do not fit.
    """
    system = list(messages[:1]) if messages and messages[0]["role"] == "system" else []
    turns = list(messages[len(system) :])
    dropped = 0
    while count_tokens(system + turns) > budget:
        if len(turns) <= 1:
            return None, dropped
        turns = turns[2:]  # one user message and the assistant's answer
        dropped += 1
    return system + turns, dropped


def read_line(prompt: str) -> Optional[str]:
    """A line from the terminal on rank 0, shared with every rank; None at end of input. Ctrl-C while
    typing gives an empty line."""
    line: Optional[str] = None
    if is_rank_zero():
        try:
            line = input(prompt)
        except EOFError:
            print()
            line = None
        except KeyboardInterrupt:
            print()
            line = ""
    if dist.is_initialized() and dist.get_world_size() > 1:
        shared = [line]
        dist.broadcast_object_list(shared, src=0)
        line = shared[0]
    return line


def answer(llama: Llama, dialog: Sequence[Message], config: GenerationConfig,
           speculative: Optional[Speculation] = None) -> str:
    """Stream the assistant's answer to stdout (rank 0) and return it; Ctrl-C cuts it short. With
    `speculative`, its statistics follow the answer on stderr."""
    fixed = llama.formatter.fixed_reply(dialog)  # Llama 2's answer to a message holding its chat tags
    if fixed is not None:
        if is_rank_zero():
            print(ASSISTANT_PROMPT + fixed, flush=True)
        return fixed
    tokens = llama.formatter.encode_dialog_prompt(dialog)
    stream = llama.generate_stream([tokens], config=config, speculative=speculative)
    pieces: List[str] = []
    say = is_rank_zero()
    if say:
        print(ASSISTANT_PROMPT, end="", flush=True)
    try:
        for event in stream:
            pieces.append(event.text)
            if say:
                print(event.text, end="", flush=True)
    except KeyboardInterrupt:
        if say:
            print(" [stopped]", end="")
    finally:
        stream.close()
    if say:
        print(flush=True)
        if speculative is not None and speculative.stats is not None:
            print(f"(speculative: {speculative.stats.summary()})", file=sys.stderr, flush=True)
    return "".join(pieces)


def run_chat(args: argparse.Namespace) -> int:
    """The chat loop. Returns the exit status."""
    config = generation_config(args)
    if config.n != 1:
        raise ValueError(f"chat answers with one sample; got --n {config.n}")
    check_speculative(args)
    llama = build(args, max_batch_size=1)
    speculative = speculation(args, llama)
    max_seq_len = llama.model.params.max_seq_len
    # Room kept for the answer when the history is trimmed.
    reserve = args.max_gen_len if args.max_gen_len else max(1, max_seq_len // 4)
    budget = max_seq_len - reserve
    if budget < 1:
        raise ValueError(f"--max_gen_len {reserve} leaves no room for a prompt within --max_seq_len {max_seq_len}")
    start: List[Message] = [{"role": "system", "content": args.system}] if args.system else []
    history = list(start)
    count_tokens = lambda messages: len(llama.formatter.encode_dialog_prompt(messages))  # noqa: E731
    if is_rank_zero():
        print(HELP, flush=True)
    while True:
        line = read_line(USER_PROMPT)
        if line is None or line.strip() == "/exit":
            return 0
        if line.strip() == "/reset":
            history = list(start)
            if is_rank_zero():
                print("(conversation forgotten)", flush=True)
            continue
        if not line.strip():
            continue
        dialog, dropped = fit_history(history + [{"role": "user", "content": line}], count_tokens, budget)
        if dialog is None:
            if is_rank_zero():
                print(f"(that message is too long: the prompt must stay within {budget} tokens; "
                      f"max_seq_len={max_seq_len}, {reserve} kept for the answer)", file=sys.stderr, flush=True)
            continue
        if dropped and is_rank_zero():
            print(f"(dropped the {dropped} oldest exchange(s) to stay within max_seq_len={max_seq_len})",
                  file=sys.stderr, flush=True)
        reply = answer(llama, dialog, config, speculative)
        history = dialog + [{"role": "assistant", "content": reply}]
