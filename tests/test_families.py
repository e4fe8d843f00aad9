"""Every Llama family, read from its files as Meta ships them, gives the logits of transformers'
LlamaForCausalLM configured as transformers' own converter (convert_llama_weights_to_hf) configures that
family; `python -m llama.convert` states the same RoPE base, scaling and context in config.json.

One row per params.json of ../shared/reference-facts.md. Each row's params.json has exactly Meta's keys and
every non-shape value (norm_eps, rope_theta or its absence, use_scaled_rope, multiple_of,
ffn_dim_multiplier, vocab_size -1); only dim / n_layers / n_heads / n_kv_heads / vocab_size are shrunk.
head_dim stays 128 (64 for 3.2 1B, as Meta's): with base 500000 the wavelengths of its pairs then fall on
all three sides of Llama 3.1's scaling thresholds (2048 and 8192 positions), so every branch of the
scaling is used (checked below). The 3.2 rows keep dim 2048 / 3072, which is how their files are told apart.
Weights are bf16 in Meta's layout: Llama 2's embedding cut by columns and `rope.freqs` in every shard,
Meta's shard counts where small (13B: 2; 70B / 405B: 2 for their KV heads), 3.2's output equal to its
embedding.
"""

import contextlib
import json
from typing import Any, Dict

import pytest
import torch

from helpers import meta_rope_freqs, random_state_dict, train_sentencepiece, write_byte_tokenizer, write_checkpoint
from hf_reference import hf_state_dict
from llama import Llama
from llama.checkpoints.meta import open_checkpoint
from llama.checkpoints.convert import main as convert_main
from llama.model import ModelArgs, apply_scaling, rope_frequencies

# Meta's params.json, value for value (reference-facts.md; CodeLlama 7B as Meta ships it).
L3_8B = {"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256, "multiple_of": 1024,
         "ffn_dim_multiplier": 1.3, "norm_eps": 1e-05, "rope_theta": 500000.0}
