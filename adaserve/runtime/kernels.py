"""Which kernel the CPU linears of a model run, chosen by measuring, not by CPU vendor.

Two candidates (``engine.model.Linear``): oneDNN on a prepacked weight, or plain ``F.linear`` (MKL's
GEMM). Which is faster depends on the CPU (the prepacked path won 2-4x on the AMD EPYC development
VM at a few rows and lost on an Intel CPU), the dtype, the thread count and the number of rows. At
model load, ``choose_linear_kernels`` times both on the model's own weights at decode-shaped inputs
(``ROWS`` rows), reading more weight bytes per pass than any cache holds so that the timing sees the
memory traffic of a real step. In fp32 the prepacked path is used from the smallest measured row
count at which it is clearly faster (``MARGIN``: it doubles the weights' memory) and from which on it
is nowhere clearly slower, plain below; in bf16/fp16 for all rows or none. The decision is cached on disk per CPU
model, torch version, dtype, threads and linear shapes (``cache_dir()/kernels``), so later loads take
no time. ``ADASERVE_PREPACK=0/1`` skips the measurement and forces the choice;
``ADASERVE_PROFILE_CACHE=0`` (the measured-profile cache switch) turns this cache off too."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from adaserve.core.files import atomic_write_text, cache_dir
from adaserve.core import jit
from adaserve.engine.model import (CPU_DECODE_ENV, GEMV, MAX_COMPILED_ROWS, PREPACK_ENV, Linear, Transformer,
                                   kernel_description, kernel_settings_restored, prepack_forced,
                                   prepack_supported, set_compiled_rows, set_prepack)

from .profiler import BASELINE_CONTEXT, StepBench, cpu_name

log = logging.getLogger("adaserve")
Say = Callable[[str], None]

ROWS = (1, 2, 8, 64)  # batch-1 decode, MKL's small-GEMM corner, a small tree, a large verification step
REPEAT = 3  # timed passes per kernel and row count (interleaved), after one warm-up pass each
MARGIN = 0.95  # prepacked must take at most this fraction of plain's time to be used
# A ratio this close to the margins is timed again with more passes before the choice: on the
# development VM the 64-row ratio came out 0.89 and 1.055 in two measurements minutes apart, and past
# 1 / MARGIN (1.053) one row count that is "clearly slower" turns the prepacked path off at every
# row count (an 8-token step then took 1.4x as long).
UNSURE = (0.9, 1.11)
UNSURE_REPEAT = 9
LAYER_BYTES = 128 * 2**20  # decoder-layer weights timed per pass (plus the LM head): several times any L3
CACHE_VERSION = 6  # 4: the compiled attention got faster (2026-11-27), so whole-step ratios changed;
# 5: its reads of scattered blocks are hinted ahead, and the steps are timed over scattered blocks (2026-11-28);
# 6: the steps are timed over blocks claimed as the engine claims them (consecutive; 2026-11-28)
COMPILED_ROWS = tuple(r for r in (2, 4) if r <= MAX_COMPILED_ROWS)  # step sizes tried once one row wins


@dataclass
class KernelChoice:
    """The linear kernel for one dtype, and why."""

    dtype: str
    min_rows: int | None  # prepacked from this many rows on (1: always); None: plain only
    reason: str  # "measured", "cached in PATH", "ADASERVE_PREPACK=1", "oneDNN cannot prepack ..."
    ratios: dict[str, float] = field(default_factory=dict)  # prepacked / plain time per row count
    gemv_ratio: float | None = None  # the compiled kernel's time / the other kernel's, at one row
    compiled_rows: int = 0  # inputs of up to this many rows run the compiled kernel (0: none)
    compiled_ratios: dict[str, float] = field(default_factory=dict)  # whole steps of 2, 4 tokens: compiled / other

    @property
    def gemv(self) -> bool:
        """One-row inputs run the compiled matrix-vector kernel (fp32, numba)."""
        return self.compiled_rows >= 1

    @property
    def kernel(self) -> str:
        return kernel_description(getattr(torch, self.dtype), self.min_rows, self.compiled_rows)

    def describe(self) -> str:
        text = f"CPU linears ({self.dtype}, {torch.get_num_threads()} thread(s)): {self.kernel}"
        if self.ratios:
            pairs = ", ".join(f"{r} rows {v:.2f}" for r, v in self.ratios.items())
            text += f" (prepacked/plain time: {pairs})"
        if self.gemv_ratio is not None:
            text += f" (1-row {GEMV}/other time: {self.gemv_ratio:.2f}"
            text += "".join(f"; {r}-token steps, compiled/other: {v:.2f}" for r, v in self.compiled_ratios.items())
            text += ")"
        return f"{text} [{self.reason}]"


def choose_linear_kernels(model: Transformer, *, say: Say = log.info, cache: bool = True) -> KernelChoice | None:
    """Decide, record (``model.set_prepack``) and report the kernel of ``model``'s CPU linears.
    None for a model that is not on the CPU."""
    w = model.lm_head.weight
    if w.device.type != "cpu":
        return None
    dtype = w.dtype
    name = str(dtype).replace("torch.", "")
    forced = prepack_forced()
    if forced is not None:
        on = forced and prepack_supported(dtype)
        note = "" if on or not forced else f"; oneDNN cannot prepack {name} weights on this CPU"
        choice = KernelChoice(name, 1 if on else None, f"{PREPACK_ENV}={int(forced)}{note}")
    elif not prepack_supported(dtype):
        choice = KernelChoice(name, None, f"oneDNN cannot prepack {name} weights on this CPU")
    else:
        choice = cached_or_measured(model, cache)
    set_prepack(dtype, choice.min_rows)
    set_compiled_rows(dtype, choice.compiled_rows)
    say(choice.describe())
    return choice


def min_rows_from(ratios: dict[int, float], margin: float = MARGIN, *, mixed: bool = True) -> int | None:
    """The smallest measured row count at which the prepacked path wins (takes at most ``margin`` of
    plain's time) and from which on it is nowhere clearly slower (more than ``1 / margin``; near 1 the
    measured ratio is noise) (None: no such count). Rows between two measured counts go the
    conservative way: plain. ``mixed=False`` (bf16, fp16): all rows or none, by the geometric mean
    of the ratios; rounding each result to 8 or 11 bits, two kernels would make a verified token's
    logits differ from one-token decoding's far more often than in fp32."""
    if not mixed:
        return 1 if statistics.geometric_mean(ratios.values()) <= margin else None
    best = None
    for r in sorted(ratios, reverse=True):
        if ratios[r] > 1 / margin:  # clearly slower: never used from below this row count
            break
        if ratios[r] <= margin:
            best = r
    return best


