"""Shared fixtures.

``artifact_traces``: the original artifact's trace files, found in this order: the folder in
``$ADASERVE_TRACES``, ``../shared/traces`` beside the repository, the folder ``adaserve traces
fetch`` fills by default. A folder counts only when every trace we hold a checksum for is there
and intact. Without one (a bare clone), or with ``ADASERVE_TRACES=none``, the tests get generated
traces with the same names and shape (``adaserve.workload`` generation, seed 0), so nothing is
skipped; ``fixture.real`` says which kind a test got. ``pytest`` prints the choice in its header.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# quick latency profiles are measured afresh in tests (a cached one would hide the measuring path);
# tests of the cache turn it back on
os.environ.setdefault("ADASERVE_PROFILE_CACHE", "0")
TRACES_ENV = "ADASERVE_TRACES"
NO_TRACES = "none"  # ADASERVE_TRACES=none: generated traces, whatever exists on this machine
TRACE_NAME = re.compile(r"(?P<fig>[^/]+)/emission_rps(?P<rps>[\d.]+)_ol(?P<ol>\d+)\.json")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads and lose a lot when the 2 cores are shared
    (tests run in 2 xdist workers)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- artifact traces

@dataclass(frozen=True)
class ArtifactTraces:
    """A folder laid out like the artifact's traces (``fig8,9/…``, ``fig15/…``)."""

    root: Path
    real: bool      # the artifact's own files (checksums verified), else generated stand-ins
    origin: str

    def file(self, name: str) -> Path:
        """``name`` as in ``KNOWN_SHA256``, e.g. ``"fig8,9/emission_rps4.8_ol256.json"``."""
        path = self.root / name
        assert path.is_file(), f"{path} missing from the {self.origin} traces"
        return path


def locate_artifact_traces(env: Mapping[str, str], repo: Path = REPO,
                           known: Mapping[str, str] | None = None) -> tuple[Path | None, list[str]]:
    """The first complete, intact copy of the known traces, and notes on the folders passed over."""
    from adaserve.workload import artifact_traces as at

    known = at.KNOWN_SHA256 if known is None else known
    value = (env.get(TRACES_ENV) or "").strip()
    if value.lower() == NO_TRACES:
        return None, [f"{TRACES_ENV}={value}"]
    candidates = [Path(value)] if value else []
    candidates += [repo.parent / "shared" / "traces", at.default_dir()]
    notes = []
    for path in candidates:
        if not path.is_dir():
            if value and path == candidates[0]:
                notes.append(f"{TRACES_ENV}={value}: no such folder")
            continue
        problems = at.verify_dir(path, known)
        if not problems:
            return path, notes
        notes.append(f"{path}: {problems[0]}" + (f" (+{len(problems) - 1} more)" if problems[1:] else ""))
    return None, notes


def generate_artifact_like(dest: Path, names: list[str] | None = None) -> Path:
    """Generated traces under the artifact's names: ``fig8,9`` from ``--kind rps`` and ``fig15``
    from ``--kind overhead``, both seed 0, so the fig8,9 files are time-rescaled prefixes of one
    request sequence like the originals."""
    from adaserve.core.trace import save_trace
    from adaserve.workload import artifact_traces as at
    from adaserve.workload.generate import generate_trace
    from adaserve.workload.prompts import load_pool

    pool = load_pool("offline")
    for name in names or sorted(at.KNOWN_SHA256):
        m = TRACE_NAME.fullmatch(name)
        assert m, name
        kind = "overhead" if m["fig"] == "fig15" else "rps"
        save_trace(dest / name, generate_trace(kind, rps=float(m["rps"]), output_len=int(m["ol"]),
                                               seed=0, pool=pool))
    return dest


@pytest.fixture(scope="session")
def artifact_traces(tmp_path_factory) -> ArtifactTraces:
    root, _ = locate_artifact_traces(os.environ)
    if root is not None:
        return ArtifactTraces(root, True, str(root))
    return ArtifactTraces(generate_artifact_like(tmp_path_factory.mktemp("artifact-traces")),
                          False, "generated")


def pytest_report_header(config) -> list[str]:
    root, notes = locate_artifact_traces(os.environ)
    head = f"artifact traces: {root}" if root else "artifact traces: generated (seed 0)"
    return [head + (f"  [{'; '.join(notes)}]" if notes else "")]
