"""Sampling controls: Meta's defaults are reproduced exactly, each control changes the output as it says,
the logits processors agree with Hugging Face's, and bad values raise clear errors.

The model is a small random checkpoint with a byte-level tokenizer, so texts are gibberish: the checks are
on tokens and on the model's own distributions (recomputed by a full forward pass over the finished
sequences, a path independent of the decode loop)."""

import pytest
import torch
from transformers.generation import logits_process as hf

from llama import Llama
from llama.config import GenerationConfig
from llama.sampling import (
    Context,
    ban_sequences,
    min_new_tokens,
    min_p_filter,
    repetition_penalty,
    top_k_filter,
)
from helpers import SMALL_GQA

VOCAB = 512  # 256 bytes + 256 special tokens
LETTERS = list(range(ord("a"), ord("z") + 1))
NOT_LETTERS = [t for t in range(VOCAB) if t not in LETTERS]


@pytest.fixture(scope="module")
def llama(tiny_llama) -> Llama:
    return tiny_llama(dict(SMALL_GQA, vocab_size=VOCAB), max_seq_len=64, max_batch_size=6, device="cpu")


def encode(llama: Llama, *texts: str):
    return [llama.tokenizer.encode(t, bos=True, eos=False) for t in texts]


def only_letters_and(llama: Llama, *keep: int):
    """banned_token_ids that leave the 26 lower-case letters and the given ids."""
    return [t for t in NOT_LETTERS if t not in keep]


def full_logits(llama: Llama, prompt, generated) -> torch.Tensor:
    """Logits predicting each generated token, from one forward pass over prompt + generation."""
    seq = torch.tensor([list(prompt) + list(generated)])
    logits = llama.model.forward(seq, 0)[0]  # (len, vocab)
    return logits[len(prompt) - 1 : len(prompt) - 1 + len(generated)]


# ---- Meta's defaults, exactly ----


def meta_reference_generate(llama, prompt_tokens, max_gen_len, temperature, top_p, logprobs, echo):
    """Meta's generate loop written out from its documented semantics: one prefill up to the shortest
    prompt, then a token a step; top-p as "smallest set reaching p, crossing token kept"; stop at the
    first stop token. Shares only the model with Llama.generate."""
    model, tok = llama.model, llama.tokenizer
    bsz = len(prompt_tokens)
    lens = [len(t) for t in prompt_tokens]
    total = min(model.params.max_seq_len, max_gen_len + max(lens))
    seq = torch.full((bsz, total), tok.pad_id, dtype=torch.long)
    for i, t in enumerate(prompt_tokens):
        seq[i, : len(t)] = torch.tensor(t)
    lp = torch.zeros((bsz, total))
    done = torch.zeros(bsz, dtype=torch.bool)
    prev = 0
    for cur in range(min(lens), total):
        logits = model.forward(seq[:, prev:cur], prev)
        if temperature > 0:
            probs = torch.softmax(logits[:, -1] / temperature, dim=-1)
            p_sorted, idx = torch.sort(probs, dim=-1, descending=True)
            p_sorted[torch.cumsum(p_sorted, -1) - p_sorted > top_p] = 0.0
            p_sorted.div_(p_sorted.sum(-1, keepdim=True))
            nxt = torch.gather(idx, -1, torch.multinomial(p_sorted, 1)).reshape(-1)
        else:
            nxt = logits[:, -1].argmax(-1)
        in_prompt = torch.tensor([cur < n for n in lens])
        nxt = torch.where(in_prompt, seq[:, cur], nxt)
        seq[:, cur] = nxt
        lp[:, prev + 1 : cur + 1] = torch.log_softmax(logits, -1).gather(2, seq[:, prev + 1 : cur + 1, None])[..., 0]
        done |= ~in_prompt & torch.tensor([t in tok.stop_tokens for t in nxt.tolist()])
        prev = cur
        if done.all():
            break
    out, out_lp = [], []
    for i, row in enumerate(seq.tolist()):
        gen = row[lens[i] : min(lens[i] + max_gen_len, total)]
        cut = next((j for j, t in enumerate(gen) if t in tok.stop_tokens), len(gen))
        start = 0 if echo else lens[i]
        out.append(row[start : lens[i] + cut])
        out_lp.append(lp[i, start : lens[i] + cut].tolist())
    return out, (out_lp if logprobs else None)


