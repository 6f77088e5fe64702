"""Optional numba compilation for the host-side hot loops (n-gram drafting, tree growth, walks).

Per-node work written as plain loops is the clearest form and, compiled, the fastest; numpy
vectorization of the same work pays a few microseconds per array call, thousands of times per
iteration. ``njit(fn)`` returns the compiled function when numba is importable and not disabled
(``ADASERVE_NUMBA=0``), else ``fn`` unchanged, and ``enabled()`` says which: a caller that has a
vectorized numpy path for machines without numba (e.g. a GPU box with a fixed software stack)
chooses it when ``enabled()`` is false. ``prefetch(array, index)`` is a read-ahead hint for
compiled kernels (an LLVM intrinsic, made on first use; a no-op interpreted).
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


def _no_prefetch(array, index) -> None:
    """``prefetch`` where numba is not importable: the interpreted kernels have nothing to hint."""


def _make_prefetch():
    """``prefetch(array, index)`` for compiled kernels: LLVM's prefetch hint (read, keep in every
    cache level) for element ``index`` of a C-contiguous ``array`` (counted flat). A kernel that
    reads small scattered pieces of a large array (the paged KV cache's blocks) stalls on each
    piece's first cache miss; hinting the next piece while it works on this one overlaps the two."""
    numba = _numba()
    if numba is None:
        return _no_prefetch
    from llvmlite import ir
    from llvmlite.binding import llvm_version_info
    from numba.core import cgutils, types
    from numba.extending import intrinsic

    @intrinsic
    def prefetch(typingctx, array, index):
        if not (isinstance(array, types.Array) and array.layout == "C" and isinstance(index, types.Integer)):
            return None
        i32 = ir.IntType(32)

        def codegen(context, builder, signature, args):
            ary = context.make_array(signature.args[0])(context, builder, args[0])
            idx = context.cast(builder, args[1], signature.args[1], types.intp)
            ptr = builder.gep(ary.data, [idx])  # C-contiguous: element ``index`` counted flat
            name = "llvm.prefetch.p0"  # LLVM 17 on has opaque pointers only
            if llvm_version_info < (17,):  # llvmlite of numba 0.60: the name mangles the pointer's type
                ptr = builder.bitcast(ptr, ir.IntType(8).as_pointer())
                name = "llvm.prefetch." + ptr.type.intrinsic_name
            hint = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(ir.VoidType(), [ptr.type, i32, i32, i32]), name)
            builder.call(hint, [ptr, i32(0), i32(3), i32(1)])  # read, high locality, data cache
            return context.get_dummy_value()

        return types.void(array, index), codegen

    return prefetch


def __getattr__(name: str):
    """``prefetch`` is made on first use, so that importing this module does not import numba."""
    if name == "prefetch":
        globals()["prefetch"] = fn = _make_prefetch()
        return fn
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
