"""Resharding at load: a checkpoint of N shards runs on M model-parallel ranks for any N, M the model allows.

Pieces are compared bit for bit with tests/helpers.shard_state_dict (Meta-style sharding written with
chunk / repeat_interleave, sharing nothing with llama.checkpoints.reshard); logits on 2 and 4 CPU ranks (gloo, processes
started as torchrun starts them) are compared with the unsharded original and with Hugging Face
transformers (fp32, 1e-5)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import (SMALL_GQA, SMALL_MHA, meta_rope_freqs, random_state_dict, save_hf_llama, shard_state_dict,
                     write_byte_tokenizer, write_checkpoint)
from llama import Llama
from llama.checkpoints.meta import MetaShards, find_shards, load_checkpoint, open_checkpoint
from llama.checkpoints.reshard import Layout, rank_state

ROOT = Path(__file__).resolve().parent.parent
GQA = dict(SMALL_GQA, vocab_size=512)  # 8 query heads, 2 KV heads
LLAMA2 = dict(SMALL_MHA, vocab_size=-1)  # vocab from the tokenizer, embedding cut by columns, rope.freqs
TOKENS = [[1, 17, 300, 42, 7, 99, 250, 3], [5, 6, 7, 8, 9, 10, 11, 12]]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("reshard")
    tok = str(write_byte_tokenizer(root / "tokenizer.model"))  # 512 tokens
    sd = random_state_dict(GQA, seed=1)
    for n in (1, 2, 4, 8):
        write_checkpoint(root / f"gqa{n}", GQA, n, sd=sd)
    sd2 = random_state_dict(dict(LLAMA2, vocab_size=512), seed=2)
    rope_freqs = {"rope.freqs": meta_rope_freqs(SMALL_MHA["dim"] // SMALL_MHA["n_heads"])}
    for n in (1, 2):
        write_checkpoint(root / f"llama2_{n}", LLAMA2, n, sd=sd2, embedding_dim=1, extra=rope_freqs)
    hf_model = save_hf_llama(root / "hf", seed=3, tie=True, max_shard_size="60KB", rope_scaling={
        "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16})
    with torch.no_grad():
        hf_logits = hf_model(torch.tensor(TOKENS)).logits
    return {"root": root, "tok": tok, "sd": sd, "sd2": sd2, "hf_logits": hf_logits}


def reference(ckpts, name):
    if name == "hf":
        return ckpts["hf_logits"]
    single = "llama2_1" if name.startswith("llama2") else "gqa1"
    generator = Llama.build(str(ckpts["root"] / single), ckpts["tok"], 32, 2, device="cpu")
    return generator.model.forward(torch.tensor(TOKENS), 0)


@pytest.mark.parametrize("n", [1, 2, 4, 8])
@pytest.mark.parametrize("m", [1, 2, 4, 8])
def test_every_rank_gets_exactly_metas_piece_for_any_n_and_m(ckpts, n, m):
    source, _ = open_checkpoint(str(ckpts["root"] / f"gqa{n}"))
    target = Layout(m, n_kv_heads=2, head_dim=8)
    for rank in range(m):
        got = rank_state(source, target, rank)
        want = shard_state_dict(ckpts["sd"], m, rank, n_kv_heads=2)
        assert got.keys() == want.keys()
        for k in want:
            assert torch.equal(got[k], want[k]), (n, m, rank, k)


@pytest.mark.parametrize("embedding_dim", [0, 1])
def test_llama2_embedding_cut_by_columns_is_regathered_by_rows_and_back(ckpts, embedding_dim):
    source, _ = open_checkpoint(str(ckpts["root"] / "llama2_2"))
    assert source.layout.embedding_dim == 1
    for rank in range(4):
        got = rank_state(source, Layout(4, 4, 16, embedding_dim), rank)
        want = shard_state_dict(ckpts["sd2"], 4, rank, embedding_dim=embedding_dim)
        assert all(torch.equal(got[k], want[k]) for k in want), rank


def test_shards_are_memory_mapped_and_column_pieces_are_not_copied(ckpts):
    source, _ = open_checkpoint(str(ckpts["root"] / "gqa2"))
    state = rank_state(source, Layout(4, 2, 8), 1)
    shard = source.shards[0]
    # Rank 1 of 4 takes the second half of shard 0's rows: a view into the mapped file, no copy.
    wq = state["layers.0.attention.wq.weight"]
    assert wq.untyped_storage().data_ptr() == shard["layers.0.attention.wq.weight"].untyped_storage().data_ptr()


@pytest.mark.parametrize("name", ["gqa2", "gqa4", "gqa8", "llama2_2"])
def test_n_shards_on_one_process_match_the_original_logits(ckpts, name):
    generator = Llama.build(str(ckpts["root"] / name), ckpts["tok"], 32, 2, device="cpu")
    logits = generator.model.forward(torch.tensor(TOKENS), 0)
    torch.testing.assert_close(logits, reference(ckpts, name), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_2_and_4_ranks_match_the_original_logits_and_generations(ckpts):
    """One 4-process gloo run: model-parallel 4 (more ranks than the 2 KV heads: they are replicated)
    and 2, for checkpoints of 1, 2 and 8 shards, Llama 2's layout and a Hugging Face directory."""
    root = ckpts["root"]
    cases = [{"name": n, "ckpt": str(root / n), "tokenizer": ckpts["tok"]}
             for n in ("gqa1", "gqa2", "gqa8", "llama2_2", "hf")]
    out = root / "mp_out"
    out.mkdir(exist_ok=True)
    job = root / "job.json"
    job.write_text(json.dumps({"cases": cases, "mp_sizes": [4, 2], "tokens": TOKENS, "out": str(out)}))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    world = 4
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world),
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen([sys.executable, str(ROOT / "tests" / "reshard_worker.py"), str(job)],
                         env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
        for r in range(world)
    ]
    try:
        outputs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outputs)

    for case in cases:
        name = case["name"]
        want = reference(ckpts, name)
        single = Llama.build(case["ckpt"], ckpts["tok"], 32, 2, device="cpu")
        want_generated, _ = single.generate(TOKENS, max_gen_len=4, temperature=0)
        for mp in (4, 2):
            got = torch.load(out / f"{name}-mp{mp}.pt")
            torch.testing.assert_close(got["logits"], want, atol=1e-5, rtol=0, msg=f"{name} on {mp} ranks")
            assert got["generated"] == want_generated, (name, mp)