L3_70B = dict(L3_8B, dim=8192, n_layers=80, n_heads=64, multiple_of=4096)
META_PARAMS: Dict[str, Dict[str, Any]] = {
    "llama2-7b": {"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-05, "vocab_size": -1},
    "llama2-13b": {"dim": 5120, "multiple_of": 256, "n_heads": 40, "n_layers": 40, "norm_eps": 1e-05, "vocab_size": -1},
    "llama2-70b": {"dim": 8192, "multiple_of": 4096, "ffn_dim_multiplier": 1.3, "n_heads": 64, "n_kv_heads": 8,
                   "n_layers": 80, "norm_eps": 1e-05, "vocab_size": -1},
    "codellama-7b": {"dim": 4096, "n_layers": 32, "n_heads": 32, "multiple_of": 256, "ffn_dim_multiplier": 1.0,
                     "norm_eps": 1e-05, "rope_theta": 1000000, "vocab_size": 32016},
    "llama3-8b": L3_8B,
    "llama3-70b": L3_70B,
    "llama3.1-8b": dict(L3_8B, use_scaled_rope=True),
    "llama3.1-405b": dict(L3_8B, dim=16384, n_layers=126, n_heads=128, multiple_of=4096, ffn_dim_multiplier=1.2,
                          use_scaled_rope=True),
    "llama3.2-1b": dict(L3_8B, dim=2048, n_layers=16, n_heads=32, multiple_of=256, ffn_dim_multiplier=1.5,
                        use_scaled_rope=True),
    "llama3.2-3b": dict(L3_8B, dim=3072, n_layers=28, n_heads=24, multiple_of=256, ffn_dim_multiplier=1.0,
                        use_scaled_rope=True),
    "llama3.3-70b": dict(L3_70B, use_scaled_rope=True),
}
SHAPE_KEYS = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size"}
SP_VOCAB, BYTE_VOCAB = 320, 512  # the test tokenizers: a trained SentencePiece model, tiktoken's 256 bytes

# name: (shrunk shapes, shard files, transformers' --llama_version for that family)
ROWS = {
    "llama2-7b": (dict(dim=256, n_heads=2, n_layers=2), 1, "2"),
    "llama2-13b": (dict(dim=256, n_heads=2, n_layers=2), 2, "2"),
    "llama2-70b": (dict(dim=1024, n_heads=8, n_kv_heads=2, n_layers=1), 2, "2"),
    "codellama-7b": (dict(dim=256, n_heads=2, n_layers=2, vocab_size=SP_VOCAB), 1, "2"),
    "llama3-8b": (dict(dim=512, n_heads=4, n_kv_heads=1, n_layers=2, vocab_size=BYTE_VOCAB), 1, "3"),
    "llama3-70b": (dict(dim=1024, n_heads=8, n_kv_heads=2, n_layers=1, vocab_size=BYTE_VOCAB), 2, "3"),
    "llama3.1-8b": (dict(dim=512, n_heads=4, n_kv_heads=1, n_layers=2, vocab_size=BYTE_VOCAB), 1, "3.1"),
    "llama3.1-405b": (dict(dim=1024, n_heads=8, n_kv_heads=1, n_layers=1, vocab_size=BYTE_VOCAB), 2, "3.1"),
    "llama3.2-1b": (dict(n_layers=1, vocab_size=BYTE_VOCAB), 1, "3.2"),
    "llama3.2-3b": (dict(n_layers=1, vocab_size=BYTE_VOCAB), 1, "3.2"),
    "llama3.3-70b": (dict(dim=1024, n_heads=8, n_kv_heads=2, n_layers=1, vocab_size=BYTE_VOCAB), 2, "3.1"),
}
MAX_SEQ_LEN = 8192  # RoPE tables then reach position 16383, past Llama 3.1's original context of 8192
FAR_POSITIONS = [0, 1, 100, 2047, 4096, 8191, 8192, 12000, 16383]


def row_params(name: str) -> Dict[str, Any]:
    return dict(META_PARAMS[name], **ROWS[name][0])


def converter_config(params: Dict[str, Any], version: str) -> Dict[str, Any]:
    """RoPE base, scaling, context and tying as transformers' convert_llama_weights_to_hf sets them for a
    family (its --llama_version), from Meta's params.json: facts about that script, written out here."""
    base = params.get("rope_theta", 10000.0)
    llama3 = version.startswith("3")
    context = {"2": 4096, "3": 8192, "3.1": 131072, "3.2": 131072}[version]
    scaling = None
    if version in ("3.1", "3.2"):
        scaling = {"rope_type": "llama3", "factor": 32.0 if version == "3.2" else 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    return {"rope_theta": base, "rope_scaling": scaling, "tie_word_embeddings": version == "3.2",
            "max_position_embeddings": 16384 if base > 10000.0 and not llama3 else context}


def hf_twin(params: Dict[str, Any], sd: Dict[str, torch.Tensor], version: str, vocab: int):
    """transformers' LlamaForCausalLM on `sd` (Meta names), configured as its converter configures `version`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    n_heads, n_kv = params["n_heads"], params.get("n_kv_heads") or params["n_heads"]
    multiplier, multiple_of = params.get("ffn_dim_multiplier", 1), params["multiple_of"]
    hidden = multiple_of * ((int(multiplier * int(8 * params["dim"] / 3)) + multiple_of - 1) // multiple_of)
    config = LlamaConfig(
        hidden_size=params["dim"], intermediate_size=hidden, num_attention_heads=n_heads,
        num_hidden_layers=params["n_layers"], rms_norm_eps=params["norm_eps"], num_key_value_heads=n_kv,
        vocab_size=vocab, **converter_config(params, version),
    )
    hf_sd = hf_state_dict(sd, n_heads, n_kv)
    with _no_init():  # every weight is replaced below: skip transformers' random init (seconds at dim 3072)
        model = LlamaForCausalLM(config).eval()
    model.load_state_dict({k: v.float() for k, v in hf_sd.items()}, strict=True)
    return model


def _no_init():
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers: initialise (slower, same result)
        return contextlib.nullcontext()
    return no_init_weights()


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    d = tmp_path_factory.mktemp("tokenizers")
    return {"sentencepiece": str(train_sentencepiece(d / "sp.model", SP_VOCAB)),
            "tiktoken": str(write_byte_tokenizer(d / "bytes.model"))}


@pytest.fixture(scope="module", params=list(ROWS))
def family(request, tmp_path_factory, tokenizers):
    """A row's checkpoint in Meta's layout, built with Llama.build, and its transformers twin."""
    name = request.param
    params, shards, version = row_params(name), ROWS[name][1], ROWS[name][2]
    llama2 = version == "2"
    vocab = SP_VOCAB if llama2 else BYTE_VOCAB
    sd = random_state_dict(dict(params, vocab_size=vocab), seed=11, dtype=torch.bfloat16)  # Meta's weights: bf16
    if version == "3.2":
        sd["output.weight"] = sd["tok_embeddings.weight"].clone()  # Meta's 3.2 files: an explicit, equal output
    head_dim = params["dim"] // params["n_heads"]
    extra = {"rope.freqs": meta_rope_freqs(head_dim)} if name.startswith("llama2") else None
    ckpt = tmp_path_factory.mktemp(name) / "meta"
    write_checkpoint(ckpt, params, shards, sd=sd, embedding_dim=int(llama2), extra=extra)
    tokenizer = tokenizers["sentencepiece" if llama2 else "tiktoken"]
    ours = Llama.build(str(ckpt), tokenizer, MAX_SEQ_LEN, 2, device="cpu", dtype=torch.float32)
    tokens = torch.randint(0, vocab, (2, 96), generator=torch.Generator().manual_seed(5))
    return dict(name=name, params=params, version=version, ckpt=ckpt, tokenizer=tokenizer, ours=ours,
                hf=hf_twin(params, sd, version, vocab), tokens=tokens, head_dim=head_dim)


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours - reference).abs().max() / reference.abs().max()).item()


def hf_rope_tables(model, positions, head_dim):
    """transformers' cos and sin at `positions`, one value per rotated pair: (len(positions), head_dim // 2)."""
    x = torch.zeros(1, len(positions), head_dim)
    cos, sin = model.model.rotary_emb(x, torch.tensor([positions]))
    return cos[0, :, : head_dim // 2], sin[0, :, : head_dim // 2]


def test_rows_keep_metas_keys_and_every_non_shape_value():
    for name in ROWS:
        params, meta = row_params(name), META_PARAMS[name]
        assert params.keys() == meta.keys(), name
        for key, value in meta.items():
            if key not in SHAPE_KEYS or value == -1:
                assert params[key] == value, (name, key)
        assert params["dim"] // params["n_heads"] == meta["dim"] // meta["n_heads"], name  # Meta's head_dim


def test_logits_match_transformers_configured_as_its_converter_configures_the_family(family):
    with torch.no_grad():
        reference = family["hf"](family["tokens"]).logits.float()
    logits = family["ours"].model.forward(family["tokens"], 0)
    assert relative_error(logits, reference) <= 1e-5, family["name"]


def test_rope_tables_match_transformers_past_the_original_context(family):
    """Positions up to 16383: where Llama 3.1's scaling (or a wrong base) changes angles the most."""
    hd = family["head_dim"]
    cos, sin = hf_rope_tables(family["hf"], FAR_POSITIONS, hd)
    model = family["ours"].model
    torch.testing.assert_close(model.rope_cos[FAR_POSITIONS, 0::2], cos, atol=1e-6, rtol=0)
    torch.testing.assert_close(model.rope_sin[FAR_POSITIONS, 1::2], sin, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", [n for n in ROWS if META_PARAMS[n].get("use_scaled_rope")])
def test_shrunk_scaled_rows_use_every_branch_of_the_scaling(name):
    """The shrunk rows still have pairs kept as they are, pairs slowed by the whole factor and pairs blended:
    their head_dim (128, or 3.2 1B's 64) puts wavelengths on both sides of 8192 / 4 and of 8192 positions."""
    args = ModelArgs.from_params(row_params(name))
    unscaled = rope_frequencies(args.head_dim, args.rope_theta)
    scaled = apply_scaling(unscaled, args.rope_scaling_factor)
    kept = torch.isclose(scaled, unscaled, rtol=1e-6, atol=0)
    slowed = torch.isclose(scaled, unscaled / args.rope_scaling_factor, rtol=1e-6, atol=0)
    assert kept.any() and slowed.any() and (~kept & ~slowed).any(), name
    assert args.rope_scaling_factor == (32.0 if name.startswith("llama3.2") else 8.0)


def test_convert_writes_the_familys_base_scaling_and_context_and_transformers_agrees(family, tmp_path):
    hf_dir = tmp_path / "hf"
    assert convert_main([str(family["ckpt"]), str(hf_dir)]) == 0
    config = json.loads((hf_dir / "config.json").read_text())
    assert {k: config[k] for k in ("rope_theta", "rope_scaling", "tie_word_embeddings", "max_position_embeddings")} \
        == converter_config(family["params"], family["version"])
    from transformers import LlamaForCausalLM

    converted = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = converted(family["tokens"]).logits.float()
    assert relative_error(family["ours"].model.forward(family["tokens"], 0), theirs) <= 1e-5
    # Read back, the Hugging Face directory gives the model the same RoPE as Meta's files.
    _, params = open_checkpoint(str(hf_dir))
    back, meta = ModelArgs.from_params(params), family["ours"].model.params
    for field in ("rope_theta", "use_scaled_rope", "rope_scaling_factor", "rope_original_context"):
        assert getattr(back, field) == getattr(meta, field), field


def test_hf_directory_converted_back_to_meta_says_no_more_than_metas_files(family, tmp_path):
    """HF -> Meta writes no RoPE scaling key the family implies anyway (Meta's files carry none): 3.2's
    factor 32 comes back from the shape, as it came from Meta's file."""
    assert convert_main([str(family["ckpt"]), str(tmp_path / "hf")]) == 0
    assert convert_main([str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    back = json.loads((tmp_path / "back" / "params.json").read_text())
    assert not [k for k in back if k.startswith("rope_") and k != "rope_theta"], back
    args, meta = ModelArgs.from_params(back), family["ours"].model.params
    assert (args.rope_theta, args.use_scaled_rope, args.rope_scaling_factor) == \
        (meta.rope_theta, meta.use_scaled_rope, meta.rope_scaling_factor)


@pytest.fixture
def llama2_files(tmp_path, tokenizers):
    """Llama 2 7B's files, shrunk as in ROWS: params.json as Meta ships it and rope.freqs at base 10000."""
    params = row_params("llama2-7b")
    ckpt = tmp_path / "meta"
    sd = random_state_dict(dict(params, vocab_size=SP_VOCAB), seed=2, dtype=torch.bfloat16)
    write_checkpoint(ckpt, params, sd=sd, extra={"rope.freqs": meta_rope_freqs(128)})
    return ckpt, params, tokenizers["sentencepiece"]


def test_llama2_rope_freqs_that_disagree_with_params_json_are_refused_naming_both(llama2_files):
    ckpt, params, tokenizer = llama2_files
    (ckpt / "params.json").write_text(json.dumps(dict(params, rope_theta=500000.0)))  # a wrong base, added
    with pytest.raises(ValueError, match=r"consolidated\.00\.pth.*rope\.freqs.*rope_theta=500000.*pair 1: "
                                         r"checkpoint \[0\.867.*params\.json \[0\.814"):
        Llama.build(str(ckpt), tokenizer, 64, 1, device="cpu")


def test_rope_freqs_of_another_head_size_are_refused_naming_the_shapes(llama2_files):
    ckpt, _, tokenizer = llama2_files
    state = torch.load(ckpt / "consolidated.00.pth", weights_only=True)
    state["rope.freqs"] = meta_rope_freqs(64)
    torch.save(state, ckpt / "consolidated.00.pth")
    with pytest.raises(ValueError, match=r"rope\.freqs' has shape \(32,\).*head_dim 128.*64 pairs"):
        Llama.build(str(ckpt), tokenizer, 64, 1, device="cpu")


def test_explicit_rope_scaling_factor_in_params_json_wins_over_the_family_default(tmp_path):
    for name, default in (("llama3.2-1b", 32.0), ("llama3.2-3b", 32.0), ("llama3.1-8b", 8.0)):
        assert ModelArgs.from_params(META_PARAMS[name]).rope_scaling_factor == default
        for explicit in (8.0, 16.0, 32.0):
            params = dict(META_PARAMS[name], rope_scaling_factor=explicit)
            assert ModelArgs.from_params(params).rope_scaling_factor == explicit
    # ... and it is what a converted config.json states.
    params = dict(row_params("llama3.2-1b"), rope_scaling_factor=8.0)
    write_checkpoint(tmp_path / "meta", params, sd=random_state_dict(params, seed=3, dtype=torch.bfloat16))
    assert convert_main([str(tmp_path / "meta"), str(tmp_path / "hf")]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["rope_scaling"]["factor"] == 8.0
