"""Our Transformer against Hugging Face transformers' LlamaForCausalLM on the same random weights:
float32 logits agree to 1e-5 relative, for a full sequence and token by token through the KV cache."""

import pytest
import torch

from llama.model import ModelArgs, apply_scaling, precompute_rope

from helpers import SMALL_GQA, SMALL_MHA, SMALL_SCALED
from hf_reference import hf_model

CONFIGS = {"llama3-gqa": SMALL_GQA, "llama3.1-scaled-rope": SMALL_SCALED, "mha": SMALL_MHA}
SEQLEN = 24


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours - reference).abs().max() / reference.abs().max()).item()


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tiny_checkpoint, tiny_llama):
    params = dict(CONFIGS[request.param], vocab_size=512)
    sd = tiny_checkpoint(params, seed=3).state_dict
    ours = tiny_llama(params, seed=3, max_seq_len=64, max_batch_size=2, device="cpu")
    tokens = torch.randint(0, 512, (2, SEQLEN), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        reference = hf_model(params, sd)(tokens).logits.float()
    return ours.model, tokens, reference


def test_full_sequence_logits_match_transformers(pair):
    model, tokens, reference = pair
    logits = model.forward(tokens, 0)
    assert logits.dtype == torch.float32 and logits.shape == (2, SEQLEN, 512)
    assert relative_error(logits, reference) <= 1e-5


def test_token_by_token_through_the_kv_cache_matches_transformers(pair):
    model, tokens, reference = pair
    steps = [model.forward(tokens[:, i : i + 1], i) for i in range(SEQLEN)]
    assert relative_error(torch.cat(steps, dim=1), reference) <= 1e-5


def test_prefill_then_decode_matches_transformers(pair):
    model, tokens, reference = pair
    first = model.forward(tokens[:, :10], 0)
    rest = [model.forward(tokens[:, i : i + 1], i) for i in range(10, SEQLEN)]
    assert relative_error(torch.cat([first] + rest, dim=1), reference) <= 1e-5


def test_ffn_hidden_sizes_of_the_published_models():
    # (dim, multiple_of, ffn_dim_multiplier) -> hidden size, from reference-facts.md
    assert ModelArgs(dim=4096, multiple_of=1024, ffn_dim_multiplier=1.3).ffn_hidden_dim == 14336
    assert ModelArgs(dim=8192, multiple_of=4096, ffn_dim_multiplier=1.3).ffn_hidden_dim == 28672
    assert ModelArgs(dim=4096, multiple_of=256).ffn_hidden_dim == 11008
    assert ModelArgs(dim=5120, multiple_of=256).ffn_hidden_dim == 13824
    assert ModelArgs(dim=2048, multiple_of=256, ffn_dim_multiplier=1.5).ffn_hidden_dim == 8192
    assert ModelArgs(dim=3072, multiple_of=256, ffn_dim_multiplier=1.0).ffn_hidden_dim == 8192


def test_rope_scaling_follows_the_three_wavelength_bands():
    import math

    freqs = torch.tensor([2 * math.pi / 100, 2 * math.pi / 4096, 2 * math.pi / 20000])
    scaled = apply_scaling(freqs)
    assert scaled[0] == freqs[0]  # short wavelength (< 8192/4): unchanged
    assert torch.isclose(scaled[2], freqs[2] / 8)  # long wavelength (> 8192): slowed 8x
    smooth = (8192 / 4096 - 1) / 3
    assert torch.isclose(scaled[1], (1 - smooth) * freqs[1] / 8 + smooth * freqs[1])


def test_rope_tables_equal_metas_complex_formulation():
    # Meta's precompute_freqs_cis: polar(1, outer(t, freqs)); our real tables must hold the same values.
    cos, sin = precompute_rope(16, 32, 500000.0)
    freqs = 1.0 / (500000.0 ** (torch.arange(0, 16, 2).float() / 16))
    cis = torch.polar(torch.ones(32, 8), torch.outer(torch.arange(32).float(), freqs))
    assert torch.equal(cos, cis.real) and torch.equal(sin, cis.imag)
