"""Built-in latency profiles by name (the artifact's hardware) and loading of profile files.

- ``llama-3.1-70b`` / ``qwen2.5-32b``: 4× A100-SXM4-80GB, verification table = the artifact's
  measured table, baselines 30 / 28 ms (docs/definitions.md §8, §1).
- ``llama-3.1-70b-a100-40g`` / ``qwen2.5-32b-a100-40g``: the artifact's 8× A100-40GB re-run (TP 8 /
  TP 4), from the roofline (adaserve.sim.roofline); baseline = the roofline's 1-token step.

Draft tables. The artifact gives only a speculation-phase estimate: 70 ms (Llama, draft Llama-3.2-1B) and
35 ms (Qwen, draft Qwen2.5-0.5B). We read it as the whole phase at maximum depth (D_max = 8 / 5
draft steps) for a *typical batch*: every step expands B2 draft tokens (96 / 80 — the artifact's
draft tokens per step, which n·w reaches once w hits W_max = 3) over the KV context of
B2 // W_max requests of 1024 cached tokens each (half the 2048 max sequence length). The draft's
per-step table takes its shape (vs tokens and context) from the draft model's roofline — nearly flat
in tokens, dominated by weight streaming and launch overhead — multiplied by one factor per model
family so that D_max · draft_ms(B2, typical context) equals the estimate. The 40 GB variants reuse
the factor of their family (same framework, same draft, a GPU of the same generation).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np

from adaserve.core.errors import UserError
from adaserve.core.profile import LatencyProfile, Table
from adaserve.sim import roofline
from adaserve.sim.artifact import ARTIFACT_VERIFY_MS, FAMILIES, GPU_40G, GPU_80G, Family

A100_40G_SUFFIX = "-a100-40g"


def draft_scale(family: Family) -> float:
    """Factor that makes D_max roofline draft steps of a typical batch last the artifact's estimate."""
    step = roofline.step_ms(family.draft, GPU_80G, 1, family.b2, family.typical_context)
    return family.phase_ms / family.d_max / step


def artifact_verify_points(name: str) -> tuple[list[int], list[float]]:
    """The artifact's table (docs/definitions.md §8) plus one point: 1 token = the baseline.

    The table's ``0:0`` means "no forward"; interpolating from it would make a 1-token step cost
    55/128 ms instead of the 30 ms a single decode step is measured at, so light-load steps would be
    ~50× too cheap.
    """
    tokens, ms = ARTIFACT_VERIFY_MS[name]
    return tokens[:1] + [1] + tokens[1:], ms[:1] + [FAMILIES[name].baseline_ms] + ms[1:]


def _artifact_profile(name: str, fam: Family) -> LatencyProfile:
    tokens, ms = artifact_verify_points(name)
    scale = draft_scale(fam)
    draft_source = roofline.roofline_profile(fam.target, fam.draft, GPU_80G, fam.tp_80g,
                                             draft_scale=scale, limits=fam.limits())
    return LatencyProfile(
        name=name,
        verify=Table(np.asarray(tokens, dtype=np.float64), np.asarray(ms, dtype=np.float64)),
        draft=draft_source.draft,
        baseline_ms=fam.baseline_ms,
        source=(f"artifact-table (artifact verify table + 1 token = baseline_ms; draft = "
                f"{fam.draft} roofline x{scale:.2f} so that {fam.d_max} steps of {fam.b2} tokens = {fam.phase_ms:g} ms)"),
        hardware=f"{fam.tp_80g}x A100-SXM4-80GB TP{fam.tp_80g}; draft {fam.draft} TP1",
        limits=draft_source.limits,
        family=fam.model_type,
    )


def _roofline_40g_profile(name: str, fam: Family) -> LatencyProfile:
    scale = draft_scale(fam)
    prof = roofline.roofline_profile(fam.target, fam.draft, GPU_40G, fam.tp_40g, name=name,
                                     draft_scale=scale, limits=fam.limits())
    prof.source = (f"roofline (baseline_ms = roofline 1-token step at context 0; draft = "
                   f"{fam.draft} roofline x{scale:.2f}, the factor calibrated on the 80 GB "
                   "profile)")
    prof.family = fam.model_type
    return prof


def _builders() -> dict[str, tuple]:
    out: dict[str, tuple] = {}
    for key, fam in FAMILIES.items():
        out[key] = (_artifact_profile, fam)
        out[key + A100_40G_SUFFIX] = (_roofline_40g_profile, fam)
    return out


def list_profiles() -> list[str]:
    return list(_builders())


@cache
def _built(name: str) -> dict:
    build, fam = _builders()[name]
    return build(name, fam).to_dict()


def get_profile(name_or_path: str | Path) -> LatencyProfile:
    """A built-in profile by name (a fresh copy each call), or a JSON profile file by path."""
    key = str(name_or_path)
    if key in _builders():
        return LatencyProfile.from_dict(_built(key), key)
    path = Path(name_or_path)
    if path.suffix == ".json" or path.exists():
        return LatencyProfile.load(path)
    raise UserError(f"unknown latency profile {key!r}; built-in profiles: "
                     f"{', '.join(list_profiles())} (or a path to a JSON profile file)")
