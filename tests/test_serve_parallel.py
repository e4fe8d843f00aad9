"""The serving engine under torchrun with model parallelism (llama.serve.parallel): 2 gloo ranks, rank 0
scheduling and the other following its steps, give every request the greedy tokens and logprobs of 1 process
on the same weights unsharded, and of its prompt alone through Llama.generate on the 2 ranks."""

import pytest
import torch

from helpers import SMALL_GQA
from test_model_parallel import ROOT, run_single, torchrun

pytestmark = pytest.mark.slow  # starts processes


def test_two_ranks_following_rank_zero_serve_what_one_process_serves(tiny_checkpoint, tmp_path):
    params = dict(SMALL_GQA, vocab_size=512)
    one_shard, two_shards = (tiny_checkpoint(params, seed=6, n_shards=n) for n in (1, 2))  # the same weights
    worker = str(ROOT / "tests" / "serve_mp_worker.py")
    single = run_single(worker, str(one_shard.dir), str(one_shard.tokenizer), str(tmp_path / "one.pt"))
    assert single.returncode == 0, single.stderr[-3000:]
    double = torchrun(2, worker, str(two_shards.dir), str(two_shards.tokenizer), str(tmp_path / "two.pt"))
    assert double.returncode == 0, double.stderr[:3000] + "\n...\n" + double.stderr[-3000:]
    one = torch.load(tmp_path / "one.pt", weights_only=True)
    two = torch.load(tmp_path / "two.pt", weights_only=True)
    assert (one["world"], two["world"]) == (1, 2) and len(two["engine"]) == 10
    for (p1, new1, tokens1, lp1), (p2, new2, tokens2, lp2), (alone_tokens, alone_lp) in zip(
            one["engine"], two["engine"], two["alone"]):
        assert (p1, new1) == (p2, new2) and len(tokens2) == new2
        assert tokens2 == tokens1 == alone_tokens
        torch.testing.assert_close(torch.tensor(lp2), torch.tensor(lp1), rtol=0, atol=1e-5)
        torch.testing.assert_close(torch.tensor(lp2), torch.tensor(alone_lp), rtol=0, atol=1e-5)
