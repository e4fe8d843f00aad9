"""The device-side speculative pass (llama.speculative.graph_pass): greedy tokens equal to plain decoding's,
and the same drafts, acceptances and passes as the general speculative loop, for prompt lookup (computed on
the device), the EAGLE-style head's chain and no drafts. On the CPU its stages run eagerly (use_graph_pass);
the CUDA tests (skipped without CUDA) replay it as one CUDA graph of compiled stages."""

import random
from typing import List

import pytest
import torch
import torch.nn.functional as F

from llama import Llama
from llama.cli.demo import DEMO_DIR, build_demo
from llama.speculative import Drafter, PromptLookup, speculative_generate
from llama.speculative.eagle import EagleDrafter
from llama.fast.layers import FastLinear
from llama.speculative.graph_pass import GraphPass, few_row_products, graph_pass_for, lookup_drafts, use_graph_pass
from llama.speculative.settings import eagle_draft_options

from test_eagle import head_params, write_random_head
from test_speculative import COPY_PROMPT, one_thread  # noqa: F401  (a fixture)

HEAD_DIR = DEMO_DIR.parent / "demo-eagle"
AUSTEN = ["Elizabeth could not help", "Mr. Darcy had walked away", "Emma Woodhouse, handsome, clever"]


def general_and_graph(llama: Llama, prompts: List[List[int]], max_gen_len: int, drafter: Drafter, k: int, **kw):
    """(tokens, stats as a dict) of the general loop, then of the graph pass, each row alone."""
    out = []
    for on in (False, True):
        use_graph_pass(llama, on)
        runs = [speculative_generate(llama, [p], max_gen_len, drafter, k, **kw) for p in prompts]
        out.append(([r[0][0] for r in runs], [r[2].as_dict() for r in runs]))
    use_graph_pass(llama, False)
    return out


def assert_plain_and_same_passes(llama: Llama, prompts: List[List[int]], max_gen_len: int, drafter: Drafter,
                                 k: int, **kw) -> None:
    (general, general_stats), (graph, graph_stats) = general_and_graph(llama, prompts, max_gen_len, drafter, k, **kw)
    for prompt, tokens in zip(prompts, graph):
        want = llama.generate([prompt], max_gen_len, temperature=0, **kw)[0][0]
        assert tokens == want
    assert graph == general
    assert graph_stats == general_stats  # the same drafts, accepted as often, in as many passes


def test_device_prompt_lookup_proposes_what_prompt_lookup_proposes():
    rng = random.Random(0)
    for trial in range(300):
        vocab = rng.choice([2, 3, 5, 50])
        text = [rng.randrange(vocab) for _ in range(rng.randrange(1, 40))]
        k = rng.randrange(1, 7)
        max_ngram = rng.randrange(1, 5)
        min_ngram = rng.randrange(1, max_ngram + 1)
        history = torch.tensor(text + [rng.randrange(vocab) for _ in range(20)])  # junk past the text's end
        drafts, valid = lookup_drafts(history, torch.tensor([len(text)]), k, max_ngram, min_ngram)
        want = PromptLookup(max_ngram, min_ngram).propose(text, k)
        n = int(valid.sum())
        assert valid.tolist() == [True] * n + [False] * (k - n), (text, k)
        assert drafts[:n].tolist() == want, (text, k, max_ngram, min_ngram)


@pytest.mark.parametrize("fast", [True])
def test_graph_pass_with_prompt_lookup_and_without_drafts_is_plain_decoding_on_random_models(tiny_llama, fast):
    llama = tiny_llama(seed=1, max_seq_len=96, max_batch_size=1, fast=fast)
    prompts = [[1, 2, 3, 1, 2, 3, 1, 2], [65, 66, 67, 68, 65, 66], [7], [9, 9]]
    for k in (1, 4):
        assert_plain_and_same_passes(llama, prompts, 60, PromptLookup(), k, ignore_eos=True)
    assert_plain_and_same_passes(llama, prompts, 40, Drafter(), 0, ignore_eos=True)


def test_graph_pass_with_a_random_eagle_head_drafts_its_chain_and_is_plain_decoding(tiny_llama, tmp_path):
    llama = tiny_llama(seed=0, max_seq_len=96, max_batch_size=1)
    for seed in (0, 1):
        drafter = EagleDrafter(write_random_head(tmp_path / f"h{seed}", head_params(llama), seed), llama)
        for k in (1, 3):
            assert_plain_and_same_passes(llama, [[1, 2, 3, 1, 2, 3, 1], [65, 66]], 50, drafter, k, ignore_eos=True)


def test_graph_pass_ends_rows_where_plain_decoding_ends_them(tiny_llama, monkeypatch):
    llama = tiny_llama(seed=0, max_seq_len=40, max_batch_size=1)
    prompt = [1, 2, 3, 1, 2, 3, 1, 2]
    # The end of the context (passes that no longer fit become plain steps) and max_gen_len within a pass.
    for max_gen_len in (3, 17, 64):
        assert_plain_and_same_passes(llama, [prompt], max_gen_len, PromptLookup(), 4, ignore_eos=True)
    # A stop token: one the model writes late (after lookup has begun to accept its repetitions).
    tokens = llama.generate([prompt], 30, temperature=0, ignore_eos=True)[0][0]
    stop = tokens[20]
    monkeypatch.setattr(llama.tokenizer, "stop_tokens", {stop})
    want = llama.generate([prompt], 30, temperature=0)[0][0]
    assert want == tokens[: tokens.index(stop)]
    assert_plain_and_same_passes(llama, [prompt], 30, PromptLookup(), 4)