def cached_or_measured(model: Transformer, cache: bool = True) -> KernelChoice:
    groups = timed_linears(model)
    path = cache_path(model, groups) if cache else None
    if path is not None and path.is_file():
        try:
            d = json.loads(path.read_text())
            rows = d["min_rows"]
            if rows is not None and not (isinstance(rows, int) and rows >= 1):
                raise ValueError(f"min_rows {rows!r}")
            return KernelChoice(d["dtype"], rows, f"cached in {path}",
                                {str(k): float(v) for k, v in d["ratios"].items()},
                                d["gemv_ratio"], int(d["compiled_rows"]),
                                {str(k): float(v) for k, v in d["compiled_ratios"].items()})
        except (ValueError, KeyError, TypeError, OSError) as e:
            log.info("ignoring the cached kernel choice %s: %s", path, e)
    choice = measure(groups)
    if choice.gemv:
        choice = measure_compiled_steps(model, choice)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps({"key": cache_key(model, groups), **asdict(choice),
                                            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=1))
    return choice


Group = tuple[list[Linear], float]  # linears timed in one pass, and how many times a step runs such a pass


def timed_linears(model: Transformer) -> list[Group]:
    """What the timing passes run: whole decoder layers in order until ``LAYER_BYTES`` (at least one
    layer, so every shape is there), counted ``num_layers / layers timed`` times, and the LM head
    once. Weighting the head by its real share matters: at one row it favoured the prepacked path
    while the layers did not (SmolLM2 on the development VM)."""
    mods: list[Linear] = []
    size = timed = 0
    for layer in model.model.layers:
        if mods and size >= LAYER_BYTES:
            break
        timed += 1
        for m in layer.modules():
            if isinstance(m, Linear):
                mods.append(m)
                size += m.weight.numel() * m.weight.element_size()
    return [(mods, len(model.model.layers) / timed), ([model.lm_head], 1.0)]


