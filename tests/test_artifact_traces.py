"""``adaserve traces fetch``: the artifact's traces from a local folder, a local archive and a local
HTTP server (tar.gz and zip), checksum verification with nothing half-written, unknown extra files,
unsafe archive members; and the ``artifact_traces`` fixture's search order."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import json
import re
import tarfile
import threading
import zipfile
from pathlib import Path

import pytest

from adaserve.cli import main
from adaserve.core.errors import UserError
from adaserve.core.trace import TraceRecord, load_trace
from adaserve.workload import artifact_traces as at
from conftest import TRACES_ENV, locate_artifact_traces

PREFIX = "AdaServe-Artifact-Evaluation-main/exps"  # how the repository's archive lays them out
KNOWN_NAMES = ("fig8,9/emission_rps2.4_ol256.json", "fig8,9/emission_rps4.8_ol256.json",
               "fig15/emission_rps3.6_ol128.json")
EXTRA = "fig10/emission_rps4.0_prop0.1.json"  # a trace we hold no checksum for


def trace_bytes(n: int, output_len: int = 256) -> bytes:
    """A small valid trace file (``n`` requests) as bytes."""
    recs = [TraceRecord(10.0 * i, 5 + i, output_len, f"prompt {i}", (1.2, -50.0, -150.0)[i % 3])
            for i in range(n)]
    return (json.dumps([r.to_json() for r in recs], indent=2) + "\n").encode()


@pytest.fixture
def source(tmp_path) -> dict[str, bytes]:
    """The files of a stand-in artifact repository: relative path -> bytes."""
    files = {f"{PREFIX}/{name}": trace_bytes(3 + i, 128 if "ol128" in name else 256)
             for i, name in enumerate(KNOWN_NAMES)}
    files[f"{PREFIX}/{EXTRA}"] = trace_bytes(2)
    files[f"{PREFIX}/fig8,9/run_llama_rps.sh"] = b"#!/bin/sh\n"
    files["AdaServe-Artifact-Evaluation-main/README.md"] = b"# artifact\n"
    return files


@pytest.fixture
def known(source, monkeypatch) -> dict[str, str]:
    """Checksums of the stand-in's known files, installed as the module's table."""
    table = {name: hashlib.sha256(source[f"{PREFIX}/{name}"]).hexdigest() for name in KNOWN_NAMES}
    monkeypatch.setattr(at, "KNOWN_SHA256", table)
    return table


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def make_archive(path: Path, files: dict[str, bytes]) -> Path:
    if path.suffix == ".zip":
        with zipfile.ZipFile(path, "w") as zf:
            for rel, data in files.items():
                zf.writestr(rel, data)
    else:
        with tarfile.open(path, "w:gz") as tf:
            for rel, data in files.items():
                info = tarfile.TarInfo(rel)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path


def tampered(files: dict[str, bytes]) -> dict[str, bytes]:
    out = dict(files)
    out[f"{PREFIX}/fig15/emission_rps3.6_ol128.json"] = trace_bytes(4, 128)  # not the known bytes
    return out


def all_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def assert_installed(dest: Path, source: dict[str, bytes]) -> None:
    expected = {name: source[f"{PREFIX}/{name}"] for name in (*KNOWN_NAMES, EXTRA)}
    assert all_files(dest) == expected  # nothing else (no scripts, no temporary files)
    for name in expected:
        load_trace(dest / name)


# ------------------------------------------------------------------------------ local sources

def test_import_folder_keeps_figure_folders_and_notes_unknown_files(tmp_path, source, known):
    src = write_tree(tmp_path / "clone", source)
    dest = tmp_path / "traces"
    report = at.import_local(src, dest)
    assert_installed(dest, source)
    assert report.verified == sorted(KNOWN_NAMES) and report.unverified == [EXTRA]
    assert report.missing == [] and report.unchanged == []
    assert any(EXTRA in n and "unverified" in n for n in report.notes)
    again = at.import_local(src, dest)  # idempotent
    assert again.unchanged == sorted((*KNOWN_NAMES, EXTRA))


def test_import_a_figure_folder_keeps_its_name(tmp_path, source, known):
    src = write_tree(tmp_path / "clone", source)
    report = at.import_local(src / PREFIX / "fig15", tmp_path / "t")
    assert report.verified == ["fig15/emission_rps3.6_ol128.json"]
    assert set(report.missing) == {"fig8,9/emission_rps2.4_ol256.json",
                                   "fig8,9/emission_rps4.8_ol256.json"}
    assert any("not in the source" in n for n in report.notes)


@pytest.mark.parametrize("suffix", [".tar.gz", ".zip"])
def test_import_local_archive(tmp_path, source, known, suffix):
    archive = make_archive(tmp_path / f"artifact{suffix}", source)
    at.import_local(archive, tmp_path / "traces")
    assert_installed(tmp_path / "traces", source)


@pytest.mark.parametrize("as_archive", [False, True])
def test_tampered_known_file_is_named_and_nothing_is_written(tmp_path, source, known, as_archive):
    files = tampered(source)
    src = (make_archive(tmp_path / "bad.tar.gz", files) if as_archive
           else write_tree(tmp_path / "clone", files))
    dest = tmp_path / "traces"
    (dest / "fig8,9").mkdir(parents=True)
    (dest / "fig8,9" / "emission_rps2.4_ol256.json").write_bytes(b"old copy")
    with pytest.raises(UserError, match=r"checksum mismatch for fig15/emission_rps3\.6_ol128\.json"
                       r".*nothing was written") as info:
        at.import_local(src, dest)
    assert re.match(r"\S*exps/fig15/emission_rps3\.6_ol128\.json: checksum", str(info.value))
    assert all_files(dest) == {"fig8,9/emission_rps2.4_ol256.json": b"old copy"}


def test_missing_known_name_is_filled_from_an_identical_file(tmp_path, source, known, monkeypatch):
    twin = "fig8,9/emission_rps2.6_ol256.json"  # identical to RPS 2.4 (both 900 requests)
    monkeypatch.setitem(known, twin, known["fig8,9/emission_rps2.4_ol256.json"])
    files = {k.replace("/fig15/", "/fig8/"): v for k, v in source.items()}  # fig15's file elsewhere
    report = at.import_local(write_tree(tmp_path / "clone", files), tmp_path / "traces")
    got = all_files(tmp_path / "traces")
    assert got[twin] == got["fig8,9/emission_rps2.4_ol256.json"]
    assert got["fig15/emission_rps3.6_ol128.json"] == got["fig8/emission_rps3.6_ol128.json"]
    assert report.missing == [] and twin in report.verified
    assert "fig8/emission_rps3.6_ol128.json" in report.unverified
    assert any(n.startswith(f"{twin}: not in the source") for n in report.notes)


def test_two_different_files_for_one_name_are_refused(tmp_path, source, known):
    files = dict(source)
    files["elsewhere/fig10/emission_rps4.0_prop0.1.json"] = trace_bytes(5)
    with pytest.raises(UserError, match=r"two different files would both become "
                                        r"fig10/emission_rps4\.0_prop0\.1\.json"):
        at.import_local(write_tree(tmp_path / "clone", files), tmp_path / "traces")
    assert not (tmp_path / "traces").exists()


def test_unsafe_archive_members_never_leave_the_destination(tmp_path, known):
    data = trace_bytes(2)
    archive = make_archive(tmp_path / "evil.tar.gz", {"../emission_up.json": data,
                                                      "/abs/figX/emission_abs.json": data,
                                                      "a/../../emission_dots.json": data})
    dest = tmp_path / "sub" / "traces"
    report = at.import_local(archive, dest)
    assert report.installed == ["figX/emission_abs.json"]
    assert all_files(tmp_path) == {"evil.tar.gz": (tmp_path / "evil.tar.gz").read_bytes(),
                                   "sub/traces/figX/emission_abs.json": data}


@pytest.mark.parametrize("make,message", [
    (lambda p: p / "missing", "no such file or folder"),
    (lambda p: (p / "x.txt").write_text("hello") and p / "x.txt", "not a folder, a .zip or a .tar"),
    (lambda p: make_archive(p / "none.tar.gz", {"a/README.md": b"x"}), "no emission_\\*.json"),
    (lambda p: (p / "cut.tar.gz").write_bytes(b"\x1f\x8b\x08\x00garbage") and p / "cut.tar.gz",
     "cut.tar.gz"),
])
def test_bad_sources_give_clear_errors(tmp_path, make, message):
    with pytest.raises(UserError, match=message):
        at.import_local(make(tmp_path), tmp_path / "traces")
    assert not (tmp_path / "traces").exists()


# ------------------------------------------------------------------------- local HTTP server

class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def http_root(tmp_path):
    """``(folder, base URL)`` of an HTTP server on 127.0.0.1 serving ``folder``."""
    root = tmp_path / "www"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.mark.parametrize("name", ["HEAD.tar.gz", "main.zip"])
def test_fetch_over_http(tmp_path, http_root, source, known, name, monkeypatch, capsys):
    root, base = http_root
    make_archive(root / name, source)
    monkeypatch.setenv("ADASERVE_PROGRESS", "1")  # draw the bar although stderr is no terminal
    report = at.fetch(f"{base}/{name}", tmp_path / "traces")
    assert_installed(tmp_path / "traces", source)
    assert report.verified == sorted(KNOWN_NAMES)
    assert "download" in capsys.readouterr().err  # the progress bar


def test_fetch_tampered_archive_writes_nothing(tmp_path, http_root, source, known):
    root, base = http_root
    make_archive(root / "HEAD.tar.gz", tampered(source))
    url = f"{base}/HEAD.tar.gz"
    with pytest.raises(UserError, match=re.escape(url) + r":.*fig15/emission_rps3\.6_ol128\.json"):
        at.fetch(url, tmp_path / "traces", show_progress=False)
    assert not (tmp_path / "traces").exists()


def test_fetch_errors_name_the_url(tmp_path, http_root, known):
    root, base = http_root
    (root / "page.html").write_text("<html>not an archive</html>")
    with pytest.raises(UserError, match=r"/nothing\.tar\.gz: HTTP 404.*--from"):
        at.fetch(f"{base}/nothing.tar.gz", tmp_path / "t", show_progress=False)
    with pytest.raises(UserError, match=r"/page\.html: not a folder, a \.zip"):
        at.fetch(f"{base}/page.html", tmp_path / "t", show_progress=False)
    with pytest.raises(UserError, match="expected an http"):
        at.fetch("ftp://example.org/x.tar.gz", tmp_path / "t", show_progress=False)
    assert not (tmp_path / "t").exists()


# ----------------------------------------------------------------------------------- the CLI

def test_cli_fetch_url_and_from(tmp_path, http_root, source, known, capsys):
    root, base = http_root
    make_archive(root / "HEAD.tar.gz", source)
    dest = tmp_path / "traces"
    assert main(["traces", "fetch", "--url", f"{base}/HEAD.tar.gz", "--to", str(dest),
                 "--no-progress"]) == 0
    out, err = capsys.readouterr()
    assert_installed(dest, source)
    assert "4 trace file(s)" in out and "3 verified, 1 unverified" in out
    assert re.search(rf"^  {re.escape(EXTRA)}  \(no checksum known: unverified\)$", out, re.M)
    assert "note:" in err and EXTRA in err

    src = write_tree(tmp_path / "clone", tampered(source))
    assert main(["traces", "fetch", "--from", str(src), "--to", str(tmp_path / "t2")]) == 2
    err = capsys.readouterr().err
    assert "adaserve: error:" in err and "fig15/emission_rps3.6_ol128.json" in err
    assert "Traceback" not in err and not (tmp_path / "t2").exists()


def test_cli_default_destination_is_the_cache(tmp_path, source, known, monkeypatch, capsys):
    monkeypatch.setenv("ADASERVE_CACHE_DIR", str(tmp_path / "cache"))
    src = write_tree(tmp_path / "clone", source)
    assert main(["traces", "fetch", "--from", str(src)]) == 0
    assert at.default_dir() == tmp_path / "cache" / "traces"
    assert_installed(tmp_path / "cache" / "traces", source)
    assert str(tmp_path / "cache" / "traces") in capsys.readouterr().out


# -------------------------------------------------------- the checksums and the test fixture

def test_known_checksums_against_the_fixture(artifact_traces):
    """With the real traces every checksum matches; generated stand-ins match none."""
    assert len(at.KNOWN_SHA256) == 14
    assert all(re.fullmatch(r"fig(8,9|15)/emission_rps[\d.]+_ol(128|256)\.json", n)
               and re.fullmatch(r"[0-9a-f]{64}", h) for n, h in at.KNOWN_SHA256.items())
    problems = at.verify_dir(artifact_traces.root)
    if artifact_traces.real:
        assert problems == []
    else:
        assert len(problems) == 14 and all("differs" in p for p in problems)


def test_fixture_search_order(tmp_path, monkeypatch):
    monkeypatch.setenv("ADASERVE_CACHE_DIR", str(tmp_path / "cache"))
    name = "fig8,9/emission_rps2.4_ol256.json"
    data = trace_bytes(3)
    table = {name: hashlib.sha256(data).hexdigest()}
    repo = tmp_path / "work" / "repo"
    shared = write_tree(tmp_path / "work" / "shared" / "traces", {name: data})
    mine = write_tree(tmp_path / "mine", {name: data})
    broken = write_tree(tmp_path / "broken", {name: b"[]"})

    assert locate_artifact_traces({TRACES_ENV: str(mine)}, repo, table)[0] == mine
    assert locate_artifact_traces({}, repo, table)[0] == shared
    assert locate_artifact_traces({TRACES_ENV: "none"}, repo, table)[0] is None
    root, notes = locate_artifact_traces({TRACES_ENV: str(tmp_path / "nope")}, repo, table)
    assert root == shared and any("no such folder" in n for n in notes)
    root, notes = locate_artifact_traces({TRACES_ENV: str(broken)}, repo, table)
    assert root == shared and any("differs" in n for n in notes)
    cache = write_tree(tmp_path / "cache" / "traces", {name: data})
    assert locate_artifact_traces({}, tmp_path / "elsewhere" / "repo", table)[0] == cache
