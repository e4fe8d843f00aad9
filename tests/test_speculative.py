"""Speculative decoding (llama.speculative) gives the model's own output: greedy tokens and logprobs equal to
plain decoding's (Llama.generate, temperature 0) whatever the drafter proposes, and with sampling the
distribution of plain sampling (a chi-square test that a biased acceptance rule fails)."""

import json
import shutil
from typing import Dict, List, Sequence

import pytest
import torch

from helpers import SMALL_GQA, random_state_dict, write_byte_tokenizer
from llama import Llama
from llama.cli.demo import DEMO_DIR, build_demo
from llama.distributed import init_distributed
from llama.model import ModelArgs, Transformer
from llama.speculative import DraftModel, Drafter, PromptLookup, Speculation, speculative_generate
from llama.speculative import verify
from llama.tokenizer import Tokenizer

LOGPROB_TOL = 1e-5
SMALL_DRAFT = dict(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, multiple_of=32, norm_eps=1e-5, rope_theta=500000.0)

PASSAGE = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want"
    " of a wife. However little known the feelings or views of such a man may be on his first entering a"
    " neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is"
    " considered as the rightful property of some one or other of their daughters."
)
SENTENCE = PASSAGE[: PASSAGE.index(".") + 1]
COPY_PROMPT = f"{SENTENCE}\n{SENTENCE}\n{SENTENCE}\n{SENTENCE[:13]}"  # the sentence thrice, then its start
AUSTEN_PROMPTS = ["Elizabeth could not help", "Mr. Darcy had walked away", "Emma Woodhouse, handsome, clever"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tests run thousands of forward passes of a few rows on tiny models: there a second thread costs
    more in synchronisation than it saves (10x more on a busy machine). Plain and speculative decoding run
    alike either way."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Oracle(Drafter):
    """Proposes a known continuation: every draft right until `sequence` ends."""

    def __init__(self, sequence: Sequence[int]):
        self.sequence = list(sequence)

    def propose(self, tokens: Sequence[int], k: int) -> List[int]:
        assert list(tokens) == self.sequence[: len(tokens)], "the oracle was asked about text it did not write"
        return self.sequence[len(tokens) : len(tokens) + k]


class Wrong(Drafter):
    """Proposes k tokens the model never chooses (each one off the oracle's): every draft is rejected."""

    def __init__(self, sequence: Sequence[int], vocab_size: int):
        self.sequence, self.vocab_size = list(sequence), vocab_size

    def propose(self, tokens: Sequence[int], k: int) -> List[int]:
        right = self.sequence[len(tokens) : len(tokens) + k]
        return [(t + 1) % self.vocab_size for t in right]


def plain(llama: Llama, prompt: List[int], max_gen_len: int, **kw) -> tuple:
    tokens, logprobs = llama.generate([prompt], max_gen_len, temperature=0, logprobs=True, **kw)
    return tokens[0], logprobs[0]


def assert_same_as_plain(llama: Llama, prompt: List[int], max_gen_len: int, drafter: Drafter, k: int = 4, **kw):
    want_tokens, want_logprobs = plain(llama, prompt, max_gen_len, **kw)
    tokens, logprobs, stats = speculative_generate(llama, [prompt], max_gen_len, drafter, k, logprobs=True, **kw)
    assert tokens[0] == want_tokens
    assert len(logprobs[0]) == len(want_logprobs)
    assert max((abs(a - b) for a, b in zip(logprobs[0], want_logprobs)), default=0.0) <= LOGPROB_TOL
    return stats


# ---- greedy: token for token plain decoding, on random tiny models ----


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_greedy_prompt_lookup_gives_plain_decodings_tokens_and_logprobs(tiny_llama, seed, fast):
    llama = tiny_llama(seed=seed, max_seq_len=96, max_batch_size=1, fast=fast)
    for prompt in ([1, 2, 3, 1, 2, 3, 1, 2], [65, 66, 67, 68, 65, 66], [7]):
        assert_same_as_plain(llama, prompt, 60, PromptLookup(), k=4)


def test_greedy_with_a_draft_model_gives_plain_decodings_tokens_and_logprobs(tiny_llama):
    llama = tiny_llama(seed=0, max_seq_len=96, max_batch_size=1)
    draft = tiny_llama(SMALL_DRAFT, seed=5, max_seq_len=96, max_batch_size=1)
    for k in (1, 3, 6):
        assert_same_as_plain(llama, [10, 20, 30, 40], 50, DraftModel(draft), k=k)


def test_a_draft_model_identical_to_the_target_has_every_draft_accepted(tiny_llama):
    # The draft model's cache must follow the accepted text exactly (rewinding past rejected drafts):
    # any slip and its proposals would stop being the target's own greedy tokens.
    llama = tiny_llama(seed=0, max_seq_len=96, max_batch_size=1)
    twin = tiny_llama(seed=0, max_seq_len=96, max_batch_size=1)
    stats = assert_same_as_plain(llama, [10, 20, 30, 40], 50, DraftModel(twin), k=4)
    assert stats.acceptance_rate == 1.0
    assert stats.mean_accepted_length > 4.5  # 5 tokens a pass, but for the cut at max_gen_len


def test_a_draft_model_proposes_its_own_greedy_continuation_after_rejections(tiny_llama):
    # After a pass, the accepted text is the old text, some of the drafts and a token of the target's: the
    # draft model must rewind its cache past the rest and propose what plain greedy decoding of it gives.
    draft = tiny_llama(SMALL_DRAFT, seed=5, max_seq_len=96, max_batch_size=1)
    drafter = DraftModel(draft)

    def own_greedy(tokens: List[int], k: int) -> List[int]:
        return draft.generate([tokens], k, temperature=0, ignore_eos=True)[0][0]

    tokens = [10, 20, 30, 40]
    for n_accepted in (0, 2, 1, 4, 3, 0):
        drafts = drafter.propose(tokens, 4)
        assert drafts == own_greedy(tokens, 4)
        other = (drafts[n_accepted] + 1) % 512 if n_accepted < 4 else 7  # the target's token after them
        tokens = tokens + drafts[:n_accepted] + [other]
    assert drafter.propose([10, 20, 99], 3) == own_greedy([10, 20, 99], 3)  # another text: rewinds to 2


def test_rejected_drafts_leave_nothing_behind_every_draft_wrong(tiny_llama):
    llama = tiny_llama(seed=1, max_seq_len=96, max_batch_size=1)
    prompt = [3, 1, 4, 1, 5]
    want, _ = plain(llama, prompt, 40)
    stats = assert_same_as_plain(llama, prompt, 40, Wrong(prompt + want, llama.model.vocab_size), k=5)
    assert stats.accepted == 0 and stats.drafted > 0
    assert stats.steps == 40  # one token per pass: the model's own, after its drafts were all rejected


@pytest.mark.parametrize("fast", [True, False])
def test_cache_entries_of_rejected_positions_are_overwritten_before_they_are_read(tiny_llama, fast):
    # The rollback is only moving the position back: a pass at the rewound position writes its own keys and
    # values over the rejected ones before attending, and never reads past its own end.
    llama = tiny_llama(seed=2, max_seq_len=32, max_batch_size=1, fast=fast)
    model = llama.model
    prompt = torch.tensor([[5, 6, 7, 8]])
    model.forward(prompt, 0)
    model.forward(torch.tensor([[9, 100, 101, 102, 103]]), 4)  # a pass whose 4 drafts are then rejected
    after_rollback = model.forward(torch.tensor([[9, 11, 12]]), 4)  # resumes at position 5 (after 9)
    fresh = tiny_llama(seed=2, max_seq_len=32, max_batch_size=1, fast=fast)
    want = fresh.model.forward(torch.tensor([[5, 6, 7, 8, 9, 11, 12]]), 0)[:, 4:]
    torch.testing.assert_close(after_rollback, want, rtol=1e-5, atol=1e-5)


def test_an_oracle_drafter_is_accepted_at_every_position(tiny_llama):
    llama = tiny_llama(seed=0, max_seq_len=96, max_batch_size=1)
    prompt = [10, 20, 30, 40]  # (the model writes no stop token in its next 41)
    want, _ = plain(llama, prompt, 41)
    stats = assert_same_as_plain(llama, prompt, 41, Oracle(prompt + want), k=4)
    assert stats.steps == 9 and stats.mean_accepted_length == pytest.approx(41 / 9)
    assert stats.acceptance_by_position == [1.0, 1.0, 1.0, 1.0]


def test_stop_token_cuts_the_output_even_inside_a_run_of_accepted_drafts(tiny_llama, monkeypatch):
    llama = tiny_llama(seed=0, max_seq_len=96, max_batch_size=1)
    prompt = [10, 20, 30, 40]
    full, _ = plain(llama, prompt, 40)
    # Make the token the model writes 6th a stop token: an oracle drafts through it (drafts 3.. of a pass).
    stop = full[6]
    first = full.index(stop)
    monkeypatch.setattr(llama.tokenizer, "stop_tokens", {stop})
    want, _ = plain(llama, prompt, 40)
    assert want == full[:first]
    stats = assert_same_as_plain(llama, prompt, 40, Oracle(prompt + full), k=4)
    assert stats.steps == first // 5 + 1
    # With ignore_eos the stop token is kept and generation goes on, as in plain decoding.
    assert_same_as_plain(llama, prompt, 40, Oracle(prompt + full), k=4, ignore_eos=True)


@pytest.mark.parametrize("max_gen_len", [1, 2, 5, 9, 10])
def test_max_gen_len_and_max_seq_len_end_generation_where_plain_decoding_ends(tiny_llama, max_gen_len):
    llama = tiny_llama(seed=0, max_seq_len=24, max_batch_size=1)
    prompt = [1, 2, 3, 1, 2, 3]
    want, _ = plain(llama, prompt, 20)
    drafters = (PromptLookup(), Oracle(prompt + want), DraftModel(tiny_llama(SMALL_DRAFT, max_seq_len=24)))
    for drafter in drafters:
        assert_same_as_plain(llama, prompt, max_gen_len, drafter, k=4)
        assert_same_as_plain(llama, prompt, 30, drafter, k=4)  # max_seq_len (24) ends it first
    assert_same_as_plain(llama, list(range(1, 25)), 5, PromptLookup())  # the prompt fills the context


def test_k_zero_is_plain_decoding_one_token_per_pass(tiny_llama):
    llama = tiny_llama(seed=0, max_seq_len=64, max_batch_size=1)
    stats = assert_same_as_plain(llama, [4, 5, 6], 20, PromptLookup(), k=0)
    assert (stats.steps, stats.drafted, stats.mean_accepted_length) == (20, 0, 1.0)


def test_llama_generate_takes_speculative_settings_and_keeps_its_stats(tiny_llama):
    llama = tiny_llama(seed=0, max_seq_len=64, max_batch_size=1)
    want = llama.generate([[1, 2, 3, 1, 2]], 30, temperature=0, logprobs=True)
    spec = Speculation(PromptLookup(), k=3)
    got = llama.generate([[1, 2, 3, 1, 2]], 30, temperature=0, logprobs=True, speculative=spec)
    assert got[0] == want[0]
    assert max(abs(a - b) for a, b in zip(got[1][0], want[1][0])) <= LOGPROB_TOL
    assert spec.stats is not None and spec.stats.k == 3 and spec.stats.steps >= 1


# ---- bad input ----


def test_bad_k_and_drafter_are_refused(tiny_llama):
    llama = tiny_llama(seed=0)
    with pytest.raises(ValueError, match="k .* >= 0, got -1"):
        speculative_generate(llama, [[1, 2]], 8, PromptLookup(), k=-1)
    with pytest.raises(TypeError, match="propose"):
        speculative_generate(llama, [[1, 2]], 8, object())

    class OutOfVocab(Drafter):
        def propose(self, tokens, k):
            return [10**6]

    with pytest.raises(ValueError, match=r"proposed token ids \[1000000\] outside the vocabulary"):
        speculative_generate(llama, [[1, 2]], 8, OutOfVocab())


def test_a_draft_model_with_another_vocabulary_is_refused(tiny_llama):
    llama = tiny_llama(seed=0)
    other = tiny_llama(dict(SMALL_DRAFT, vocab_size=-1), tokenizer="sentencepiece")
    with pytest.raises(ValueError, match="vocab_size=320, the target 512"):
        speculative_generate(llama, [[1, 2]], 8, DraftModel(other))


# ---- prompt lookup ----


def test_prompt_lookup_proposes_what_followed_the_latest_match_of_the_longest_ngram():
    lookup = PromptLookup()
    # "1 2 3" occurs twice before the end: the later occurrence wins.
    assert lookup.propose([1, 2, 3, 4, 5, 9, 1, 2, 3, 7, 8, 0, 1, 2, 3], 3) == [7, 8, 0]
    # No 3-gram match; the 2-gram "2 3" matches, the 1-gram "3" later would not be tried.
    assert lookup.propose([2, 3, 6, 6, 3, 9, 2, 3], 2) == [6, 6]
    assert lookup.propose([5, 1, 6, 1], 4) == [6, 1]  # 1-gram; the continuation is cut at the end
    assert lookup.propose([1, 2, 3, 4], 4) == []  # nothing repeats
    assert lookup.propose([7], 4) == []
    assert PromptLookup(max_ngram=1).propose([1, 2, 3, 9, 1, 2, 3], 2) == [9, 1]  # "3": its latest match


def test_prompt_lookup_refuses_bad_ngram_sizes():
    with pytest.raises(ValueError, match="min_ngram=3 is more than max_ngram=2"):
        PromptLookup(max_ngram=2, min_ngram=3)
    with pytest.raises(ValueError, match="max_ngram must be an integer >= 1, got 0"):
        PromptLookup(max_ngram=0)


# ---- the demo model: real text ----


@pytest.fixture(scope="module")
def demo() -> Llama:
    return build_demo(max_seq_len=256, max_batch_size=1, device="cpu")


@pytest.fixture(scope="module")
def demo_first_and_last_layers(tmp_path_factory) -> Llama:
    """The demo model's first and last of its 6 layers (with its embedding, final norm and output): a draft
    model that agrees with it at times (1.2 to 1.4 tokens a pass), in Meta's layout, loaded by Llama.build."""
    out = tmp_path_factory.mktemp("demo_first_and_last_layers")
    params = json.loads((DEMO_DIR / "params.json").read_text())
    params["n_layers"] = 2
    (out / "params.json").write_text(json.dumps(params))
    state = torch.load(DEMO_DIR / "consolidated.00.pth", map_location="cpu", weights_only=True)
    kept = {k: v for k, v in state.items() if not k.startswith("layers.")}
    for new, old in enumerate((0, 5)):
        prefix = f"layers.{old}."
        kept.update({f"layers.{new}." + k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    torch.save(kept, out / "consolidated.00.pth")
    shutil.copy(DEMO_DIR / "tokenizer.model", out / "tokenizer.model")
    return Llama.build(str(out), None, max_seq_len=256, max_batch_size=1, device="cpu")


def test_demo_greedy_is_plain_decoding_with_prompt_lookup_and_with_a_draft_model(demo, demo_first_and_last_layers):
    for text in AUSTEN_PROMPTS + [COPY_PROMPT]:
        prompt = demo.tokenizer.encode(text, bos=True, eos=False)
        assert_same_as_plain(demo, prompt, 48, PromptLookup(), k=4)
        stats = assert_same_as_plain(demo, prompt, 48, DraftModel(demo_first_and_last_layers), k=4)
        assert 0 < stats.accepted < stats.drafted  # a real draft: right sometimes, not always


def test_demo_prompt_lookup_accepts_several_tokens_per_pass_on_a_copying_prompt(demo):
    prompt = demo.tokenizer.encode(COPY_PROMPT, bos=True, eos=False)
    stats = assert_same_as_plain(demo, prompt, 48, PromptLookup(), k=4)
    # (A toy model copies poorly: 2.2 tokens a pass here; about 1.1 on Austen prompts that copy nothing.)
    assert stats.mean_accepted_length > 1.5, stats.summary()
    assert stats.acceptance_by_position[0] > 0.5


# ---- sampling: the distribution of plain sampling ----

TINY_VOCAB = dict(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, multiple_of=16, norm_eps=1e-5,
                  rope_theta=500000.0, vocab_size=4)
TEMPERATURE, TOP_P = 0.7, 0.9
SAMPLE_PROMPT = [1, 2]


@pytest.fixture(scope="module")
def tiny_vocab_llama(tmp_path_factory) -> Llama:
    """A random model over 4 tokens (the byte tokenizer only supplies stop tokens, ids >= 256, never drawn)."""
    init_distributed(torch.device("cpu"))  # fairscale's layers need it (Llama.build would start it)
    args = ModelArgs.from_params(TINY_VOCAB, max_seq_len=8, max_batch_size=1)
    model = Transformer(args)
    model.load_state_dict(random_state_dict(TINY_VOCAB, seed=4))
    tokenizer = Tokenizer(str(write_byte_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.model")))
    return Llama(model.eval(), tokenizer)


def nucleus_by_hand(logits: Sequence[float]) -> List[float]:
    """Temperature, softmax and top-p as Meta's sample_top_p defines them, written out independently."""
    exps = [torch.tensor(v / TEMPERATURE).exp().item() for v in logits]
    probs = [e / sum(exps) for e in exps]
    order = sorted(range(len(probs)), key=lambda i: (-probs[i], i))
    kept, mass = [], 0.0
    for i in order:
        if mass > TOP_P:
            break
        kept.append(i)
        mass += probs[i]
    total = sum(probs[i] for i in kept)
    return [probs[i] / total if i in kept else 0.0 for i in range(len(probs))]


def expected_joint(llama: Llama, n_tokens: int) -> Dict[tuple, float]:
    """The probability of each sequence of n_tokens tokens after SAMPLE_PROMPT under plain sampling."""
    joint = {(): 1.0}
    for _ in range(n_tokens):
        longer = {}
        for seq, p in joint.items():
            logits = llama.model.forward(torch.tensor([SAMPLE_PROMPT + list(seq)]), 0)[0, -1].tolist()
            for t, q in enumerate(nucleus_by_hand(logits)):
                if q > 0:
                    longer[seq + (t,)] = p * q
        joint = longer
    return joint


def chi_square_p_value(llama: Llama, expected: Dict[tuple, float], n_samples: int, drafter: Drafter) -> float:
    """Sample n_samples generations (seed i for sample i) and test them against `expected`: the p-value."""
    counts: Dict[tuple, int] = {}
    n_tokens = len(next(iter(expected)))
    for seed in range(n_samples):
        tokens, _, _ = speculative_generate(llama, [SAMPLE_PROMPT], n_tokens, drafter, k=2,
                                            temperature=TEMPERATURE, top_p=TOP_P, seed=seed)
        counts[tuple(tokens[0])] = counts.get(tuple(tokens[0]), 0) + 1
    return goodness_of_fit(counts, expected, n_samples)


def goodness_of_fit(counts: Dict[tuple, int], expected: Dict[tuple, float], n_samples: int) -> float:
    """The chi-square test's p-value for `counts` (outcome -> times seen, n_samples in all) drawn from the
    distribution `expected` (outcome -> probability); 0.0 if an outcome of probability 0 was seen."""
    impossible = set(counts) - set(expected)
    if impossible:
        return 0.0
    # Cells expected fewer than 5 times are pooled, as the chi-square approximation asks.
    stat, df, pooled_obs, pooled_exp = 0.0, -1, 0, 0.0
    for seq, p in expected.items():
        e, o = p * n_samples, counts.get(seq, 0)
        if e < 5:
            pooled_obs, pooled_exp = pooled_obs + o, pooled_exp + e
        else:
            stat, df = stat + (o - e) ** 2 / e, df + 1
    if pooled_exp > 0:
        stat, df = stat + (pooled_obs - pooled_exp) ** 2 / pooled_exp, df + 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


class Fixed(Drafter):
    """Always the same drafts: token 1 first (the model's likeliest after SAMPLE_PROMPT, p = 0.49)."""

    def propose(self, tokens, k):
        return [1, 0, 3][:k]


def always_accept(p, x, generator):
    return True, x


def resample_from_p(p, x, generator):
    """The bias of forgetting to remove the rejected draft from the residual: x comes out too often."""
    if float(torch.rand((), generator=generator)) < float(p[x]):
        return True, x
    return False, verify.draw(p, generator)


def test_sampling_draws_from_plain_samplings_distribution_and_a_biased_rule_fails(tiny_vocab_llama, monkeypatch):
    llama = tiny_vocab_llama
    expected = expected_joint(llama, 3)  # 3 tokens: drafts at 2 positions, the bonus token, resamples
    assert 10 <= len(expected) < 64  # top_p cut some tokens at some positions
    assert chi_square_p_value(llama, expected, 2000, Fixed()) > 1e-3
    assert chi_square_p_value(llama, expected, 1000, PromptLookup()) > 1e-3
    for biased in (always_accept, resample_from_p):
        monkeypatch.setattr(verify, "accept_point_mass", biased)
        assert chi_square_p_value(llama, expected, 500, Fixed()) < 1e-3, biased.__name__


def test_sampling_with_a_seed_is_reproducible_and_the_seed_matters(tiny_llama):
    llama = tiny_llama(seed=0, max_seq_len=64, max_batch_size=1)
    spec = Speculation(PromptLookup(), k=3)
    runs = [llama.generate([[1, 2, 3, 1, 2]], 20, temperature=0.8, seed=s, speculative=spec)[0] for s in (7, 7, 8)]
    assert runs[0] == runs[1] != runs[2]
