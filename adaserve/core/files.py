"""Files a user gives us or gets from us: atomic writes (a reader never sees a half-written
result, trace or profile) and JSON reads that fail with a ``UserError`` saying what is wrong."""

from __future__ import annotations

import codecs
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from adaserve.core.errors import UserError


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (``os.umask`` sets it, which
    races with other threads creating files)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to a temp file beside ``path`` and rename it over ``path``.

    ``mkstemp`` creates files 0600; the final file gets the permissions an ordinary ``open`` would
    give it (0666 less the umask)."""
    atomic_write_chunks(path, (text,))


def atomic_write_chunks(path: str | Path, chunks: Iterable[str]) -> None:
    """``atomic_write_text`` of the concatenated ``chunks``, written as they come (a large
    document never has to be one string in memory)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for chunk in chunks:
                f.write(chunk)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class JsonFileError(UserError):
    """A JSON file the user named that cannot be decoded; ``reason`` says why, without the path."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"'{self.path}': {reason}")


def read_json(path: str | os.PathLike) -> Any:
    """Decode a JSON file that a user named (a trace, a profile).

    Every way the file can be wrong is a ``JsonFileError``: missing, a directory, unreadable, not
    UTF-8 (a UTF-8 byte-order mark is accepted; UTF-16 is named as such), not JSON, nested deeper
    than the decoder's recursion allows, or a number longer than Python converts."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise JsonFileError(path, "not found") from None
    except IsADirectoryError:
        raise JsonFileError(path, "is a directory, not a file") from None
    except OSError as e:
        raise JsonFileError(path, f"cannot be read: {e.strerror or e}") from None
    if raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8):]
    elif raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise JsonFileError(path, "is UTF-16 text; save it as UTF-8")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise JsonFileError(path, f"is not UTF-8 text: byte 0x{raw[e.start]:02x} at offset "
                                  f"{e.start} ({e.reason}); save it as UTF-8") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise JsonFileError(path, f"is not valid JSON: {e.msg} at line {e.lineno} "
                                  f"column {e.colno}") from None
    except RecursionError:
        raise JsonFileError(path, "cannot be decoded: its arrays/objects are nested too "
                                  "deeply") from None
    except ValueError as e:  # an integer literal longer than Python's digit limit
        raise JsonFileError(path, f"is not valid JSON: {str(e).split(';')[0]}") from None


def cache_dir() -> Path:
    """Where adaserve caches what it can rebuild (converted models, prompt pools, quick profiles,
    fetched traces): ``$ADASERVE_CACHE`` (``$ADASERVE_CACHE_DIR`` is the same), else
    ``$XDG_CACHE_HOME/adaserve``, else ``~/.cache/adaserve``."""
    for var in ("ADASERVE_CACHE", "ADASERVE_CACHE_DIR"):
        if os.environ.get(var):
            return Path(os.environ[var])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "adaserve"