# ---- bad input ---------------------------------------------------------------------------------------------


def test_shard_with_wrong_shape_names_the_file_and_tensor(ckpts, tmp_path):
    write_checkpoint(tmp_path, GQA, 2, sd=ckpts["sd"])
    shard = torch.load(tmp_path / "consolidated.01.pth")
    shard["layers.1.feed_forward.w2.weight"] = shard["layers.1.feed_forward.w2.weight"][:, :-1].clone()
    torch.save(shard, tmp_path / "consolidated.01.pth")
    with pytest.raises(ValueError, match=r"consolidated\.01\.pth' \(shard 1 of 2\) has tensors of the wrong shape"
                                         r".*layers\.1\.feed_forward\.w2\.weight: checkpoint \(64, 111\) vs "
                                         r"model \(64, 112\)"):
        Llama.build(str(tmp_path), ckpts["tok"], 32, 2, device="cpu")


def test_shard_from_another_checkpoint_is_refused(ckpts, tmp_path):
    """A mixed directory: shard 0 of a 2-shard checkpoint next to shard 1 of a 4-shard one."""
    write_checkpoint(tmp_path, GQA, 2, sd=ckpts["sd"])
    torch.save(torch.load(ckpts["root"] / "gqa4" / "consolidated.01.pth"), tmp_path / "consolidated.01.pth")
    with pytest.raises(ValueError, match=r"consolidated\.01\.pth.*tok_embeddings\.weight: checkpoint "
                                         r"\(128, 64\) vs model \(256, 64\)"):
        Llama.build(str(tmp_path), ckpts["tok"], 32, 2, device="cpu")
    torch.save(torch.load(ckpts["root"] / "gqa4" / "consolidated.00.pth"), tmp_path / "consolidated.00.pth")
    with pytest.raises(ValueError, match=r"params.json says vocab_size=512 but tensor 'tok_embeddings\.weight' of "
                                         r"'.*consolidated\.00\.pth' holds 256 tokens"):
        Llama.build(str(tmp_path), ckpts["tok"], 32, 2, device="cpu")


def test_shard_missing_a_tensor_names_the_file_and_tensor(ckpts, tmp_path):
    write_checkpoint(tmp_path, GQA, 2, sd=ckpts["sd"])
    shard = torch.load(tmp_path / "consolidated.01.pth")
    del shard["layers.0.ffn_norm.weight"]
    torch.save(shard, tmp_path / "consolidated.01.pth")
    with pytest.raises(ValueError, match=r"consolidated\.01\.pth.*missing tensors \['layers\.0\.ffn_norm\.weight'\]"):
        MetaShards(find_shards(str(tmp_path)), GQA)


def test_model_that_cannot_be_split_that_way_names_the_sizes(ckpts):
    with pytest.raises(ValueError, match=r"over 3 model-parallel ranks: n_heads=8 is not divisible by 3"):
        load_checkpoint(str(ckpts["root"] / "gqa2"), 3, 0)


def test_embedding_fitting_no_split_is_refused(ckpts, tmp_path):
    write_checkpoint(tmp_path, GQA, 2, sd=ckpts["sd"])
    for r in range(2):
        shard = torch.load(tmp_path / f"consolidated.{r:02d}.pth")
        shard["tok_embeddings.weight"] = torch.zeros(256, 48)
        torch.save(shard, tmp_path / f"consolidated.{r:02d}.pth")
    with pytest.raises(ValueError, match=r"'tok_embeddings\.weight' has shape \(256, 48\)"):
        open_checkpoint(str(tmp_path))
