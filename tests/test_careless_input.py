"""Careless input gets a clear error naming what is wrong (or simply works), never a silent wrong answer or a
traceback: a str where a list of prompts belongs, one dialog where a list of dialogs belongs, odd prompts
files, params.json values of the wrong type or misspelt keys, dtype and device names, the bench on any
checkpoint layout, Ctrl-C, a missing checkpoint folder or output folder, failed prompts, bytes that are not
UTF-8, and the file mode of written safetensors."""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llama import Llama
from llama.cli import main
from llama.checkpoints.convert import main as convert_main
from llama.distributed import pick_device, pick_dtype
from helpers import SMALL_GQA, random_state_dict, subprocess_env, write_byte_tokenizer, write_checkpoint

REPO = Path(__file__).resolve().parents[1]
PARAMS = dict(SMALL_GQA, vocab_size=512)
STOP_TOKENS = (257, 264, 265)
# Greedy and printable (lower-case letters only), as in test_cli.py, so results compare exactly.
BANNED = [t for t in range(512) if not ord("a") <= t <= ord("z") and t not in STOP_TOKENS]
GREEDY = ["--temperature", "0", "--banned_token_ids", ",".join(map(str, BANNED))]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("careless") / "ckpt"
    write_checkpoint(d, PARAMS, seed=3)
    write_byte_tokenizer(d / "tokenizer.model")
    return d


@pytest.fixture(scope="module")
def llama(ckpt) -> Llama:
    return Llama.build(str(ckpt), None, max_seq_len=64, max_batch_size=4, device="cpu")


def copy_with_params(ckpt: Path, dst: Path, params: dict) -> Path:
    shutil.copytree(ckpt, dst)
    (dst / "params.json").write_text(json.dumps(params))
    return dst


def cli(ckpt: Path, *args: str) -> int:
    return main(["--ckpt_dir", str(ckpt), "--max_seq_len", "64", "--no_progress", *GREEDY, *args])


# ---- the library's calls ----


def test_text_completion_refuses_one_string_instead_of_running_one_prompt_per_character(llama):
    with pytest.raises(TypeError, match=r"takes a list of prompts; got one str 'abc': pass \[prompt\]"):
        llama.text_completion("abc", max_gen_len=2)


def test_chat_completion_refuses_one_dialog_instead_of_a_list_of_dialogs(llama):
    dialog = [{"role": "user", "content": "hi"}]
    with pytest.raises(TypeError, match=r"takes a list of dialogs, each a list of messages; got one dialog .*\[dia"):
        llama.chat_completion(dialog, max_gen_len=2)
    with pytest.raises(TypeError, match="got one message"):
        llama.chat_completion(dialog[0], max_gen_len=2)
    assert len(llama.chat_completion([dialog], max_gen_len=2)) == 1  # the list of one dialog runs


def test_build_accepts_the_name_of_a_torch_dtype(ckpt):
    for name, dtype in [("bfloat16", torch.bfloat16), ("torch.float16", torch.float16), ("float32", torch.float32)]:
        generator = Llama.build(str(ckpt), None, max_seq_len=16, max_batch_size=1, device="cpu", dtype=name)
        assert generator.model.tok_embeddings.weight.dtype == dtype
    with pytest.raises(ValueError, match=r"unknown dtype 'bf16': expected a torch.dtype or the name of one"):
        pick_dtype(torch.device("cpu"), "bf16")
    with pytest.raises(ValueError, match="floating-point"):
        pick_dtype(torch.device("cpu"), "int8")


def test_an_unknown_device_name_lists_the_valid_ones(ckpt, capsys):
    with pytest.raises(ValueError, match=r"unknown device 'gpu': expected cpu, cuda or cuda:N"):
        pick_device("gpu")
    assert cli(ckpt, "--prompt", "hi", "--device", "gpu") == 2
    assert "error: unknown device 'gpu'" in capsys.readouterr().err


# ---- params.json ----