@pytest.mark.parametrize("temperature,top_p", [(0.6, 0.9), (0.0, 0.9), (1.3, 0.5)])
def test_defaults_reproduce_meta_generate_exactly(llama, temperature, top_p):
    prompts = encode(llama, "hi", "a longer prompt", "mid size")
    torch.manual_seed(7)
    expected = meta_reference_generate(llama, prompts, 12, temperature, top_p, logprobs=True, echo=True)
    torch.manual_seed(7)
    got = llama.generate(prompts, 12, temperature, top_p, logprobs=True, echo=True)
    assert got[0] == expected[0]
    torch.testing.assert_close(torch.tensor(sum(got[1], [])), torch.tensor(sum(expected[1], [])))


def test_text_completion_defaults_are_meta_and_an_explicit_default_config_changes_nothing(llama):
    prompts = ["one", "two two"]
    torch.manual_seed(3)
    plain = llama.text_completion(prompts, max_gen_len=10)
    torch.manual_seed(3)
    reference, _ = meta_reference_generate(llama, encode(llama, *prompts), 10, 0.6, 0.9, False, False)
    assert [r["generation"] for r in plain] == [llama.tokenizer.decode(t) for t in reference]
    assert all(set(r) == {"generation"} for r in plain)
    torch.manual_seed(3)
    assert llama.text_completion(prompts, max_gen_len=10, config=GenerationConfig()) == plain


# ---- each control ----


def test_temperature_zero_picks_the_most_likely_token_every_step(llama):
    prompt = encode(llama, "greedy")[0]
    out = llama.complete([prompt], 10, temperature=0, ignore_eos=True)[0][0]
    assert out.tokens == full_logits(llama, prompt, out.tokens).argmax(-1).tolist()


def test_top_k_keeps_sampling_among_the_k_most_likely_tokens(llama):
    prompt = encode(llama, "top k")[0]
    for seed in range(3):
        out = llama.complete([prompt], 12, temperature=5.0, top_p=1.0, top_k=3, seed=seed, ignore_eos=True)[0][0]
        top3 = full_logits(llama, prompt, out.tokens).topk(3, dim=-1).indices
        assert all(t in row for t, row in zip(out.tokens, top3.tolist()))
    greedy = llama.complete([prompt], 12, temperature=0, ignore_eos=True)[0][0].tokens
    assert llama.complete([prompt], 12, temperature=5.0, top_k=1, seed=0, ignore_eos=True)[0][0].tokens == greedy


def test_min_p_drops_tokens_less_likely_than_min_p_times_the_best(llama):
    prompt = encode(llama, "min p")[0]
    temperature, min_p = 2.0, 0.5
    out = llama.complete([prompt], 16, temperature=temperature, top_p=1.0, min_p=min_p, seed=1, ignore_eos=True)
    tokens = out[0][0].tokens
    probs = torch.softmax(full_logits(llama, prompt, tokens) / temperature, dim=-1)
    chosen = probs.gather(1, torch.tensor(tokens)[:, None])[:, 0]
    assert (chosen >= min_p * probs.max(-1).values - 1e-6).all()
    # Without min_p, this temperature picks tokens far below the bar.
    free = llama.complete([prompt], 16, temperature=temperature, top_p=1.0, seed=1, ignore_eos=True)[0][0].tokens
    free_probs = torch.softmax(full_logits(llama, prompt, free) / temperature, dim=-1)
    free_chosen = free_probs.gather(1, torch.tensor(free)[:, None])[:, 0]
    assert (free_chosen < min_p * free_probs.max(-1).values).any()


def test_a_large_repetition_penalty_stops_greedy_decoding_from_repeating(llama):
    prompt = encode(llama, "aaa")[0]
    plain = llama.complete([prompt], 20, temperature=0, ignore_eos=True)[0][0].tokens
    assert len(set(prompt + plain)) < len(prompt + plain)  # the random model repeats itself...
    penalised = llama.complete([prompt], 20, temperature=0, ignore_eos=True, repetition_penalty=1e6)[0][0].tokens
    context = set(prompt)
    for t in penalised:  # ...and with the penalty never chooses a token already seen
        assert t not in context
        context.add(t)


def test_stop_strings_end_the_text_just_before_the_first_one(llama):
    banned = only_letters_and(llama)
    prompt = ["stop here"]
    free = llama.text_completion(prompt, temperature=0, max_gen_len=24, banned_token_ids=banned)[0]["generation"]
    stop = free[6:8]
    expected = free[: free.find(stop)]
    got = llama.complete(encode(llama, *prompt), 24, temperature=0, banned_token_ids=banned, stop=[stop, "#"])
    assert got[0][0].text == expected
    assert got[0][0].stop_reason == "stop_string"
    text = llama.text_completion(prompt, temperature=0, max_gen_len=24, banned_token_ids=banned, stop=stop)
    assert text[0]["generation"] == expected


