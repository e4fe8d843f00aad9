"""Every user mistake gets a deliberate exception that names the offending value; a batch with bad
prompts finishes the good ones."""

import json
import os
import shutil

import pytest
import torch

from llama import Llama, PromptError
from llama.model import ModelArgs

from helpers import SMALL_GQA, meta_rope_freqs

PARAMS = dict(SMALL_GQA, vocab_size=512)


@pytest.fixture(scope="module")
def files(tiny_checkpoint):
    """(checkpoint directory, tokenizer path), shared with other tests: damage only a copy (copy_ckpt)."""
    ckpt = tiny_checkpoint(PARAMS, seed=1)
    return ckpt.dir, ckpt.tokenizer


@pytest.fixture(scope="module")
def llama(tiny_llama):
    return tiny_llama(PARAMS, seed=1, max_seq_len=32, max_batch_size=2, device="cpu")


def copy_ckpt(files, tmp_path):
    ckpt, tok = files
    dst = tmp_path / "ckpt"
    shutil.copytree(ckpt, dst)
    return dst, tok


def build(ckpt, tok, **kw):
    kw.setdefault("max_seq_len", 32)
    kw.setdefault("max_batch_size", 2)
    return Llama.build(str(ckpt), str(tok), device="cpu", **kw)


# ---- loading: files, shards, params.json, sizes ----


