"""Compiled twin of ``profile.Table``'s array lookup (``adaserve.core.jit``).

The scheduler and the simulator look up a few short arrays per iteration (the draft steps of a
tree, the candidate budgets), where numpy's ~10 array calls per lookup cost more than the
interpolation. This loop gives ``np.interp``'s bits: the same search result, the same
``slope * (x - xp[j]) + fp[j]`` (slope computed as numpy does), the same special cases (exact
grid points, NaN), then the table's linear extrapolation past its last point and the blend of two
context rows, each in numpy's order of operations. ``tests/test_latency_models.py`` compares both.

Imported only when ``jit.enabled()`` (importing this module imports numba).
"""

from __future__ import annotations

import numpy as np

from adaserve.core.jit import njit


@njit
def _segment(x, xp, guess):  # pragma: no cover - compiled
    """The j with ``xp[j] <= x < xp[j + 1]`` (the last index when x == xp[-1]) for
    ``xp[0] <= x <= xp[-1]``: a few steps up from ``guess`` (sorted lookups), else bisection."""
    last = xp.shape[0] - 1
    if xp[guess] <= x:
        for _ in range(4):
            if guess == last or x < xp[guess + 1]:
                return guess
            guess += 1
    lo, hi = 0, last
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if xp[mid] <= x:
            lo = mid
        else:
            hi = mid - 1
    return lo


@njit
def _slopes(xp, fp):  # pragma: no cover - compiled
    """Per segment, ``(fp[j + 1] - fp[j]) / (xp[j + 1] - xp[j])``, as numpy computes them."""
    out = np.empty(xp.shape[0] - 1)
    for j in range(out.shape[0]):
        out[j] = (fp[j + 1] - fp[j]) / (xp[j + 1] - xp[j])
    return out


@njit
def _fill_row(x, xp, fp, tail_value, tail_slope, out):  # pragma: no cover - compiled
    """``out[k]`` = one row's ``Table._row`` at ``x[k]``: past the last point the table's
    extrapolation, else ``np.interp`` (numpy's ``arr_interp``: NaN stays NaN, the end values
    outside, the grid value at a grid point, else the segment's line with numpy's slope)."""
    last, j = xp.shape[0] - 1, 0
    slopes = _slopes(xp, fp)
    for k in range(x.shape[0]):
        v = x[k]
        if v > xp[last]:
            out[k] = tail_value + (v - xp[last]) * tail_slope
        elif v != v:
            out[k] = v
        elif v < xp[0]:
            out[k] = fp[0]
        else:
            j = _segment(v, xp, j)
            if j == last or xp[j] == v:
                out[k] = fp[j]
            else:
                r = slopes[j] * (v - xp[j]) + fp[j]
                if r != r:
                    r = slopes[j] * (v - xp[j + 1]) + fp[j + 1]
                    if r != r and fp[j] == fp[j + 1]:
                        r = fp[j]
                out[k] = r


@njit
def lookup(x, xp, fp_lo, tail_lo, fp_hi, tail_hi, a):  # pragma: no cover - compiled
    """``Table.__call__`` over the array ``x``: row ``fp_lo`` alone when ``a`` is NaN (no context
    axis), else ``lo * (1 - a) + hi * a`` of the two context rows."""
    flat_x = x.ravel()
    lo = np.empty(flat_x.shape[0])
    _fill_row(flat_x, xp, fp_lo, tail_lo[0], tail_lo[1], lo)
    if a == a:
        hi = np.empty(flat_x.shape[0])
        _fill_row(flat_x, xp, fp_hi, tail_hi[0], tail_hi[1], hi)
        for k in range(lo.shape[0]):
            lo[k] = lo[k] * (1 - a) + hi[k] * a
    return lo.reshape(x.shape)
