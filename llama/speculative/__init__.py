"""Speculative decoding: drafts verified several at a time by one forward pass, with the model's own output.

    from llama.speculative import PromptLookup, DraftModel, speculative_generate
    tokens, logprobs, stats = speculative_generate(generator, [prompt_ids], 64, PromptLookup(), k=4)

verify.py: the acceptance rules; drafters.py: the Drafter interface, prompt lookup, a draft model;
generate.py: the loop and its statistics. docs/speculative.md says what is supported.
"""

from llama.speculative.drafters import DraftModel, Drafter, PromptLookup
from llama.speculative.generate import SUPPORTED_CONTROLS, Speculation, SpeculativeStats, speculative_generate

__all__ = [
    "Drafter", "DraftModel", "PromptLookup", "Speculation", "SpeculativeStats", "SUPPORTED_CONTROLS",
    "speculative_generate",
]