def test_a_missing_checkpoint_directory_raises_file_not_found_naming_it(files, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        build(tmp_path / "nowhere", files[1])


def test_a_missing_params_json_raises_file_not_found_naming_it(files, tmp_path):
    ckpt, tok = copy_ckpt(files, tmp_path)
    os.remove(ckpt / "params.json")
    with pytest.raises(FileNotFoundError, match="params.json"):
        build(ckpt, tok)


def test_a_missing_shard_raises_file_not_found_naming_it(files, tmp_path):
    ckpt, tok = copy_ckpt(files, tmp_path)
    os.remove(ckpt / "consolidated.00.pth")
    with pytest.raises(FileNotFoundError, match="consolidated"):
        build(ckpt, tok)


def test_a_missing_tokenizer_raises_file_not_found_naming_it(files, tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.model"):
        build(files[0], tmp_path / "absent.model")


def test_truncated_shard_names_the_file(files, tmp_path):
    ckpt, tok = copy_ckpt(files, tmp_path)
    shard = ckpt / "consolidated.00.pth"
    shard.write_bytes(shard.read_bytes()[:5000])
    with pytest.raises(ValueError, match=r"consolidated\.00\.pth.*corrupt or truncated"):
        build(ckpt, tok)


def test_garbage_shard_names_the_file(files, tmp_path):
    ckpt, tok = copy_ckpt(files, tmp_path)
    (ckpt / "consolidated.00.pth").write_bytes(b"not a checkpoint at all" * 100)
    with pytest.raises(ValueError, match=r"consolidated\.00\.pth"):
        build(ckpt, tok)


class RunsCode:
    """Unpickling this object would run a shell command (the classic pickle attack)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_whose_pickle_runs_code_is_refused_without_running_it(files, tmp_path):
    ckpt, tok = copy_ckpt(files, tmp_path)
    marker = tmp_path / "pwned"
    state = torch.load(ckpt / "consolidated.00.pth", weights_only=True)
    state["norm.weight"] = RunsCode(marker)
    torch.save(state, ckpt / "consolidated.00.pth")
    with pytest.raises(ValueError, match=r"refusing to load .*consolidated\.00\.pth"):
        build(ckpt, tok)
    assert not marker.exists()


def test_two_shards_load_on_one_rank_but_a_copied_shard_is_refused_by_its_vocabulary(files, tiny_checkpoint, tmp_path):
    # Checkpoints are resharded at load (tests/test_reshard.py): 2 shards run on 1 rank ...
    build(tiny_checkpoint(PARAMS, seed=1, n_shards=2).dir, files[1])
    # ... but a copy of a 1-shard file is no second shard: it holds twice the vocabulary a 2-shard cut would.
    ckpt, tok = copy_ckpt(files, tmp_path)
    shutil.copy(ckpt / "consolidated.00.pth", ckpt / "consolidated.01.pth")
    with pytest.raises(ValueError, match=r"vocab_size=512 but tensor 'tok_embeddings.weight' of .*consolidated"
                                         r"\.00\.pth' holds 1024 tokens"):
        build(ckpt, tok)


def test_a_vocab_size_other_than_the_tokenizers_is_refused_naming_both(files, tmp_path):
    ckpt, tok = copy_ckpt(files, tmp_path)
    (ckpt / "params.json").write_text(json.dumps(dict(PARAMS, vocab_size=1000)))
    with pytest.raises(ValueError, match="vocab_size=1000 .* 512 tokens"):
        build(ckpt, tok)


def test_wrong_tensor_shape_names_the_tensor_and_both_shapes(files, tmp_path):
    ckpt, tok = copy_ckpt(files, tmp_path)
    state = torch.load(ckpt / "consolidated.00.pth", weights_only=True)
    state["layers.1.feed_forward.w2.weight"] = torch.zeros(64, 100)
    torch.save(state, ckpt / "consolidated.00.pth")
    with pytest.raises(ValueError, match=r"layers\.1\.feed_forward\.w2\.weight: checkpoint \(64, 100\) vs model"):
        build(ckpt, tok)


def test_missing_and_unexpected_tensors_are_named(files, tmp_path):
    ckpt, tok = copy_ckpt(files, tmp_path)
    state = torch.load(ckpt / "consolidated.00.pth", weights_only=True)
    del state["layers.0.ffn_norm.weight"]
    state["layers.0.extra.weight"] = torch.zeros(3)
    torch.save(state, ckpt / "consolidated.00.pth")
    missing, unexpected = r"\['layers\.0\.ffn_norm\.weight'\]", r"\['layers\.0\.extra\.weight'\]"
    with pytest.raises(ValueError, match=rf"missing tensors {missing}.*unexpected tensors {unexpected}"):
        build(ckpt, tok)


def test_rope_freqs_tensor_matching_params_is_accepted_and_not_loaded(files, tmp_path):
    ckpt, tok = copy_ckpt(files, tmp_path)
    state = torch.load(ckpt / "consolidated.00.pth", weights_only=True)
    state["rope.freqs"] = meta_rope_freqs(PARAMS["dim"] // PARAMS["n_heads"], PARAMS["rope_theta"])
    torch.save(state, ckpt / "consolidated.00.pth")
    build(ckpt, tok)


def test_unknown_params_keys_warn_and_are_ignored(files, tmp_path):
    ckpt, tok = copy_ckpt(files, tmp_path)
    (ckpt / "params.json").write_text(json.dumps(dict(PARAMS, future_knob=3)))
    with pytest.warns(UserWarning, match="future_knob"):
        build(ckpt, tok)
    with pytest.warns(UserWarning, match="future_knob"):
        assert ModelArgs.from_params({"dim": 8, "future_knob": 1}).dim == 8


@pytest.mark.parametrize("value", [0, -5, 2.5, "128", None])
def test_max_seq_len_must_be_a_positive_integer(files, value):
    with pytest.raises(ValueError, match=f"max_seq_len must be a positive integer, got {value!r}"):
        build(files[0], files[1], max_seq_len=value)


def test_max_batch_size_must_be_a_positive_integer(files):
    with pytest.raises(ValueError, match="max_batch_size"):
        build(files[0], files[1], max_batch_size=0)


# ---- prompts and generation settings ----


def test_a_prompt_longer_than_max_seq_len_is_refused_naming_its_index(llama):
    with pytest.raises(ValueError, match="prompt 1: the prompt has 40 tokens, more than max_seq_len=32"):
        llama.generate([[256, 1], [256] * 40], max_gen_len=4)


def test_more_prompts_than_max_batch_size_are_refused(llama):
    with pytest.raises(ValueError, match="3 prompts is more than max_batch_size=2"):
        llama.generate([[256]] * 3, max_gen_len=4)
    with pytest.raises(ValueError, match="3 prompts is more than max_batch_size=2"):
        llama.text_completion(["a", "b", "c"], max_gen_len=4)


def test_an_empty_prompt_list_is_refused(llama):
    with pytest.raises(ValueError, match="at least one prompt"):
        llama.generate([], max_gen_len=4)
    with pytest.raises(ValueError, match="no prompts"):
        llama.text_completion([], max_gen_len=4)


def test_an_empty_prompt_and_out_of_vocabulary_ids_are_refused(llama):
    with pytest.raises(ValueError, match="prompt 0: the prompt is empty"):
        llama.generate([[]], max_gen_len=4)
    with pytest.raises(ValueError, match=r"token ids \[999\] are outside the vocabulary \[0, 512\)"):
        llama.generate([[256, 999]], max_gen_len=4)


@pytest.mark.parametrize("kw, match", [
    (dict(temperature=-1), "temperature must be >= 0, got -1"),
    (dict(top_p=0), r"top_p must be in \(0, 1\], got 0"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\], got 1.5"),
    (dict(max_gen_len=0), "max_gen_len must be a positive integer, got 0"),
])
def test_bad_generation_settings_are_refused_naming_the_value(llama, kw, match):
    kw = dict(dict(max_gen_len=4), **kw)
    with pytest.raises(ValueError, match=match):
        llama.generate([[256, 1]], **kw)


def test_a_too_long_text_prompt_is_reported_and_the_others_still_complete(llama):
    good = llama.text_completion(["ok"], max_gen_len=4, temperature=0)[0]
    with pytest.raises(PromptError, match=r"1 of 2 prompts failed \(prompt 0: the prompt has 101 tokens") as info:
        llama.text_completion(["x" * 100, "ok"], max_gen_len=4, temperature=0)
    assert info.value.results == [None, good]
    assert list(info.value.errors) == [0]


def test_a_bad_dialog_is_reported_and_the_others_still_answered(llama):
    good = [{"role": "user", "content": "hi"}]
    bad_role = [{"role": "wizard", "content": "hi"}]
    bad_order = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    expected = llama.chat_completion([good], max_gen_len=4, temperature=0)[0]
    with pytest.raises(PromptError) as info:
        llama.chat_completion([bad_role, good], max_gen_len=4, temperature=0)
    assert "unknown role 'wizard'" in info.value.errors[0]
    assert info.value.results == [None, expected]
    with pytest.raises(PromptError, match="ending with user"):
        llama.chat_completion([bad_order], max_gen_len=4, temperature=0)


@pytest.mark.slow
def test_checks_survive_python_dash_O(files):
    # `python -O` strips assert statements: user-facing checks must not rely on them.
    import subprocess
    import sys

    ckpt, tok = files
    code = (
        "from llama import Llama\n"
        f"g = Llama.build({str(ckpt)!r}, {str(tok)!r}, max_seq_len=32, max_batch_size=2, device='cpu')\n"
        "try:\n    g.generate([[256] * 40], max_gen_len=4)\nexcept ValueError as e:\n    print('raised:', e)\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-O", "-c", code], capture_output=True, text=True, cwd=root, timeout=120)
    assert "raised: prompt 0: the prompt has 40 tokens" in out.stdout, out.stderr
