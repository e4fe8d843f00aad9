"""Speculative decoding: drafts verified several at a time by one forward pass, with the model's own output.

    from llama.speculative import PromptLookup, DraftModel, Speculation, speculative_generate
    tokens, logprobs, stats = speculative_generate(generator, [prompt_ids], 64, PromptLookup(), k=4)
    generator.text_completion(prompts, speculative="lookup")      # or Speculation(...), "draft:CKPT_DIR"

verify.py: the acceptance rules; drafters.py: the Drafter interface, prompt lookup, a draft model;
generate.py: one row's loop and its statistics; rows.py: that loop as a decode loop of Llama (every
control, stop strings, n, logprobs, streaming); settings.py: named settings ("lookup", "draft:PATH");
eagle.py: the EAGLE-style head; tree.py: draft trees verified in one pass; tree_sampling.py: sampling over
them; eagle_tree.py: the head drafting them.
docs/speculative.md says what is supported.
"""

from typing import Union

from llama.speculative.drafters import DraftModel, Drafter, PromptLookup
from llama.speculative.generate import Speculation, SpeculativeStats, naive_generate, speculative_generate
from llama.speculative.settings import DRAFTERS, DrafterKind, register_drafter, resolve_speculation

# What Llama's calls take as `speculative=`: None (plain decoding), a Speculation, or a name ("lookup", ...).
SpeculativeSetting = Union[None, str, Speculation]

__all__ = [
    "Drafter", "DraftModel", "DRAFTERS", "DrafterKind", "PromptLookup", "Speculation", "SpeculativeSetting",
    "SpeculativeStats", "naive_generate", "register_drafter", "resolve_speculation", "speculative_generate",
]
