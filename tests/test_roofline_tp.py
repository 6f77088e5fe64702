"""Tensor-parallel hardware in the roofline (issue 13, item 4): the all-reduce term follows the ring
formula in the TP degree and the interconnect bandwidth, and `adaserve profiles roofline` derives
"Llama-3.1-70B on 4x A100 NVLink" (or any link) and reports the difference with the artifact."""

import json
from dataclasses import replace

import pytest

from adaserve.cli import main
from adaserve.sim import roofline
from adaserve.sim.profiles import get_profile

NO_LATENCY = replace(roofline.DEFAULT_EFFICIENCY, allreduce_latency_us=0.0)


@pytest.mark.parametrize("tp", [2, 4, 8])
@pytest.mark.parametrize("gb_per_s", [32.0, 300.0, 450.0])
def test_allreduce_is_the_ring_formula(tp, gb_per_s):
    """A ring all-reduce moves 2(p-1)/p of the message through each GPU's link."""
    gpu = roofline.with_interconnect("a100-80gb", gb_per_s)
    message = 128 * 8192 * 2  # 128 tokens of Llama-70B's hidden state in bf16
    eff = NO_LATENCY
    expected_ms = 1e3 * 2 * (tp - 1) / tp * message / (gb_per_s * 1e9 * eff.nvlink)
    assert roofline.allreduce_ms(message, gpu, tp, eff) == pytest.approx(expected_ms, rel=1e-12)
    # the fixed latency is added once per all-reduce
    with_latency = roofline.allreduce_ms(message, gpu, tp, roofline.DEFAULT_EFFICIENCY)
    assert with_latency - expected_ms == pytest.approx(roofline.ALLREDUCE_LATENCY_US * 1e-3)


def test_allreduce_scales_with_tp_and_bandwidth():
    gpu = roofline.get_gpu("a100-80gb")
    ar = lambda tp, g=gpu: roofline.allreduce_ms(1e6, g, tp, NO_LATENCY)  # noqa: E731
    assert ar(1) == 0.0  # one GPU: nothing to reduce
    assert ar(4) / ar(2) == pytest.approx((2 * 3 / 4) / (2 * 1 / 2))
    assert ar(8) / ar(2) == pytest.approx(1.75)
    slow = roofline.with_interconnect(gpu, gpu.nvlink_bytes_per_s / 1e9 / 10)
    assert ar(4, slow) == pytest.approx(10 * ar(4))


def test_step_pays_two_allreduces_per_layer_and_only_they_see_the_link():
    model = roofline.get_model("llama-3.1-70b")
    nvlink = roofline.step_breakdown(model, "a100-80gb", 4, 256)
    pcie = roofline.step_breakdown(model, roofline.with_interconnect("a100-80gb", 32), 4, 256)
    per_layer = roofline.allreduce_ms(256 * model.hidden * model.bytes_per_param,
                                      roofline.get_gpu("a100-80gb"), 4, roofline.DEFAULT_EFFICIENCY)
    assert nvlink.comm_ms == pytest.approx(model.layers * 2 * per_layer)
    assert (pcie.compute_ms, pcie.memory_ms, pcie.overhead_ms) == (
        nvlink.compute_ms, nvlink.memory_ms, nvlink.overhead_ms)
    fixed = model.layers * 2 * roofline.ALLREDUCE_LATENCY_US * 1e-3  # latency, not bandwidth
    assert pcie.comm_ms - fixed == pytest.approx((nvlink.comm_ms - fixed) * 300 / 32)
    assert roofline.step_breakdown(model, "a100-80gb", 1, 256).comm_ms == 0.0


@pytest.mark.parametrize("bad", [0.0, -5.0, float("nan"), float("inf")])
def test_interconnect_bandwidth_must_be_positive(bad):
    with pytest.raises(ValueError, match="interconnect bandwidth"):
        roofline.with_interconnect("a100-80gb", bad)


def test_cli_derives_llama70b_on_4xa100_and_reports_the_difference(tmp_path, capsys):
    out_file = tmp_path / "l70.json"
    assert main(["profiles", "roofline", "llama-3.1-70b", "--gpu", "a100-80gb", "--tp", "4",
                 "--interconnect-gbps", "300", "--draft", "llama-3.2-1b", "--out", str(out_file)]) == 0
    out = capsys.readouterr().out
    assert "4x A100-SXM4-80GB (300 GB/s link) TP4" in out and "300 GB/s per direction" in out
    rows = {int(line.split()[0]): line.split() for line in out.splitlines()
            if line.strip() and line.split()[0].isdigit()}
    # the 256-token step: roofline, its all-reduce part, the artifact's 85 ms and the difference
    step, comm, table, diff = rows[256][1:]
    assert float(step) == pytest.approx(roofline.step_ms("llama-3.1-70b", "a100-80gb", 4, 256), abs=0.05)
    assert float(table) == 85.0 and diff == f"{(float(step) - 85.0) / 85.0:+.1%}"
    assert float(comm) > 0
    assert "max |difference|" in out
    # the written profile is what `simulate --profile FILE` reads
    prof = get_profile(str(out_file))
    assert prof.family == "llama" and prof.limits.max_batch_requests == 64
    assert float(prof.verify(256)) == pytest.approx(float(step), abs=0.05)
    assert json.loads(out_file.read_text())["name"] == "llama-3.1-70b-a100-80gb-tp4-link300"


def test_cli_slower_link_costs_more_and_unknown_models_compare_with_nothing(capsys):
    assert main(["profiles", "roofline", "llama-3.1-70b", "--tp", "4", "--interconnect-gbps", "32"]) == 0
    slow = capsys.readouterr().out
    assert main(["profiles", "roofline", "llama-3.1-70b", "--tp", "4"]) == 0
    fast = capsys.readouterr().out
    step = lambda out: float(next(l.split()[1] for l in out.splitlines() if l.split()[:1] == ["1024"]))  # noqa: E731,E741
    assert step(slow) > step(fast) + 100
    assert main(["profiles", "roofline", "llama-3.2-1b"]) == 0
    assert "nothing to compare" in capsys.readouterr().out


@pytest.mark.parametrize("args,needle", [(["--tp", "0"], "--tp must be >= 1"),
                                         (["--interconnect-gbps", "0"], "interconnect bandwidth"),
                                         (["--gpu", "v100"], "unknown GPU"),
                                         (["--context", "-1"], "--context")])
def test_cli_refuses_bad_flags(args, needle, capsys):
    assert main(["profiles", "roofline", "llama-3.1-70b", *args]) == 2
    assert needle in capsys.readouterr().err
