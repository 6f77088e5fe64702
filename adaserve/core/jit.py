"""Optional numba compilation for the host-side hot loops (n-gram drafting, tree growth, walks).

Per-node work written as plain loops is the clearest form and, compiled, the fastest; numpy
vectorization of the same work pays a few microseconds per array call, thousands of times per
iteration. ``njit(fn)`` returns the compiled function when numba is importable and not disabled
(``ADASERVE_NUMBA=0``), else ``fn`` unchanged, and ``enabled()`` says which: a caller that has a
vectorized numpy path for machines without numba (e.g. a GPU box with a fixed software stack)
chooses it when ``enabled()`` is false.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import TypeVar

from .errors import UserError

ENV = "ADASERVE_NUMBA"
F = TypeVar("F", bound=Callable)

@functools.cache
def _numba():
    """The numba module, imported on first use, or None where it cannot be imported (numba is a
    dependency, but the package must still run where it cannot be installed). Importing it costs
    ~0.3 s and ~100 MB of memory, which a run on the numpy paths need not pay: a caller that
    imports its compiled functions only when ``enabled()`` (the simulator's ``sim.kernels``)
    never imports numba under ``ADASERVE_NUMBA=0``."""
    try:
        import numba
    except ImportError:  # pragma: no cover - depends on the environment
        return None
    return numba


# ``enabled()`` runs ~80 times per engine iteration: ``os.environ.get`` (key encoding, value
# decoding) cost ~1.2 us a call, reading the environment's own mapping ~0.03 us. The answer is
# kept for the raw value it was computed from.
_ENV_DATA = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey(ENV) if hasattr(os.environ, "encodekey") else ENV
_answer: tuple[object, bool] | None = None


def enabled() -> bool:
    """numba is importable and ``ADASERVE_NUMBA`` is not 0 (read at each call: tests flip it)."""
    global _answer
    raw = _ENV_DATA.get(_ENV_KEY) if _ENV_DATA is not None else os.environ.get(ENV)
    if _answer is not None and _answer[0] == raw:
        return _answer[1]
    value = os.environ.get(ENV, "1").strip()
    if value not in ("0", "1", ""):
        raise UserError(f"{ENV}={value!r}: use 1 (compile host loops with numba) or 0 (numpy paths only)")
    _answer = (raw, value != "0" and _numba() is not None)
    return _answer[1]


def njit(fn: F | None = None, *, fastmath: bool = False):
    """``fn`` compiled with numba (nopython, cached on disk) when available, else ``fn`` itself;
    ``@njit`` or ``@njit(fastmath=True)`` (lets LLVM reorder float sums, e.g. to vectorize a dot
    product: results then differ from a sequential sum in the last bits).

    Compilation is lazy (first call) so importing a module costs nothing beyond numba's import."""
    if fn is None:
        return functools.partial(njit, fastmath=fastmath)
    numba = _numba()
    if numba is None:
        return fn
    return numba.njit(cache=True, nogil=True, fastmath=fastmath)(fn)
