"""Speculation parameters: depth and width of the candidate trees from the batch size (paper
Eq. 8-9), with the artifact's constants per model family."""

from __future__ import annotations

from dataclasses import dataclass

from adaserve.scheduling.plan import SpecShape


@dataclass(frozen=True)
class SpecParams:
    """``d = clip(floor(B1/(n+c1)) - 1, D_min, D_max)``, ``w = clip(floor(B2/n) + c2, 1, W_max)``.

    c1 and c2 were grid-searched by the authors and not published. Defaults: ``c1 = 0`` makes the
    depth exactly the verifier's per-request share of B1 minus the root (the paper's stated intent:
    speculate no deeper than the average verification budget per request); ``c2 = 1`` keeps a
    branching factor of at least 2 until the draft's per-step budget B2 is shared by more than B2
    requests, so the selector always has an alternative to the top-1 chain to choose from.
    ``n_max_factor``: the SLO phase adds at most ``n_max = n_max_factor * B / n`` nodes to a tree.
    """

    d_min: int
    d_max: int
    w_max: int
    b1: int
    b2: int
    c1: float = 0.0
    c2: int = 1
    n_max_factor: float = 1.2

    def __post_init__(self) -> None:
        if not 1 <= self.d_min <= self.d_max:
            raise ValueError(f"need 1 <= d_min <= d_max, got {self.d_min}, {self.d_max}")
        if self.w_max < 1 or self.b1 < 1 or self.b2 < 1 or self.n_max_factor <= 0:
            raise ValueError("w_max, b1, b2 and n_max_factor must be positive")

    def depth(self, n: int) -> int:
        n = max(n, 1)
        return int(min(max(self.b1 // (n + self.c1) - 1, self.d_min), self.d_max))

    def width(self, n: int) -> int:
        n = max(n, 1)
        return int(min(max(self.b2 // n + self.c2, 1), self.w_max))

    def shape(self, n: int) -> SpecShape:
        return SpecShape(depth=self.depth(n), width=self.width(n))

    def n_max(self, budget: int, n: int) -> int:
        return max(1, int(self.n_max_factor * budget / max(n, 1)))


LLAMA_SPEC = SpecParams(d_min=4, d_max=8, w_max=3, b1=512, b2=96)
QWEN_SPEC = SpecParams(d_min=3, d_max=5, w_max=3, b1=256, b2=80)


# By the target's Hugging Face model_type (a model config's ``family``, a profile's ``family``).
SPEC_PARAMS: dict[str, SpecParams] = {"llama": LLAMA_SPEC, "qwen2": QWEN_SPEC}


def spec_params_for(family: str | None) -> SpecParams:
    """The artifact's constants for a model family; Llama's for any other (or unknown) family."""
    return SPEC_PARAMS.get(family or "llama", LLAMA_SPEC)
