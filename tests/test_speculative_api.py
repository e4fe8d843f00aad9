"""Speculative decoding behaves as plain decoding through every call of Llama: text_completion,
chat_completion, generate_stream and complete give, with `speculative=`, exactly what they give without it
(greedy): stop strings (even inside a run of accepted drafts), n samples, logprobs and top_logprobs, echo,
max_gen_len, every logits processor, batches of mixed prompts; the CLI and the chat take the drafter as a
flag; under torchrun (2 ranks, gloo) the model-parallel target verifies as one process decodes.

Random byte-tokenizer models write only lower-case letters here (the other bytes banned, as in test_cli),
so stop strings can be cut from their text."""

import json
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Sequence

import pytest
import torch

from helpers import SMALL_GQA, subprocess_env
from llama import Llama
from llama.cli import main
from llama.cli.chat import answer
from llama.cli.demo import build_demo
from llama.completion import Completion
from llama.config import GenerationConfig
from llama.speculative import DraftModel, Drafter, PromptLookup, Speculation, naive_generate, speculative_generate
from llama.speculative.settings import resolve_speculation
from llama.speculative.verify_step import drop_verify_step, use_verify_step

ROOT = Path(__file__).resolve().parent.parent
TOL = 1e-5
STOP_TOKENS = (257, 264, 265)  # <|end_of_text|>, <|eom_id|>, <|eot_id|> after 256 byte tokens
BANNED = tuple(t for t in range(512) if not ord("a") <= t <= ord("z") and t not in STOP_TOKENS)
GREEDY = dict(temperature=0, banned_token_ids=BANNED)
SMALL_DRAFT = dict(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, multiple_of=32, norm_eps=1e-5, rope_theta=500000.0)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Thousands of tiny forward passes: a second thread costs more than it saves (see test_speculative)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def llama(tiny_checkpoint) -> Llama:
    ckpt = tiny_checkpoint(SMALL_GQA, seed=2)
    return Llama.build(str(ckpt.dir), None, max_seq_len=64, max_batch_size=4)


class Oracles(Drafter):
    """Drafts the known continuation of whichever of `sequences` the text so far begins: runs of accepted
    drafts everywhere (through stop strings and stop tokens)."""

    def __init__(self, sequences: Sequence[Sequence[int]]):
        self.sequences = [list(s) for s in sequences]

    def propose(self, tokens: Sequence[int], k: int) -> List[int]:
        tokens = list(tokens)
        for seq in self.sequences:
            if seq[: len(tokens)] == tokens:
                return seq[len(tokens) : len(tokens) + k]
        return []


def oracle_for(llama: Llama, prompts: List[List[int]], max_gen_len: int, **controls) -> Oracles:
    """An oracle of plain greedy decoding's own continuations of `prompts` under `controls`."""
    tokens, _ = llama.generate(prompts, max_gen_len, **controls)
    return Oracles([p + t for p, t in zip(prompts, tokens)])


