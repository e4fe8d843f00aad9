"""Llama 2's `rope.freqs` tensor: Meta's own record of the RoPE frequencies a checkpoint was trained with.

Meta's Llama 2 shards hold it beside the weights (it is not a parameter: Meta's code recomputes the
frequencies from base 10000). Its params.json does not state the base, so this tensor is the only place the
files say it: we check it against the frequencies our model will use, and refuse a checkpoint whose
params (or whose missing `rope_theta`) would rotate with another base.
"""

import torch

from llama.model import ModelArgs, apply_scaling, rope_frequencies


def model_frequencies(args: ModelArgs) -> torch.Tensor:
    """(head_dim // 2,) float32: the per-pair frequencies the model built from `args` rotates with."""
    freqs = rope_frequencies(args.head_dim, args.rope_theta)
    if args.use_scaled_rope:
        freqs = apply_scaling(
            freqs, args.rope_scaling_factor, args.rope_low_freq_factor, args.rope_high_freq_factor,
            args.rope_original_context,
        )
    return freqs


def _show(values: torch.Tensor) -> str:
    return "[" + ", ".join(f"{v:.6g}" for v in values.tolist()) + "]"


def check_rope_freqs(stored: torch.Tensor, args: ModelArgs, source: str) -> None:
    """Raise ValueError, naming both, when the checkpoint's `rope.freqs` differs from the model's frequencies.

    The tensor is compared within its own dtype's rounding (Meta's weights are bf16): bases that differ at
    all differ by far more (pair 1 of a 128-wide head: 0.866 at base 10000, 0.814 at 500000).
    """
    ours = model_frequencies(args)
    if tuple(stored.shape) != tuple(ours.shape):
        raise ValueError(
            f"{source}: tensor 'rope.freqs' has shape {tuple(stored.shape)}, but the model's heads "
            f"(head_dim {args.head_dim}) rotate {ours.numel()} pairs"
        )
    if not stored.is_floating_point():
        raise ValueError(f"{source}: tensor 'rope.freqs' holds {stored.dtype}, not floating-point frequencies")
    # Two units in the last place of the stored dtype: the rounding of Meta's float32 values to it.
    tolerance = 2 * max(torch.finfo(stored.dtype).eps, torch.finfo(torch.float32).eps)
    stored = stored.float()
    differs = ~torch.isclose(stored, ours, rtol=tolerance, atol=0)
    if differs.any():
        first = int(differs.nonzero()[0])
        shown = slice(first, first + 4)
        raise ValueError(
            f"{source}: tensor 'rope.freqs' (the RoPE frequencies the checkpoint was trained with) differs "
            f"from the frequencies params.json gives (rope_theta={args.rope_theta:g}"
            f"{', scaled by %g' % args.rope_scaling_factor if args.use_scaled_rope else ''}) from pair "
            f"{first}: checkpoint {_show(stored[shown])} vs params.json {_show(ours[shown])}. Llama 2 files "
            "have no rope_theta and mean 10000; set rope_theta in params.json to the checkpoint's base"
        )
