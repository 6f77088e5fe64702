"""Tensor parallelism on the CPU: gloo, workers spawned by the command (or started by torchrun).

Each group is started in-process through ``runtime.build.load_models`` (what every engine command
does) and compared with the unsharded model: logits of prefill chunks, decode tokens and token trees
(after a tree commit, whose KV move every rank must replay), greedy speculation, the server, a killed
worker, and two torchrun "nodes" on loopback."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from adaserve.config import EngineConfig
from adaserve.core.errors import UserError
from adaserve.core.profile import LatencyProfile
from adaserve.core.request import Request
from adaserve.engine import BatchBuilder, ModelDrafter, NgramDrafter, TorchExecutor
from adaserve.engine.config import ModelConfig
from adaserve.engine.loader import resolve_model
from adaserve.engine.tp import TPFailure, TPModel
from adaserve.iteration import ServingLoop
from adaserve.runtime.build import load_models
from adaserve.runtime.random_checkpoint import save_random_checkpoint
from adaserve.scheduling.policies import make_policy

from engine_util import free_port, plain_greedy, wait_for_server

BIN = Path(sys.executable).parent
EOS = 2
PROFILE = {"name": "tiny", "baseline_ms": 2.0, "source": "test",
           "limits": {"max_batch_requests": 8, "max_batch_tokens": 128, "prefill_chunk": 32, "max_seq_len": 256},
           "verify": {"tokens": [1, 8, 128], "ms": [1.0, 1.2, 5.0]}, "draft": {"tokens": [1, 128], "ms": [0.2, 1.0]}}


@pytest.fixture(autouse=True)
def plain_kernels(monkeypatch):
    """One thread, F.linear everywhere (no kernel timing at load: the workers inherit the variable)."""
    monkeypatch.setenv("ADASERVE_PREPACK", "0")
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def start(model: str, world: int) -> TPModel:
    tp, _, _ = load_models(EngineConfig(model, tensor_parallel_size=world), say=lambda s: None)
    assert isinstance(tp, TPModel) and tp.world_size == world
    return tp


def four_kv_heads(folder: Path) -> Path:
    """A random Llama checkpoint with 4 KV heads (8 query heads), for 4 ranks."""
    cfg = ModelConfig(num_heads=8, num_kv_heads=4, head_dim=8, bos_token_id=1, eos_token_ids=(EOS,))
    return save_random_checkpoint(cfg, folder, torch.float32, device="cpu", seed=3)


def step_logits(model, cache) -> list[torch.Tensor]:
    """Two prefills; a tree + a decode; commit a branch of the tree (a KV move); a tree, a decode and
    a 40-token prefill (its own attention group) over the moved KV."""
    out = []
    b = BatchBuilder(cache)
    b.add_prefill("a", list(range(3, 43)))
    b.add_prefill("b", [7, 9, 11, 7, 9])
    out.append(model(b.build(), cache))
    b = BatchBuilder(cache)
    b.add_tree("a", [40, 41, 42, 43, 44, 45], [-1, 0, 0, 1, 3, 2])
    b.add_decode("b", 13)
    out.append(model(b.build(), cache))
    cache.commit("a", [0, 2, 5])  # nodes 2 and 5 move to positions +1, +2: replayed on every rank
    b = BatchBuilder(cache)
    b.add_tree("a", [46, 47, 48], [-1, 0, 0])
    b.add_decode("b", 14)
    b.add_prefill("c", list(range(100, 140)))
    out.append(model(b.build(), cache))
    return out


def check_logits(tp: TPModel, ref) -> None:
    got = step_logits(tp, tp.make_cache(32, 16))
    want = step_logits(ref, ref.make_cache(32, 16))
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert torch.allclose(g, w, atol=1e-5, rtol=0), (g - w).abs().max()


def speculate(model, system: str, drafter, prompts: dict[int, list[int]], new: int):
    ex = TorchExecutor(model, LatencyProfile.from_dict(PROFILE), drafter, num_blocks=120)
    ex.set_prompts(prompts)
    reqs = [Request(rid=i, arrival_ms=0.5 * i, input_len=len(p), max_new_tokens=new, slo_ratio=1.5, slo_ms=3.0,
                    category="coding") for i, p in prompts.items()]
    loop = ServingLoop(make_policy(system, "llama"), ex, reqs)
    loop.run()
    return ex.outputs, loop.stats


def test_llama_two_ranks_logits_lossless_speculation_and_a_killed_worker():
    tp = start("tiny-llama", 2)
    try:
        ref, _ = resolve_model("tiny-llama")
        assert tp.config.num_kv_heads == 1 and tp.make_cache(4, 16).k.shape[3] == 1  # rank 0 holds its shard
        check_logits(tp, ref)
        prompts = {i: ([5 + i, 9, 30 + i, 7] * 6)[: 10 + 3 * i] for i in range(4)}
        want = {i: plain_greedy(ref, p, 24, (EOS,)) for i, p in prompts.items()}
        draft = copy.deepcopy(ref)  # a draft on rank 0, unsharded: agrees with the target, long commits
        for system, drafter in (("adaserve", ModelDrafter(draft, num_blocks=120)), ("specinfer", NgramDrafter())):
            outputs, stats = speculate(tp, system, drafter, prompts, 24)
            assert {i: outputs[i] for i in prompts} == want, system
            assert stats.committed_tokens > stats.request_steps  # trees were accepted (KV moves replayed)
        kill_a_worker_mid_run(tp)
    finally:
        tp.close()


def kill_a_worker_mid_run(tp: TPModel) -> None:
    """SIGKILL a worker between two steps of a run: the next step raises ``TPFailure`` naming it,
    within 30 s, and the group stays broken."""
    ex = TorchExecutor(tp, LatencyProfile.from_dict(PROFILE), NgramDrafter(), num_blocks=60)
    ex.set_prompts({i: [5 + i, 9, 30] * 4 for i in range(3)})
    reqs = [Request(rid=i, arrival_ms=0.0, input_len=12, max_new_tokens=10_000, slo_ratio=1.5, slo_ms=3.0,
                    category="coding") for i in range(3)]
    loop = ServingLoop(make_policy("adaserve", "llama"), ex, reqs)
    for _ in range(3):
        loop.run_once()
    os.kill(tp.processes[0].pid, signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(TPFailure, match=r"worker rank 1 \(pid \d+\) was killed by signal 9"):
        while time.monotonic() - t0 < 60:
            loop.run_once()
    assert time.monotonic() - t0 < 30
    with pytest.raises(TPFailure):
        loop.run_once()


def test_qwen2_biases_two_ranks_and_a_hung_worker(monkeypatch):
    monkeypatch.setenv("ADASERVE_TP_TIMEOUT", "2")  # read when the group starts
    monkeypatch.setenv("ADASERVE_DEVICE_MASK", "1")  # the batches carry mask windows, as on a GPU
    tp = start("tiny-qwen2", 2)
    try:
        assert tp.model.layers[0].self_attn.q_proj.bias.shape == (32,)  # 2 of 4 heads x 16
        check_logits(tp, resolve_model("tiny-qwen2")[0])
        cache = tp.make_cache(8, 16)
        os.kill(tp.processes[0].pid, signal.SIGSTOP)  # alive, but never answers
        b = BatchBuilder(cache)
        b.add_prefill(0, [5, 6, 7])
        t0 = time.monotonic()
        with pytest.raises(TPFailure, match="tensor-parallel group of 2 failed.*2 s timeout"):
            tp(b.build(), cache)
        assert 1.5 < time.monotonic() - t0 < 15
    finally:
        tp.close()  # kills the stopped worker
    assert tp.processes[0].exitcode == -signal.SIGKILL


def test_four_ranks_with_four_kv_heads(tmp_path):
    folder = four_kv_heads(tmp_path / "kv4")
    tp = start(str(folder), 4)
    try:
        assert tp.config.num_kv_heads == 1 and tp.config.num_heads == 2
        check_logits(tp, resolve_model(str(folder))[0])
    finally:
        tp.close()


def test_refuses_kv_heads_that_do_not_split():
    t0 = time.monotonic()
    with pytest.raises(UserError, match=r"--tensor-parallel-size 4: the model's num_kv_heads 2 .*not divisible"):
        start("tiny-llama", 4)
    assert time.monotonic() - t0 < 5  # refused before any worker starts
    with pytest.raises(UserError, match="--cuda-graphs"):
        EngineConfig("tiny-llama", device="cuda", tensor_parallel_size=2, cuda_graphs=True).validate()
    assert not EngineConfig("tiny-llama", device="cuda", tensor_parallel_size=2).use_cuda_graphs


def test_serve_streams_a_chat_completion_with_two_ranks(tmp_path):
    from adaserve.core.trace import TraceRecord
    from adaserve.runtime.replay import tokenize

    profile = tmp_path / "tiny.json"
    profile.write_text(json.dumps(PROFILE))
    port = free_port()
    cmd = [sys.executable, "-m", "adaserve", "serve", "--model", "tiny-llama", "--tensor-parallel-size", "2",
           "--profile", str(profile), "--port", str(port), "--served-model-name", "t", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    msg = [{"role": "user", "content": "def add(a, b):"}]
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_server(proc, url)
        body = {"model": "t", "messages": msg, "max_tokens": 12, "stream": True}
        with httpx.Client(base_url=url, timeout=30) as c, c.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        text = "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1]
                       if json.loads(e)["choices"])
        model, tok = resolve_model("tiny-llama")
        ids = tokenize(tok, [TraceRecord(0.0, 1, 12, msg[0]["content"], 1.2)], chat_template=True)[0]
        assert text == tok.decode(plain_greedy(model, ids, 12, (EOS,)))
        t0 = time.monotonic()
        os.kill(children(proc.pid)[0], signal.SIGKILL)  # an idle server notices too, and ends
        out, _ = proc.communicate(timeout=30)
        assert time.monotonic() - t0 < 30 and proc.returncode != 0
        assert "tensor-parallel group of 2 failed: worker rank 1" in out and "killed by signal 9" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def children(pid: int) -> list[int]:
    """Child processes of ``pid`` (Linux /proc), the spawned workers first (multiprocessing's
    resource tracker is not a worker)."""
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(k) for k in (task / "children").read_text().split()]
    workers = [k for k in kids if "spawn_main" in Path(f"/proc/{k}/cmdline").read_text()
               and "resource_tracker" not in Path(f"/proc/{k}/cmdline").read_text()]
    return workers


def test_two_torchrun_nodes_on_loopback(tmp_path):
    trace = tmp_path / "t.json"
    trace.write_text(json.dumps([{"emission_time_ms": 10.0 * i, "input_length": 1, "output_length": 8,
                                  "prompt": p, "slo_ratio": 1.2} for i, p in enumerate(["def f(x):", "Hello"])]))
    profile = tmp_path / "tiny.json"
    profile.write_text(json.dumps(PROFILE))
    port = free_port()
    procs = []
    for node in (0, 1):
        cmd = [str(BIN / "torchrun"), "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(node),
               "--master-addr", "127.0.0.1", "--master-port", str(port), str(BIN / "adaserve"), "run",
               "--trace", str(trace), "--system", "adaserve", "--model", "tiny-llama", "--profile", str(profile),
               "--tensor-parallel-size", "2", "--ignore-eos", "--no-progress", "--out", str(tmp_path / f"r{node}")]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    doc = json.loads((tmp_path / "r0.json").read_text())
    assert doc["complete"] and doc["summary"]["completed"] == 2 and doc["summary"]["total_tokens"] == 16
    assert doc["meta"]["tensor_parallel"] == 2
    assert not (tmp_path / "r1.json").exists()  # rank 1 only served as a worker


def test_a_profile_measured_with_another_tensor_parallel_size_warns():
    from adaserve.engine.loader import tiny_random_model
    from adaserve.runtime.build import warn_if_measured_elsewhere
    from adaserve.runtime.profiler import measured_with

    model = tiny_random_model("llama")
    assert measured_with(model)["tensor_parallel"] == 1
    profile = LatencyProfile.from_dict({**PROFILE, "measured_with": {**measured_with(model), "tensor_parallel": 2}})
    said = []
    warn_if_measured_elsewhere(profile, model, said.append)
    assert len(said) == 1 and "tensor_parallel 2 (now 1)" in said[0]