def assert_same_completions(got: Sequence[Completion], want: Sequence[Completion]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert (g.tokens, g.text, g.stop_reason, g.stop_token) == (w.tokens, w.text, w.stop_reason, w.stop_token)
        assert (g.logprobs is None) == (w.logprobs is None)
        if w.logprobs is not None:
            assert max((abs(a - b) for a, b in zip(g.logprobs, w.logprobs)), default=0.0) <= TOL
        if w.top_logprobs is not None:
            for gp, wp in zip(g.top_logprobs, w.top_logprobs):
                assert [t for t, _ in gp] == [t for t, _ in wp]
                assert max((abs(a - b) for (_, a), (_, b) in zip(gp, wp)), default=0.0) <= TOL


def flat(results: List[List[Completion]]) -> List[Completion]:
    return [c for samples in results for c in samples]


# ---- every control, through complete (what text_completion, chat_completion and the CLI run) ----


def test_mixed_prompts_with_logprobs_top_logprobs_and_echo_are_plain_decodings(llama):
    prompts = [list(b"cab"), list(b"ca"), list(b"hello wor"), list(b"q")]
    for drafter in (PromptLookup(), oracle_for(llama, prompts, 40, **GREEDY)):
        kw = dict(logprobs=True, top_logprobs=3, echo=True, **GREEDY)
        want = flat(llama.complete(prompts, 40, **kw))
        got = flat(llama.complete(prompts, 40, speculative=Speculation(drafter, k=4), **kw))
        assert_same_completions(got, want)
        alone = [llama.complete([p], 40, speculative=Speculation(drafter, k=4), **kw)[0][0] for p in prompts]
        assert_same_completions(alone, want)  # a row of a batch = that prompt alone


@pytest.mark.parametrize("where", [3, 10, 17])
def test_stop_strings_end_the_text_where_plain_decoding_ends_it_even_inside_accepted_drafts(llama, where):
    prompt = list(b"cab cab")
    text = llama.complete([prompt], 40, **GREEDY)[0][0].text  # "ifxylpjpjfpjfpj..."
    stop = text[where : where + 2]  # a string the model writes (from its first occurrence on)
    oracle = oracle_for(llama, [prompt], 40, **GREEDY)
    for drafter, k in ((oracle, 4), (oracle, 7), (PromptLookup(), 4)):
        want = llama.complete([prompt], 40, stop=[stop], logprobs=True, **GREEDY)[0]
        got = llama.complete([prompt], 40, stop=[stop], logprobs=True, speculative=Speculation(drafter, k),
                             **GREEDY)[0]
        assert want[0].stop_reason == "stop_string" and not want[0].text.endswith(stop)
        assert_same_completions(got, want)


@pytest.mark.parametrize("controls", [
    dict(repetition_penalty=1.5), dict(banned_words=["ab", "c"]), dict(min_new_tokens=20),
    dict(repetition_penalty=1.3, banned_words=["ba"], min_new_tokens=5, max_new_tokens=25),
], ids=["repetition_penalty", "banned_words", "min_new_tokens", "all"])
def test_logits_processors_see_each_verified_positions_own_text(llama, controls):
    # A processor at verified position i must see the text with the first i drafts in it: an oracle gets
    # its drafts accepted, so a processor that saw the text before the pass would pick other tokens.
    prompts = [list(b"fpj"), list(b"cab"), list(b"q")]
    want = flat(llama.complete(prompts, 30, logprobs=True, **GREEDY, **controls))
    for drafter in (oracle_for(llama, prompts, 30, **GREEDY, **controls), PromptLookup()):
        got = flat(llama.complete(prompts, 30, logprobs=True, speculative=Speculation(drafter, 4),
                                  **GREEDY, **controls))
        assert_same_completions(got, want)


def test_n_greedy_samples_are_each_plain_decoding_and_seeded_samples_differ_and_repeat(llama):
    prompt = list(b"xyx")
    want = llama.complete([prompt], 20, **GREEDY)[0]
    got = llama.complete([prompt], 20, n=3, speculative="lookup", **GREEDY)[0]
    assert_same_completions(got, want * 3)
    sampled = dict(temperature=1.0, top_p=1.0, seed=3, n=3, banned_token_ids=BANNED)
    runs = [[c.tokens for c in llama.complete([prompt], 20, speculative="lookup", **sampled)[0]] for _ in range(2)]
    assert runs[0] == runs[1]  # the seed makes it repeat
    assert len({tuple(t) for t in runs[0]}) == 3  # each sample its own random stream


def test_a_seeded_rows_samples_do_not_depend_on_the_other_rows_of_the_batch(llama):
    # As in plain decoding: with a seed, row i draws from its own stream (seed, its sample number).
    kw = dict(temperature=1.0, top_p=1.0, seed=11, banned_token_ids=BANNED, speculative="lookup")
    alone = llama.complete([list(b"cab")], 20, **kw)[0][0].tokens
    second = llama.complete([list(b"hello"), list(b"cab")], 20, **kw)[1][0].tokens
    assert second == alone


def test_max_gen_len_and_the_end_of_the_context_end_rows_where_plain_decoding_ends_them(llama):
    prompts = [list(b"ab" * 20), list(b"cab " * 15 + b"ca")]
    for max_gen_len in (1, 2, 7, 40):
        want = flat(llama.complete(prompts, max_gen_len, logprobs=True, **GREEDY))
        got = flat(llama.complete(prompts, max_gen_len, logprobs=True, speculative="lookup", **GREEDY))
        assert_same_completions(got, want)


@pytest.mark.parametrize("width, k", [(5, 4), (7, 3)], ids=["k+1", "padded"])
def test_a_fixed_width_verify_step_reading_the_whole_cache_gives_plain_decodings_output(tiny_checkpoint, width, k):
    # The CUDA-graph-friendly pass (llama.speculative.verify_step), run eagerly: per-row positions, the
    # whole cache under a mask, drafts padded to its width.
    ckpt = tiny_checkpoint(SMALL_GQA, seed=2)
    llama = Llama.build(str(ckpt.dir), None, max_seq_len=64, max_batch_size=3)
    prompts = [list(b"cab"), list(b"hello wor"), list(b"ab" * 29)]  # the last: too near the end for it
    want = flat(llama.complete(prompts, 40, logprobs=True, **GREEDY))
    step = use_verify_step(llama, width, compile=False)
    calls = []
    step._step = lambda *a, original=step._step: calls.append(1) or original(*a)
    try:
        got = flat(llama.complete(prompts, 40, logprobs=True, speculative=Speculation(PromptLookup(), k), **GREEDY))
    finally:
        drop_verify_step(llama.model)
    assert_same_completions(got, want)
    assert len(calls) > 10


# ---- the wrappers ----


def test_text_completion_takes_a_setting_string_and_its_predictions_carry_their_stats(llama):
    prompts = ["cab cab", "hello"]
    want = llama.text_completion(prompts, max_gen_len=30, logprobs=True, **GREEDY)
    got = llama.text_completion(prompts, max_gen_len=30, logprobs=True, speculative="lookup", **GREEDY)
    for g, w in zip(got, want):
        assert (g["generation"], g["tokens"]) == (w["generation"], w["tokens"])
        assert max(abs(a - b) for a, b in zip(g["logprobs"], w["logprobs"])) <= TOL
        assert "speculative" not in w
        stats = g["speculative"]
        assert set(stats) == {"k", "steps", "drafted", "accepted", "mean_accepted_length", "acceptance_by_position"}
        # Every pass yields its accepted drafts and one token of the model's (with a stop token, which is
        # not returned, and any drafts accepted after it, which are dropped).
        assert stats["steps"] + stats["accepted"] >= len(w["tokens"]) and stats["k"] == 4
    assert sum(g["speculative"]["accepted"] for g in got) > 0  # the text repeats: lookup's drafts are taken


def test_chat_completion_with_a_draft_model_checkpoint_answers_as_plain_decoding(llama, tiny_checkpoint):
    draft_dir = tiny_checkpoint(SMALL_DRAFT, seed=5).dir
    dialogs = [[{"role": "user", "content": "abc"}], [{"role": "system", "content": "be brief"},
                                                       {"role": "user", "content": "cab cab"}]]
    want = llama.chat_completion(dialogs, max_gen_len=20, logprobs=True, **GREEDY)
    got = llama.chat_completion(dialogs, max_gen_len=20, logprobs=True, speculative=f"draft:{draft_dir}", **GREEDY)
    for g, w in zip(got, want):
        assert (g["generation"], g["tokens"]) == (w["generation"], w["tokens"])
        assert max(abs(a - b) for a, b in zip(g["logprobs"], w["logprobs"])) <= TOL
    # The draft model is loaded once per Llama and setting, then reused.
    first = resolve_speculation(f"draft:{draft_dir}", llama)
    assert resolve_speculation(f"draft:{draft_dir}", llama) is first
    assert isinstance(first.drafter, DraftModel)


def test_generate_stream_gives_each_row_plain_streamings_events(llama):
    prompts = [list(b"cab"), list(b"q")]
    text = llama.complete(prompts[:1], 30, **GREEDY)[0][0].text
    kw = dict(stop=[text[12:14]], **GREEDY)
    want = list(llama.generate_stream(prompts, 30, **kw))
    spec = Speculation(PromptLookup(), k=4)
    got = list(llama.generate_stream(prompts, 30, speculative=spec, **kw))
    for row in (0, 1):
        assert [e for e in got if e.row == row] == [e for e in want if e.row == row]
    assert [e.row for e in got] == sorted(e.row for e in got)  # rows one after the other
    assert spec.stats is not None and spec.stats.steps > 0


def test_generate_with_a_speculation_keeps_the_calls_stats_summed_over_rows(llama):
    prompts = [list(b"cab"), list(b"hello"), list(b"q")]
    spec = Speculation(PromptLookup(), k=3)
    completions = flat(llama.complete(prompts, 25, speculative=spec, **GREEDY))
    rows = [c.speculative for c in completions]
    assert spec.stats.steps == sum(r.steps for r in rows)
    assert spec.stats.accepted == sum(r.accepted for r in rows)
    assert spec.stats.drafted_at == [sum(r.drafted_at[i] for r in rows) for i in range(3)]


def test_naive_generate_has_speculative_generates_signature_and_output_one_token_a_pass(llama):
    prompt = [list(b"cab")]
    spec_tokens, spec_lps, spec_stats = speculative_generate(llama, prompt, 20, PromptLookup(), 4, logprobs=True)
    tokens, lps, stats = naive_generate(llama, prompt, 20, PromptLookup(), 4, logprobs=True)
    assert tokens == spec_tokens and max(abs(a - b) for a, b in zip(lps[0], spec_lps[0])) <= TOL
    assert (stats.drafted, stats.mean_accepted_length) == (0, 1.0) and stats.steps == len(tokens[0]) + (
        len(tokens[0]) < 20)  # a stop token ends it one pass later
    assert spec_stats.steps < stats.steps


def test_bad_settings_are_refused_by_name(llama, tiny_checkpoint):
    with pytest.raises(ValueError, match="unknown speculative setting 'lookahead': expected one of draft, eagle, eagle-tree, lookup"):
        llama.generate([[1, 2]], 4, speculative="lookahead")
    with pytest.raises(ValueError, match="'draft' needs a path: draft:PATH"):
        llama.text_completion(["ab"], speculative="draft")
    with pytest.raises(TypeError, match="speculative must be a Speculation or a string"):
        llama.generate([[1, 2]], 4, speculative=4)
    with pytest.raises(FileNotFoundError):
        llama.generate([[1, 2]], 4, speculative="draft:/nonexistent/ckpt")
    other = tiny_checkpoint(dict(SMALL_DRAFT, vocab_size=-1), tokenizer="sentencepiece").dir
    with pytest.raises(ValueError, match="vocab_size=320, the target 512"):
        list(llama.generate_stream([[1, 2]], 4, speculative=f"draft:{other}"))


def test_the_eagle_head_named_as_a_setting_follows_stop_strings_and_logprobs_as_plain_decoding(llama, tmp_path):
    from test_eagle import head_params, write_random_head  # (a random head in the demo head's layout)

    head_dir = write_random_head(tmp_path / "head", head_params(llama), seed=1)
    prompts = [list(b"cab cab"), list(b"q")]
    text = llama.complete(prompts[:1], 30, **GREEDY)[0][0].text
    kw = dict(logprobs=True, top_logprobs=2, stop=[text[9:11]], **GREEDY)
    want = flat(llama.complete(prompts, 30, **kw))
    got = flat(llama.complete(prompts, 30, speculative=f"eagle:{head_dir}", **kw))
    assert_same_completions(got, want)
    with pytest.raises(FileNotFoundError, match="draft head"):
        llama.generate([[1, 2]], 4, speculative=f"eagle:{tmp_path / 'nothing'}")


# ---- the demo model: real text, stop strings inside accepted runs of prompt lookup ----


def test_demo_text_completion_with_lookup_and_stop_strings_is_plain_decoding():
    demo = build_demo(max_seq_len=256, max_batch_size=2, device="cpu")
    sentence = "It is a truth universally acknowledged, that a single man in possession of a good fortune"
    prompts = [f"{sentence}.\n{sentence}.\n{sentence}.\nIt is a", "Elizabeth could not help"]
    for stop in ([], ["man in"], ["fortune", "\n"]):
        kw = dict(max_gen_len=48, temperature=0, logprobs=True, stop=stop)
        want = demo.text_completion(prompts, **kw)
        got = demo.text_completion(prompts, speculative="lookup", **kw)
        for g, w in zip(got, want):
            assert (g["generation"], g["tokens"]) == (w["generation"], w["tokens"])
            assert max(abs(a - b) for a, b in zip(g["logprobs"], w["logprobs"])) <= TOL
        if not stop:
            assert got[0]["speculative"]["mean_accepted_length"] > 1.3  # the copy is drafted (1.45)


# ---- the command line and the chat ----


def test_the_cli_takes_the_drafter_as_a_flag_and_writes_the_same_records_with_stats(tiny_checkpoint, tmp_path):
    ckpt = tiny_checkpoint(SMALL_GQA, seed=2).dir
    base = ["--ckpt_dir", str(ckpt), "--max_seq_len", "64", "--temperature", "0", "--banned_token_ids",
            ",".join(map(str, BANNED)), "--prompt", "abcabcab", "--prompt", "xyx", "--stop", "ca", "--no_progress"]
    records: Dict[str, List[dict]] = {}
    for name, extra in (("plain", []), ("lookup", ["--speculative", "lookup", "--draft_k", "3"]),
                        ("draft", ["--speculative", "draft", "--draft_ckpt_dir",
                                   str(tiny_checkpoint(SMALL_DRAFT, seed=5).dir)])):
        out = tmp_path / f"{name}.jsonl"
        assert main(base + extra + ["--output_file", str(out)]) == 0
        records[name] = [json.loads(line) for line in out.read_text().splitlines()]
    for name in ("lookup", "draft"):
        for got, want in zip(records[name], records["plain"]):
            stats = got.pop("speculative")
            assert got == want
            assert stats["k"] == (3 if name == "lookup" else 4)


@pytest.mark.parametrize("args, message", [
    (["--draft_k", "3"], "--draft_ckpt_dir and --draft_k need --speculative"),
    (["--speculative", "draft"], "--speculative draft needs --draft_ckpt_dir"),
    (["--speculative", "lookup", "--draft_k", "-1"], "--draft_k must be >= 0, got -1"),
])
def test_bad_speculative_flags_exit_with_status_2_and_a_message(tiny_checkpoint, capsys, args, message):
    ckpt = tiny_checkpoint(SMALL_GQA, seed=2).dir
    assert main(["--ckpt_dir", str(ckpt), "--prompt", "ab", *args]) == 2
    assert message in capsys.readouterr().err


def test_the_chat_streams_plain_decodings_answer_and_then_the_speculative_stats(llama, capsys):
    dialog = [{"role": "user", "content": "abcabc"}]
    want = llama.chat_completion([dialog], max_gen_len=24, **GREEDY)[0]["generation"]["content"]
    spec = Speculation(PromptLookup(), k=4)
    got = answer(llama, dialog, GenerationConfig(max_new_tokens=24, **GREEDY), spec)
    assert got == want
    out, err = capsys.readouterr()
    assert want in out and "(speculative: " in err and "mean accepted length" in err


# ---- torchrun: the target stays model-parallel ----


@pytest.mark.slow
def test_two_ranks_speculative_greedy_tokens_equal_plain_decoding(tiny_checkpoint, tmp_path):
    params = dict(SMALL_GQA, vocab_size=512)
    one, two = (tiny_checkpoint(params, seed=4, n_shards=n).dir for n in (1, 2))
    draft = tiny_checkpoint(SMALL_DRAFT, seed=5).dir
    worker = str(ROOT / "tests" / "spec_mp_worker.py")
    env = subprocess_env(OMP_NUM_THREADS="1")
    runs = {}
    for name, ckpt, launcher in (("one", one, []), ("two", two, ["-m", "torch.distributed.run", "--standalone",
                                                                  "--nproc_per_node=2"])):
        out = tmp_path / f"{name}.json"
        done = subprocess.run([sys.executable, *launcher, worker, str(ckpt), str(draft), str(out)],
                              capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[name] = json.loads(out.read_text())
    assert (runs["one"]["world"], runs["two"]["world"]) == (1, 2)
    for run in runs.values():  # in each process: speculative = plain
        assert run["lookup"] == run["plain"] and run["draft"] == run["plain"]
        assert run["accepted"] > 0
    assert runs["two"]["plain"] == runs["one"]["plain"]  # and 2 ranks = 1 process
