"""Complete a few text prompts with a Llama checkpoint, or with the bundled demo model when none is given.

    python example_text_completion.py        # the demo model (models/demo), on the CPU, in seconds
    python example_text_completion.py --ckpt_dir DIR --tokenizer_path DIR/tokenizer.model
    torchrun --nproc_per_node 2 example_text_completion.py --ckpt_dir DIR --tokenizer_path ...
"""

import sys
import time
from typing import List, Optional

import fire

from llama import Llama
from llama.cli.demo import DemoModelError, build_demo, demo_description
from llama.distributed import is_rank_zero
from llama.cli.interrupt import exit_on_interrupt

PROMPTS: List[str] = [
    # For these prompts, the expected answer is the natural continuation of the prompt
    "I believe the meaning of life is",
    "Simply put, the theory of relativity states that ",
    """A brief message congratulating the team on the launch:

        Hi everyone,

        I just """,
    # Few shot prompt (providing a few examples before asking model to complete more);
    """Translate English to French:

        sea otter => loutre de mer
        peppermint => menthe poivrée
        plush girafe => girafe peluche
        cheese =>""",
]

# Prompts for the demo model, which has read nothing but Jane Austen's novels.
DEMO_PROMPTS: List[str] = [
    "It is a truth universally acknowledged, that",
    "Elizabeth could not help",
    "Mr. Knightley was",
    "The morning was fine, and",
]


def main(
    ckpt_dir: Optional[str] = None,
    tokenizer_path: Optional[str] = None,
    temperature: float = 0.6,
    top_p: float = 0.9,
    max_seq_len: int = 128,
    max_gen_len: int = 64,
    max_batch_size: int = 4,
    device: Optional[str] = None,
):
    """Prompts are plain text: the model continues them (no chat format). Without --ckpt_dir the demo
    model continues prompts suited to it; Without --tokenizer_path, the tokenizer.model in ckpt_dir is used."""
    if ckpt_dir is None:
        try:
            generator = build_demo(max_seq_len=max_seq_len, max_batch_size=max_batch_size, device=device)
        except DemoModelError as e:
            sys.exit(f"error: {e}")
        prompts = DEMO_PROMPTS
        if is_rank_zero():
            print(f"{demo_description(generator)}\n")
    else:
        generator = Llama.build(
            ckpt_dir=ckpt_dir,
            tokenizer_path=tokenizer_path,
            max_seq_len=max_seq_len,
            max_batch_size=max_batch_size,
            device=device,
        )
        prompts = PROMPTS
    start = time.time()
    results = generator.text_completion(
        prompts,
        max_gen_len=max_gen_len,
        temperature=temperature,
        top_p=top_p,
    )
    elapsed = time.time() - start
    if is_rank_zero():
        for prompt, result in zip(prompts, results):
            print(prompt)
            print(f"> {result['generation']}")
            print("\n==================================\n")
        # Tokens counted by encoding the generated text again (stop tokens are not part of it).
        n_tokens = sum(len(generator.tokenizer.encode(r["generation"], bos=False, eos=False)) for r in results)
        print(f"Generated {n_tokens} tokens in {elapsed:.2f} seconds ({n_tokens / elapsed:.1f} tokens/s)")


if __name__ == "__main__":
    with exit_on_interrupt():  # Ctrl-C: a short message and status 130, not a traceback
        fire.Fire(main)
