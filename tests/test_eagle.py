"""The EAGLE-style draft head (llama.speculative.eagle): drafts from the model's own features, and speculative
decoding with it gives the model's own output (greedy tokens and logprobs of plain decoding, the distribution
of plain sampling); its files load only for the model they belong to."""

import hashlib
import json
import sys
from pathlib import Path
from typing import List

import pytest
import torch

from helpers import SMALL_GQA
from llama import Llama
from llama.cli.demo import build_demo
from llama.speculative import Speculation, speculative_generate, verify
from llama.speculative.eagle import EagleDrafter, EagleHead, head_args, load_head
from llama.speculative.forward import forward_features
from test_speculative import (  # noqa: F401  (tiny_vocab_llama is a fixture)
    Fixed, always_accept, assert_same_as_plain, chi_square_p_value, expected_joint, one_thread, tiny_vocab_llama)

REPO = Path(__file__).resolve().parent.parent
HEAD_DIR = REPO / "models" / "demo-eagle"
AUSTEN_PROMPTS = ["Elizabeth could not help", "Mr. Darcy had walked away", "Emma Woodhouse, handsome, clever"]


def head_params(llama: Llama, **overrides) -> dict:
    args = llama.model.params
    params = dict(dim=args.dim, n_layers=1, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads, multiple_of=16,
                  norm_eps=1e-5, rope_theta=args.rope_theta, vocab_size=args.vocab_size)
    return dict(params, **overrides)


def write_random_head(path: Path, params: dict, seed: int = 0, std: float = 0.3) -> Path:
    """A head with random weights in the shipped layout (its files written independently of load_head)."""
    torch.manual_seed(seed)
    head = EagleHead(head_args(params, 64))
    state = {name: torch.randn(t.shape) * std for name, t in head.state_dict().items()}
    path.mkdir(parents=True, exist_ok=True)
    torch.save(state, path / "consolidated.00.pth")
    (path / "params.json").write_text(json.dumps(params))
    return path


@pytest.fixture
def random_head(tmp_path):
    def make(llama: Llama, seed: int = 0, **overrides) -> Path:
        return write_random_head(tmp_path / f"head{seed}", head_params(llama, **overrides), seed)
    return make


# ---- the head itself ----


def test_drafting_through_the_cache_equals_the_head_over_whole_sequences(tiny_llama, random_head):
    llama = tiny_llama(seed=0, max_seq_len=64, max_batch_size=1)
    head = load_head(random_head(llama), llama)
    g = torch.Generator().manual_seed(3)
    features, embeddings = torch.randn(1, 12, 64, generator=g), torch.randn(1, 12, 64, generator=g)
    with torch.inference_mode():
        whole = head(features, embeddings)
        pieces = [head(features[:, a:b], embeddings[:, a:b], a) for a, b in ((0, 5), (5, 6), (6, 12))]
    torch.testing.assert_close(torch.cat(pieces, dim=1), whole, rtol=1e-5, atol=1e-5)


def test_training_time_test_sees_what_drafting_sees():
    # scripts/train_eagle.py trains depth d at position j on the real pairs up to j - d + 1 and its own
    # predictions after them: its outputs must be what chained drafting through the cache computes.
    sys.path.insert(0, str(REPO / "scripts"))
    import train_eagle  # noqa: E402

    params = dict(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, multiple_of=16, norm_eps=1e-5, rope_theta=5e5,
                  vocab_size=50)
    torch.manual_seed(0)
    head = EagleHead(head_args(params, 32))
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.3)
    real, emb = torch.randn(1, 10, 32), torch.randn(1, 10, 32)
    cos, sin = head.rope_cos[:10], head.rope_sin[:10]
    keys, values, outs, feat = [], [], [], real
    with torch.no_grad():
        for _ in range(3):
            h = train_eagle.attend_depths(head.layers[0], head.fc(torch.cat([feat, emb], -1)), cos, sin, keys, values)
            outs.append(h)
            feat = torch.cat([real[:, :1], h[:, :-1]], dim=1)
    with torch.inference_mode():
        for s in (0, 3, 6):
            predicted = head(real[:, : s + 1], emb[:, : s + 1], 0)[:, -1:]  # depth 1, position s
            torch.testing.assert_close(predicted[0, 0], outs[0][0, s], rtol=1e-5, atol=1e-5)
            for d in (1, 2):
                predicted = head(predicted, emb[:, s + d : s + d + 1], s + d)
                torch.testing.assert_close(predicted[0, 0], outs[d][0, s + d], rtol=1e-5, atol=1e-5)


# ---- lossless: greedy ----


