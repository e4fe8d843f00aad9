"""The bundled demo model (models/demo): Meta's layout, loading through Llama.build, a recorded greedy
continuation that Hugging Face transformers reproduces on the same weights, the examples run with no
arguments, and a missing or damaged checkpoint says how to retrain it."""

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import random_state_dict
from llama import Llama, Tokenizer
from llama.cli.demo import DEMO_DIR, DemoModelError, build_demo

REPO = Path(__file__).resolve().parent.parent

# Greedy (temperature 0) continuations of the shipped model, float32 on the CPU. Recorded once from the
# trained model; test_recorded_continuations_are_what_transformers_generates checks them against an
# independent implementation, so a change here is a numerics change in model, tokenizer or generation.
TEXT_PROMPT = "Elizabeth could not help"
TEXT_CONTINUATION = (
    " smiling at the expense of the two who had been in the habit of a very different manner, and she was not"
    " so much more to be satisfied with the feelings"
)
CHAT_DIALOG = [{"role": "user", "content": "Do you dance, Mr. Darcy?"}]
CHAT_ANSWER = "Yes; I am sure I should not."
MAX_GEN_LEN = 32


@pytest.fixture(scope="module")
def demo() -> Llama:
    return build_demo(max_seq_len=256, max_batch_size=2, device="cpu")


def test_demo_checkpoint_is_in_metas_layout_and_at_most_30_mb():
    # Meta's files, beside the model card (README.md) and its bundled golden outputs (a folder).
    files = sorted(p.name for p in DEMO_DIR.iterdir() if p.is_file() and p.name != "README.md")
    assert files == ["checklist.chk", "consolidated.00.pth", "params.json", "tokenizer.model"]
    assert sum(p.stat().st_size for p in DEMO_DIR.iterdir()) <= 30 * 2**20
    params = json.loads((DEMO_DIR / "params.json").read_text())
    state = torch.load(DEMO_DIR / "consolidated.00.pth", map_location="cpu", weights_only=True)
    # Names and shapes as written by tests/helpers.py from Meta's layout, independently of llama.model.
    expected = random_state_dict(params)
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: tuple(v.shape) for k, v in expected.items()}
    assert {v.dtype for v in state.values()} == {torch.bfloat16}


def test_demo_tokenizer_is_a_tiktoken_file_whose_special_tokens_follow_it():
    lines = (DEMO_DIR / "tokenizer.model").read_text().splitlines()
    tokens = [base64.b64decode(line.split()[0]) for line in lines]
    assert [int(line.split()[1]) for line in lines] == list(range(len(lines)))
    assert tokens[:256] == [bytes([b]) for b in range(256)]  # byte-level: every byte is a token
    assert len(set(tokens)) == len(tokens)
    tokenizer = Tokenizer(str(DEMO_DIR / "tokenizer.model"))
    params = json.loads((DEMO_DIR / "params.json").read_text())
    assert tokenizer.n_words == len(lines) + 256 == params["vocab_size"]
    assert tokenizer.bos_id == len(lines)  # <|begin_of_text|> is the first id after the file's tokens


def test_greedy_text_continuation_equals_the_recorded_text(demo):
    result = demo.text_completion([TEXT_PROMPT], temperature=0, max_gen_len=MAX_GEN_LEN)
    assert result[0]["generation"] == TEXT_CONTINUATION


def test_greedy_chat_answer_equals_the_recorded_answer_and_stops_at_eot(demo):
    result = demo.chat_completion([CHAT_DIALOG], temperature=0, max_gen_len=MAX_GEN_LEN * 4)
    assert result[0]["generation"] == {"role": "assistant", "content": CHAT_ANSWER}
    answer_len = len(demo.tokenizer.encode(CHAT_ANSWER, bos=False, eos=False))
    assert answer_len < MAX_GEN_LEN * 4  # it stopped at <|eot_id|>, not at the length limit


