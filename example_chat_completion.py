"""Answer a few dialogs with a Llama 3 instruct checkpoint, or with the bundled demo model when none is given.

    python example_chat_completion.py        # the demo model (models/demo), on the CPU, in seconds
    python example_chat_completion.py --ckpt_dir DIR --tokenizer_path DIR/tokenizer.model
    torchrun --nproc_per_node 2 example_chat_completion.py --ckpt_dir DIR --tokenizer_path ...
"""

import sys
import time
from typing import List, Optional

import fire

from llama import Dialog, Llama
from llama.cli.demo import DEMO_MAX_SEQ_LEN, DemoModelError, build_demo, demo_description
from llama.distributed import is_rank_zero
from llama.cli.interrupt import exit_on_interrupt

DIALOGS: List[Dialog] = [
    [{"role": "user", "content": "what is the recipe of mayonnaise?"}],
    [
        {"role": "user", "content": "I am going to Paris, what should I see?"},
        {
            "role": "assistant",
            "content": """\
Paris, the capital of France, is known for its stunning architecture, art museums, historical landmarks, and romantic atmosphere. Here are some of the top attractions to see in Paris:

1. The Eiffel Tower: The iconic Eiffel Tower is one of the most recognizable landmarks in the world and offers breathtaking views of the city.
2. The Louvre Museum: The Louvre is one of the world's largest and most famous museums, housing an impressive collection of art and artifacts, including the Mona Lisa.
3. Notre-Dame Cathedral: This beautiful cathedral is one of the most famous landmarks in Paris and is known for its Gothic architecture and stunning stained glass windows.

These are just a few of the many attractions that Paris has to offer. With so much to see and do, it's no wonder that Paris is one of the most popular tourist destinations in the world.""",
        },
        {"role": "user", "content": "What is so great about #1?"},
    ],
    [
        {"role": "system", "content": "Always answer with Haiku"},
        {"role": "user", "content": "I am going to Paris, what should I see?"},
    ],
    [
        {"role": "system", "content": "Always answer with emojis"},
        {"role": "user", "content": "How to go from Beijing to NY?"},
    ],
]

# The demo model is not instruction-tuned: besides the novels' text it was trained on their conversations
# (consecutive speeches of two characters) written in the Llama 3 chat format. It answers the way one of
# Jane Austen's characters answers another, and follows no instructions; it never saw a system message.
DEMO_DIALOGS: List[Dialog] = [
    [{"role": "user", "content": "Do you dance, Mr. Darcy?"}],
    [{"role": "user", "content": "What do you think of Bath?"}],
    [
        {"role": "user", "content": "Have you heard the news? Mr. Bingley is to be married."},
        {"role": "assistant", "content": "Married! To whom?"},
        {"role": "user", "content": "To Miss Bennet, to be sure."},
    ],
    [{"role": "user", "content": "My dear Emma, you must not be so severe upon poor Mr. Elton."}],
]


def main(
    ckpt_dir: Optional[str] = None,
    tokenizer_path: Optional[str] = None,
    temperature: float = 0.6,
    top_p: float = 0.9,
    max_seq_len: Optional[int] = None,
    max_batch_size: int = 4,
    max_gen_len: Optional[int] = None,
    device: Optional[str] = None,
):
    """Dialogs are lists of {"role", "content"} messages; the model answers as the assistant. Without
    --ckpt_dir the demo model answers dialogs suited to it. max_seq_len defaults to 512 (256, the context
    it was trained on, for the demo model); Without --tokenizer_path, the tokenizer.model in ckpt_dir is used."""
    if ckpt_dir is None:
        try:
            generator = build_demo(
                max_seq_len=max_seq_len or DEMO_MAX_SEQ_LEN, max_batch_size=max_batch_size, device=device
            )
        except DemoModelError as e:
            sys.exit(f"error: {e}")
        dialogs = DEMO_DIALOGS
        if is_rank_zero():
            print(f"{demo_description(generator)}\nIt is not instruction-tuned: it answers as a character in "
                  "the novels would, and ignores instructions.\n")
    else:
        generator = Llama.build(
            ckpt_dir=ckpt_dir,
            tokenizer_path=tokenizer_path,
            max_seq_len=max_seq_len or 512,
            max_batch_size=max_batch_size,
            device=device,
        )
        dialogs = DIALOGS

    start = time.time()
    results = generator.chat_completion(
        dialogs,
        max_gen_len=max_gen_len,
        temperature=temperature,
        top_p=top_p,
    )
    elapsed = time.time() - start
    if is_rank_zero():
        for dialog, result in zip(dialogs, results):
            for msg in dialog:
                print(f"{msg['role'].capitalize()}: {msg['content']}\n")
            print(f"> {result['generation']['role'].capitalize()}: {result['generation']['content']}")
            print("\n==================================\n")
        # Tokens counted by encoding the generated text again (the closing <|eot_id|> is not part of it).
        n_tokens = sum(
            len(generator.tokenizer.encode(r["generation"]["content"], bos=False, eos=False)) for r in results
        )
        print(f"Generated {n_tokens} tokens in {elapsed:.2f} seconds ({n_tokens / elapsed:.1f} tokens/s)")


if __name__ == "__main__":
    with exit_on_interrupt():  # Ctrl-C: a short message and status 130, not a traceback
        fire.Fire(main)