def test_banned_token_ids_and_banned_words_never_appear(llama):
    prompt = encode(llama, "ban")[0]
    letters_only = only_letters_and(llama)
    free = llama.complete([prompt], 24, temperature=0, banned_token_ids=letters_only, ignore_eos=True)[0][0]
    first = free.tokens[0]
    no_first = llama.complete([prompt], 24, temperature=0, banned_token_ids=letters_only + [first],
                              ignore_eos=True)[0][0]
    assert first not in no_first.tokens
    word = free.text[3:5]
    no_word = llama.complete([prompt], 24, temperature=0, banned_token_ids=letters_only, banned_words=[word],
                             ignore_eos=True)[0][0]
    assert word in free.text and word not in no_word.text
    assert no_word.text[: free.text.find(word) + 1] == free.text[: free.text.find(word) + 1]


def test_a_seed_gives_the_same_output_whatever_ran_before_and_leaves_the_global_rng_alone(llama):
    prompts = encode(llama, "seeded")
    settings = dict(temperature=1.0, top_p=1.0, seed=42, ignore_eos=True)
    first = llama.generate(prompts, 16, **settings)[0]
    llama.generate(prompts, 16, temperature=1.0)  # unseeded: uses and moves the global RNG
    torch.manual_seed(123)
    assert llama.generate(prompts, 16, **settings)[0] == first
    assert llama.generate(prompts, 16, **dict(settings, seed=43))[0] != first
    torch.manual_seed(123)
    before = torch.get_rng_state()
    llama.generate(prompts, 16, **settings)
    assert torch.equal(torch.get_rng_state(), before)


def test_a_seeded_prompt_samples_the_same_alone_or_beside_other_prompts(llama):
    settings = dict(temperature=1.0, top_p=1.0, seed=5, ignore_eos=True)
    alone = llama.generate(encode(llama, "beside"), 10, **settings)[0][0]
    batch = llama.generate(encode(llama, "x", "beside", "a much longer prompt"), 10, **settings)[0]
    assert batch[1] == alone


def test_n_gives_n_different_samples_per_prompt_in_prompt_major_rows(llama):
    settings = dict(temperature=1.0, top_p=1.0, seed=9, n=3, ignore_eos=True)
    results = llama.text_completion(["p", "q"], max_gen_len=8, **settings)
    assert [len(r) for r in results] == [3, 3]
    assert len({r["generation"] for r in results[0]}) == 3  # different samples
    tokens, _ = llama.generate(encode(llama, "p", "q"), 8, **settings)
    assert len(tokens) == 6  # rows prompt-major: p's 3 samples, then q's
    assert [llama.tokenizer.decode(t) for t in tokens[:3]] == [r["generation"] for r in results[0]]
    with pytest.raises(ValueError, match=r"2 prompts x n=4 samples is more than max_batch_size=6"):
        llama.generate(encode(llama, "p", "q"), 8, n=4)


def test_min_new_tokens_holds_back_stop_tokens_and_ignore_eos_runs_to_the_length(llama):
    prompt = encode(llama, "short")[0]
    # Only 'a' and the stop tokens are allowed: the greedy answer ends early at a stop token.
    allowed = only_letters_and(llama, *llama.tokenizer.stop_tokens) + [t for t in LETTERS if t != ord("a")]
    early = llama.complete([prompt], 20, temperature=0, banned_token_ids=allowed)[0][0]
    assert early.stop_reason == "stop_token" and early.generated_len < 15
    held = llama.complete([prompt], 20, temperature=0, banned_token_ids=allowed,
                          min_new_tokens=early.generated_len + 5)[0][0]
    assert held.generated_len >= early.generated_len + 5
    assert held.tokens[: early.generated_len] == early.tokens
    ignoring = llama.complete([prompt], 20, temperature=0, banned_token_ids=allowed, ignore_eos=True)[0][0]
    assert ignoring.stop_reason == "length" and ignoring.generated_len == 20
    assert set(ignoring.tokens) & llama.tokenizer.stop_tokens  # stop tokens were produced and kept


def test_max_new_tokens_bounds_the_generation(llama):
    out = llama.complete(encode(llama, "len"), config=GenerationConfig(max_new_tokens=7, ignore_eos=True))
    assert out[0][0].generated_len == 7 and out[0][0].stop_reason == "length"