def cache_key(model: Transformer, groups: list[Group]) -> dict:
    w = model.lm_head.weight
    return {"version": CACHE_VERSION, "cpu": cpu_name(), "torch": torch.__version__,
            "dtype": str(w.dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
            "shapes": sorted({tuple(m.weight.shape) for g, _ in groups for m in g}), "rows": list(ROWS),
            "margin": MARGIN, "layers": len(model.model.layers), "gemv_candidate": gemv_candidate(w.dtype)}


def cache_path(model: Transformer, groups: list[Group]) -> Path:
    key = cache_key(model, groups)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / "kernels" / f"linear-{key['dtype']}-{digest}.json"


def gemv_candidate(dtype: torch.dtype) -> bool:
    """The compiled kernel is timed (at one row; then whole steps of 2 and 4 tokens while it wins)
    for fp32 where numba is enabled."""
    return dtype == torch.float32 and jit.enabled()


def pass_seconds(mods: list[Linear], xs: dict[int, torch.Tensor], packed: bool | str) -> float:
    """One pass over ``mods`` with one kernel (``True``: prepacked, ``False``: plain, ``"gemv"``)."""
    t0 = time.perf_counter()
    for m in mods:
        x = xs[m.in_features]
        if packed == "gemv":
            m.gemv(x)
        elif packed:
            torch.ops.mkldnn._linear_pointwise(x, m.packed_weight(), m.bias, "none", [], "")
        else:
            F.linear(x, m.weight, m.bias)
    return time.perf_counter() - t0


def weighted_seconds(groups: list[Group], xs: dict[int, torch.Tensor], kernels: tuple, repeat: int
                     ) -> dict:
    """Each kernel's time of one step's passes: the groups' passes interleaved across kernels (so
    load from other processes hits all alike), median per group and kernel, weighted by how often a
    step runs each group; the first pass of each is a warm-up."""
    total = dict.fromkeys(kernels, 0.0)
    for g, weight in groups:
        times: dict = {k: [] for k in kernels}
        for i in range(repeat + 1):
            for k in kernels:
                t = pass_seconds(g, xs, k)
                if i:
                    times[k].append(t)
        for k in kernels:
            total[k] += weight * statistics.median(times[k])
    return total


def measure(groups: list[Group], rows: tuple[int, ...] = ROWS, repeat: int = REPEAT) -> KernelChoice:
    """Time each group's pass with each kernel at each row count (passes interleaved, so load from
    other processes hits both alike; median per group and kernel), weight the groups by how often a
    step runs them, and choose."""
    mods = [m for g, _ in groups for m in g]
    dtype = mods[0].weight.dtype
    for m in mods:
        m.packed_weight()  # packed before timing; kept if the prepacked path wins
    gen = torch.Generator().manual_seed(0)
    ratios: dict[int, float] = {}
    inputs = {}
    with torch.inference_mode():
        for r in rows:
            xs = inputs[r] = {n: torch.randn(r, n, generator=gen).to(dtype) for n in {m.in_features for m in mods}}
            total = weighted_seconds(groups, xs, (False, True), repeat)
            ratios[r] = round(total[True] / total[False], 3)
            if UNSURE[0] <= ratios[r] <= UNSURE[1]:  # near a threshold: time it again, longer
                total = weighted_seconds(groups, xs, (False, True), UNSURE_REPEAT)
                ratios[r] = round(total[True] / total[False], 3)
        rows_on = min_rows_from(ratios, mixed=dtype == torch.float32)
        gemv_ratio = None
        if gemv_candidate(dtype):  # against what one row would run otherwise
            one = inputs.get(1) or {n: torch.randn(1, n, generator=gen).to(dtype)
                                    for n in {m.in_features for m in mods}}
            total = weighted_seconds(groups, one, ("gemv", rows_on == 1), repeat)
            gemv_ratio = round(total["gemv"] / total[rows_on == 1], 3)
    if rows_on is None:
        for m in mods:
            m.drop_packed()
    gemv = gemv_ratio is not None and gemv_ratio <= MARGIN
    return KernelChoice(str(dtype).replace("torch.", ""), rows_on, "measured",
                        {str(r): v for r, v in ratios.items()}, gemv_ratio, int(gemv))


def step_ms(bench: StepBench, tokens: int) -> float:
    """One timed step of ``tokens`` new tokens (a chain over ``BASELINE_CONTEXT`` tokens)."""
    return bench.step_ms(1, tokens, BASELINE_CONTEXT, 1)


def measure_compiled_steps(model: Transformer, choice: KernelChoice, repeat: int = REPEAT) -> KernelChoice:
    """Once the compiled linear wins at one row: whole steps of 2, then 4 tokens with every layer
    compiled (``cpu_decode``) against the operator path with the linears ``choice`` sets, steps
    interleaved, medians; ``compiled_rows`` grows while the compiled step takes at most ``MARGIN`` of
    the other's time. Whole steps, not linears alone: at 4 rows the compiled linear took 1.07x the
    prepacked one on the development VM while whole 4-token steps were 1.27x faster compiled (the
    operator calls it saves). The engine's kernel settings are set for each path and restored after."""
    dtype = model.lm_head.weight.dtype
    bench = StepBench(model, BASELINE_CONTEXT + COMPILED_ROWS[-1] + 16, spare_blocks=4)
    compiled, ratios = choice.compiled_rows, dict(choice.compiled_ratios)
    with kernel_settings_restored(dtype):
        set_prepack(dtype, choice.min_rows)
        for t in COMPILED_ROWS:
            times: dict[bool, list[float]] = {True: [], False: []}
            for i in range(repeat + 1):
                for on in (True, False):
                    set_compiled_rows(dtype, t if on else choice.compiled_rows)
                    os.environ[CPU_DECODE_ENV] = "1" if on else "0"
                    ms = step_ms(bench, t)
                    if i:
                        times[on].append(ms)
            ratios[str(t)] = round(statistics.median(times[True]) / statistics.median(times[False]), 3)
            if ratios[str(t)] > MARGIN:
                break
            compiled = t
    return replace(choice, compiled_rows=compiled, compiled_ratios=ratios)
