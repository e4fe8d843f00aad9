"""What a Meta params.json leaves unsaid, family by family.

Meta's files do not name their family, and each family's code filled the gaps its own way:
- Llama 2's params.json has no `rope_theta` (Meta's Llama 2 code has no such field and always rotates with
  base 10000); every Llama 3 file carries `rope_theta: 500000.0`, CodeLlama's carry 1000000. So a missing
  `rope_theta` means 10000.
- Llama 3.2 1B and 3B (`use_scaled_rope` with dim 2048 / 3072) do not say their RoPE scaling factor. Meta's
  code applies 8 to every 3.1+ model; Meta has since said 32 is right for 3.2 (llama-models issues 166 and
  241), and Hugging Face's 3.2 configs say 32. We take 32. An explicit `rope_scaling_factor` key in
  params.json wins over this.
- The context Hugging Face's configs state (`max_position_embeddings`) is not in params.json at all: 4096 for
  Llama 2, 16384 for CodeLlama, 8192 for Llama 3, 131072 for Llama 3.1 and later.
"""

from typing import Any, Dict

LLAMA2_ROPE_THETA = 10000.0
LLAMA3_ROPE_THETA = 500000.0
# The `dim` of Llama 3.2 1B and 3B, the only scaled-RoPE models whose factor is not Meta's code's 8.
LLAMA32_DIMS = (2048, 3072)
LLAMA32_ROPE_SCALING_FACTOR = 32.0


def implied_params(params: Dict[str, Any]) -> Dict[str, Any]:
    """The values `params` (a params.json dict) implies for the keys it leaves out; keys it has win."""
    implied: Dict[str, Any] = {}
    if "rope_theta" not in params:
        implied["rope_theta"] = LLAMA2_ROPE_THETA
    if params.get("use_scaled_rope") and params.get("dim") in LLAMA32_DIMS and "rope_scaling_factor" not in params:
        implied["rope_scaling_factor"] = LLAMA32_ROPE_SCALING_FACTOR
    return implied


def hf_context_length(rope_theta: float, use_scaled_rope: bool) -> int:
    """The `max_position_embeddings` Hugging Face's conversion states for a family: 131072 (Llama 3.1+,
    scaled RoPE), 8192 (Llama 3, base 500000), 4096 (Llama 2, base 10000), 16384 (any other base: CodeLlama's
    1000000; transformers' converter gives 16384 to every pre-Llama-3 base above 10000)."""
    if use_scaled_rope:
        return 131072
    if rope_theta == LLAMA3_ROPE_THETA:
        return 8192
    if rope_theta == LLAMA2_ROPE_THETA:
        return 4096
    return 16384
