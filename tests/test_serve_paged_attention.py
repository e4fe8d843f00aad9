"""The engine's fast decode step (llama.serve.decode, llama.serve.paged_attention): attention that reads the
paged KV cache in place, at bucketed batch sizes with padding rows, eager or replayed from CUDA graphs.

Expected values: a per-row softmax written out by hand over each row's own slots, and `Llama.generate` for
each prompt alone (not the engine's simple path). The Triton kernels run on CUDA, or on the CPU under
Triton's interpreter (TRITON_INTERPRET=1 with Triton installed); elsewhere those tests skip."""

from typing import List

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import SMALL_GQA
from test_serve_engine import run_random_schedule
from llama.serve import paged_attention as pa
from llama.serve.decode import StepForward, bucket
from llama.serve.engine import Engine
from llama.serve.forward import Chunk, paged_forward

PARAMS = dict(SMALL_GQA, vocab_size=512)
MAX_SEQ_LEN = 64
GREEDY = dict(temperature=0, ignore_eos=True)
CUDA = torch.cuda.is_available()
KERNEL_DEVICES = [d for d in ("cpu", "cuda") if pa.has_triton_kernels(torch.device(d)) and (d == "cpu" or CUDA)]
needs_kernels = pytest.mark.skipif(not KERNEL_DEVICES, reason="no Triton (CUDA, or TRITON_INTERPRET=1 on the CPU)")
needs_cuda = pytest.mark.skipif(not (CUDA and pa.has_triton_kernels(torch.device("cuda"))),
                                reason="needs CUDA with Triton")


