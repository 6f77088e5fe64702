"""Built-in latency profiles by name (the artifact's hardware), the profile each system is priced
with, and loading of profile files.

- ``llama-3.1-70b`` / ``qwen2.5-32b``: 4× A100-SXM4-80GB, verification table = the artifact's
  measured FlexFlow table, baselines 30 / 28 ms (docs/definitions.md §8, §1).
- ``llama-3.1-70b-a100-40g`` / ``qwen2.5-32b-a100-40g``: the artifact's 8× A100-40GB re-run (TP 8 /
  TP 4), from the roofline (adaserve.sim.roofline); baseline = the roofline's 1-token step.

Draft tables: the draft model's roofline on one GPU of the same hardware, with the same constants
as the target (docs/simulator.md, "Built-in profiles").

Each system is priced on the engine the paper ran it on (``system_profile``): AdaServe, its
ablations and SpecInfer on FlexFlow (the profiles above); vLLM, Sarathi-Serve, vLLM-Spec (and
Priority, "vLLM + Priority" in the paper's Figure 1) on vLLM, with a roofline of the same hardware
(``roofline.VLLM_EFFICIENCY``) and the artifact's vLLM batch limits (``Family.vllm_limits``).
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


def runs_on_vllm(system: str) -> bool:
    """Whether the paper ran ``system`` on vLLM (v0.8.4, §6.1) rather than on FlexFlow Serve."""
    return system in ("vllm", "sarathi", "priority") or system.startswith("vllm_spec_")


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
    draft_source = roofline.roofline_profile(fam.target, fam.draft, GPU_80G, fam.tp_80g,
                                             limits=fam.limits())
    return LatencyProfile(
        name=name,
        verify=Table(np.asarray(tokens, dtype=np.float64), np.asarray(ms, dtype=np.float64)),
        draft=draft_source.draft,
        baseline_ms=fam.baseline_ms,
        source=(f"artifact-table (artifact verify table + 1 token = baseline_ms; draft = "
                f"{fam.draft} roofline, same constants as the target)"),
        hardware=f"{fam.tp_80g}x A100-SXM4-80GB TP{fam.tp_80g}; draft {fam.draft} TP1",
        limits=draft_source.limits,
        family=fam.model_type,
    )


def _roofline_40g_profile(name: str, fam: Family) -> LatencyProfile:
    prof = roofline.roofline_profile(fam.target, fam.draft, GPU_40G, fam.tp_40g, name=name,
                                     limits=fam.limits())
    prof.source = (f"roofline (baseline_ms = roofline 1-token step at context 0; draft = "
                   f"{fam.draft} roofline)")
    prof.family = fam.model_type
    return prof


def _vllm_profile(name: str, system: str) -> LatencyProfile:
    """``name``'s hardware priced as vLLM runs it: the roofline with ``VLLM_EFFICIENCY``, the
    artifact's vLLM limits for ``system``, the draft model only for vLLM-Spec. The baseline (which
    relative SLOs are multiples of) stays the profile's, so every system serves the same SLOs."""
    base = get_profile(name)
    fam = _builders()[name][1]
    gpu, tp = (GPU_40G, fam.tp_40g) if name.endswith(A100_40G_SUFFIX) else (GPU_80G, fam.tp_80g)
    draft = fam.draft if system.startswith("vllm_spec_") else None
    prof = roofline.roofline_profile(fam.target, draft, gpu, tp, name=f"{name}@vllm",
                                     eff=roofline.VLLM_EFFICIENCY, limits=fam.vllm_limits(system))
    prof.baseline_ms = base.baseline_ms
    prof.source = (f"vllm roofline (overlap {roofline.VLLM_EFFICIENCY.overlap:g}, other constants "
                   f"as fitted; vLLM limits of the artifact for {system}); SLO baseline of {name}")
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


@cache
def _built_vllm(name: str, system: str) -> dict:
    return _vllm_profile(name, system).to_dict()


PRICINGS = ("per-engine", "shared")


def system_profile(name_or_path: str | Path, system: str, pricing: str = "per-engine") -> LatencyProfile:
    """The profile ``system`` is simulated with. ``pricing="per-engine"`` (default): a built-in
    profile's vLLM variant for the systems the paper ran on vLLM (``runs_on_vllm``);
    ``"shared"``: every system on the named profile (the artifact's FlexFlow table), for
    comparison. A profile file is always used as is (it describes one engine, ours), with
    ``system``'s own host row where it has one (``LatencyProfile.for_system``)."""
    if pricing not in PRICINGS:
        raise UserError(f"unknown pricing {pricing!r}; valid: {', '.join(PRICINGS)}")
    key = str(name_or_path)
    if pricing == "per-engine" and key in _builders() and runs_on_vllm(system):
        d = _built_vllm(key, system)
        return LatencyProfile.from_dict(d, d["name"])
    return get_profile(name_or_path).for_system(system)


def split_calls_missing(profile: LatencyProfile) -> str | None:
    """A warning for a profile of our engine on a CPU measured before the engine split its
    attention calls (no ``attention_calls``): it prices one padded call, which that engine no
    longer runs (docs/engine.md, "Attention calls on a CPU")."""
    if (profile.step_model == "engine" and profile.measured_with.get("device") == "cpu"
            and profile.attention_calls is None):
        return (f"profile {profile.name!r} predates the engine's split attention calls on a CPU: it prices "
                "one padded call per step (too high for batches of mixed contexts or tree sizes); measure "
                "it again with `adaserve profile`")
    return None


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
