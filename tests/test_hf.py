"""Hugging Face directories in and out: loading what transformers' own save_pretrained writes (single and
sharded safetensors, tied embeddings, llama3 rope_scaling, old and new config styles) gives the logits
transformers computes; `python -m llama.convert` writes Meta -> HF (which transformers loads to the same
logits) and HF -> Meta, and round trips are bit-exact; bad directories fail naming the file and tensor."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import (SMALL_GQA, SMALL_MHA, meta_rope_freqs, random_state_dict, save_hf_llama, shard_state_dict,
                     train_sentencepiece, write_byte_tokenizer, write_checkpoint)
from llama import Llama
from llama.checkpoints.meta import open_checkpoint
from llama.checkpoints.convert import main as convert_main
from llama.checkpoints.hf import permute_rows, unpermute_rows
from llama.model import ModelArgs

TOKENS = torch.tensor([[1, 17, 300, 42, 7, 99, 250, 3, 77, 12, 400, 5],
                       [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]])
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return str(write_byte_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.model"))


def our_logits(ckpt_dir, tokenizer, tokens=TOKENS, **kwargs):
    generator = Llama.build(str(ckpt_dir), tokenizer, 32, 2, device="cpu", **kwargs)
    return generator.model.forward(tokens, 0)


def hf_logits(model, tokens=TOKENS):
    with torch.no_grad():
        return model(tokens).logits.float()


def to_v4_config(hf_dir):
    """Rewrite transformers 5's config.json (rope_parameters) the way the Hub's Llama repos and
    transformers 4 write it (rope_theta and rope_scaling at the top)."""
    config = json.loads((hf_dir / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = rope if rope.get("rope_type") != "default" else None
    (hf_dir / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("config_style", ["v5", "v4"])
@pytest.mark.parametrize("tie,rope_scaling,max_shard_size", [
    (False, None, None),  # one model.safetensors
    (True, LLAMA3_ROPE, "60KB"),  # Llama 3.2 style: tied output, scaled RoPE, sharded with an index
])
def test_transformers_save_pretrained_loads_to_transformers_logits(tmp_path, tok, tie, rope_scaling,
                                                                   max_shard_size, config_style):
    model = save_hf_llama(tmp_path, seed=1, tie=tie, rope_scaling=rope_scaling, max_shard_size=max_shard_size)
    assert (tmp_path / "model.safetensors.index.json").is_file() == bool(max_shard_size)
    if config_style == "v4":
        to_v4_config(tmp_path)
    torch.testing.assert_close(our_logits(tmp_path, tok), hf_logits(model), atol=1e-5, rtol=0)


def test_q_k_row_permutation_round_trips_and_moves_pairs_to_halves():
    w = torch.arange(2 * 8 * 3).reshape(16, 3)  # 2 heads of head_dim 8
    p = permute_rows(w, 2)
    assert p[:, 0].tolist() == [0, 6, 12, 18, 3, 9, 15, 21, 24, 30, 36, 42, 27, 33, 39, 45]
    assert torch.equal(unpermute_rows(p, 2), w)


def test_meta_to_hf_loads_in_transformers_with_the_same_logits(tmp_path, tok):
    from transformers import LlamaForCausalLM

    params = dict(SMALL_GQA, vocab_size=512, use_scaled_rope=True)
    write_checkpoint(tmp_path / "meta", params, n_shards=2, seed=4)
    assert convert_main([str(tmp_path / "meta"), str(tmp_path / "hf")]) == 0
    model = LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    torch.testing.assert_close(hf_logits(model), our_logits(tmp_path / "meta", tok), atol=1e-5, rtol=0)


def test_llama2_meta_to_hf_matches_transformers(tmp_path):
    """Llama 2: MHA, vocab_size -1 (from the SentencePiece tokenizer), embedding cut by columns."""
    from transformers import LlamaForCausalLM

    sp = train_sentencepiece(tmp_path / "tokenizer.model")
    meta = tmp_path / "meta"
    params = dict(SMALL_MHA, vocab_size=320)
    sd = random_state_dict(params, seed=5)
    write_checkpoint(meta, dict(params, vocab_size=-1), n_shards=2, sd=sd, embedding_dim=1,
                     extra={"rope.freqs": meta_rope_freqs(params["dim"] // params["n_heads"])})
    shutil.copy(sp, meta / "tokenizer.model")
    assert convert_main([str(meta), str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "tokenizer.model").is_file()  # Llama 2 repos keep it at the top
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["vocab_size"], config["bos_token_id"], config["eos_token_id"]) == (320, 1, 2)
    model = LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokens = TOKENS % 320
    torch.testing.assert_close(hf_logits(model, tokens), our_logits(meta, None, tokens), atol=1e-5, rtol=0)
    # And back: Llama 2's column-cut embedding is chosen again because the tokenizer is SentencePiece.
    # (rope.freqs is not a parameter: checked against params.json on reading, not carried over.)
    assert convert_main([str(tmp_path / "hf"), str(tmp_path / "back"), "--shards", "2"]) == 0
    for r in range(2):
        a = torch.load(meta / f"consolidated.{r:02d}.pth")
        b = torch.load(tmp_path / "back" / f"consolidated.{r:02d}.pth")
        assert a.pop("rope.freqs") is not None
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_meta_to_hf_to_meta_is_bit_exact(tmp_path):
    params = dict(SMALL_GQA, vocab_size=512)
    write_checkpoint(tmp_path / "meta", params, n_shards=4, seed=6, dtype=torch.bfloat16)
    assert convert_main([str(tmp_path / "meta"), str(tmp_path / "hf"), "--max_shard_size", "40KB"]) == 0
    assert len(list((tmp_path / "hf").glob("model-*-of-*.safetensors"))) > 1
    assert convert_main([str(tmp_path / "hf"), str(tmp_path / "back"), "--shards", "4"]) == 0
    for r in range(4):
        a = torch.load(tmp_path / "meta" / f"consolidated.{r:02d}.pth")
        b = torch.load(tmp_path / "back" / f"consolidated.{r:02d}.pth")
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype == torch.bfloat16 and torch.equal(a[k], b[k]), (r, k)
    back = json.loads((tmp_path / "back" / "params.json").read_text())
    for key in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "norm_eps", "rope_theta"):
        assert back[key] == params[key]
    assert ModelArgs.from_params(back).ffn_hidden_dim == ModelArgs.from_params(params).ffn_hidden_dim


def test_hf_to_meta_to_hf_is_bit_exact(tmp_path):
    save_hf_llama(tmp_path / "hf", seed=7, tie=True, rope_scaling=LLAMA3_ROPE, dtype=torch.bfloat16)
    assert convert_main([str(tmp_path / "hf"), str(tmp_path / "meta")]) == 0
    meta = torch.load(tmp_path / "meta" / "consolidated.00.pth")
    assert torch.equal(meta["output.weight"], meta["tok_embeddings.weight"])  # Meta's files spell it out
    params = json.loads((tmp_path / "meta" / "params.json").read_text())
    assert params["use_scaled_rope"] and params["rope_scaling_factor"] == 32.0
    assert convert_main([str(tmp_path / "meta"), str(tmp_path / "hf2")]) == 0
    a, b = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "hf2" / "model.safetensors")
    assert a.keys() == b.keys() and "lm_head.weight" not in b  # tied again
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    c1, c2 = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("hf", "hf2"))
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "rms_norm_eps", "tie_word_embeddings"):
        assert c1[key] == c2[key], key
    assert c2["rope_theta"] == c1["rope_parameters"]["rope_theta"]
    assert c2["rope_scaling"] == {k: v for k, v in c1["rope_parameters"].items() if k != "rope_theta"}


def test_hf_repo_with_only_metas_files_under_original_loads_them(tmp_path, tok):
    write_checkpoint(tmp_path / "repo" / "original", dict(SMALL_GQA, vocab_size=512), n_shards=2, seed=8)
    shutil.copy(tok, tmp_path / "repo" / "original" / "tokenizer.model")
    write_checkpoint(tmp_path / "plain", dict(SMALL_GQA, vocab_size=512), n_shards=1, seed=8)
    # tokenizer_path=None finds original/tokenizer.model.
    torch.testing.assert_close(our_logits(tmp_path / "repo", None), our_logits(tmp_path / "plain", tok),
                               atol=1e-5, rtol=0)


def test_converter_reshards_meta_checkpoints(tmp_path):
    sd = write_checkpoint(tmp_path / "one", dict(SMALL_GQA, vocab_size=512), n_shards=1, seed=9)
    assert convert_main([str(tmp_path / "one"), str(tmp_path / "eight"), "--shards", "8"]) == 0
    for r in range(8):  # 8 ranks, 2 KV heads: each file holds a copy of its rank's KV head
        got = torch.load(tmp_path / "eight" / f"consolidated.{r:02d}.pth")
        want = shard_state_dict(sd, 8, r, n_kv_heads=2)
        assert all(torch.equal(got[k], want[k]) for k in want)


# ---- bad input ---------------------------------------------------------------------------------------------


def test_config_for_another_architecture_is_refused_naming_it(tmp_path, tok):
    save_hf_llama(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(model_type="mistral", architectures=["MistralForCausalLM"])
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config\.json' describes model_type='mistral', architectures="
                                         r"\['MistralForCausalLM'\]: only Llama"):
        Llama.build(str(tmp_path), tok, 32, 2, device="cpu")


def test_llama_variant_with_biases_is_refused(tmp_path):
    save_hf_llama(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(attention_bias=True)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"not supported: attention_bias=true"):
        open_checkpoint(str(tmp_path))


def test_hf_tensor_with_wrong_shape_names_the_file_and_tensor(tmp_path, tok):
    save_hf_llama(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["model.layers.1.self_attn.k_proj.weight"] = tensors["model.layers.1.self_attn.k_proj.weight"][:8]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight in model\.safetensors: "
                                         r"\(8, 64\), config\.json implies \(16, 64\)"):
        Llama.build(str(tmp_path), tok, 32, 2, device="cpu")


def test_hf_missing_tensor_is_named(tmp_path):
    save_hf_llama(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.0.mlp.up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing tensors \['model\.layers\.0\.mlp\.up_proj\.weight'\]"):
        open_checkpoint(str(tmp_path))


def test_directory_mixing_meta_and_hf_files_is_refused(tmp_path, tok):
    save_hf_llama(tmp_path)
    write_checkpoint(tmp_path, dict(SMALL_GQA, vocab_size=512))
    with pytest.raises(ValueError, match=r"mixes a Meta checkpoint \(\['consolidated\.00\.pth'\]\) with Hugging "
                                         r"Face files \(\['config\.json', 'model\.safetensors'\]\)"):
        Llama.build(str(tmp_path), tok, 32, 2, device="cpu")


def test_two_safetensors_files_without_index_holding_the_same_tensor_are_refused(tmp_path):
    save_hf_llama(tmp_path)
    shutil.copy(tmp_path / "model.safetensors", tmp_path / "model-old.safetensors")
    with pytest.raises(ValueError, match=r"tensor '[a-z_.0-9]+' is in both model-old\.safetensors "
                                         r"and model\.safetensors"):
        open_checkpoint(str(tmp_path))


def test_safetensors_without_config_is_refused(tmp_path):
    save_hf_llama(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"safetensors files \['model\.safetensors'\] but no config\.json"):
        open_checkpoint(str(tmp_path))


def test_converter_refuses_a_non_empty_output(tmp_path, capsys):
    write_checkpoint(tmp_path / "meta", dict(SMALL_GQA, vocab_size=512))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("x")
    assert convert_main([str(tmp_path / "meta"), str(tmp_path / "out")]) == 1
    assert "exists and is not empty" in capsys.readouterr().err
