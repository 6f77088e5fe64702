"""The SLO encoding and the paper's request categories (its Table 2): docs/definitions.md §1-2."""

from __future__ import annotations

import math
from dataclasses import dataclass

from adaserve.core.errors import UserError

NO_SLO_ABOVE = 999.0  # slo_ratio > this means best effort (always attained)
# The artifact's Llama-3.1-70B baseline decode latency: hardware-scaled SLOs multiply absolute
# SLOs by baseline_ms / ARTIFACT_BASELINE_MS (docs/definitions.md).
ARTIFACT_BASELINE_MS = 30.0


def slo_ms(slo_ratio: float, baseline_ms: float) -> float:
    """TPOT SLO in ms for an encoded ratio; ``math.inf`` for best-effort requests.

    ``> 0``: a multiple of the model's baseline decode latency; ``< 0``: an absolute TPOT in ms;
    ``> 999``: no SLO.
    """
    if not math.isfinite(slo_ratio) or slo_ratio == 0:
        raise UserError(f"slo_ratio must be finite and non-zero, got {slo_ratio!r}")
    if slo_ratio > NO_SLO_ABOVE:
        return math.inf
    if slo_ratio > 0:
        if not baseline_ms > 0:
            raise UserError(f"baseline_ms must be positive, got {baseline_ms!r}")
        return slo_ratio * baseline_ms
    return -slo_ratio


def hardware_scaled(slo_ratio: float, baseline_ms: float) -> float:
    """An encoded SLO with hardware scaling applied: absolute (negative) SLOs times
    ``baseline_ms / ARTIFACT_BASELINE_MS``; relative and best-effort SLOs unchanged (they already
    follow the baseline)."""
    if slo_ratio >= 0:
        return slo_ratio
    return slo_ratio * (baseline_ms / ARTIFACT_BASELINE_MS)


@dataclass(frozen=True)
class Category:
    name: str
    slo_ratio: float


CODING = Category("coding", 1.2)               # HumanEval prompts
CHAT = Category("chat", -50.0)                 # Alpaca prompts
SUMMARIZATION = Category("summarization", -150.0)  # CNN/DailyMail articles
CATEGORIES = (CODING, CHAT, SUMMARIZATION)
SUMMARIZATION_PREFIX = "Please generate a summarization for the following document.\n\n"


def category_of(slo_ratio: float, name: str | None = None) -> str:
    """Category label of a request: the explicit name if given, else the paper's category with
    this exact ratio, else a label derived from the ratio (e.g. scaled SLOs in Figure 11)."""
    if name:
        return name
    for c in CATEGORIES:
        if c.slo_ratio == slo_ratio:
            return c.name
    if slo_ratio > NO_SLO_ABOVE:
        return "best_effort"
    return f"slo{slo_ratio:g}"
