"""The serving warm-up (runtime/warmup.py): throwaway requests before the real ones, so that no host
kernel compiles in the middle of a run, and nothing of the real executor is touched."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from adaserve.config import EngineConfig
from adaserve.core import jit
from adaserve.engine.cuda_graphs import CHUNK_QUERY_BUCKETS
from adaserve.runtime.build import build_engine
from adaserve.runtime.warmup import warm_serving

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("system,draft", [("adaserve_plus", None), ("vllm", None), ("vllm_spec_4", "tiny-llama")])
def test_warm_up_leaves_the_real_executor_untouched(system, draft):
    eng = build_engine(EngineConfig("tiny-llama", draft=draft, profile="llama-3.1-70b", max_num_seqs=4,
                                    max_model_len=256, threads=1), progress=False)
    ex = eng.executor
    free, blocks = ex.cache.alloc.free_blocks, ex.num_blocks
    assert warm_serving(eng, system).serving_s > 0
    assert ex.seqs == {} and ex.outputs == {} and ex.prompts == {}
    assert ex.cache.alloc.free_blocks == free and ex.num_blocks == blocks
    assert getattr(ex.drafter, "calls", 0) == 0  # the real drafter drafted nothing


@pytest.mark.parametrize("system,queries", [("vllm", {1}), ("adaserve", {1, 2, 4, 8, 16, 32})])
def test_warm_up_captures_the_graph_buckets_of_the_policy(system, queries):
    from adaserve.engine import TorchExecutor

    eng = build_engine(EngineConfig("tiny-llama", profile="llama-3.1-70b", max_num_seqs=4, max_model_len=256,
                                    threads=1), progress=False)
    # CUDA graphs on the CPU: the runner's eager stand-in (engine/cuda_graphs.py), same buckets
    eng.executor = TorchExecutor(eng.model, eng.profile, eng.executor.drafter, cuda_graphs=True, ignore_eos=True)
    warm = warm_serving(eng, system)
    runner = eng.executor.graphs
    queries = tuple(sorted(queries)) + CHUNK_QUERY_BUCKETS  # every policy prefills
    assert warm.graphs == len(runner.graphs) == len(runner.buckets(queries)) > 0
    assert {b.queries for b in runner.graphs} == {b.queries for b in runner.buckets(queries)}
    assert {64, 128} <= {b.queries for b in runner.graphs}  # prefill chunks (the limits allow 128 rows here)
    assert system in warm.describe(system) and f"captured {warm.graphs} CUDA graphs" in warm.describe(system)


def test_warm_up_fits_a_short_max_model_len():
    """A 48-token prompt would be refused under ``--max-model-len 40``: the throwaway prompts shrink
    to fit, so the warm-up still serves (and compiles) rather than being refused."""
    eng = build_engine(EngineConfig("tiny-llama", profile="llama-3.1-70b", max_num_seqs=2, max_model_len=40,
                                    threads=1), progress=False)
    seen = []
    real = eng.executor.__class__.execute

    def counting(self, prefill, decode, *rest):
        seen.append((len(prefill), len(decode)))
        return real(self, prefill, decode, *rest)

    eng.executor.__class__.execute = counting
    try:
        warm_serving(eng, "adaserve")
    finally:
        eng.executor.__class__.execute = real
    assert any(d for _, d in seen) and any(p for p, _ in seen)  # prompts prefilled, tokens decoded


# In a fresh process (numba dispatchers start with no compiled signature, even when its disk cache
# holds them): count every dispatcher's signatures right before the real requests are served and
# right after. A signature added during serving is a kernel compiled (or loaded) mid-run.
SPY = r"""
import gc, json, sys
from numba.core.dispatcher import Dispatcher
import adaserve.runtime.replay as rp
import adaserve.runtime.warmup as wu
from adaserve.cli import main

def signatures():
    return {f"{d.py_func.__module__}.{d.py_func.__qualname__}": len(d.signatures)
            for d in gc.get_objects() if isinstance(d, Dispatcher)}

if sys.argv[1] == "off":
    rp.warm_serving = lambda eng, system: wu.WarmUp(0.0)
real = rp.replay
def spy(cfg, ex, requests):
    before = signatures()
    out = real(cfg, ex, requests)
    after = signatures()
    print("NEW " + json.dumps({k: n - before.get(k, 0) for k, n in after.items() if n > before.get(k, 0)}))
    return out
rp.replay = spy
sys.exit(main(sys.argv[2:]))
"""


def compiled_during_serving(tmp_path: Path, warm: bool, system: str, profile: str) -> dict[str, int]:
    from test_engine_cli import small_trace

    trace = small_trace(tmp_path / f"t-{system}-{warm}.json", n=6)
    args = ["run", "--trace", str(trace), "--system", system, "--model", "tiny-llama", "--profile", profile,
            "--max-num-seqs", "4", "--max-model-len", "256", "--threads", "1", "--no-progress",
            "--ignore-eos", "--out", str(tmp_path / f"out-{system}-{warm}")]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run([sys.executable, "-c", SPY, "on" if warm else "off", *args], capture_output=True, text=True,
                       cwd=tmp_path, env=env, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    [line] = [x for x in p.stdout.splitlines() if x.startswith("NEW ")]
    return json.loads(line[4:])


@pytest.fixture(scope="module")
def measured_profile(tmp_path_factory) -> str:
    """A measured profile of the tiny model with the n-gram drafter (the one adaserve_plus's
    drafting switch reads, as on a GPU), not the built-in 70B one."""
    from adaserve.cli import main

    out = tmp_path_factory.mktemp("prof") / "tiny.json"
    assert main(["profile", "--model", "tiny-llama", "--out", str(out), "--quick", "--repeat", "1", "--threads", "1",
                 "--no-progress", "--max-num-seqs", "4", "--max-num-batched-tokens", "64"]) == 0
    return str(out)


@pytest.mark.skipif(not jit.enabled(), reason="numba is not importable or ADASERVE_NUMBA=0")
@pytest.mark.parametrize("system,profile", [("adaserve_plus", "llama-3.1-70b"), ("adaserve", "llama-3.1-70b"),
                                            ("adaserve_plus", "measured")])
def test_no_kernel_compiles_while_serving(tmp_path, system, profile, request):
    if profile == "measured":
        profile = request.getfixturevalue("measured_profile")
    assert compiled_during_serving(tmp_path, True, system, profile) == {}
    if system == "adaserve" and profile == "llama-3.1-70b":
        # the check can fail: without the warm-up the same run compiles (or loads) its kernels mid-run.
        # adaserve selects with its compiled kernels in every iteration; adaserve_plus decides from
        # predicted against real times whether to draft at all, so on a loaded machine a short run of
        # it may call no kernel (the likely cause of one failure, seen with another suite running beside)
        assert compiled_during_serving(tmp_path, False, system, profile)
