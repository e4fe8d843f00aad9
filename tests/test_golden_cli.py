"""`python -m llama.golden record / compare` as a user runs them: files, exit codes, resuming, torchrun, and
other engines' outputs in the documented schemas."""

import contextlib
import gzip
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import SMALL_GQA, random_state_dict, subprocess_env, write_byte_tokenizer, write_checkpoint
from llama.golden import compare, load_golden, load_outputs
from llama.golden.__main__ import main
from llama.golden.formats import TokenIds

ROOT = Path(__file__).resolve().parent.parent
PARAMS = dict(SMALL_GQA, vocab_size=512)
PROMPTS = [
    {"id": "a", "prompt": "The quick brown fox"},
    {"id": "b", "dialog": [{"role": "user", "content": "Hi"}]},
    {"prompt": "Hello", "continuation": " world"},
    {"tokens": [256, 70, 71, 72]},
]


def golden_cli(*args: str) -> subprocess.CompletedProcess:
    """`python -m llama.golden ARGS`, run in this process (a new interpreter per call would cost seconds)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def golden_subprocess(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llama.golden", *args], capture_output=True, text=True,
                          cwd=ROOT, env=subprocess_env(OMP_NUM_THREADS="1"), timeout=300)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("golden_cli")
    sd = random_state_dict(PARAMS, seed=11)
    write_checkpoint(d / "ckpt", PARAMS, sd=sd)
    write_checkpoint(d / "ckpt2", PARAMS, n_shards=2, sd=sd)
    write_byte_tokenizer(d / "ckpt" / "tokenizer.model")
    write_byte_tokenizer(d / "ckpt2" / "tokenizer.model")
    prompts = d / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    out = d / "golden.jsonl"
    result = golden_cli("record", "--ckpt_dir", str(d / "ckpt"), "--prompts", str(prompts), "--out", str(out),
                        "--max_new_tokens", "8", "--top_k", "4", "--max_seq_len", "64")
    assert result.returncode == 0, result.stderr
    return d, prompts, out, result


def test_record_writes_a_header_that_makes_the_numbers_reproducible_and_one_record_per_prompt(setup):
    d, _, out, result = setup
    golden = load_golden(out)
    h = golden.header
    assert h["dtype"] == "float32" and h["device"] == "cpu" and h["torch"] == torch.__version__
    assert h["params"] == PARAMS and h["files"]["md5_source"] == "computed"
    assert sorted(h["files"]["md5"]) == ["consolidated.00.pth", "params.json", "tokenizer.model"]
    assert h["settings"]["top_k"] == 4 and h["settings"]["max_new_tokens"] == 8 and h["llama"]
    assert [r.id for r in golden.records] == ["a", "b", "2", "3"]  # ids default to the prompt's index
    assert "[4/4] 3:" in result.stderr  # progress on stderr
    scored = golden.records[2].scored
    assert len(scored.logprobs) == len(scored.ids) - 1 and scored.ids[-6:] == list(b" world")
    assert all(len(row) == 4 for row in golden.records[0].greedy.top_ids)


def test_compare_passes_with_exit_0_and_prints_a_table_or_json(setup):
    _, _, out, _ = setup
    result = golden_cli("compare", str(out), str(out))
    assert result.returncode == 0 and "PASS: 4 prompts agree" in result.stdout
    result = golden_cli("compare", str(out), str(out), "--json")
    report = json.loads(result.stdout)
    assert report["verdict"] == "PASS" and len(report["prompts"]) == 4
    assert report["tolerances"] == {"logprob": 1e-3, "mean_logprob": 1e-4, "tie": 1e-3}


def test_compare_fails_with_exit_1_when_the_logprobs_move_beyond_the_tolerance(setup, tmp_path):
    _, _, out, _ = setup
    lines = out.read_text().splitlines()
    record = json.loads(lines[1])
    record["scored"]["logprobs"][2] += 0.01  # position 3 of prompt "a"
    (tmp_path / "other.jsonl").write_text("\n".join([lines[0], json.dumps(record)] + lines[2:]) + "\n")
    result = golden_subprocess("compare", str(out), str(tmp_path / "other.jsonl"), "--json_out",
                               str(tmp_path / "r.json"))
    assert result.returncode == 1
    assert re.search(r"^a +FAIL ", result.stdout, re.M) and "at scored 3" in result.stdout
    assert json.loads((tmp_path / "r.json").read_text())["prompts"][0]["first_over"] == "scored 3"
    # A looser tolerance given on the command line lets it pass.
    assert golden_cli("compare", str(out), str(tmp_path / "other.jsonl"), "--logprob_tol", "0.02",
                      "--mean_tol", "0.01").returncode == 0


def test_a_missing_prompt_fails(setup, tmp_path):
    _, _, out, _ = setup
    lines = out.read_text().splitlines()
    (tmp_path / "fewer.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    report = compare(load_golden(out), load_golden(tmp_path / "fewer.jsonl"))
    assert not report.passed and report.prompts[-1].cause.startswith("missing")


def test_record_resumes_a_run_cut_short_and_keeps_what_was_written(setup, tmp_path):
    d, prompts, out, _ = setup
    for name in ("cut.jsonl", "cut.jsonl.gz"):
        target = tmp_path / name
        full = out.read_bytes()
        if name.endswith(".gz"):
            full = gzip.compress(full)
        target.write_bytes(full[: len(full) * 3 // 5])  # a crash in the middle of a record
        result = golden_cli("record", "--ckpt_dir", str(d / "ckpt"), "--prompts", str(prompts), "--out",
                            str(target), "--max_new_tokens", "8", "--top_k", "4", "--max_seq_len", "64")
        assert result.returncode == 0, result.stderr
        assert "already recorded" in result.stderr
        assert compare(load_golden(out), load_golden(target)).passed
        assert [r.id for r in load_golden(target).records] == ["a", "b", "2", "3"]
    # Nothing left to do: the file is left as it is.
    before = (tmp_path / "cut.jsonl").read_bytes()
    golden_cli("record", "--ckpt_dir", str(d / "ckpt"), "--prompts", str(prompts), "--out",
               str(tmp_path / "cut.jsonl"), "--max_new_tokens", "8", "--top_k", "4", "--max_seq_len", "64")
    assert (tmp_path / "cut.jsonl").read_bytes() == before


def test_record_refuses_to_append_to_a_file_recorded_with_other_settings(setup):
    d, prompts, out, _ = setup
    result = golden_cli("record", "--ckpt_dir", str(d / "ckpt"), "--prompts", str(prompts), "--out", str(out),
                        "--max_new_tokens", "8", "--top_k", "5", "--max_seq_len", "64")
    assert result.returncode == 2 and "recorded with other ['settings']" in result.stderr


def test_a_bad_prompts_file_is_reported_before_the_model_loads(setup, tmp_path):
    d, _, _, _ = setup
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"text": "which key?"}\n')
    result = golden_cli("record", "--ckpt_dir", str(d / "ckpt"), "--prompts", str(bad), "--out",
                        str(tmp_path / "x.jsonl"))
    assert result.returncode == 2 and "bad.jsonl:2: give exactly one of" in result.stderr
    assert "Loaded" not in result.stdout and not (tmp_path / "x.jsonl").exists()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_two_model_parallel_ranks_under_torchrun_record_what_one_process_records(setup, tmp_path, dtype):
    d, prompts, out, _ = setup
    args = ["--prompts", str(prompts), "--max_new_tokens", "8", "--top_k", "4", "--max_seq_len", "64",
            "--dtype", dtype]
    if dtype == "float32":
        one = load_golden(out)
    else:
        assert golden_cli("record", "--ckpt_dir", str(d / "ckpt"), "--out", str(tmp_path / "one.jsonl"),
                          *args).returncode == 0
        one = load_golden(tmp_path / "one.jsonl")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "llama.golden", "record", "--ckpt_dir", str(d / "ckpt2"), "--out", str(tmp_path / "mp.jsonl"), *args]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=subprocess_env(OMP_NUM_THREADS="1"),
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    mp = load_golden(tmp_path / "mp.jsonl")
    assert mp.header["model_parallel_size"] == 2 and len(mp.records) == 4  # one writer: no record twice
    assert mp.header["dtype"] == one.header["dtype"] == dtype
    report = compare(one, mp)  # the dtype's default tolerances: a split sums in another order
    assert report.passed, report.table()


def test_other_engines_outputs_in_the_minimal_schema_and_in_openai_style(setup, tmp_path):
    d, _, out, _ = setup
    golden = load_golden(out)
    from llama import Tokenizer

    tokenizer = Tokenizer(str(d / "ckpt" / "tokenizer.model"))
    minimal, openai = [{"header": {"dtype": "float32", "engine": "mine"}}], []
    for r in golden.records:
        g = r.greedy
        minimal.append({"id": r.id, "prompt_ids": r.prompt_ids, "ids": g.ids, "logprobs": g.logprobs,
                        "top_logprobs": [list(map(list, zip(i, lp))) for i, lp in zip(g.top_ids, g.top_logprobs)]})
        content = []
        for t, lp, ids, lps in zip(g.ids, g.logprobs, g.top_ids, g.top_logprobs):
            entry = lambda i, x: {"token": tokenizer.decode([i]),  # noqa: E731
                                  "bytes": list(tokenizer.model.decode_single_token_bytes(i)), "logprob": x}
            content.append(dict(entry(t, lp), top_logprobs=[entry(i, x) for i, x in zip(ids, lps)]))
        openai.append({"id": r.id, "response": {"choices": [{"logprobs": {"content": content},
                                                             "finish_reason": "length"}]}})
    (tmp_path / "minimal.jsonl").write_text("".join(json.dumps(x) + "\n" for x in minimal))
    (tmp_path / "openai.jsonl").write_text("".join(json.dumps(x) + "\n" for x in openai))
    report = compare(golden, load_outputs(tmp_path / "minimal.jsonl"))
    assert report.passed and all(p.prompt_ids_match for p in report.prompts), report.table()
    with pytest.raises(ValueError, match="give the tokenizer"):
        load_outputs(tmp_path / "openai.jsonl")
    token_ids = TokenIds(tokenizer.decode, tokenizer.n_words, tokenizer.model.decode_single_token_bytes)
    report = compare(golden, load_outputs(tmp_path / "openai.jsonl", token_ids))
    assert report.passed and all(p.positions == len(r.greedy.ids) for p, r in zip(report.prompts, golden.records))
    # The command line finds the tokenizer through the golden header.
    assert golden_cli("compare", str(out), str(tmp_path / "openai.jsonl")).returncode == 0
    # A wrong token in the other engine's output is caught where it is.
    openai[0]["response"]["choices"][0]["logprobs"]["content"][1]["bytes"] = list(b"#")
    (tmp_path / "openai.jsonl").write_text("".join(json.dumps(x) + "\n" for x in openai))
    report = compare(golden, load_outputs(tmp_path / "openai.jsonl", token_ids))
    assert not report.passed and report.prompts[0].greedy_parts_at == 1


def test_llama_cpp_is_optional_and_its_absence_is_reported_cleanly(setup, tmp_path):
    try:
        import llama_cpp  # noqa: F401

        pytest.skip("llama-cpp-python is installed: its absence cannot be tested here")
    except ImportError:
        pass
    _, _, out, _ = setup
    result = golden_cli("compare", str(out), f"llamacpp:{tmp_path / 'model.gguf'}")
    assert result.returncode == 2 and "pip install llama-cpp-python" in result.stderr


def test_compare_runs_transformers_from_a_hugging_face_directory(tmp_path):
    from helpers import save_hf_llama

    save_hf_llama(tmp_path / "hf", seed=2)  # written by transformers' own save_pretrained
    tok = write_byte_tokenizer(tmp_path / "tokenizer.model")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    golden = tmp_path / "golden.jsonl.gz"
    result = golden_cli("record", "--ckpt_dir", str(tmp_path / "hf"), "--tokenizer_path", str(tok), "--prompts",
                        str(prompts), "--out", str(golden), "--max_new_tokens", "6", "--top_k", "3",
                        "--max_seq_len", "64")
    assert result.returncode == 0, result.stderr
    assert "model.safetensors" in load_golden(golden).header["files"]["md5"]
    result = golden_cli("compare", str(golden), f"hf:{tmp_path / 'hf'}")
    assert result.returncode == 0 and "PASS: 4 prompts agree" in result.stdout, result.stdout + result.stderr


def test_a_prompt_longer_than_the_context_is_named_before_any_prompt_runs(setup, tmp_path):
    d, _, _, _ = setup
    prompts = tmp_path / "long.jsonl"
    prompts.write_text(json.dumps({"id": "ok", "prompt": "short"}) + "\n"
                       + json.dumps({"id": "long", "prompt": "x" * 100}) + "\n")
    result = golden_cli("record", "--ckpt_dir", str(d / "ckpt"), "--prompts", str(prompts), "--out",
                        str(tmp_path / "out.jsonl"), "--max_seq_len", "64")
    assert result.returncode == 2 and "'long' (101 tokens)" in result.stderr and "max_seq_len=64" in result.stderr
    assert "[1/2]" not in result.stderr
