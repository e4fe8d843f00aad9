"""The CUDA path (skipped without a GPU): bf16 and fp16 weights on the GPU against Hugging Face transformers
in float32 on the CPU, at half-precision tolerance, and NCCL model parallelism when 2 GPUs are present."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import SMALL_GQA, subprocess_env, SMALL_SCALED
from hf_reference import hf_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("params", [SMALL_GQA, SMALL_SCALED], ids=["gqa", "scaled-rope"])
def test_cuda_logits_match_transformers(tiny_checkpoint, tiny_llama, dtype, params):
    params = dict(params, vocab_size=512)
    sd = tiny_checkpoint(params, seed=2, dtype=torch.bfloat16).state_dict
    llama = tiny_llama(params, seed=2, checkpoint_dtype=torch.bfloat16, max_seq_len=64, max_batch_size=2,
                       device="cuda", dtype=dtype)
    assert llama.model.output.weight.dtype == dtype and llama.model.output.weight.is_cuda
    tokens = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = hf_model(params, {k: v.float() for k, v in sd.items()})(tokens).logits
    full = llama.model.forward(tokens.cuda(), 0).cpu()
    steps = torch.cat([llama.model.forward(tokens[:, i : i + 1].cuda(), i) for i in range(24)], 1).cpu()
    tol = {torch.bfloat16: 3e-2, torch.float16: 5e-3, torch.float32: 1e-4}[dtype]  # TF32 may be on
    scale = reference.abs().max()
    assert (full - reference).abs().max() / scale <= tol
    assert (steps - reference).abs().max() / scale <= tol


def test_cuda_default_dtype_is_bf16_and_generation_runs(tiny_llama):
    params = dict(SMALL_GQA, vocab_size=512)
    llama = tiny_llama(params, seed=2, checkpoint_dtype=torch.bfloat16, max_seq_len=64, max_batch_size=4)
    assert llama.device.type == "cuda" and llama.model.output.weight.dtype == torch.bfloat16
    out = llama.text_completion(["Hello", "A longer prompt"], max_gen_len=16, temperature=0)
    assert len(out) == 2 and all(isinstance(r["generation"], str) for r in out)
    again = llama.text_completion(["Hello", "A longer prompt"], max_gen_len=16, temperature=0)
    assert again == out


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_nccl_two_shards_match_one_shard(tiny_checkpoint, tmp_path):
    params = dict(SMALL_GQA, vocab_size=512)
    # The same weights in 1 and in 2 shards.
    ckpts = {n: tiny_checkpoint(params, seed=4, n_shards=n, dtype=torch.bfloat16) for n in (1, 2)}
    env = subprocess_env(LLAMA_TEST_DEVICE="cuda")
    worker = str(ROOT / "tests" / "mp_worker.py")
    for name, n in (("one", 1), ("two", 2)):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", worker,
               str(ckpts[n].dir), str(ckpts[n].tokenizer), str(tmp_path / f"{name}.pt")]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
    one = torch.load(tmp_path / "one.pt", weights_only=True)
    two = torch.load(tmp_path / "two.pt", weights_only=True)
    assert two["world"] == 2
    assert (one["logits"] - two["logits"]).abs().max() / one["logits"].abs().max() <= 3e-2
    assert one["generated"] == two["generated"]
