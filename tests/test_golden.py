"""Golden outputs: engines that compute the same numbers pass, engines broken on purpose fail, and the report
points at the position and the cause.

The tiny model has its embeddings at the scale of real checkpoints (std 0.02 instead of 1), so that the
RMSNorm epsilon matters as much as it does in Llama. Broken engines are Hugging Face transformers'
LlamaForCausalLM on the same weights, built wrong the ways real conversions go wrong, or this package with
a tokenizer that lacks one merge; the reference's numbers never come from the engine under test.
"""

import json
from pathlib import Path

import pytest
import torch

from hf_reference import hf_model, permute_for_hf
from helpers import SMALL_GQA, random_state_dict, write_byte_tokenizer, write_checkpoint
from llama import Llama
from llama.golden import Golden, OursEngine, Prompt, Tolerances, assert_matches, check, compare, load_golden, record
from llama.golden.adapters import HFEngine
from llama.golden.record import make_header

PARAMS = dict(SMALL_GQA, vocab_size=512)
SETTINGS = {"max_new_tokens": 10, "top_k": 5, "max_seq_len": 64}
PROMPTS = [
    Prompt("text", "text", "The quick brown fox"),
    Prompt("scored", "text", "Hello", continuation=" world, again"),
    Prompt("dialog", "dialog", [{"role": "user", "content": "Hi there"}]),
    Prompt("tokens", "tokens", [256, 40, 41, 42, 43, 44, 45, 46]),
]


def tiny_state_dict():
    sd = random_state_dict(PARAMS, seed=7)
    sd["tok_embeddings.weight"] = sd["tok_embeddings.weight"] * 0.02
    return sd


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("golden")
    sd = tiny_state_dict()
    write_checkpoint(d / "ckpt", PARAMS, sd=sd)
    tok = write_byte_tokenizer(d / "tokenizer.model")
    return d, sd, str(tok)


def ours(tiny, dtype=torch.float32) -> OursEngine:
    d, _, tok = tiny
    llama = Llama.build(str(d / "ckpt"), tok, max_seq_len=SETTINGS["max_seq_len"], max_batch_size=1,
                        device="cpu", dtype=dtype)
    return OursEngine(llama, {"ckpt_dir": str(d / "ckpt")})


def record_golden(tiny, out: Path, dtype=torch.float32) -> Golden:
    d, _, tok = tiny
    engine = ours(tiny, dtype)
    header = make_header(engine, SETTINGS, str(d / "ckpt"), tok)
    return record(engine, PROMPTS, out, header, progress=None)


@pytest.fixture(scope="module")
def golden32(tiny, tmp_path_factory) -> Golden:
    return record_golden(tiny, tmp_path_factory.mktemp("g32") / "golden.jsonl")


def hf_engine(tiny, params=None, sd=None, engine_class=HFEngine, stop_ids=None) -> HFEngine:
    _, tiny_sd, tok = tiny
    model = hf_model(dict(PARAMS, **(params or {})), sd if sd is not None else tiny_sd)
    from llama import Tokenizer

    return engine_class(model, Tokenizer(tok).stop_tokens if stop_ids is None else stop_ids)


# ---- passing engines ----------------------------------------------------------------------------------


def test_a_second_recording_of_the_same_model_passes_with_identical_numbers(tiny, golden32, tmp_path):
    again = record_golden(tiny, tmp_path / "again.jsonl.gz")
    report = compare(golden32, again)
    assert report.passed, report.table()
    assert all(p.max_dlogprob == 0 and p.verdict == "pass" for p in report.prompts)
    assert load_golden(tmp_path / "again.jsonl.gz").records[1].scored.ids[-1] == ord("n")  # "...again"


