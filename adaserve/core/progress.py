"""One progress bar for every long job (sweeps, profiling, trace replay, HTTP benchmarks).

The bar is drawn only on an interactive terminal: redirected to a log it would write thousands of
carriage-return updates. ``ADASERVE_PROGRESS=1`` forces it on, ``=0`` off."""

from __future__ import annotations

import os
import sys
from typing import Any


def progress_enabled(requested: bool = True) -> bool:
    if not requested:
        return False
    forced = os.environ.get("ADASERVE_PROGRESS", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    return sys.stderr.isatty()


def progress(total: int | None = None, desc: str = "", unit: str = "it", *, enabled: bool = True,
             leave: bool = True, **kwargs: Any):
    """A ``tqdm`` bar on stderr (a no-op object with the same methods when disabled)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=leave, disable=not progress_enabled(enabled),
                file=sys.stderr, **kwargs)