def test_a_params_value_of_the_wrong_type_names_the_key_the_value_and_the_file(ckpt, tmp_path):
    bad = copy_with_params(ckpt, tmp_path / "bad", dict(PARAMS, n_layers="2"))
    path = str(bad / "params.json")
    with pytest.raises(TypeError) as info:
        Llama.build(str(bad), None, max_seq_len=16, max_batch_size=1, device="cpu")
    assert str(info.value) == f"{path}: 'n_layers' must be an integer, got '2' (str)"
    for key, value, wanted in [("use_scaled_rope", "true", "true or false"), ("norm_eps", "1e-5", "a number"),
                               ("n_kv_heads", 2.0, "an integer or null"), ("rope_theta", True, "a number")]:
        (bad / "params.json").write_text(json.dumps(dict(PARAMS, **{key: value})))
        with pytest.raises(TypeError, match=f"'{key}' must be {wanted}, got {value!r}"):
            Llama.build(str(bad), None, max_seq_len=16, max_batch_size=1, device="cpu")


def test_the_cli_reports_a_params_type_error_in_one_line(ckpt, tmp_path, capsys):
    bad = copy_with_params(ckpt, tmp_path / "bad", dict(PARAMS, n_layers="2"))
    assert cli(bad, "--prompt", "hi") == 2
    assert "error: " + str(bad / "params.json") + ": 'n_layers' must be an integer" in capsys.readouterr().err


def test_params_as_meta_ships_them_pass_the_type_check():
    from llama.model import ModelArgs

    llama2_7b = {"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-05, "vocab_size": -1}
    llama31_8b = {"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256,
                  "ffn_dim_multiplier": 1.3, "multiple_of": 1024, "norm_eps": 1e-05, "rope_theta": 500000.0,
                  "use_scaled_rope": True}
    codellama_7b = {"dim": 4096, "n_layers": 32, "n_heads": 32, "multiple_of": 256, "ffn_dim_multiplier": None,
                    "norm_eps": 1e-5, "rope_theta": 1000000, "vocab_size": 32016}
    for params in (llama2_7b, llama31_8b, codellama_7b):
        assert ModelArgs.from_params(params).dim == 4096


def test_a_misspelt_params_key_is_named_in_the_missing_tensors_error(ckpt, tmp_path):
    params = dict(PARAMS)
    params["n_layer"] = params.pop("n_layers")  # n_layers falls back to its default, 32
    typo = copy_with_params(ckpt, tmp_path / "typo", params)
    with pytest.raises(ValueError, match=r"missing tensors \[.*'n_layer' \(did you mean 'n_layers'\?\)"):
        Llama.build(str(typo), None, max_seq_len=16, max_batch_size=1, device="cpu")
    params = dict(PARAMS)
    params["dims"] = params.pop("dim")
    (typo / "params.json").write_text(json.dumps(params))
    with pytest.raises(ValueError, match=r"wrong shape.*'dims' \(did you mean 'dim'\?\)"):
        Llama.build(str(typo), None, max_seq_len=16, max_batch_size=1, device="cpu")


def test_a_missing_checkpoint_folder_is_reported_as_missing_not_as_a_missing_tokenizer(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found: .*nowhere"):
        Llama.build(str(tmp_path / "nowhere"), None, max_seq_len=16, max_batch_size=1, device="cpu")
    assert main(["--ckpt_dir", str(tmp_path / "nowhere"), "--prompt", "hi"]) == 2
    assert "checkpoint directory not found" in capsys.readouterr().err


# ---- prompts files ----


@pytest.mark.parametrize("line, message", [
    ({"dialog": "text"}, r'p.jsonl:2: "dialog" must be a list of messages, got "text"'),
    ({"dialog": [{"role": "user", "content": "a"}], "prompt": "b"},
     r"p.jsonl:2: an object holds exactly one key.*got keys \['dialog', 'prompt'\]"),
    ({"prompt": ["a"]}, r'p.jsonl:2: "prompt" must be a string'),
    ({"promt": "a"}, r"got keys \['promt'\]"),
])
def test_a_jsonl_object_that_is_not_exactly_one_prompt_or_dialog_is_refused(ckpt, tmp_path, capsys, line, message):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps("fine") + "\n" + json.dumps(line) + "\n")
    assert cli(ckpt, "--prompts_file", str(path)) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err


def test_a_json_prompts_file_is_a_json_array_of_prompts(ckpt, llama, tmp_path):
    dialog = [{"role": "user", "content": "hi"}]
    prompts = ["plain", {"prompt": "as object"}, {"dialog": dialog}, dialog]
    (tmp_path / "p.json").write_text(json.dumps(prompts, indent=2))
    out = tmp_path / "out.jsonl"
    assert cli(ckpt, "--prompts_file", str(tmp_path / "p.json"), "--output_file", str(out), "--max_gen_len", "5") == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in records] == ["plain", "as object", dialog, dialog]
    texts = llama.text_completion(["plain", "as object"], temperature=0, max_gen_len=5, banned_token_ids=BANNED)
    chats = llama.chat_completion([dialog], temperature=0, max_gen_len=5, banned_token_ids=BANNED)
    assert [r["generation"] for r in records] == [t["generation"] for t in texts] + [
        chats[0]["generation"]["content"]] * 2


