"""The CLI's small contracts: help and version, broken pipes, progress bars only on a terminal,
user errors printed short (everything else with its traceback), hostile trace and profile files,
file permissions that follow the umask, and trace generation that says what to change."""

from __future__ import annotations

import asyncio
import functools
import importlib.metadata
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

import adaserve.cli as cli
from adaserve.bench import http_client
from adaserve.core import slo
from adaserve.core.errors import UserError
from adaserve.core.files import JsonFileError, read_json
from adaserve.core.profile import LatencyProfile
from adaserve.core.request import Phase
from adaserve.core.results import write_results
from adaserve.core.trace import TraceError, TraceRecord, load_trace, save_trace
from adaserve.sim.profiles import get_profile
from adaserve.sim.run import simulate_records
from adaserve.workload import prompts
from adaserve.workload.generate import TraceSpec, generate_trace

ROOT = Path(__file__).resolve().parents[1]
RECORD = {"emission_time_ms": 0.0, "input_length": 5, "output_length": 3, "prompt": "hi",
          "slo_ratio": 1.2}


def records(n: int = 6) -> list[TraceRecord]:
    """A few short requests of every category (ratios of the paper's categories)."""
    cats = slo.CATEGORIES
    return [TraceRecord(float(10 * i), 8 + i, 4, f"prompt number {i}", cats[i % 3].slo_ratio,
                        cats[i % 3].name) for i in range(n)]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


# ------------------------------------------------------------------------------ help, version

def test_help_is_a_description_with_the_main_commands():
    text = cli.build_parser().format_help()
    assert "SLO-customized speculative decoding" in text
    assert "main commands:" in text and "trace inspect FILE" in text and "simulate" in text
    assert "register(subparsers)" not in text  # not the module's developer docstring


def test_command_map_names_the_module_of_every_command():
    """``COMMANDS`` (which module a command line imports alone) against what the modules register,
    and a command's own parser is the same as in the whole one."""
    import argparse
    import importlib
    import pkgutil

    registered = {}
    for m in pkgutil.iter_modules(cli.__path__):
        module = importlib.import_module(f"adaserve.cli.{m.name}")
        if hasattr(module, "register"):
            sub = argparse.ArgumentParser().add_subparsers()
            module.register(sub)
            registered.update({name: m.name for name in sub.choices})
    assert registered == cli.COMMANDS
    whole = cli.build_parser()
    for name in cli.COMMANDS:
        one = cli.build_parser(name)
        (action,) = [a for a in one._actions if isinstance(a, argparse._SubParsersAction)]
        (all_,) = [a for a in whole._actions if isinstance(a, argparse._SubParsersAction)]
        assert action.choices[name].format_help() == all_.choices[name].format_help()


