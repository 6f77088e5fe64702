"""The original artifact's emission traces: download them from the artifact repository's archive
(``fetch``) or import a local copy (``import_local``), verifying every file we know.

The public repository ``zikun-li/AdaServe-Artifact-Evaluation`` keeps its traces beside the scripts
that use them, as ``exps/<figure>/emission_*.json``. We search a folder or an archive for
``emission_*.json`` files anywhere and install each as ``<its folder's name>/<file name>`` (e.g.
``fig8,9/emission_rps4.8_ol256.json``), the layout ``TRACE_DIR`` and the tests expect.

Files listed in ``KNOWN_SHA256`` must match their checksum, or nothing is written at all; a known
name the source lacks is filled from a file with exactly its checksum, if there is one; other
trace files are kept unverified and reported. Each file is written atomically, after every file
of the source has been read and checked.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from adaserve.core.errors import UserError
from adaserve.core.files import atomic_write_text
from adaserve.core.progress import progress

DEFAULT_URL = "https://github.com/zikun-li/AdaServe-Artifact-Evaluation/archive/HEAD.tar.gz"
TRACE_FILE = re.compile(r"emission_.+\.json")
MAX_TRACE_BYTES = 256 << 20  # the largest artifact trace is 2 MB; refuse absurd members
DOWNLOAD_TIMEOUT_S = 60.0
CHUNK = 1 << 16

# sha256 of the artifact's traces, computed from the files the paper's authors published.
# Identical checksums are identical files (RPS x 360 rounds to the same hundred requests).
KNOWN_SHA256: dict[str, str] = {
    "fig8,9/emission_rps2.4_ol256.json": "a33e8522ae127df5a57114f4783328e834e7e2acabaa4ef9dc7b6ebe6d9655e4",
    "fig8,9/emission_rps2.6_ol256.json": "a33e8522ae127df5a57114f4783328e834e7e2acabaa4ef9dc7b6ebe6d9655e4",
    "fig8,9/emission_rps2.8_ol256.json": "05abd355d8dc26add232e5b336877ed88ac35033434e55d3cbfc77cdcb226430",
    "fig8,9/emission_rps3.0_ol256.json": "d7026104317d1d7b18f062e08b1b7bb12f4c5611fe4768f5da22f1d0619652db",
    "fig8,9/emission_rps3.2_ol256.json": "14abd99099d76b52577752cf455bb020d143218393e99247f18e4a53ae1ba210",
    "fig8,9/emission_rps3.4_ol256.json": "14abd99099d76b52577752cf455bb020d143218393e99247f18e4a53ae1ba210",
    "fig8,9/emission_rps3.6_ol256.json": "c8f0c4ac43004f64e1792d52efb46ffc3a931195deefedfc62cac25455a9a4c1",
    "fig8,9/emission_rps3.8_ol256.json": "21b9006cd0a1673625d6f66fb481e3f3728400a66ba098f7c5eee7e01ef106d9",
    "fig8,9/emission_rps4.0_ol256.json": "21b9006cd0a1673625d6f66fb481e3f3728400a66ba098f7c5eee7e01ef106d9",
    "fig8,9/emission_rps4.2_ol256.json": "61a9478288114308063cbcb61d764de20d31742ce98e57fbc327dc1641f53d4c",
    "fig8,9/emission_rps4.4_ol256.json": "7a08d43cb3d473133a094082ac1b1cad776a4edb6ba9ddc7ae55f6e42cdb5058",
    "fig8,9/emission_rps4.6_ol256.json": "343550a85add9c8eb592a3f6059d0779a6cac58b25a71bd7b7073f8408415aaa",
    "fig8,9/emission_rps4.8_ol256.json": "343550a85add9c8eb592a3f6059d0779a6cac58b25a71bd7b7073f8408415aaa",
    "fig15/emission_rps3.6_ol128.json": "9f7cfc9c1df0114d4da49f314260a528473a47484dbce8a2d5f328cab527107a",
}


def default_dir() -> Path:
    """Where ``adaserve traces fetch`` puts the traces without ``--to``: ``traces/`` in the
    adaserve cache (``$ADASERVE_CACHE``, else ``$XDG_CACHE_HOME/adaserve``, else
    ``~/.cache/adaserve``)."""
    from adaserve.core.files import cache_dir

    return cache_dir() / "traces"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class FoundTrace:
    """One trace file of a source: where it will go (``name``), its bytes, where it came from."""

    name: str
    data: bytes
    origin: str


@dataclass
class ImportReport:
    dest: Path
    verified: list[str] = field(default_factory=list)    # known names, checksum matched
    unverified: list[str] = field(default_factory=list)  # kept, no checksum known
    unchanged: list[str] = field(default_factory=list)   # already there with the same bytes
    missing: list[str] = field(default_factory=list)     # known names the source lacks
    notes: list[str] = field(default_factory=list)

    @property
    def installed(self) -> list[str]:
        return sorted(self.verified + self.unverified)


# ------------------------------------------------------------------------------ reading sources

def install_name(parts: tuple[str, ...]) -> str | None:
    """``<folder>/<file>`` for a trace at path ``parts`` (components), or ``<file>`` for one at the
    top of an archive; ``None`` for anything that is not a trace or has an unsafe name."""
    if not parts or not TRACE_FILE.fullmatch(parts[-1]):
        return None
    folder = parts[-2] if len(parts) >= 2 else None
    if folder is None:
        return parts[-1]
    if folder in ("", ".", "..") or "\\" in folder or "\\" in parts[-1]:
        return None
    return f"{folder}/{parts[-1]}"


def _checked_size(size: int, origin: str) -> None:
    if size > MAX_TRACE_BYTES:
        raise UserError(f"{origin}: {size} bytes, more than the {MAX_TRACE_BYTES >> 20} MiB a "
                        f"trace file may have")


def traces_in_dir(root: Path) -> Iterator[FoundTrace]:
    """Every ``emission_*.json`` below ``root`` (symbolic links are not followed), named by its
    own folder, so ``--from .../traces/fig8,9`` keeps ``fig8,9/``."""
    root = root.resolve()
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for file in sorted(files):
            path = Path(folder) / file
            name = install_name((path.parent.name, file))
            if name is None or path.is_symlink() or not path.is_file():
                continue
            _checked_size(path.stat().st_size, str(path))
            yield FoundTrace(name, path.read_bytes(), str(path))


def traces_in_archive(path: Path, label: str | None = None) -> Iterator[FoundTrace]:
    """Every ``emission_*.json`` member of a zip or tar (optionally compressed) archive; messages
    name the archive as ``label`` (default: its path)."""
    label = label or str(path)
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                for info in sorted(zf.infolist(), key=lambda i: i.filename):
                    name = install_name(PurePosixPath(info.filename).parts)
                    if name is None or info.is_dir():
                        continue
                    origin = f"{label}:{info.filename}"
                    _checked_size(info.file_size, origin)
                    yield FoundTrace(name, zf.read(info), origin)
            return
        if tarfile.is_tarfile(path):
            with tarfile.open(path, "r:*") as tf:
                for member in sorted(tf.getmembers(), key=lambda m: m.name):
                    name = install_name(PurePosixPath(member.name).parts)
                    if name is None or not member.isfile():
                        continue
                    origin = f"{label}:{member.name}"
                    _checked_size(member.size, origin)
                    f = tf.extractfile(member)
                    yield FoundTrace(name, f.read() if f else b"", origin)
            return
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as e:
        raise UserError(f"{label}: cannot read the archive ({e})") from e
    raise UserError(f"{label}: not a folder, a .zip or a .tar(.gz|.bz2|.xz) archive")


def read_source(source: Path, label: str | None = None) -> list[FoundTrace]:
    """The traces of a folder or an archive (named ``label`` in messages)."""
    if not source.exists():
        raise UserError(f"{source}: no such file or folder")
    found = list(traces_in_dir(source) if source.is_dir() else traces_in_archive(source, label))
    if not found:
        raise UserError(f"{label or source}: no emission_*.json trace file in it")
    return found


# ------------------------------------------------------------------------------------- checking

def check(found: list[FoundTrace], known: Mapping[str, str] | None = None) -> dict[str, FoundTrace]:
    """One file per name, every known one with its checksum; raise before anything is written.
    ``known`` defaults to ``KNOWN_SHA256`` (looked up at call time, so tests can replace it)."""
    known = KNOWN_SHA256 if known is None else known
    by_name: dict[str, FoundTrace] = {}
    for t in found:
        other = by_name.get(t.name)
        if other is not None and other.data != t.data:
            raise UserError(f"two different files would both become {t.name}: {other.origin} and "
                            f"{t.origin}")
        by_name.setdefault(t.name, t)
    for name, t in by_name.items():
        want = known.get(name)
        got = sha256(t.data)
        if want is not None and got != want:
            raise UserError(f"{t.origin}: checksum mismatch for {name} (sha256 {got}, expected "
                            f"{want}): the file is damaged or not the artifact's; nothing was "
                            f"written")
        try:
            t.data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"{t.origin}: not UTF-8 text ({e}); nothing was written") from e
    return by_name


def fill_by_content(by_name: dict[str, FoundTrace], known: Mapping[str, str]) -> dict[str, str]:
    """Add each known name the source lacks when a file of the source has its exact checksum
    (identical files, e.g. RPS 4.6 and 4.8, or a figure's trace kept in another folder); return
    ``{added name: origin}``."""
    by_hash = {sha256(t.data): t for t in by_name.values()}
    added = {}
    for name, want in sorted(known.items()):
        if name not in by_name and want in by_hash:
            twin = by_hash[want]
            by_name[name] = FoundTrace(name, twin.data, twin.origin)
            added[name] = twin.origin
    return added


def install(found: list[FoundTrace], dest: Path,
            known: Mapping[str, str] | None = None) -> ImportReport:
    """Check every file, then write them under ``dest`` (each atomically)."""
    known = KNOWN_SHA256 if known is None else known
    by_name = check(found, known)
    report = ImportReport(dest)
    for name, origin in fill_by_content(by_name, known).items():
        report.notes.append(f"{name}: not in the source under that name; installed from the "
                            f"identical {origin}")
    for name in sorted(by_name):
        data = by_name[name].data
        target = dest / name
        if target.is_file() and target.read_bytes() == data:
            report.unchanged.append(name)
        else:
            atomic_write_text(target, data.decode("utf-8"))
        (report.verified if name in known else report.unverified).append(name)
    report.missing = sorted(set(known) - set(by_name))
    if report.unverified:
        report.notes.append(f"kept {len(report.unverified)} trace file(s) we hold no checksum "
                            f"for, unverified: {', '.join(report.unverified)}")
    if report.missing:
        report.notes.append(f"{len(report.missing)} known trace file(s) not in the source: "
                            f"{', '.join(report.missing)}")
    return report


def import_local(source: str | Path, dest: str | Path,
                 known: Mapping[str, str] | None = None) -> ImportReport:
    """Install the traces of a local folder or archive (``adaserve traces fetch --from``)."""
    return install(read_source(Path(source)), Path(dest), known)


# ------------------------------------------------------------------------------------ download

def download(url: str, to: Path, *, show_progress: bool = True,
             timeout: float = DOWNLOAD_TIMEOUT_S) -> None:
    """Stream ``url`` into the file ``to``, with a progress bar on a terminal."""
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme not in ("http", "https", "file"):
        raise UserError(f"--url {url!r}: expected an http(s):// or file:// URL")
    request = urllib.request.Request(url, headers={"User-Agent": "adaserve-traces-fetch"})
    hint = "; without network, download the archive elsewhere and use --from FILE"
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp, open(to, "wb") as out:
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            with progress(total, "download", "B", enabled=show_progress, unit_scale=True,
                          unit_divisor=1024) as bar:
                while chunk := resp.read(CHUNK):
                    out.write(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as e:
        raise UserError(f"{url}: HTTP {e.code} {e.reason}{hint}") from e
    except urllib.error.URLError as e:
        raise UserError(f"{url}: cannot download ({e.reason}){hint}") from e
    except (TimeoutError, OSError) as e:
        raise UserError(f"{url}: download failed ({e}){hint}") from e


def fetch(url: str, dest: str | Path, *, show_progress: bool = True,
          known: Mapping[str, str] | None = None) -> ImportReport:
    """Download the artifact repository's archive and install its traces under ``dest``."""
    tmp = Path(tempfile.mkdtemp(prefix="adaserve-traces-"))
    try:
        archive = tmp / "archive"
        download(url, archive, show_progress=show_progress)
        return install(read_source(archive, label=url), Path(dest), known)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def verify_dir(root: Path, known: Mapping[str, str] | None = None) -> list[str]:
    """Problems that keep ``root`` from being a complete, intact copy of the known traces (empty
    when it is one)."""
    known = KNOWN_SHA256 if known is None else known
    problems = []
    for name, want in sorted(known.items()):
        path = root / name
        if not path.is_file():
            problems.append(f"{name} missing")
        elif sha256(path.read_bytes()) != want:
            problems.append(f"{name} differs from the artifact's (sha256)")
    return problems