@pytest.mark.parametrize("fast", [True, False])
def test_greedy_with_the_head_gives_plain_decodings_tokens_and_logprobs(tiny_llama, random_head, fast):
    llama = tiny_llama(seed=0, max_seq_len=96, max_batch_size=1, fast=fast)
    drafter = EagleDrafter(random_head(llama), llama, fast=fast)
    for prompt, k in (([10, 20, 30, 40], 4), ([7], 3), ([1, 2, 3, 1, 2, 3, 1, 2], 1)):
        assert_same_as_plain(llama, prompt, 50, drafter, k=k)
    for max_gen_len in (1, 2, 7):
        assert_same_as_plain(llama, [5, 6, 7], max_gen_len, drafter, k=4)


def test_the_drafter_gets_the_models_features_of_exactly_the_accepted_positions(tiny_llama, random_head):
    llama = tiny_llama(seed=1, max_seq_len=96, max_batch_size=1)
    drafter = EagleDrafter(random_head(llama), llama)
    prompt = [3, 1, 4, 1, 5]
    tokens, _, stats = speculative_generate(llama, [prompt], 30, drafter, k=4)
    text = prompt + tokens[0]
    fresh = tiny_llama(seed=1, max_seq_len=96, max_batch_size=1)
    with torch.inference_mode():
        _, want = forward_features(fresh.model, torch.tensor([text[:-1]]), 0, logits=False)
    assert drafter.n_real == len(text) - 1  # every fed, accepted token: all but the last
    torch.testing.assert_close(drafter.features[: len(text) - 1], want[0], rtol=1e-5, atol=1e-5)


def test_the_head_drafts_after_rejections_what_a_fresh_head_drafts_from_the_same_features(tiny_llama, random_head):
    # Its cache rewinds past the predicted pairs of a rejected chain: a drafter that went through any history
    # proposes what a new one proposes given the same features in one go.
    llama = tiny_llama(seed=0, max_seq_len=64, max_batch_size=1)
    path = random_head(llama, seed=2)
    drafter, g = EagleDrafter(path, llama), torch.Generator().manual_seed(0)
    features = torch.randn(40, 64, generator=g)
    tokens = [int(t) for t in torch.randint(0, 256, (40,), generator=g)]
    length = 3
    drafter.observe_features(0, features[: length - 1])
    for n_accepted in (0, 2, 4, 1, 3, 0):
        drafts = drafter.propose(tokens[:length], 4)
        fresh = EagleDrafter(path, llama)
        fresh.observe_features(0, features[: length - 1])
        assert drafts == fresh.propose(tokens[:length], 4)
        # Between calls the cache holds the real pairs (feature, next token) of positions 0 .. length - 2.
        ours, theirs = (d.head.layers[0].attention.cache_k[0, :, : length - 1] for d in (drafter, fresh))
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        drafter.observe_features(length - 1, features[length - 1 : length + n_accepted])
        length += n_accepted + 1


def test_the_lean_drafting_step_computes_what_the_heads_modules_compute(tiny_llama, random_head):
    llama = tiny_llama(seed=0, max_seq_len=64, max_batch_size=1)
    path = random_head(llama, seed=3)
    g = torch.Generator().manual_seed(1)
    features, tokens = torch.randn(20, 64, generator=g), [int(t) for t in torch.randint(0, 256, (20,), generator=g)]
    lean, modules = EagleDrafter(path, llama), EagleDrafter(path, llama, fast=False)
    assert lean.lean and not modules.lean
    for drafter in (lean, modules):
        drafter.observe_features(0, features[:9])
    assert lean.propose(tokens[:10], 6) == modules.propose(tokens[:10], 6)
    # Both caches now hold the 9 real pairs and the chain's 5 predicted ones.
    ours, theirs = (d.head.layers[0].attention.cache_k[0, :, :14] for d in (lean, modules))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


# ---- lossless: sampling ----


def test_sampling_with_the_heads_drafts_draws_from_plain_samplings_distribution(tiny_vocab_llama, tmp_path,
                                                                                monkeypatch):
    llama = tiny_vocab_llama
    drafter = EagleDrafter(write_random_head(tmp_path, head_params(llama), seed=1, std=1.0), llama)
    expected = expected_joint(llama, 3)
    drafted: List[int] = []
    propose = drafter.propose
    monkeypatch.setattr(drafter, "propose", lambda tokens, k: drafted.append(len(d := propose(tokens, k))) or d)
    assert chi_square_p_value(llama, expected, 2000, drafter) > 1e-3
    assert sum(drafted) > 2000  # it drafted (mostly 2 a pass after the first)
    monkeypatch.setattr(verify, "accept_point_mass", always_accept)  # a biased rule fails with these drafts
    assert chi_square_p_value(llama, expected, 500, drafter) < 1e-3


# ---- the shipped head of the demo model ----


@pytest.fixture(scope="module")
def demo() -> Llama:
    return build_demo(max_seq_len=256, max_batch_size=1, device="cpu")