def test_version_comes_from_the_package_metadata(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"adaserve {importlib.metadata.version('adaserve')}"


# ------------------------------------------------------------------------------- broken pipe

def test_a_closed_pipe_ends_quietly_with_sigpipe_status():
    """`adaserve profiles show NAME | head`: the reader is gone before anything is written."""
    proc = subprocess.Popen([sys.executable, "-m", "adaserve", "profiles", "show", "llama-3.1-70b"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.wait(timeout=60)
    proc.stderr.close()
    assert proc.returncode == cli.EXIT_BROKEN_PIPE, err
    assert "Traceback" not in err and "BrokenPipeError" not in err


# ------------------------------------------------------------------------------ progress bars

def test_simulator_bar_is_drawn_only_on_a_terminal(capsys, monkeypatch):
    monkeypatch.delenv("ADASERVE_PROGRESS", raising=False)
    simulate_records(records(), "adaserve", "llama-3.1-70b", progress=True)
    assert capsys.readouterr().err == ""  # captured stderr is not a TTY
    monkeypatch.setenv("ADASERVE_PROGRESS", "1")
    simulate_records(records(), "adaserve", "llama-3.1-70b", progress=True)
    assert "adaserve on llama-3.1-70b" in capsys.readouterr().err


def _fake_server(request: httpx.Request) -> httpx.Response:
    """Just enough of an OpenAI-compatible server for the HTTP bench client."""
    if request.url.path == "/v1/models":
        return httpx.Response(200, json={"data": [{"id": "fake"}]})
    if request.url.path == "/v1/completions":
        events = [{"choices": [{"text": "a", "finish_reason": None}]},
                  {"choices": [{"text": "b", "finish_reason": "length"}]}]
        body = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
        return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})
    return httpx.Response(404, json={"error": {"message": "not found"}})


def test_http_bench_bar_is_drawn_only_on_a_terminal(capsys, monkeypatch):
    client = functools.partial(httpx.AsyncClient, transport=httpx.MockTransport(_fake_server))
    monkeypatch.setattr(http_client.httpx, "AsyncClient", client)
    cfg = http_client.BenchConfig(endpoint="http://bench.test", baseline_ms=30.0, progress=True)
    monkeypatch.delenv("ADASERVE_PROGRESS", raising=False)
    requests, _, model = asyncio.run(http_client.replay(records(3), cfg))
    assert model == "fake" and all(r.phase == Phase.FINISHED for r in requests)
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("ADASERVE_PROGRESS", "1")
    asyncio.run(http_client.replay(records(3), cfg))
    assert "requests" in capsys.readouterr().err


# ----------------------------------------------------------------------------- error contract

@pytest.fixture
def failing_command(monkeypatch):
    """`adaserve profiles` raising whatever the test puts in ``box[0]``."""
    box: list[BaseException] = []

    def boom() -> str:
        raise box[0]

    monkeypatch.setattr("adaserve.cli.profile_info_cmd.format_list", boom)
    return box


def test_user_error_is_one_line_with_exit_2(capsys, failing_command):
    failing_command.append(UserError("record 3: field 'prompt' must be a string"))
    code, _, err = run_cli(capsys, "profiles")
    assert code == 2
    assert err == "adaserve: error: record 3: field 'prompt' must be a string\n"


@pytest.mark.parametrize("exc", [FileNotFoundError(2, "No such file or directory", "t.json"),
                                 PermissionError(13, "Permission denied", "t.json"),
                                 IsADirectoryError(21, "Is a directory", "t.json")])
def test_a_bad_path_is_one_line_naming_it(capsys, failing_command, exc):
    failing_command.append(exc)
    code, _, err = run_cli(capsys, "profiles")
    assert code == 2 and err == f"adaserve: error: t.json: {exc.strerror}\n"


@pytest.mark.parametrize("exc", [RuntimeError("internal"), KeyError("k"), TypeError("t"),
                                 ConnectionError("refused"), ZeroDivisionError()])
def test_anything_else_keeps_its_traceback(failing_command, exc):
    failing_command.append(exc)
    with pytest.raises(type(exc)):
        cli.main(["profiles"])


def test_is_user_error():
    assert cli._is_user_error(UserError("x"))
    assert cli._is_user_error(TraceError("t.json", ["not found"]))
    assert cli._is_user_error(prompts.PoolError("no prompts"))
    assert cli._is_user_error(FileNotFoundError(2, "No such file", "x"))
    for exc in (RuntimeError("x"), KeyError("x"), OSError("disk"), BrokenPipeError()):
        assert not cli._is_user_error(exc)


def test_an_internal_value_error_keeps_its_traceback(failing_command):
    failing_command.append(ValueError("an internal invariant broke"))
    assert not cli._is_user_error(failing_command[0])
    with pytest.raises(ValueError):
        cli.main(["profiles"])


# ------------------------------------------------------------------------ hostile trace files

def write(tmp_path: Path, content: str | bytes, name: str = "t.json") -> Path:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


def test_deeply_nested_trace_is_a_clear_error(tmp_path, capsys):
    path = write(tmp_path, "[" * 100_000 + "]" * 100_000)
    code, _, err = run_cli(capsys, "trace", "inspect", str(path))
    assert code == 2 and "Traceback" not in err
    assert err == f"adaserve: error: trace file '{path}': cannot be decoded: its arrays/objects " \
                  "are nested too deeply\n"


def test_deep_nesting_inside_a_record_is_a_clear_error(tmp_path):
    deep = "[" * 50_000 + "]" * 50_000
    path = write(tmp_path, json.dumps([RECORD])[:-2] + f', "category": {deep}}}]')
    with pytest.raises(TraceError, match="nested too deeply"):
        load_trace(path)


def test_every_trace_reader_reports_deep_nesting(tmp_path, capsys):
    path = write(tmp_path, "[" * 100_000 + "]" * 100_000)
    for argv in (["simulate", "--trace", str(path), "--system", "adaserve"],
                 ["trace", "generate", "--kind", "overhead", "--pool", f"trace:{path}",
                  "--out", str(tmp_path / "o.json")]):
        code, _, err = run_cli(capsys, *argv)
        assert code == 2 and str(path) in err and "nested too deeply" in err, argv
    assert not (tmp_path / "o.json").exists()


@pytest.mark.parametrize("field,value", [("input_length", 10**400), ("output_length", 10**12),
                                         ("input_length", 2**31)],
                         ids=["400-digit-input", "output-1e12", "input-2**31"])
def test_huge_lengths_are_refused(tmp_path, capsys, field, value):
    path = write(tmp_path, json.dumps([dict(RECORD, **{field: value})]))
    code, _, err = run_cli(capsys, "trace", "inspect", str(path))
    assert code == 2 and f"field '{field}' must be <= 2147483647" in err
    assert len(err) < 300  # the value is quoted cut short, not with its 400 digits


def test_longest_accepted_length_loads(tmp_path):
    path = write(tmp_path, json.dumps([dict(RECORD, output_length=2**31 - 1)]))
    assert load_trace(path)[0].output_length == 2**31 - 1


def test_utf8_byte_order_mark_is_accepted(tmp_path):
    path = write(tmp_path, b"\xef\xbb\xbf" + json.dumps([RECORD]).encode())
    assert load_trace(path)[0].prompt == "hi"


def test_utf16_is_named(tmp_path):
    path = write(tmp_path, json.dumps([RECORD]).encode("utf-16"))
    with pytest.raises(TraceError, match="is UTF-16 text; save it as UTF-8") as e:
        load_trace(path)
    assert str(path) in str(e.value)


def test_invalid_utf8_names_the_byte_and_offset(tmp_path):
    raw = json.dumps([RECORD]).encode()
    path = write(tmp_path, raw.replace(b'"hi"', b'"h\xff"'))
    with pytest.raises(TraceError, match=rf"not UTF-8 text: byte 0xff at offset {raw.index(b'hi') + 1}"):
        load_trace(path)


@pytest.mark.parametrize("field", ["prompt", "category"])
def test_lone_surrogates_are_refused(tmp_path, capsys, field):
    """They decode from a \\ud800 escape but cannot be printed, saved or tokenized."""
    path = write(tmp_path, json.dumps([dict(RECORD, **{field: "a\ud800b"})]))
    code, _, err = run_cli(capsys, "trace", "inspect", str(path))
    assert code == 2
    assert f"record 0: field '{field}' contains a lone surrogate '\\ud800' at character 1" in err


def test_a_huge_value_of_the_wrong_type_is_quoted_short(tmp_path):
    path = write(tmp_path, json.dumps([dict(RECORD, slo_ratio="x" * 1_000_000)]))
    with pytest.raises(TraceError) as e:
        load_trace(path)
    assert "field 'slo_ratio' must be a number, got str" in str(e.value) and len(str(e.value)) < 400


@pytest.mark.parametrize("content,why", [
    ("", "is not valid JSON: Expecting value"),
    ('{"records": []}', "top level must be a JSON array of records, got dict"),
    ('"x"', "top level must be a JSON array of records, got str"),
    ("[" + "9" * 5000 + "]", "is not valid JSON: Exceeds the limit (4300 digits)"),
])
def test_other_malformed_files_are_clear_errors(tmp_path, capsys, content, why):
    path = write(tmp_path, content)
    code, _, err = run_cli(capsys, "trace", "inspect", str(path))
    assert code == 2 and err.startswith(f"adaserve: error: trace file '{path}': {why}")


def test_read_json_errors_name_the_file(tmp_path):
    with pytest.raises(JsonFileError, match="not found") as e:
        read_json(tmp_path / "missing.json")
    assert e.value.path == str(tmp_path / "missing.json") and isinstance(e.value, UserError)
    with pytest.raises(JsonFileError, match="is a directory"):
        read_json(tmp_path)


# ---------------------------------------------------------------------- hostile profile files

def _profile_dict() -> dict:
    return get_profile("llama-3.1-70b").to_dict()


@pytest.mark.parametrize("content,why", [
    ("[" * 100_000, "nested too deeply"),
    (b"\xff\xfe{", "UTF-16"),
    ("{", "is not valid JSON"),
    ("[]", "a profile must be a JSON object"),
])
def test_bad_profile_files_are_clear_errors(tmp_path, capsys, content, why):
    path = write(tmp_path, content, "p.json")
    code, _, err = run_cli(capsys, "profiles", "show", str(path))
    assert code == 2 and str(path) in err and why in err and "Traceback" not in err


@pytest.mark.parametrize("change,why", [
    ({"limits": [1, 2]}, "'limits' must be a JSON object"),
    ({"limits": {"max_seq_len": "long"}}, "limit 'max_seq_len' must be a positive integer"),
    ({"limits": {"max_seq_len": 0}}, "limit 'max_seq_len' must be a positive integer"),
    ({"verify": {"tokens": [1, 2], "ms": [1, 2], "context_tokens": [0, 10]}},
     "needs numeric 'context_tokens' and 'ms_by_context'"),
    ({"verify": {"tokens": [1, 2], "ms": [1, 2], "context_tokens": ["a"], "ms_by_context": [[1, 2]]}},
     "needs numeric 'context_tokens' and 'ms_by_context'"),
])
def test_bad_profile_fields_are_user_errors(change, why):
    with pytest.raises(UserError, match=why):
        LatencyProfile.from_dict({**_profile_dict(), **change}, "p.json")


def test_a_built_in_profile_round_trips(tmp_path):
    path = tmp_path / "p.json"
    get_profile("llama-3.1-70b").save(path)
    assert LatencyProfile.load(path).to_dict() == _profile_dict()


# ------------------------------------------------------------------------ umask and file modes

@pytest.fixture(params=[(0o022, 0o644), (0o077, 0o600)], ids=["umask022", "umask077"])
def umask(request):
    mask, mode = request.param
    before = os.umask(mask)
    try:
        yield mode
    finally:
        os.umask(before)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_traces_follow_the_umask(tmp_path, umask):
    save_trace(tmp_path / "t.json", records())
    assert mode_of(tmp_path / "t.json") == umask


def test_results_follow_the_umask(tmp_path, umask):
    res = simulate_records(records(), "adaserve", "llama-3.1-70b")
    txt, js = write_results(tmp_path / "r", res.summary, res.requests, {"system": "adaserve"})
    assert mode_of(Path(txt)) == umask and mode_of(Path(js)) == umask


def test_prompt_cache_follows_the_umask(tmp_path, umask, monkeypatch):
    monkeypatch.setenv("ADASERVE_CACHE_DIR", str(tmp_path / "cache"))
    pool = prompts.PromptPool({"chat": (prompts.Prompt("hello", 2),)}, "test")
    prompts._write_cache("k", pool)
    assert mode_of(prompts._cache_path("k")) == umask


def test_profiles_follow_the_umask(tmp_path, umask):
    get_profile("llama-3.1-70b").save(tmp_path / "p.json")
    assert mode_of(tmp_path / "p.json") == umask


# ------------------------------------------------------------------------- trace generation

def test_no_request_after_rounding_says_what_to_change(tmp_path, capsys):
    out = tmp_path / "t.json"
    code, _, err = run_cli(capsys, "trace", "generate", "--kind", "rps", "--rps", "1",
                           "--duration-s", "20", "--out", str(out))
    assert code == 2 and not out.exists()
    assert "20 expected requests round to 0 at the nearest 100" in err
    assert "--exact-count" in err and "at least 50" in err


def test_exact_count_then_generates(tmp_path, capsys):
    pool = tmp_path / "pool.json"
    save_trace(pool, records())
    out = tmp_path / "t.json"
    code, _, err = run_cli(capsys, "trace", "generate", "--kind", "rps", "--rps", "1",
                           "--duration-s", "20", "--exact-count", "--pool", f"trace:{pool}",
                           "--out", str(out))
    assert code == 0, err
    assert len(load_trace(out)) == 20


def test_the_count_is_checked_before_any_prompt_is_loaded(tmp_path):
    with pytest.raises(UserError, match="--exact-count"):
        generate_trace("rps", rps=1, duration_s=20, pool=f"trace:{tmp_path / 'missing.json'}")
    with pytest.raises(UserError, match=r"0\.02 expected requests round to 0; raise --rps"):
        generate_trace("rps", rps=0.001, duration_s=20, artifact_rounding=False,
                       pool=f"trace:{tmp_path / 'missing.json'}")


def test_an_overflowing_request_count_is_a_user_error():
    with pytest.raises(UserError, match="more than 1000000"):
        TraceSpec("rps", rps=1e308).resolved()
