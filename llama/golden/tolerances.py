"""How far two engines may differ before compare calls it a failure, by dtype.

- logprob: the largest |Δ logprob| allowed at any position both engines scored with the same context and
  the same token (natural log; a Δ of 0.1 is a 10% change of that token's probability).
- mean_logprob: the largest mean |Δ logprob| over a prompt's positions: a bias that never spikes.
- tie: greedy decoding may part where the reference's top-1 logprob minus its logprob of the other
  engine's choice is below this (a near-tie: rounding decides it); above it, parting is a disagreement.

The defaults come from what correct engines showed on the demo model's bundled prompts (docs/golden.md):
float32, this package against transformers: max |Δ| 4.8e-5, mean at most 1.1e-5; bfloat16, this package
against transformers in bf16, or against its own float32 run: max |Δ| 0.15, mean at most 0.016, and greedy
runs parting on gaps of 0.0007 to 0.06. float32 leaves a margin of 10 to 20, bfloat16 of 3 (bf16 noise
grows with the model); float16 carries 3 more mantissa bits than bfloat16, so a tenth or less of its noise
is expected; quantized weights (q8, q4) move logprobs by up to about a nat, and their defaults are only a
starting point: set your own with the compare flags.
"""

from dataclasses import dataclass, replace
from typing import Dict, Optional

QUANTIZED = "quantized"


@dataclass(frozen=True)
class Tolerances:
    logprob: float
    mean_logprob: float
    tie: float

    def updated(self, **changes: Optional[float]) -> "Tolerances":
        """A copy with the given (not None) values replaced; ValueError for a negative one."""
        given = {k: v for k, v in changes.items() if v is not None}
        for k, v in given.items():
            if v < 0:
                raise ValueError(f"tolerance {k} must be >= 0, got {v}")
        return replace(self, **given)


DEFAULTS: Dict[str, Tolerances] = {
    "float32": Tolerances(logprob=1e-3, mean_logprob=1e-4, tie=1e-3),
    "float16": Tolerances(logprob=0.2, mean_logprob=0.02, tie=0.1),
    "bfloat16": Tolerances(logprob=0.5, mean_logprob=0.05, tie=0.25),
    QUANTIZED: Tolerances(logprob=2.0, mean_logprob=0.25, tie=0.75),
}
ORDER = ["float32", "float16", "bfloat16", QUANTIZED]  # tight to loose


def for_dtypes(*dtypes: Optional[str]) -> Tolerances:
    """The defaults for the loosest of the given dtypes ("float32", "bfloat16", "float16", or anything
    else, e.g. "q4_0", counted as quantized); float32 when none is known."""
    rank = 0
    for d in dtypes:
        if d is None:
            continue
        d = d.replace("torch.", "")
        rank = max(rank, ORDER.index(d) if d in ORDER else ORDER.index(QUANTIZED))
    return DEFAULTS[ORDER[rank]]


def named(name: str) -> Tolerances:
    """The defaults of one dtype by name; ValueError naming the known ones."""
    if name not in DEFAULTS:
        raise ValueError(f"unknown tolerance preset {name!r}; known: {ORDER}")
    return DEFAULTS[name]
