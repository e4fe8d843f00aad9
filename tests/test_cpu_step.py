"""llama.fast.cpu_step: the CPU decode step compiled whole gives the reference loop's greedy tokens and logits
as close to exact (float64) as the reference's own float32 ones, is chosen only where it is asked for or wins,
and without a working C++ compiler the model decodes eagerly, with a warning."""

import copy

import pytest
import torch

from llama import Llama
from llama.fast import cpu_step
from llama.fast.cpu_forms import picked_forms
from llama.fast.cpu_step import CompiledCPUStep, cpu_decode_step
from llama.fast.step import DecodeStep, fast_forward
from llama.sampling import greedy

from helpers import SMALL_GQA

PARAMS = dict(SMALL_GQA, vocab_size=512)
MAX_SEQ_LEN = 40
# The compiled step's products and fused pointwise operations round in another order than the reference
# model's: each float32 sum has the same worst-case error (gamma_K times the sum of magnitudes) whatever its
# order, so its distance from exact may be a small multiple of the reference's own, not more.
ORDER_FACTOR = 8


def _build(tiny_llama, **kwargs) -> Llama:
    return tiny_llama(PARAMS, seed=6, max_seq_len=MAX_SEQ_LEN, max_batch_size=4, device="cpu", dtype=torch.float32,
                      **kwargs)