def by_hand(q, keys, values, tables, lengths, block_size):
    """Each row's attention over its own slots, one row at a time, in float64."""
    n_rows, n_heads, head_dim = q.shape
    out = torch.zeros(q.shape, dtype=torch.float64)
    for r in range(n_rows):
        n = int(lengths[r])
        if n == 0:
            continue
        slots = [int(tables[r, p // block_size]) * block_size + p % block_size for p in range(n)]
        group = n_heads // keys.shape[1]
        k = keys[slots].double().repeat_interleave(group, dim=1)  # (n, n_heads, head_dim)
        v = values[slots].double().repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,phd->hp", q[r].double(), k) / head_dim**0.5
        out[r] = torch.einsum("hp,phd->hd", scores.softmax(-1), v)
    return out


def problem(n_kv_heads=2, n_heads=8, head_dim=16, block_size=4, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    n_blocks, width = 40, 7
    keys = torch.randn(n_blocks * block_size, n_kv_heads, head_dim, generator=g).to(device, dtype)
    values = torch.randn(n_blocks * block_size, n_kv_heads, head_dim, generator=g).to(device, dtype)
    q = torch.randn(5, n_heads, head_dim, generator=g).to(device, dtype)
    tables = torch.randperm(n_blocks, generator=g)[: 5 * width].view(5, width).to(device)
    lengths = torch.tensor([1, 7, width * block_size, 0, 13], device=device)  # row 3 is padding
    return q, keys, values, tables, lengths


@pytest.mark.parametrize("shape", [dict(), dict(n_kv_heads=4, n_heads=4, head_dim=8), dict(head_dim=12, block_size=3)],
                         ids=["gqa", "mha-small-head", "odd-head-and-block"])
def test_the_torch_decode_attention_reads_each_rows_own_positions(shape):
    q, keys, values, tables, lengths = problem(**shape)
    got = pa.decode_attention_torch(q, keys, values, tables, lengths, shape.get("block_size", 4))
    torch.testing.assert_close(got.double(), by_hand(q, keys, values, tables, lengths, shape.get("block_size", 4)),
                               rtol=0, atol=1e-6)
    assert got[3].abs().max() == 0  # the padding row


@needs_kernels
@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("shape", [dict(), dict(n_kv_heads=4, n_heads=4, head_dim=8), dict(head_dim=12, block_size=3),
                                   dict(n_kv_heads=8, n_heads=32, head_dim=128, block_size=16)],
                         ids=["gqa", "mha-small-head", "odd-head-and-block", "8b-heads"])
def test_the_triton_decode_attention_equals_the_hand_written_one_in_float32(device, shape):
    q, keys, values, tables, lengths = problem(device=device, **shape)
    got = pa.decode_attention_triton(q, keys, values, tables, lengths, shape.get("block_size", 4))
    want = by_hand(*(t.cpu() for t in (q, keys, values, tables, lengths)), shape.get("block_size", 4))
    torch.testing.assert_close(got.cpu().double(), want, rtol=0, atol=2e-6)


@needs_cuda
def test_the_triton_decode_attention_in_bf16_is_the_float32_one_to_bf16_rounding():
    q, keys, values, tables, lengths = problem(n_kv_heads=8, n_heads=32, head_dim=128, block_size=16, device="cuda")
    want = pa.decode_attention_triton(q, keys, values, tables, lengths, 16)
    got = pa.decode_attention_triton(q.bfloat16(), keys.bfloat16(), values.bfloat16(), tables, lengths, 16)
    torch.testing.assert_close(got.float(), want, rtol=0, atol=3e-2)


@needs_kernels
@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_the_triton_kv_write_writes_real_rows_and_skips_padding_rows(device):
    _, keys, values, _, _ = problem(device=device)
    xk, xv = torch.randn(3, 2, 16, device=device), torch.randn(3, 2, 16, device=device)
    slots = torch.tensor([3, -1, 17], device=device)
    k, v = keys.clone(), values.clone()
    pa.write_kv_triton(k, v, xk, xv, slots)
    expected_k, expected_v = keys.clone(), values.clone()
    expected_k[3], expected_k[17], expected_v[3], expected_v[17] = xk[0], xk[2], xv[0], xv[2]
    assert torch.equal(k, expected_k) and torch.equal(v, expected_v)


def test_steps_run_at_buckets_of_1_2_4_8_then_multiples_of_8():
    assert [bucket(n) for n in (1, 2, 3, 4, 5, 8, 9, 16, 17, 63, 64, 65)] == [1, 2, 4, 4, 8, 8, 16, 16, 24, 64, 64, 72]


# ---- the whole step, and the engine on it ----------------------------------------------------------------


@pytest.fixture(scope="module", params=["fast", "reference"])
def llama(request, tiny_llama):
    return tiny_llama(PARAMS, seed=1, max_seq_len=MAX_SEQ_LEN, max_batch_size=1, device="cpu",
                      fast=request.param == "fast")


def prompts(lengths=(5, 17, 33, 3, 40, 9), seed=0) -> List[List[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]


def assert_as_alone(llama, prompt, out, max_new):
    tokens, logprobs = llama.generate([prompt], max_new, logprobs=True, **GREEDY)
    assert out.tokens == tokens[0]
    torch.testing.assert_close(torch.tensor(out.logprobs), torch.tensor(logprobs[0]), rtol=0, atol=1e-5)


def test_a_decode_step_with_padding_rows_gives_the_simple_steps_logits_and_cache(llama):
    """Three sequences at positions 5, 17, 40 (blocks scattered), run at bucket 4: one padding row."""
    from llama.serve.kv_cache import PagedKVCache

    logits = {}
    for mode in ("simple", "kernel"):
        torch.manual_seed(0)
        cache = PagedKVCache(llama.model, 48, block_size=4)
        tables = [[40, 3, 7, 1, 30, 31], [5, 9, 11, 12, 13, 14, 20], list(range(21, 30)) + [32, 47]]
        chunks = [Chunk(p, 0, t) for p, t in zip(prompts((5, 17, 40)), tables)]
        paged_forward(llama.model, cache, chunks)  # prefill
        decode = [Chunk([7], c.start + len(c.tokens), c.table) for c in chunks]
        logits[mode] = StepForward(llama.model, cache, max_rows=8, mode=mode)(decode)
        logits[mode + " cache"] = torch.stack(cache.keys + cache.values)
    assert logits["kernel"].shape == (3, PARAMS["vocab_size"])
    torch.testing.assert_close(logits["kernel"], logits["simple"], rtol=0, atol=1e-5)
    # every written slot the same, and the padding row wrote nothing (slot 0 of block 0 is nobody's)
    torch.testing.assert_close(logits["kernel cache"], logits["simple cache"], rtol=0, atol=1e-6)


def test_the_kernel_decode_engine_gives_each_prompt_what_it_gets_alone_through_arrivals_and_preemption(llama):
    # 14 blocks of 4: requests are preempted and recomputed; arrivals mid-decode make batches of 1 .. 6
    # rows, so several buckets run with padding rows.
    engine = Engine(llama, n_blocks=14, block_size=4, decode="kernel")
    runner, buckets = engine.forward.runner, set()
    run = runner._run
    runner._run = lambda n: (buckets.add(n), run(n))[1]
    ps = prompts()
    ids = [engine.add_request(ps[0], logprobs=True, max_new_tokens=16, **GREEDY)]
    for k, prompt in enumerate(ps[1:], start=1):
        engine.step()
        ids.append(engine.add_request(prompt, logprobs=True, max_new_tokens=16, **GREEDY))
    list(engine.run())
    assert engine.preemptions > 0 and len(buckets) >= 2, buckets
    for prompt, i in zip(ps, ids):
        assert_as_alone(llama, prompt, engine.outputs[i], 16)
    assert engine.cache.allocator.n_free == 14


@pytest.fixture(scope="module")
def fast_llama(tiny_llama):
    return tiny_llama(PARAMS, seed=1, max_seq_len=MAX_SEQ_LEN, max_batch_size=1, device="cpu")


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_schedule_through_the_kernel_decode_leaves_every_request_as_it_is_alone(fast_llama, data):
    """Random arrivals, block sizes, budgets and step budgets: rows join, leave, are preempted and move
    between the step's input rows (whose block tables are rewritten only when they change)."""
    run_random_schedule(fast_llama, data, block_sizes=[1, 3, 4, 16], max_requests=9, decode="kernel")


def test_an_unknown_decode_mode_or_graphs_without_cuda_are_refused(llama):
    with pytest.raises(ValueError, match="decode must be one of .* got 'fast'"):
        Engine(llama, n_blocks=8, decode="fast")
    if not CUDA:
        with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
            Engine(llama, n_blocks=8, decode="graphs")


@needs_cuda
@pytest.mark.parametrize("mode", ["kernel", "graphs"])
@pytest.mark.parametrize("fast", [True, False], ids=["fast", "reference"])
def test_on_cuda_in_float32_the_fast_decode_gives_each_prompt_what_it_gets_alone(tiny_llama, mode, fast):
    llama = tiny_llama(PARAMS, seed=1, max_seq_len=MAX_SEQ_LEN, max_batch_size=1, device="cuda",
                       dtype="float32", fast=fast)
    engine = Engine(llama, n_blocks=14, block_size=4, decode=mode)
    ps = prompts()
    ids = [engine.add_request(ps[0], logprobs=True, max_new_tokens=16, **GREEDY)]
    for prompt in ps[1:]:
        engine.step()
        ids.append(engine.add_request(prompt, logprobs=True, max_new_tokens=16, **GREEDY))
    list(engine.run())
    assert engine.preemptions > 0
    if mode == "graphs":
        assert len(engine.forward.runner.captured) >= 2  # several buckets captured and replayed
    for prompt, i in zip(ps, ids):
        assert_as_alone(llama, prompt, engine.outputs[i], 16)