def test_graph_pass_serves_stop_strings_and_streams_as_plain_decoding(tiny_llama):
    llama = tiny_llama(seed=0, max_seq_len=96, max_batch_size=2)
    prompts = ["abcabcabca", "xyzxy"]
    want = llama.text_completion(prompts, max_gen_len=30, temperature=0, stop=["c"])
    use_graph_pass(llama)
    got = llama.text_completion(prompts, max_gen_len=30, temperature=0, stop=["c"], speculative="lookup")
    use_graph_pass(llama, False)
    assert [c["generation"] for c in got] == [c["generation"] for c in want]


def test_graph_pass_is_used_only_where_it_is_exact(tiny_llama):
    llama = tiny_llama(seed=0, max_seq_len=32, max_batch_size=1)
    use_graph_pass(llama)
    try:
        assert isinstance(graph_pass_for(llama, PromptLookup(), 4, [1, 2, 3], True, True), GraphPass)
        assert graph_pass_for(llama, PromptLookup(), 4, [1, 2, 3], False, True) is None  # sampling
        assert graph_pass_for(llama, PromptLookup(), 4, [1, 2, 3], True, False) is None  # logprobs, processors
        assert graph_pass_for(llama, PromptLookup(), 4, list(range(30)), True, True) is None  # no room for a pass

        class Subclass(PromptLookup):  # may propose something else: the general loop runs it
            pass

        assert graph_pass_for(llama, Subclass(), 4, [1, 2, 3], True, True) is None
    finally:
        use_graph_pass(llama, False)
    assert graph_pass_for(llama, PromptLookup(), 4, [1, 2, 3], True, True) is None  # CPU, not asked for
    with pytest.raises(ValueError, match="drafts with prompt lookup"):
        GraphPass(llama, Subclass(), 4)
    with pytest.raises(ValueError, match="k must be"):
        GraphPass(llama, PromptLookup(), -1)


@pytest.mark.slow
def test_few_row_products_compute_the_products_while_traced_and_are_undone_after(tiny_llama, monkeypatch):
    monkeypatch.setattr("llama.generation.compiles_on_cpu", lambda model: False)  # compiled as on CUDA
    llama = tiny_llama(seed=0, max_seq_len=32, max_batch_size=1, compile=True)  # unpacked weights, as on CUDA
    layer = llama.model.layers[0].feed_forward.w13
    x = torch.randn(1, 5, layer.in_features)
    plain_forward = FastLinear.forward
    traced = torch.compile(lambda x: layer(x), backend="aot_eager", fullgraph=True)
    with few_row_products():
        got = traced(x)
        assert "sum" in str(torch._dynamo.explain(lambda x: layer(x))(x).graphs[0].graph)  # not a linear
    assert FastLinear.forward is plain_forward
    torch.testing.assert_close(got, F.linear(x, layer.weight), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def demo() -> Llama:
    return build_demo(max_seq_len=256, max_batch_size=1, device="cpu")


def test_graph_pass_on_the_demo_model_drafts_accepts_and_emits_as_the_general_loop(demo):
    eagle = EagleDrafter(HEAD_DIR, demo, **eagle_draft_options(HEAD_DIR))
    prompts = [demo.tokenizer.encode(t, bos=True, eos=False) for t in AUSTEN + [COPY_PROMPT]]
    assert_plain_and_same_passes(demo, prompts, 40, eagle, 4, ignore_eos=True)
    assert_plain_and_same_passes(demo, prompts[-1:], 40, PromptLookup(), 4, ignore_eos=True)


# ---- CUDA: the captured graph of compiled stages ----

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.slow
def test_captured_graph_pass_on_cuda_is_plain_decoding_with_the_general_loops_passes(monkeypatch):
    from llama.fast import step
    from llama.speculative import verify_step

    # CUDA graphs without max_autotune: tuning every shape of the demo takes minutes, and changes no token.
    for module in (step, verify_step):
        monkeypatch.setattr(module, "compile_options", lambda: {"triton.cudagraphs": True})
    llama = Llama.build(str(DEMO_DIR), None, max_seq_len=256, max_batch_size=1, device="cuda", dtype="float32",
                        compile=True)
    eagle = EagleDrafter(HEAD_DIR, llama, **eagle_draft_options(HEAD_DIR))
    prompts = [llama.tokenizer.encode(t, bos=True, eos=False) for t in AUSTEN + [COPY_PROMPT]]
    for drafter, k in ((eagle, 4), (PromptLookup(), 4), (Drafter(), 0)):
        for prompt in prompts:
            want = llama.generate([prompt], 48, temperature=0, ignore_eos=True)[0][0]
            tokens = speculative_generate(llama, [prompt], 48, drafter, k, ignore_eos=True)[0]
            assert graph_pass_for(llama, drafter, k, prompt, True, True).graph is not None
            assert tokens[0] == want