def test_a_json_prompts_file_that_is_not_an_array_is_refused(ckpt, tmp_path, capsys):
    (tmp_path / "p.json").write_text(json.dumps({"prompt": "one"}))
    assert cli(ckpt, "--prompts_file", str(tmp_path / "p.json")) == 2
    assert "p.json: a .json prompts file holds a JSON array of prompts, got a dict" in capsys.readouterr().err
    (tmp_path / "p.json").write_text('[\n  "one",\n  "two"\n  "three"\n]')
    assert cli(ckpt, "--prompts_file", str(tmp_path / "p.json")) == 2
    assert "p.json:4: not JSON" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["p.txt", "p.jsonl", "p.json"])
def test_bytes_that_are_not_utf8_are_reported_with_the_file_and_line(ckpt, tmp_path, capsys, name):
    lines = {"p.txt": [b"good", b"bad \xff here"], "p.jsonl": [b'"good"', b'"bad \xff here"'],
             "p.json": [b'["good",', b' "bad \xff here"]']}[name]
    (tmp_path / name).write_bytes(b"\n".join(lines) + b"\n")
    assert cli(ckpt, "--prompts_file", str(tmp_path / name)) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / name}:2: not UTF-8 text (byte 0xff at column" in err, err


def test_a_command_line_prompt_that_is_not_utf8_is_refused_before_loading(ckpt):
    done = subprocess.run([sys.executable, "-m", "llama", "--ckpt_dir", str(ckpt), "--prompt", "ok",
                           "--prompt", os.fsdecode(b"bad \xff")], capture_output=True, env=subprocess_env())
    assert done.returncode == 2
    assert b"error: --prompt number 2 is not valid UTF-8: byte 0xff at character 5" in done.stderr
    assert b"Loaded in" not in done.stdout and b"Traceback" not in done.stderr


# ---- the output file, the exit status ----


def test_an_output_file_that_cannot_be_written_is_reported_before_the_model_loads(ckpt, tmp_path, capsys):
    (tmp_path / "a_dir.jsonl").mkdir()
    for path, message in [(tmp_path / "no_such_dir" / "out.jsonl", "the directory .* does not exist"),
                          (tmp_path / "a_dir.jsonl", "is a directory")]:
        assert cli(ckpt, "--prompt", "hi", "--output_file", str(path)) == 2
        captured = capsys.readouterr()
        assert re.search(message, captured.err), captured.err
        assert "Loaded in" not in captured.out


def test_under_torchrun_rank_zero_alone_reports_a_bad_output_file(tmp_path):
    two = tmp_path / "two"
    write_checkpoint(two, PARAMS, n_shards=2, seed=3)
    write_byte_tokenizer(two / "tokenizer.model")
    torchrun = Path(sys.executable).with_name("torchrun")
    done = subprocess.run([str(torchrun), "--nproc_per_node", "2", "-m", "llama", "--ckpt_dir", str(two), "--prompt",
                           "hi", "--device", "cpu", "--output_file", str(tmp_path / "missing" / "out.jsonl")],
                          cwd=tmp_path, env=subprocess_env(OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=180)
    assert done.returncode != 0
    assert done.stderr.count("error: --output_file") == 1, done.stderr
    assert "Loaded in" not in done.stdout
    assert "[rank" not in done.stderr  # no traceback from any rank (torchrun's own failure report remains)


def test_the_exit_status_is_1_with_a_summary_when_prompts_failed(ckpt, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    assert cli(ckpt, "--prompt", "ok", "--prompt", "x" * 80, "--max_gen_len", "2", "--output_file", str(out)) == 1
    assert "error: 1 of 2 prompts failed (their records say why)" in capsys.readouterr().err
    assert [json.loads(line)["error"] is None for line in out.read_text().splitlines()] == [True, False]
    assert cli(ckpt, "--prompt", "ok", "--max_gen_len", "2") == 0


# ---- Ctrl-C ----

# Generation is replaced by a function that sends this process SIGINT, as Ctrl-C in the terminal does, and
# waits for the KeyboardInterrupt it raises: the interrupt lands mid-generation every time.
INTERRUPT = """
import os, runpy, signal, sys, time
from llama.generation import Llama
def interrupted(self, *args, **kwargs):
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(60)
Llama.complete = interrupted
sys.argv = [sys.argv[1]] + sys.argv[2:]
if sys.argv[0] == "-m":
    runpy.run_module(sys.argv.pop(1), run_name="__main__", alter_sys=True)
else:
    runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("command", [["-m", "llama", "--prompt", "hello", "--max_gen_len", "4"],
                                     [str(REPO / "example_text_completion.py"), "--max_gen_len", "4"],
                                     [str(REPO / "example_chat_completion.py"), "--max_gen_len", "4"]])
def test_ctrl_c_during_generation_exits_130_with_a_short_message_and_no_traceback(ckpt, command):
    done = subprocess.run([sys.executable, "-c", INTERRUPT, *command, "--ckpt_dir", str(ckpt), "--device", "cpu"],
                          capture_output=True, text=True, env=subprocess_env(), timeout=120, cwd=REPO)
    assert "Loaded in" in done.stdout, done.stderr
    assert done.returncode == 130, done.stderr
    assert done.stderr.strip().endswith("interrupted (Ctrl-C)")
    assert "Traceback" not in done.stderr


# ---- the bench ----


def bench_weights(ckpt_dir: Path):
    from bench.run import load_weights

    opts = argparse.Namespace(ckpt_dir=str(ckpt_dir), shape=None, seed=0)
    return load_weights(opts, torch.device("cpu"), torch.float32, max_seq_len=16, max_batch_size=1)


def test_the_bench_reads_sharded_and_hugging_face_checkpoints(tmp_path):
    sd = write_checkpoint(tmp_path / "two", PARAMS, n_shards=2, seed=4)
    write_checkpoint(tmp_path / "one", PARAMS, seed=4)
    assert convert_main([str(tmp_path / "one"), str(tmp_path / "hf")]) == 0
    for layout in ("two", "hf"):
        args, weights = bench_weights(tmp_path / layout)
        assert (args.n_layers, args.vocab_size) == (2, 512)
        assert weights.keys() == sd.keys()
        assert all(torch.equal(weights[k], sd[k]) for k in sd), layout


def test_the_bench_takes_llama2_vocab_size_from_the_embedding(tmp_path):
    write_checkpoint(tmp_path / "l2", dict(PARAMS, vocab_size=-1), sd=random_state_dict(PARAMS, seed=5))
    args, weights = bench_weights(tmp_path / "l2")
    assert args.vocab_size == 512 == weights["tok_embeddings.weight"].shape[0]


def test_the_bench_without_transformers_says_so_before_any_work(monkeypatch, capsys):
    import bench.run as bench

    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` raises ImportError
    with pytest.raises(SystemExit) as info:
        bench.parse_args(["--batch", "1"])
    assert info.value.code == 2
    assert "needs transformers (pip install transformers); or pass --no-hf" in capsys.readouterr().err
    assert bench.parse_args(["--batch", "1", "--no-hf"]).no_hf


def test_the_bench_on_a_missing_folder_says_so(tmp_path, capsys):
    import bench.run as bench

    with pytest.raises(SystemExit) as info:
        bench.main(["--ckpt-dir", str(tmp_path / "nowhere"), "--no-hf"])
    assert info.value.code == 2
    assert "checkpoint directory not found" in capsys.readouterr().err


# ---- files written ----


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)], ids=["umask-022", "umask-027"])
def test_written_safetensors_get_the_mode_the_umask_gives(ckpt, tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        assert convert_main([str(ckpt), str(tmp_path / "hf")]) == 0
        assert convert_main([str(ckpt), str(tmp_path / "hf2"), "--max_shard_size", "40KB"]) == 0
    finally:
        os.umask(previous)
    files = sorted((tmp_path / "hf").glob("*.safetensors")) + sorted((tmp_path / "hf2").glob("*.safetensors"))
    assert len(files) > 2
    assert {oct(f.stat().st_mode & 0o777) for f in files} == {oct(mode)}
    assert (tmp_path / "hf" / "config.json").stat().st_mode & 0o777 == mode
