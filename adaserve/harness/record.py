"""Whether a result file really is a given sweep point's, run with the configuration asked for.

A finished point is skipped on a rerun only when (``stale_reason`` returns None):

1. its result is complete (``core.results.result_complete``);
2. its JSON's ``meta.point_config`` equals the configuration asked for now (``sweep.point_config``: the
   point's identity, the trace's sha256, backend, model, drafter, seed, output length, profile,
   extra arguments). A result copied from another point, or run with another setting, differs;
3. the statistics block of its ``.txt`` says what its ``.json`` summary says.

Anything else is re-run and the reason printed. The simulator writes ``meta.point_config`` with its
result; after an engine or HTTP run, whose commands do not know the sweep, the harness adds it to
the JSON (``stamp_config``, atomically: a run cut short in between leaves a result without a
configuration, which is re-run).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from adaserve.core.files import atomic_write_text
from adaserve.core.results import (STATS_LINE, load_result, read_stats_block, result_complete,
                                   stats_block)

_NON_FINITE = ("nan", "inf", "-inf")  # JSON stores every non-finite number as null
_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | Path) -> str:
    """The file's sha256 (hex), cached per path, size and modification time."""
    st = Path(path).stat()
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


def stats_disagreement(prefix: str | Path, doc: Mapping[str, Any]) -> str | None:
    """The first statistics line where ``PREFIX.txt`` differs from the ``.json`` summary."""
    try:
        want = {m.group(1): m.group(2).strip()
                for m in map(STATS_LINE.match, stats_block(doc["summary"])) if m}
    except (KeyError, TypeError, ValueError, AttributeError):
        return "the JSON summary lacks the statistics"
    have = read_stats_block(Path(prefix).with_name(Path(prefix).name + ".txt"))
    for name, value in want.items():
        if have.get(name) != value and not (value == "nan" and have.get(name) in _NON_FINITE):
            return f"{name}: text says {have.get(name)!r}, JSON says {value!r}"
    return None


def _show(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 24 else text[:10] + "..." + text[-8:]


def config_difference(have: Any, want: Mapping[str, Any]) -> str | None:
    """How a recorded configuration differs from the wanted one (None when equal)."""
    if not isinstance(have, Mapping):
        return "no recorded configuration"
    keys = [k for k in want if have.get(k) != want[k]] + [k for k in have if k not in want]
    if not keys:
        return None
    shown = ", ".join(f"{k} {_show(have.get(k))} -> {_show(want.get(k))}" for k in keys[:3])
    return "configuration changed: " + shown + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")


def stale_reason(prefix: str | Path, want: Mapping[str, Any]) -> str | None:
    """None when ``prefix`` holds a complete result of exactly ``want``; else why not."""
    if not result_complete(prefix):
        return "no complete result"
    try:
        doc = load_result(prefix)
    except (OSError, ValueError) as e:
        return f"unreadable ({e})"
    meta = doc.get("meta") if isinstance(doc, dict) else None
    why = config_difference(meta.get("point_config") if isinstance(meta, dict) else None, want)
    return why or stats_disagreement(prefix, doc)


def stamp_config(prefix: str | Path, config: Mapping[str, Any]) -> None:
    """Record ``config`` as ``meta.point_config`` in ``PREFIX.json`` (atomic rewrite)."""
    js = Path(prefix).with_name(Path(prefix).name + ".json")
    doc = json.loads(js.read_text(encoding="utf-8"))
    doc.setdefault("meta", {})["point_config"] = dict(config)
    atomic_write_text(js, json.dumps(doc, allow_nan=False) + "\n")
