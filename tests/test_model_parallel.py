"""Model parallelism on the CPU with gloo: a checkpoint split into 2 shards the way Meta splits it, run by
2 processes under torchrun, gives the same logits and greedy text as 1 shard in 1 process. Also runs the
example scripts the ways the README shows."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import SMALL_GQA, SMALL_MHA, real_tokenizer_path, subprocess_env

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow  # every test here starts processes


def torchrun(nproc: int, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    env = subprocess_env(OMP_NUM_THREADS="1")
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)


def run_single(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = subprocess_env()
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=timeout)


@pytest.mark.parametrize("params", [SMALL_GQA, SMALL_MHA], ids=["gqa", "mha"])
def test_two_shards_on_two_processes_match_one_shard(tiny_checkpoint, tmp_path, params):
    params = dict(params, vocab_size=512)
    one_shard, two_shards = (tiny_checkpoint(params, seed=4, n_shards=n) for n in (1, 2))  # the same weights
    worker = str(ROOT / "tests" / "mp_worker.py")

    single = run_single(worker, str(one_shard.dir), str(one_shard.tokenizer), str(tmp_path / "one.pt"))
    assert single.returncode == 0, single.stderr[-3000:]
    double = torchrun(2, worker, str(two_shards.dir), str(two_shards.tokenizer), str(tmp_path / "two.pt"))
    assert double.returncode == 0, double.stderr[:4000] + "\n...\n" + double.stderr[-2000:]

    one = torch.load(tmp_path / "one.pt", weights_only=True)
    two = torch.load(tmp_path / "two.pt", weights_only=True)
    assert (one["world"], two["world"]) == (1, 2)
    rel = ((one["logits"] - two["logits"]).abs().max() / one["logits"].abs().max()).item()
    assert rel <= 1e-5
    assert one["generated"] == two["generated"]
    assert one["text"] == two["text"]


def test_compiled_step_on_two_processes_gives_one_process_greedy_tokens(tiny_checkpoint, tmp_path):
    """compile=True under torchrun: the decode step's all-reduces and the logits' gather compile (torch's
    functional collectives, over gloo here); its float32 greedy tokens and log-probabilities, at batch 1 and
    2, are one process's eager ones (log-probabilities to summation order)."""
    one_shard, two_shards = (tiny_checkpoint(dict(SMALL_GQA, vocab_size=512), seed=4, n_shards=n) for n in (1, 2))
    worker = str(ROOT / "tests" / "compiled_mp_worker.py")
    single = run_single(worker, str(one_shard.dir), str(tmp_path / "one.pt"), "eager")
    assert single.returncode == 0, single.stderr[-3000:]
    double = torchrun(2, worker, str(two_shards.dir), str(tmp_path / "two.pt"), "compile", timeout=600)
    assert double.returncode == 0, double.stderr[:4000] + "\n...\n" + double.stderr[-2000:]
    one = torch.load(tmp_path / "one.pt", weights_only=True)
    two = torch.load(tmp_path / "two.pt", weights_only=True)
    assert (one["world"], two["world"]) == (1, 2)
    for batch in ("one", "two"):
        (tokens, logprobs), (tokens_2, logprobs_2) = one["results"][batch], two["results"][batch]
        assert tokens_2 == tokens, batch
        for row, row_2 in zip(logprobs, logprobs_2):
            torch.testing.assert_close(torch.tensor(row_2), torch.tensor(row), rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def real_vocab_ckpt(tiny_checkpoint):
    """A tiny random model with Meta's 128256-token vocabulary, in 1 and 2 shards (bf16, as Meta ships)."""
    params = dict(SMALL_GQA, vocab_size=128256)
    return {name: tiny_checkpoint(params, seed=9, n_shards=n, dtype=torch.bfloat16, tokenizer="llama3").dir
            for name, n in (("one", 1), ("two", 2))}


# ---- Meta's example scripts, run the ways the README shows ----


def test_example_text_completion_runs_with_plain_python(real_vocab_ckpt):
    out = run_single("example_text_completion.py", "--ckpt_dir", str(real_vocab_ckpt["one"]),
                     "--tokenizer_path", real_tokenizer_path(), "--max_gen_len", "8", "--device", "cpu")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "I believe the meaning of life is" in out.stdout
    assert out.stdout.count("\n==================================") == 4


def test_example_text_completion_runs_under_torchrun_with_two_shards_and_rank_zero_prints(real_vocab_ckpt):
    out = torchrun(2, "example_text_completion.py", "--ckpt_dir", str(real_vocab_ckpt["two"]),
                   "--tokenizer_path", real_tokenizer_path(), "--max_gen_len", "8", "--device", "cpu")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("I believe the meaning of life is") == 1  # rank 1 prints nothing
    assert out.stdout.count("\n==================================") == 4


def test_example_chat_completion_runs_under_torchrun_with_two_shards(real_vocab_ckpt):
    out = torchrun(2, "example_chat_completion.py", "--ckpt_dir", str(real_vocab_ckpt["two"]),
                   "--tokenizer_path", real_tokenizer_path(), "--max_gen_len", "8", "--device", "cpu")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("User: what is the recipe of mayonnaise?") == 1
    assert out.stdout.count("> Assistant:") == 4
