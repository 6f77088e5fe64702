"""One engine configuration: the same flags for run / serve / profile / bench engine, validation
with clear errors, KV pools that can hold a request, the cached quick profile, and the benchmark's
prompt source."""

from __future__ import annotations

import argparse
import math

import pytest

from adaserve.cli import build_parser, main
from adaserve.config import DEFAULT_THREADS, EngineConfig
from adaserve.core.errors import UserError

ENGINE_FLAGS = {"--model", "--dtype", "--device", "--threads", "--max-num-seqs", "--max-num-batched-tokens",
                "--prefill-chunk", "--max-model-len", "--kv-cache-gb", "--tensor-parallel-size"}
OLD_FLAGS = {"--max-batch-requests", "--max-batch-tokens", "--kv-memory-gb", "--max-seq-len"}


def _sub(parser: argparse.ArgumentParser, *path: str) -> argparse.ArgumentParser:
    for name in path:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    return parser


@pytest.mark.parametrize("command", [("run",), ("serve",), ("profile",), ("bench", "engine")])
def test_every_engine_command_takes_the_same_flags(command):
    flags = set(_sub(build_parser(), *command)._option_string_actions)
    assert ENGINE_FLAGS <= flags and not (OLD_FLAGS & flags)


@pytest.mark.parametrize("command", [["run", "--trace", "t", "--system", "vllm", "--out", "o"], ["serve"],
                                     ["profile", "--out", "p"]])
def test_threads_default_is_one_everywhere(command):
    args = build_parser().parse_args(command + ["--model", "tiny-llama"])
    cfg = EngineConfig.from_args(args)
    assert cfg.threads == DEFAULT_THREADS == 1 and cfg.dtype_name == "float32"


@pytest.mark.parametrize("field,value,message", [
    ("kv_cache_gb", math.inf, "--kv-cache-gb"), ("kv_cache_gb", math.nan, "--kv-cache-gb"),
    ("kv_cache_gb", 0.0, "--kv-cache-gb"), ("threads", 0, "--threads"), ("max_num_seqs", 0, "--max-num-seqs"),
    ("tensor_parallel_size", 0, "--tensor-parallel-size"), ("dtype", "float8", "--dtype"), ("device", "tpu", "--device"),
])
def test_bad_engine_options_are_user_errors(field, value, message):
    with pytest.raises(UserError, match=message):
        EngineConfig("tiny-llama", **{field: value}).validate()


def test_cuda_defaults_to_bfloat16():
    assert EngineConfig("m", device="cuda").dtype_name == "bfloat16"


@pytest.mark.parametrize("value", ["inf", "1e-9", "-1"])
def test_serve_refuses_a_useless_kv_pool_at_start_up(value, capsys):
    assert main(["serve", "--model", "tiny-llama", "--kv-cache-gb", value, "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("adaserve: error: --kv-cache-gb") and "Traceback" not in err


def test_kv_pool_too_small_for_one_request_names_the_minimum():
    from adaserve.engine.loader import tiny_random_model
    from adaserve.runtime.build import sized_limits

    cfg = EngineConfig("tiny-llama", kv_cache_gb=1e-9)
    with pytest.raises(UserError, match=r"give at least [\d.e-]+ GiB"):
        sized_limits(cfg, cfg.default_limits(), tiny_random_model("llama"), None)


def _fake_profile(name="fake", **measured):
    import numpy as np

    from adaserve.core.profile import LatencyProfile, Limits, Table

    t = Table(np.array([1.0, 64.0]), np.array([1.0, 2.0]))
    return LatencyProfile(name, t, t, baseline_ms=1.0, source="measured", limits=Limits(4, 64, 64, 256, 1000),
                          measured_with=measured)


def test_quick_profile_is_cached_per_configuration(tmp_path, monkeypatch):
    from adaserve.engine.loader import tiny_random_model
    from adaserve.runtime import build

    monkeypatch.setenv("ADASERVE_CACHE", str(tmp_path))
    monkeypatch.setenv("ADASERVE_PROFILE_CACHE", "1")
    calls = []
    monkeypatch.setattr(build, "quick_profile", lambda *a, **k: calls.append(a) or _fake_profile())
    model, said = tiny_random_model("llama"), []
    cfg = EngineConfig("tiny-llama", max_num_seqs=4)
    first = build.resolve_profile(cfg, model, None, say=said.append, progress=False)
    second = build.resolve_profile(cfg, model, None, say=said.append, progress=False)
    assert len(calls) == 1 and first.to_dict() == second.to_dict()
    assert any("measuring a quick latency profile" in s for s in said)
    assert any("cached quick profile" in s for s in said)
    other = build.resolve_profile(EngineConfig("tiny-llama", max_num_seqs=4, threads=2), model, None,
                                  say=said.append, progress=False)
    assert len(calls) == 2 and other is not None  # other threads: another cache entry
    assert len(list((tmp_path / "profiles").glob("*.json"))) == 2


def test_profile_measured_with_other_threads_warns(tmp_path):
    import torch

    from adaserve.engine.loader import tiny_random_model
    from adaserve.runtime.build import resolve_profile

    path = tmp_path / "p.json"
    _fake_profile(device="cpu", dtype="float32", threads=torch.get_num_threads() + 3).save(path)
    said = []
    resolve_profile(EngineConfig("tiny-llama", profile=str(path)), tiny_random_model("llama"), None,
                    say=said.append)
    assert any(s.startswith("warning: profile 'fake' was measured with threads") for s in said)
    said.clear()
    _fake_profile(device="cpu", dtype="float32", threads=torch.get_num_threads()).save(path)
    resolve_profile(EngineConfig("tiny-llama", profile=str(path)), tiny_random_model("llama"), None,
                    say=said.append)
    assert not any("warning" in s for s in said)


def test_bench_prompts_come_from_text_never_random_tokens(tmp_path):
    from adaserve.bench.engine import DEFAULT_PROMPTS, trace_prompts
    from adaserve.engine.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    prompts, source = trace_prompts(tok, 4, 32)
    assert source.startswith(DEFAULT_PROMPTS) and len(prompts) == 4
    assert all(tok.decode(p) and len(p) <= 32 for p in prompts)
    with pytest.raises(UserError, match="prompts, the benchmark needs 9"):
        from adaserve.core.trace import TraceRecord, save_trace

        save_trace(tmp_path / "t.json", [TraceRecord(0.0, 2, 4, "hi", 1.2)])
        trace_prompts(tok, 9, 32, tmp_path / "t.json")


@pytest.mark.parametrize("flag,value", [("--body-timeout", "0"), ("--max-body-mb", "inf"), ("--body-timeout", "nan")])
def test_serve_refuses_bad_body_limits_before_loading(flag, value, capsys):
    assert main(["serve", "--model", "tiny-llama", flag, value]) == 2
    err = capsys.readouterr().err
    assert "--body-timeout and --max-body-mb" in err and "Traceback" not in err