# ---- processors agree with Hugging Face's ----


def test_logits_processors_match_hugging_face():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g) * 3
    tokens = torch.randint(0, 50, (3, 9), generator=g)
    context = Context(tokens, lengths=torch.tensor([9, 9, 9]), prompt_lens=torch.tensor([9, 7, 4]))
    torch.testing.assert_close(
        repetition_penalty(1.7)(logits, context), hf.RepetitionPenaltyLogitsProcessor(1.7)(tokens, logits.clone())
    )
    torch.testing.assert_close(top_k_filter(logits, 4), hf.TopKLogitsWarper(4)(tokens, logits.clone()))
    torch.testing.assert_close(min_p_filter(logits, 0.3), hf.MinPLogitsWarper(0.3)(tokens, logits.clone()))
    bad = [[7], [tokens[1, -1].item(), 11], [tokens[2, -2].item(), tokens[2, -1].item(), 5], [3, 4, 5]]
    torch.testing.assert_close(
        ban_sequences(bad)(logits, context), hf.NoBadWordsLogitsProcessor(bad, eos_token_id=49)(tokens, logits.clone())
    )
    # HF counts new tokens from one prompt length for the whole batch: compare row by row.
    for row in range(3):
        one = Context(tokens[row : row + 1], context.lengths[row : row + 1], context.prompt_lens[row : row + 1])
        theirs = hf.MinNewTokensLengthLogitsProcessor(context.prompt_lens[row].item(), 3, [48, 49])
        expected = theirs(tokens[row : row + 1], logits[row : row + 1].clone())
        torch.testing.assert_close(min_new_tokens([48, 49], 3)(logits[row : row + 1], one), expected)


def test_processors_read_rows_of_different_lengths_as_their_own_contexts():
    """A decode loop may keep rows at different positions: each row is read up to its own length, as if
    it were alone (what Hugging Face's processors see for that row)."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 30, generator=g)
    tokens = torch.randint(0, 30, (2, 8), generator=g)
    lengths = torch.tensor([8, 5])
    ragged = Context(tokens, lengths, prompt_lens=torch.tensor([3, 3]))
    bad = [[tokens[1, 3].item(), tokens[1, 4].item(), 9]]
    for ours, theirs in [
        (repetition_penalty(2.0), hf.RepetitionPenaltyLogitsProcessor(2.0)),
        (ban_sequences(bad), hf.NoBadWordsLogitsProcessor(bad, eos_token_id=29)),
    ]:
        got = ours(logits, ragged)
        for row in range(2):
            alone = tokens[row : row + 1, : lengths[row]]
            torch.testing.assert_close(got[row : row + 1], theirs(alone, logits[row : row + 1].clone()))


# ---- validation ----


@pytest.mark.parametrize(
    "controls,message",
    [
        (dict(temperature=-0.5), r"temperature must be >= 0, got -0.5"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\], got 0.0"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\], got 1.5"),
        (dict(top_k=-1), r"top_k must be an integer >= 0, got -1"),
        (dict(min_p=2.0), r"min_p must be in \[0, 1\], got 2.0"),
        (dict(repetition_penalty=0), r"repetition_penalty must be > 0, got 0"),
        (dict(stop=[""]), r"stop must hold non-empty strings, got ''"),
        (dict(n=0), r"n must be an integer >= 1, got 0"),
        (dict(seed=-1), r"seed must be an integer >= 0, got -1"),
        (dict(banned_token_ids=[3, 9999]), r"banned_token_ids \[9999\] are outside the vocabulary \[0, 512\)"),
        (dict(min_new_tokens=50), r"min_new_tokens=50 is more than max_gen_len=8"),
        (dict(topk=3), r"unknown generation controls \['topk'\]"),
    ],
)
def test_bad_controls_raise_value_errors_naming_the_value(llama, controls, message):
    with pytest.raises(ValueError, match=message):
        llama.text_completion(["x"], max_gen_len=8, **controls)


def test_generation_config_checks_its_values_when_built():
    with pytest.raises(ValueError, match=r"max_new_tokens must be an integer >= 1, got 0"):
        GenerationConfig(max_new_tokens=0)
    with pytest.raises(ValueError, match=r"temperature must be a finite number >= 0, got nan"):
        GenerationConfig(temperature=float("nan"))
    assert GenerationConfig(stop="\n\n").stop == ("\n\n",)  # one string is one stop string