def test_the_demo_head_drafts_losslessly_and_is_accepted_often(demo):
    drafter = EagleDrafter(HEAD_DIR, demo)
    lengths = []
    for text in AUSTEN_PROMPTS:
        prompt = demo.tokenizer.encode(text, bos=True, eos=False)
        stats = assert_same_as_plain(demo, prompt, 48, drafter, k=4)
        lengths.append(stats.mean_accepted_length)
        assert stats.mean_accepted_length > 1.5, stats.summary()  # (a random head: about 1.0)
    assert sum(lengths) / len(lengths) > 1.9, lengths  # the shipped head: 2.53, 2.09 and 1.85 here
    spec = Speculation(EagleDrafter(HEAD_DIR, demo, min_confidence=0.3), k=4)  # through Llama.generate
    want = demo.generate([prompt], 40, temperature=0)[0]
    assert demo.generate([prompt], 40, temperature=0, speculative=spec)[0] == want
    assert spec.stats.drafted < 4 * spec.stats.steps  # chains ended early where the head was unsure


def test_the_demo_head_files_are_meta_like_and_checksummed():
    params = json.loads((HEAD_DIR / "params.json").read_text())
    assert set(params) <= {"dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of", "ffn_dim_multiplier",
                           "norm_eps", "rope_theta", "vocab_size"}
    demo_params = json.loads((REPO / "models" / "demo" / "params.json").read_text())
    assert (params["dim"], params["vocab_size"]) == (demo_params["dim"], demo_params["vocab_size"])
    state = torch.load(HEAD_DIR / "consolidated.00.pth", map_location="cpu", weights_only=True)
    assert all(t.dtype == torch.bfloat16 for t in state.values())
    assert "fc.weight" in state and "layers.0.attention.wq.weight" in state
    assert not any(name.startswith(("output", "tok_embeddings", "norm")) for name in state)  # the model's, reused
    assert (HEAD_DIR / "consolidated.00.pth").stat().st_size < 5e6
    for line in (HEAD_DIR / "checklist.chk").read_text().splitlines():
        md5, name = line.split()
        assert hashlib.md5((HEAD_DIR / name).read_bytes()).hexdigest() == md5, name


# ---- bad input ----


def test_a_head_for_another_model_is_refused_naming_both_shapes(tiny_llama, random_head):
    llama = tiny_llama(seed=0, max_seq_len=64, max_batch_size=1)
    other = tiny_llama(dict(SMALL_GQA, dim=32), seed=0, max_seq_len=64, max_batch_size=1)
    path = random_head(other)
    with pytest.raises(ValueError, match=r"model with \{'dim': 32, 'vocab_size': 512\}.*has \{'dim': 64"):
        EagleDrafter(path, llama)
    wrong_vocab = random_head(llama, seed=1, vocab_size=1000)
    with pytest.raises(ValueError, match="'vocab_size': 1000"):
        load_head(wrong_vocab, llama)


def test_missing_damaged_or_misshapen_head_files_are_refused(tiny_llama, random_head, tmp_path):
    llama = tiny_llama(seed=0, max_seq_len=64, max_batch_size=1)
    with pytest.raises(FileNotFoundError, match="missing consolidated.00.pth, params.json"):
        load_head(tmp_path / "nothing", llama)
    path = random_head(llama)
    md5 = hashlib.md5((path / "consolidated.00.pth").read_bytes()).hexdigest()
    (path / "checklist.chk").write_text(f"{md5[::-1]}  consolidated.00.pth\n")
    with pytest.raises(ValueError, match="consolidated.00.pth is damaged"):
        load_head(path, llama)
    (path / "checklist.chk").write_text(f"{md5}  consolidated.00.pth\n")
    load_head(path, llama)  # the right sum loads
    params = json.loads((path / "params.json").read_text())
    (path / "params.json").write_text(json.dumps(dict(params, n_heads=4, n_kv_heads=4)))
    (path / "checklist.chk").unlink()
    with pytest.raises(ValueError, match="do not fit its params.json"):
        load_head(path, llama)


def test_the_drafter_refuses_another_model_and_drafting_without_features(tiny_llama, random_head):
    llama = tiny_llama(seed=0, max_seq_len=64, max_batch_size=1)
    twin = tiny_llama(seed=0, max_seq_len=64, max_batch_size=1)
    drafter = EagleDrafter(random_head(llama), llama)
    with pytest.raises(ValueError, match="drafts for another Llama"):
        speculative_generate(twin, [[1, 2, 3]], 8, drafter)
    with pytest.raises(ValueError, match="features of 0 positions, 2 needed"):
        drafter.propose([1, 2, 3], 4)
    with pytest.raises(TypeError, match="drafts for a Llama"):
        EagleDrafter(random_head(llama), object())