def _prompts(lengths, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.slow  # compiles (inductor)
def test_compiled_cpu_step_gives_the_reference_greedy_tokens(tiny_llama):
    compiled, reference = _build(tiny_llama, compile=True), _build(tiny_llama, fast=False)
    assert isinstance(compiled.decode_step, CompiledCPUStep)
    for lengths, new in (([3, 11, 7], 12), ([5, 5], 9), ([4], MAX_SEQ_LEN - 4)):  # the last fills the context
        prompts = _prompts(lengths, seed=len(lengths))
        tokens, logprobs = compiled.generate(prompts, new, temperature=0, logprobs=True)
        ref_tokens, ref_logprobs = reference.generate(prompts, new, temperature=0, logprobs=True)
        assert tokens == ref_tokens
        for row, ref_row in zip(logprobs, ref_logprobs):
            torch.testing.assert_close(torch.tensor(row), torch.tensor(ref_row), rtol=0, atol=1e-5)
    assert not compiled.decode_step.failed  # every step ran compiled


@pytest.mark.slow  # compiles (inductor)
def test_after_the_first_step_of_a_batch_size_the_step_calls_its_graph_directly(tiny_llama):
    """DirectCall: only the first step of a batch size goes through torch.compile's frame (the step compiled
    at load took batch size 1); every later step calls the compiled graph directly, with its own tokens,
    positions and cache length, and decoding still gives the reference loop's tokens and log-probabilities."""
    compiled, reference = _build(tiny_llama, compile=True), _build(tiny_llama, fast=False)
    step = compiled.decode_step
    through_torch_compile = []
    graph = step.graph
    step.graph = lambda tokens, *args: through_torch_compile.append(len(tokens)) or graph(tokens, *args)
    for lengths, new in (([3, 11, 7], 12), ([4], 20), ([6, 2, 9], 8)):
        prompts = _prompts(lengths, seed=len(lengths) + new)
        tokens, logprobs = compiled.generate(prompts, new, temperature=0, logprobs=True)
        ref_tokens, ref_logprobs = reference.generate(prompts, new, temperature=0, logprobs=True)
        assert tokens == ref_tokens
        for row, ref_row in zip(logprobs, ref_logprobs):
            torch.testing.assert_close(torch.tensor(row), torch.tensor(ref_row), rtol=0, atol=1e-5)
    assert through_torch_compile == [3]  # batch size 3's first step
    threads = torch.get_num_threads()
    assert set(step.direct) == {(1, threads), (3, threads)}
    assert all(isinstance(d, cpu_step.DirectCall) for d in step.direct.values())
    assert not step.failed


@pytest.mark.slow  # compiles (inductor)
def test_a_second_model_of_another_shape_compiles_a_step_of_static_shapes(tiny_llama):
    """Dynamo keys what it learns about changing shapes by file, line and name, so across every model's step:
    a second model of another shape in the same process must still get a step whose only dynamic size is the
    cache length (its one int argument, so the step calls its graph directly), and the reference's tokens.
    (Found in the bench: the third and fourth models built in one process compiled with their weights'
    sizes as symbols: 64 float32 tokens in 0.744 s, and 0.65 s with static shapes in the next process.)"""
    first = _build(tiny_llama, compile=True)
    other = dict(PARAMS, dim=PARAMS["dim"] * 2, n_layers=PARAMS["n_layers"] + 1)
    second, reference = (tiny_llama(other, seed=8, max_seq_len=MAX_SEQ_LEN, max_batch_size=4, device="cpu",
                                    dtype=torch.float32, **kw) for kw in (dict(compile=True), dict(fast=False)))
    prompts = _prompts([5], seed=9)
    for llama in (first, second):
        llama.generate(prompts, 6, temperature=0)
    assert second.generate(prompts, 6, temperature=0)[0] == reference.generate(prompts, 6, temperature=0)[0]
    for llama in (first, second):
        assert isinstance(llama.decode_step.direct[(1, torch.get_num_threads())], cpu_step.DirectCall)


@pytest.mark.slow  # compiles (inductor)
def test_the_step_hands_back_the_greedy_pick_of_its_own_logits(tiny_llama):
    """decode_and_pick: the step's logits, and greedy(logits) of them, row by row (rows at their own positions)."""
    llama = _build(tiny_llama, compile=True)
    tokens, positions = torch.tensor([5, 17, 200]), torch.tensor([3, 9, 6])
    with torch.inference_mode():
        logits, picks = llama.decode_step.decode_and_pick(tokens, positions, 10)
    assert picks.shape == (3,) and torch.equal(picks, greedy(logits))
    assert not llama.decode_step.failed


@pytest.mark.slow  # compiles (inductor)
def test_the_compiled_pick_takes_the_first_of_equal_maxima_and_lets_a_nan_win():
    """What the loop's greedy() promises (llama.sampling), kept by the pick compiled into the step."""
    compiled = torch.compile(cpu_step.pick, options=cpu_step.compile_options(), fullgraph=True)
    logits = torch.randn(4, 1024)
    logits[0, [7, 300, 1000]] = 50.0  # three equal maxima: the first wins
    logits[1, 900] = float("nan")  # a NaN beats every number
    logits[1, 3] = 60.0
    logits[2] = 1.0  # all equal: index 0
    logits[3, [10, 20]] = float("nan")  # two NaNs: the first
    expected = torch.tensor([7, 900, 0, 10])
    assert torch.equal(greedy(logits), expected)
    assert torch.equal(compiled(logits), expected)


@pytest.mark.slow  # compiles (inductor)
def test_logits_processors_choose_from_the_logits_not_the_step_pick(tiny_llama):
    """Greedy decoding with a processor (a repetition penalty) takes the sampler's choice from the processed
    logits, not the step's own pick of the raw ones: the reference loop's tokens, which differ from plain
    greedy decoding's here."""
    compiled, reference = _build(tiny_llama, compile=True), _build(tiny_llama, fast=False)
    prompts = _prompts([6, 6], seed=9)
    penalised = compiled.generate(prompts, 16, temperature=0, repetition_penalty=3.0)[0]
    assert penalised == reference.generate(prompts, 16, temperature=0, repetition_penalty=3.0)[0]
    assert penalised != compiled.generate(prompts, 16, temperature=0)[0]  # (the penalty changes the tokens)


@pytest.mark.slow  # compiles (inductor)
def test_each_compiled_step_runs_its_own_model_beside_another(tiny_llama):
    """Two models of different depth compiled in one process, called in turn: each step gives its own model's
    reference tokens (a step guards only its inputs, so no step may reach the other's graph)."""
    deep = dict(PARAMS, n_layers=PARAMS["n_layers"] + 1)
    models = [(_build(tiny_llama, compile=True), _build(tiny_llama, fast=False)),
              (tiny_llama(deep, seed=7, max_seq_len=MAX_SEQ_LEN, max_batch_size=4, device="cpu",
                          dtype=torch.float32, compile=True),
               tiny_llama(deep, seed=7, max_seq_len=MAX_SEQ_LEN, max_batch_size=4, device="cpu",
                          dtype=torch.float32, fast=False))]
    prompts = _prompts([6, 6], seed=5)
    for _ in range(2):
        for compiled, reference in models:
            assert isinstance(compiled.decode_step, CompiledCPUStep)
            assert compiled.generate(prompts, 10, temperature=0)[0] == reference.generate(prompts, 10, temperature=0)[0]


@pytest.mark.slow  # compiles (inductor)
@pytest.mark.parametrize("fma", [False, True], ids=["mul-add", "fma-contracted"])
def test_compiled_cpu_step_logits_are_as_close_to_exact_as_the_reference_ones(tiny_llama, monkeypatch, fma):
    """Each step's logits against the same model in float64: the compiled step's distance from exact is
    within ORDER_FACTOR times the float32 reference model's own, over 10 decode steps of 2 rows; also with
    multiplies and adds fused into FMAs, as the step is compiled where torch's vectors are AVX2's."""
    capability = torch.backends.cpu.get_cpu_capability()
    monkeypatch.setattr(cpu_step, "FMA_CONTRACT", (capability,) if fma else ())
    assert ("cpp.enable_floating_point_contract_flag" in cpu_step.compile_options()) == fma
    compiled, reference = _build(tiny_llama, compile=True), _build(tiny_llama, fast=False)
    exact = copy.deepcopy(reference.model).double()
    prompts = torch.tensor(_prompts([6, 6], seed=3))  # (2, 6)
    with torch.inference_mode():
        fast_forward(compiled.model, prompts, 0)
        ref = reference.model.forward(prompts, 0)[:, -1]
        exact.forward(prompts, 0)
        err, ref_err = 0.0, 0.0
        for pos in range(6, 16):
            tokens = ref.argmax(-1)  # (2,) the reference's greedy tokens, fed to all three
            logits = compiled.decode_step(tokens, pos, pos + 1)  # (2, vocab)
            ref = reference.model.forward(tokens[:, None], pos)[:, -1]
            logits64 = exact.forward(tokens[:, None], pos)[:, -1]
            err = max(err, float((logits.double() - logits64).abs().max()))
            ref_err = max(ref_err, float((ref.double() - logits64).abs().max()))
    assert 0 < ref_err < 1e-4  # float32 rounding, not another model
    assert err <= ORDER_FACTOR * ref_err, (err, ref_err)


@pytest.mark.slow  # tries to compile
def test_without_a_compiler_the_model_decodes_eagerly_with_a_warning(tiny_llama):
    import torch._inductor.config as inductor_config

    # inductor's config is patched through its own context manager: pytest's monkeypatch cannot restore
    # these entries (it deletes them on undo, breaking every later compile in the session).
    no_compiler = {"cpp.cxx": ("/no/such/c++",), "force_disable_caches": True}  # no kernel from an earlier compile
    torch._dynamo.reset()
    reference = _build(tiny_llama)  # eager fast path
    with inductor_config.patch(no_compiler), pytest.warns(UserWarning, match="cannot be compiled here"):
        llama = _build(tiny_llama, compile=True)
    torch._dynamo.reset()
    assert type(llama.decode_step) is DecodeStep
    assert picked_forms(llama.model) == picked_forms(reference.model)  # packed again, as before the attempt
    prompts = _prompts([3, 8], seed=4)
    assert llama.generate(prompts, 10, temperature=0) == reference.generate(prompts, 10, temperature=0)


@pytest.mark.parametrize("capability, fused", [("AVX2", True), ("AVX512", False), ("DEFAULT", False)])
def test_the_step_fuses_multiplies_and_adds_where_the_vectors_are_avx2s(monkeypatch, capability, fused):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    options = cpu_step.compile_options()
    assert options["cpp_wrapper"] is True
    assert options.get("cpp.enable_floating_point_contract_flag") == ("fast" if fused else None)


def test_small_models_run_the_eager_step_unless_asked(tiny_llama, monkeypatch):
    monkeypatch.delenv(cpu_step.ENV, raising=False)
    assert type(_build(tiny_llama).decode_step) is DecodeStep  # far below PROBE_MIN_BYTES: nothing compiled
    monkeypatch.setenv(cpu_step.ENV, "sometimes")
    with pytest.raises(ValueError, match="LLAMA_CPU_STEP.*'sometimes'"):
        _build(tiny_llama)


def test_the_eager_step_is_kept_where_it_is_faster_and_the_layers_put_back(tiny_llama, monkeypatch):
    """The timed comparison at load: an eager step timed MIN_GAIN times faster keeps the model's layers exactly
    as they were (packed weights, picked forms) and no compiled step. (Compiling is replaced by a stand-in.)"""
    llama = _build(tiny_llama)
    before = picked_forms(llama.model)
    weights = {k: v.clone() for k, v in llama.model.state_dict().items()}
    monkeypatch.setenv(cpu_step.ENV, "probe")
    monkeypatch.setattr(CompiledCPUStep, "run", lambda self, *args: None)  # "compiles" at once
    monkeypatch.setattr(cpu_step, "_time_round", lambda step, *args: 1.0 if isinstance(step, DecodeStep) else 2.0)
    assert cpu_decode_step(llama.model) is None
    assert picked_forms(llama.model) == before
    assert llama.model.cpu_step_probe["compiled_step_s"] == 2.0
    after = llama.model.state_dict()
    assert all(torch.equal(after[k], weights[k]) for k in weights)
    # ... and a compiled step timed faster is kept, as is one that ties (within MIN_GAIN either way)
    for eager_s, compiled_s in ((2.0, 1.0), (1.0, 1.02), (1.02, 1.0)):
        monkeypatch.setattr(cpu_step, "_time_round",
                            lambda step, *args: eager_s if isinstance(step, DecodeStep) else compiled_s)
        assert isinstance(cpu_decode_step(llama.model), CompiledCPUStep), (eager_s, compiled_s)


def test_the_two_steps_take_turns_at_load_each_on_its_own_layers(tiny_llama, monkeypatch):
    """The comparison's rounds alternate (the order reversed every round), so that a change in the machine's
    speed falls on both steps; each round runs on its own step's layers (the eager step on the packed weights
    and picked forms it had, the compiled one on its own forms); the winner's layers are left in place."""
    llama = _build(tiny_llama)
    before = picked_forms(llama.model)
    monkeypatch.setenv(cpu_step.ENV, "probe")
    monkeypatch.setattr(CompiledCPUStep, "run", lambda self, *args: None)  # "compiles" at once
    rounds = []

    def timed(step, *args):
        kind = "eager" if isinstance(step, DecodeStep) else "compiled"
        rounds.append((kind, picked_forms(llama.model) == before))
        return 1.0 if kind == "eager" else 1.02  # a tie: the compiled step is kept

    monkeypatch.setattr(cpu_step, "_time_round", timed)
    assert isinstance(cpu_decode_step(llama.model), CompiledCPUStep)
    kinds = [kind for kind, _ in rounds]
    assert kinds == (["eager", "compiled", "compiled", "eager"] * cpu_step.PROBE_ROUNDS)[: 2 * cpu_step.PROBE_ROUNDS]
    assert all(on_eager_layers == (kind == "eager") for kind, on_eager_layers in rounds)
    assert picked_forms(llama.model) != before  # the compiled step's layers, whatever round came last


def _innermost_loops(code: str):
    """The bodies of the innermost `for` loops of inductor's generated C++, each as one string."""
    bodies, stack = [], []  # stack: [brace depth at the loop's start, lines, has an inner loop]
    depth = 0
    for line in code.splitlines():
        if line.lstrip().startswith("for(") or line.lstrip().startswith("for ("):
            if stack:
                stack[-1][2] = True
            stack.append([depth, [], False])
        for frame in stack:
            frame[1].append(line)
        depth += line.count("{") - line.count("}")
        while stack and depth <= stack[-1][0] and "}" in line:
            start, lines, has_inner = stack.pop()
            if not has_inner:
                bodies.append("\n".join(lines))
    return bodies


@pytest.mark.slow  # compiles (inductor)
@pytest.mark.parametrize("int8", [False, True], ids=["bf16-weights", "int8-weights"])
def test_the_compiled_step_does_not_recompute_the_norm_for_every_weight_row(int8):
    """A product after an RMSNorm, as the step compiles it: the loop over a weight row reads the normalised
    activations from a buffer (computed once: llama.fast.layers.computed_once); left to itself inductor
    inlined the norm there, recomputed for every row (bf16 and int8 steps 1.08-1.28x slower)."""
    from torch._inductor.utils import run_and_get_code

    from llama.fast.blocked import BlockedProduct
    from llama.fast.cpu_forms import CompiledProduct
    from llama.fast.quantize import quantize_int8

    g = torch.Generator().manual_seed(0)
    w, norm_weight = torch.randn(256, 64, generator=g), torch.rand(64, generator=g) + 0.5
    q, scale = quantize_int8(w)
    forms = [CompiledProduct(q, scale), BlockedProduct(q, scale)] if int8 else \
        [CompiledProduct(w.to(torch.bfloat16)), BlockedProduct(w.to(torch.bfloat16))]
    x = torch.randn(1, 64, generator=g)  # float32 activations: the only bf16 / int8 loads are the weight's

    def normed(h):
        return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5) * norm_weight

    for form in forms:
        out, code = run_and_get_code(torch.compile(lambda h: form.traced(normed(h)), fullgraph=True), x)
        torch.testing.assert_close(out, form(normed(x)))
        blocks = getattr(form, "blocks", None)
        # (without AVX-512 the blocked int8 weight is held as int32 words: llama.fast.blocked.to_words)
        words = blocks is not None and blocks.dtype == torch.int32
        weight_load = "int32_t>::loadu" if words else "int8_t>::loadu" if int8 else "Vectorized<at::BFloat16>::loadu"
        products = [b for b in _innermost_loops("\n".join(code)) if weight_load in b]
        assert products, f"no loop reads the weight in the generated code of {type(form).__name__}"
        assert not any("sqrt" in b for b in products), type(form).__name__