def test_ours_in_bf16_passes_against_ours_in_bf16_and_against_the_fp32_golden(tiny, golden32, tmp_path):
    golden16 = record_golden(tiny, tmp_path / "bf16.jsonl", torch.bfloat16)
    assert golden16.header["dtype"] == "bfloat16"
    assert compare(golden16, record_golden(tiny, tmp_path / "bf16b.jsonl", torch.bfloat16)).passed
    report = compare(golden32, golden16)  # defaults: the looser dtype's tolerances
    assert "bfloat16" in report.tolerance_source
    assert report.passed, report.table()
    assert max(p.max_dlogprob for p in report.prompts) > 1e-3  # bf16 really is looser than fp32 ...
    strict = compare(golden32, golden16, tolerances=Tolerances(1e-3, 1e-4, 1e-3))
    assert not strict.passed  # ... so fp32 tolerances would (rightly) reject it


def test_transformers_on_the_same_weights_passes(tiny, golden32):
    report = check(golden32, hf_engine(tiny))
    assert report.passed, report.table()
    assert all(p.verdict == "pass" and p.prompt_ids_match is None or p.prompt_ids_match for p in report.prompts)
    assert max(p.max_dlogprob for p in report.prompts) < 1e-4
    assert all(p.topk_overlap == 1.0 for p in report.prompts)


# ---- broken engines: caught, at the right place, with the right cause -----------------------------------


def test_rope_base_off_fails_from_position_2_as_a_position_dependent_difference(tiny, golden32):
    report = check(golden32, hf_engine(tiny, params={"rope_theta": 10000.0}))
    assert not report.passed
    for p in report.failed:
        # Position 1 is predicted from one token at position 0, where RoPE rotates nothing: it agrees.
        where, position = p.first_over.split()
        assert where == "scored" and int(position) >= 2 and "position-dependent" in p.cause, p.cause


