"""Hugging Face transformers' LlamaForCausalLM on the same weights as a Meta-layout state dict: the
independent implementation our numbers are checked against."""

from typing import Dict

import torch

from helpers import ffn_hidden_dim

META_TO_HF = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def permute_for_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta rotates adjacent pairs (2i, 2i+1) of a head; HF rotates halves (i, i + head_dim/2). Reorder
    each head's rows so that HF's halves hold Meta's pairs: (heads, head_dim/2, 2, dim) -> swap -> flatten."""
    out_dim, dim = w.shape
    return w.view(n_heads, out_dim // n_heads // 2, 2, dim).transpose(1, 2).reshape(out_dim, dim)


def hf_state_dict(sd: Dict[str, torch.Tensor], n_heads: int, n_kv: int) -> Dict[str, torch.Tensor]:
    """Meta's tensors under transformers' names, wq and wk rows permuted (written here, apart from llama's own
    conversion, so that tests compare against an independent one)."""
    hf_sd = {"model.embed_tokens.weight": sd["tok_embeddings.weight"], "model.norm.weight": sd["norm.weight"],
             "lm_head.weight": sd["output.weight"]}
    for k, v in sd.items():
        if not k.startswith("layers."):
            continue
        _, i, rest = k.split(".", 2)
        name = rest.rsplit(".", 1)[0]
        if name == "attention.wq":
            v = permute_for_hf(v, n_heads)
        elif name == "attention.wk":
            v = permute_for_hf(v, n_kv)
        hf_sd[f"model.layers.{i}.{META_TO_HF[name]}.weight"] = v
    return hf_sd


def hf_model(params: Dict, sd: Dict[str, torch.Tensor], max_positions: int = 256):
    from transformers import LlamaConfig, LlamaForCausalLM

    n_heads = params["n_heads"]
    n_kv = params.get("n_kv_heads") or n_heads
    theta = params.get("rope_theta", 10000.0)  # as transformers' converter reads a Llama 2 file
    rope = {"rope_type": "default", "rope_theta": theta}
    if params.get("use_scaled_rope"):
        rope = {"rope_type": "llama3", "rope_theta": theta, "factor": 8.0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    config = LlamaConfig(
        vocab_size=params["vocab_size"], hidden_size=params["dim"], intermediate_size=ffn_hidden_dim(params),
        num_hidden_layers=params["n_layers"], num_attention_heads=n_heads, num_key_value_heads=n_kv,
        rms_norm_eps=params["norm_eps"], rope_parameters=rope, max_position_embeddings=max_positions,
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
    )
    config._attn_implementation = "eager"
    hf_sd = hf_state_dict(sd, n_heads, n_kv)
    model = LlamaForCausalLM(config).float().eval()
    missing, unexpected = model.load_state_dict(hf_sd, strict=False)
    assert not unexpected and not [m for m in missing if "rotary" not in m], (missing, unexpected)
    return model