def _hf_greedy(model, prompt, n, stop):
    """Greedy decoding with transformers, recomputing the whole sequence each step (no cache)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids])).logits[0, -1]
            ids.append(int(logits.argmax()))
            if ids[-1] in stop:
                break
    return ids[len(prompt) :]


def test_recorded_continuations_are_what_transformers_generates(demo):
    pytest.importorskip("transformers")
    from hf_reference import hf_model

    params = json.loads((DEMO_DIR / "params.json").read_text())
    state = torch.load(DEMO_DIR / "consolidated.00.pth", map_location="cpu", weights_only=True)
    hf = hf_model(params, {k: v.float() for k, v in state.items()}, max_positions=256)
    tok = demo.tokenizer

    text_ids = _hf_greedy(hf, tok.encode(TEXT_PROMPT, bos=True, eos=False), MAX_GEN_LEN, tok.stop_tokens)
    assert tok.decode(text_ids) == TEXT_CONTINUATION
    chat_ids = _hf_greedy(hf, demo.formatter.encode_dialog_prompt(CHAT_DIALOG), MAX_GEN_LEN * 4, tok.stop_tokens)
    assert chat_ids[-1] == tok.eot_id
    assert tok.decode(chat_ids[:-1]) == CHAT_ANSWER


def _copy_demo(tmp_path: Path) -> Path:
    copy = tmp_path / "demo"
    shutil.copytree(DEMO_DIR, copy)
    return copy


def _assert_says_how_to_retrain(message: str) -> None:
    assert "python scripts/train_demo.py" in message
    assert "apt-get download r-cran-janeaustenr" in message
    assert "git checkout -- models/demo" in message


def test_missing_demo_checkpoint_says_how_to_retrain(tmp_path):
    ckpt = _copy_demo(tmp_path)
    (ckpt / "consolidated.00.pth").unlink()
    with pytest.raises(DemoModelError, match="missing consolidated.00.pth") as info:
        build_demo(ckpt_dir=ckpt, device="cpu")
    _assert_says_how_to_retrain(str(info.value))


def test_damaged_demo_checkpoint_says_how_to_retrain(tmp_path):
    ckpt = _copy_demo(tmp_path)
    data = bytearray((ckpt / "consolidated.00.pth").read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the middle of the weights
    (ckpt / "consolidated.00.pth").write_bytes(bytes(data))
    with pytest.raises(DemoModelError, match="consolidated.00.pth is damaged") as info:
        build_demo(ckpt_dir=ckpt, device="cpu")
    _assert_says_how_to_retrain(str(info.value))


def test_demo_checkpoint_that_does_not_load_says_how_to_retrain(tmp_path):
    ckpt = _copy_demo(tmp_path)
    # A truncated file whose checklist line was updated to match: it passes the md5 check, not the load.
    shard = ckpt / "consolidated.00.pth"
    shard.write_bytes(shard.read_bytes()[:1000])
    lines = [f"{hashlib.md5((ckpt / n).read_bytes()).hexdigest()}  {n}"
             for n in ("consolidated.00.pth", "params.json", "tokenizer.model")]
    (ckpt / "checklist.chk").write_text("\n".join(lines) + "\n")
    with pytest.raises(DemoModelError, match="corrupt or truncated") as info:
        build_demo(ckpt_dir=ckpt, device="cpu")
    _assert_says_how_to_retrain(str(info.value))


def _run(script: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(cwd), os.environ.get("PYTHONPATH")) if p))
    return subprocess.run([sys.executable, str(script)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("script", ["example_text_completion.py", "example_chat_completion.py"])
def test_examples_run_with_no_arguments_on_the_demo_model(script):
    out = _run(REPO / script, REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Demo model:" in out.stdout and "Loaded in" in out.stdout and "tokens/s" in out.stdout
    assert out.stdout.count("\n==================================") == 4


@pytest.mark.slow
def test_example_without_the_demo_files_exits_with_the_retrain_command(tmp_path):
    # A copy of the repository's code without models/demo: the example must explain, not crash.
    shutil.copytree(REPO / "llama", tmp_path / "llama", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "example_text_completion.py", tmp_path)
    out = _run(tmp_path / "example_text_completion.py", tmp_path)
    assert out.returncode == 1
    assert str(tmp_path / "models" / "demo") in out.stderr  # the copy's llama package was the one used
    assert "Traceback" not in out.stderr
    _assert_says_how_to_retrain(out.stderr)