def test_missed_q_k_permutation_fails_as_a_position_dependent_difference(tiny, golden32):
    _, sd, _ = tiny
    n_kv = PARAMS["n_kv_heads"]

    def unpermute(w, heads):  # hf_model permutes again: the HF model ends up with Meta's row order
        out, dim = w.shape
        return w.view(heads, 2, out // heads // 2, dim).transpose(1, 2).reshape(out, dim)

    broken = dict(sd)
    for i in range(PARAMS["n_layers"]):
        broken[f"layers.{i}.attention.wq.weight"] = unpermute(sd[f"layers.{i}.attention.wq.weight"], 8)
        broken[f"layers.{i}.attention.wk.weight"] = unpermute(sd[f"layers.{i}.attention.wk.weight"], n_kv)
    assert torch.equal(permute_for_hf(broken["layers.0.attention.wk.weight"], n_kv), sd["layers.0.attention.wk.weight"])
    report = check(golden32, hf_engine(tiny, sd=broken))
    assert not report.passed
    scored_failures = [p for p in report.failed if p.first_over and p.first_over.startswith("scored")]
    assert scored_failures
    for p in scored_failures:
        assert int(p.first_over.split()[1]) >= 2 and "RoPE" in p.cause, p.cause


def test_rmsnorm_epsilon_changed_fails_at_position_1_as_a_position_independent_difference(tiny, golden32):
    report = check(golden32, hf_engine(tiny, params={"norm_eps": 1e-6}))
    assert not report.passed
    for p in report.failed:
        assert p.first_over == "scored 1" and "does not depend on position" in p.cause, p.cause


class OffByOneDecode(HFEngine):
    """Rotates each generated token one position too far (the prompt's positions are right)."""

    def decode_position(self, n_past: int) -> int:
        return n_past + 1


def test_decode_positions_off_by_one_fail_at_the_second_generated_token_as_the_decode_path(tiny, golden32):
    report = check(golden32, hf_engine(tiny, engine_class=OffByOneDecode))
    assert not report.passed
    assert {p.id for p in report.failed} == {p.id for p in golden32.records}
    for p in report.failed:
        assert p.max_dlogprob is not None
        # Teacher forcing (one prefill) agrees; step 0 comes from the prefill too; step 1 is the first decode.
        assert p.first_over == "greedy 1" or (p.parting == "disagreement" and p.greedy_parts_at == 1), p
        if p.first_over == "greedy 1":
            assert "decode path" in p.cause


# ---- the near-tie rule ---------------------------------------------------------------------------------


def synthetic(gap: float, other_delta: float, choose_second: bool):
    """A reference that at step 2 prefers token 11 over token 12 by `gap`, and another engine whose logprobs
    there are off by `other_delta` and which takes token 12 when `choose_second`."""
    from llama.golden import Record, Sequence

    def seq(lp11, lp12):
        return Sequence(ids=[5, 6, 11 if lp11 >= lp12 else 12], logprobs=[-0.5, -0.7, max(lp11, lp12)],
                        top_ids=[[5, 7], [6, 8], [11, 12] if lp11 >= lp12 else [12, 11]],
                        top_logprobs=[[-0.5, -2.0], [-0.7, -2.2], sorted([lp11, lp12], reverse=True)],
                        stop_reason="length")

    ref = Record(id="p", prompt={"tokens": [1, 2]}, prompt_ids=[1, 2], greedy=seq(-1.0, -1.0 - gap))
    lp11, lp12 = -1.0 - other_delta, -1.0 - gap + other_delta
    if not choose_second:
        lp12 = -1.0 - gap - other_delta
    other = Record(id="p", prompt={}, prompt_ids=[1, 2], greedy=seq(lp11, lp12))
    header = {"dtype": "bfloat16"}
    return Golden(header, [ref]), Golden(header, [other])


def test_a_bf16_near_tie_is_reported_as_a_near_tie_and_passes():
    ref, other = synthetic(gap=0.03, other_delta=0.02, choose_second=True)
    report = compare(ref, other)
    p = report.prompts[0]
    assert report.passed and p.verdict == "near-tie" and p.parting == "near-tie"
    assert p.greedy_parts_at == 2 and p.ref_gap == pytest.approx(0.03)
    assert "near-tie" in report.table()


def test_a_logit_bug_of_similar_size_where_the_reference_is_sure_is_not_excused():
    # bf16 defaults: tie 0.25, logprob 0.5. The bug moves two logprobs by 0.2 each: inside the logprob
    # tolerance, like bf16 noise, but enough to flip a choice the reference made by 0.35.
    ref, other = synthetic(gap=0.35, other_delta=0.2, choose_second=True)
    report = compare(ref, other)
    p = report.prompts[0]
    assert p.max_dlogprob < report.tolerances.logprob  # the logprobs alone would not catch it
    assert not report.passed and p.parting == "disagreement" and p.greedy_parts_at == 2
    assert "parts at step 2" in p.cause and "prefers 11 by 0.35" in p.cause


def test_wrong_stop_token_fails_where_the_reference_stops(tiny, golden32):
    from llama.golden import Record, Sequence

    # The tiny model never picks a stop token on its own: stand in an engine record for one prompt.
    ref = golden32.records[0]
    stop = sorted(golden32.header["stop_ids"])[0]
    g = ref.greedy
    stopped = Record(ref.id, ref.prompt, ref.prompt_ids,
                     greedy=Sequence(g.ids[:3] + [stop], g.logprobs[:3] + [-0.1], stop_reason="stop_token"))
    went_on = Record(ref.id, ref.prompt, ref.prompt_ids,
                     greedy=Sequence(g.ids[:3] + [stop] + [65, 66], g.logprobs[:3] + [-0.1, -1, -1],
                                     stop_reason="length"))
    report = compare(Golden(golden32.header, [stopped]), Golden({}, [went_on]))
    p = report.prompts[0]
    assert not report.passed and p.parting == "stop" and p.greedy_parts_at == 4
    assert p.cause.startswith("stop tokens: the reference stops at step 3")
    # The other way round: the other engine stops on a token the reference does not stop on.
    report = compare(Golden(golden32.header, [went_on]), Golden({}, [stopped]))
    assert not report.passed and report.prompts[0].parting == "stop"
    # An engine that leaves the stop token out of its ids, and says it stopped, agrees.
    without = Record(ref.id, ref.prompt, ref.prompt_ids,
                     greedy=Sequence(g.ids[:3], g.logprobs[:3], stop_reason="stop_token"))
    assert compare(Golden(golden32.header, [stopped]), Golden({}, [without])).passed


# ---- the API for other test suites --------------------------------------------------------------------


def test_assert_matches_raises_with_the_readable_report(tiny, golden32, tmp_path):
    path = tmp_path / "rope.jsonl"
    from llama.golden import run_engine

    broken = run_engine(hf_engine(tiny, params={"rope_theta": 10000.0}), golden32)
    with path.open("w") as f:
        f.write(json.dumps({"format": "llama-golden", "version": 1, "dtype": "float32"}) + "\n")
        for r in broken.records:
            f.write(json.dumps(r.to_json()) + "\n")
    with pytest.raises(AssertionError) as caught:
        assert_matches(golden32.path, str(path))
    message = str(caught.value)
    assert "FAIL" in message and "position-dependent" in message and "text" in message
    assert assert_matches(golden32, golden32).passed


# ---- the demo model and its bundled goldens -------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "models" / "demo"
BUNDLED = {dtype: ROOT / "models" / "demo-golden" / f"demo-{dtype}.jsonl.gz" for dtype in ("float32", "bfloat16")}


def subset(golden: Golden, ids) -> Golden:
    return Golden(golden.header, [r for r in golden.records if r.id in ids], golden.path)


@pytest.fixture(scope="module")
def demo_hf():
    """transformers' LlamaForCausalLM on the demo model's weights (converted by the tests' own code)."""
    params = json.loads((DEMO / "params.json").read_text())
    sd = torch.load(DEMO / "consolidated.00.pth", map_location="cpu", weights_only=True)
    return hf_model(params, {k: v.float() for k, v in sd.items()}, max_positions=512)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_bundled_goldens_are_what_this_package_computes(dtype):
    golden = load_golden(BUNDLED[dtype])
    assert golden.header["dtype"] == dtype and golden.header["files"]["md5_source"] == "checklist.chk"
    kinds = {next(iter(r.prompt)) for r in golden.records}
    assert kinds == {"text", "dialog", "tokens"} and max(len(r.prompt_ids) for r in golden.records) > 400
    engine = OursEngine.build(str(DEMO), max_seq_len=golden.header["settings"]["max_seq_len"], device="cpu",
                              dtype=getattr(torch, dtype))
    report = assert_matches(golden, engine)  # within the dtype's tolerances: another CPU rounds differently
    if dtype == "float32":
        assert max(p.max_dlogprob for p in report.prompts) < 1e-4, report.table()


def test_transformers_on_the_demo_weights_passes_the_bundled_fp32_golden(demo_hf):
    golden = load_golden(BUNDLED["float32"])
    report = assert_matches(golden, HFEngine(demo_hf, set(golden.header["stop_ids"])))
    assert all(p.verdict == "pass" for p in report.prompts)
    assert max(p.max_dlogprob for p in report.prompts) < 1e-4


def test_transformers_in_bf16_passes_the_bundled_bf16_golden(demo_hf, tmp_path):
    demo_hf.save_pretrained(tmp_path / "hf")
    golden = load_golden(BUNDLED["bfloat16"])
    engine = HFEngine.from_pretrained(str(tmp_path / "hf"), set(golden.header["stop_ids"]), dtype=torch.bfloat16)
    report = assert_matches(golden, engine)
    assert "bfloat16" in report.tolerance_source
    assert max(p.max_dlogprob for p in report.prompts) > 1e-3  # two bf16 engines round differently


def test_rope_frequencies_rounded_to_bf16_fail_on_the_long_prompt_as_position_dependent(demo_hf):
    import copy

    # model.to(bfloat16) also casts transformers' RoPE inv_freq buffer: the angles go wrong as positions
    # grow, which only the long prompt reaches (from_pretrained(dtype=...) keeps the buffer in float32).
    golden = load_golden(BUNDLED["bfloat16"])
    engine = HFEngine(copy.deepcopy(demo_hf).to(torch.bfloat16), set(golden.header["stop_ids"]))
    report = check(golden, engine)
    p = {p.id: p for p in report.prompts}["text-long"]
    assert not report.passed and p.verdict == "FAIL"
    assert "position-dependent" in p.cause and int(p.first_over.split()[1]) > 100, p.cause


def test_the_epsilon_of_llama_2_chat_copies_is_caught_on_the_demo_model_as_position_independent():
    # 1e-6 instead of 1e-5, as some Llama 2 chat copies ship it: it moves logprobs by about 1e-3.
    params = dict(json.loads((DEMO / "params.json").read_text()), norm_eps=1e-6)
    sd = torch.load(DEMO / "consolidated.00.pth", map_location="cpu", weights_only=True)
    golden = load_golden(BUNDLED["float32"])
    report = check(golden, HFEngine(hf_model(params, {k: v.float() for k, v in sd.items()}, max_positions=512),
                                    set(golden.header["stop_ids"])))
    assert len(report.failed) == len(golden.records)
    for p in report.failed:
        assert "position 1 already differs" in p.cause and "does not depend on position" in p.cause, p.cause


def test_bf16_against_the_fp32_golden_passes_on_near_ties_that_fp32_tolerances_reject():
    fp32, bf16 = load_golden(BUNDLED["float32"]), load_golden(BUNDLED["bfloat16"])
    report = compare(fp32, bf16)
    assert report.passed, report.table()
    ties = [p for p in report.prompts if p.verdict == "near-tie"]
    assert ties and all(p.ref_gap < 0.05 for p in ties)  # real bf16 near-ties of the demo model
    strict = compare(fp32, bf16, tolerances=Tolerances(1e-3, 1e-4, 1e-3))
    assert not strict.passed


def test_an_engine_that_misses_the_eot_stop_token_fails_where_the_reference_stops(demo_hf):
    golden = load_golden(BUNDLED["float32"])
    dialogs = subset(golden, {"dialog-two-turns"})
    eot = 4105  # <|eot_id|> of the demo tokenizer (4096 base tokens + 9)
    assert dialogs.records[0].greedy.ids[-1] == eot and dialogs.records[0].greedy.stop_reason == "stop_token"
    broken = HFEngine(demo_hf, set(golden.header["stop_ids"]) - {eot})
    report = check(dialogs, broken)
    p = report.prompts[0]
    assert not report.passed and p.parting == "stop"
    assert p.greedy_parts_at == len(dialogs.records[0].greedy.ids)
    assert "the reference stops at step" in p.cause and "4105" in p.cause


def test_a_tokenizer_that_lacks_a_merge_fails_at_the_first_prompt_id_it_changes(tmp_path):
    golden = subset(load_golden(BUNDLED["float32"]), {"text-bennet", "text-truth"})
    lines = (DEMO / "tokenizer.model").read_text().splitlines()
    bennet = __import__("base64").b64encode(b" Bennet").decode()
    junk = __import__("base64").b64encode(b"\x00\x01never-in-text").decode()
    lines = [line.replace(bennet + " ", junk + " ") if line.startswith(bennet + " ") else line for line in lines]
    (tmp_path / "tokenizer.model").write_text("\n".join(lines) + "\n")
    llama = Llama.build(str(DEMO), str(tmp_path / "tokenizer.model"), max_seq_len=512, max_batch_size=1,
                        device="cpu")
    report = check(golden, OursEngine(llama))
    by_id = {p.id: p for p in report.prompts}
    assert by_id["text-truth"].verdict == "pass"  # no " Bennet" in it: the same ids, the same numbers
    p = by_id["text-bennet"]
    assert p.verdict == "FAIL" and p.prompt_ids_part_at == 3  # <|begin_of_text|> Mr . [ Bennet]
    assert p.cause.startswith("tokenizer: prompt ids differ from position 3")
