"""What the paper's artifact fixes for its two model pairs: the measured verification tables, the
baselines, tensor parallelism, batch limits and the draft phase estimate (docs/definitions.md).

Everything that needs these numbers (the built-in profiles, the roofline's calibration, the
scheduler benchmark) reads them from here, so each is written once.
"""

from __future__ import annotations

from dataclasses import dataclass

from adaserve.core.profile import Limits
from adaserve.core.slo import ARTIFACT_BASELINE_MS
from adaserve.scheduling.speculation import LLAMA_SPEC, QWEN_SPEC, SpecParams

GPU_80G = "a100-80gb"  # the artifact's main set-up (roofline GPU names)
GPU_40G = "a100-40gb"  # its re-run on 8x A100-40GB

# Profiled target latency (ms) vs tokens in the verification batch, 4x A100-SXM4-80GB.
ARTIFACT_VERIFY_MS: dict[str, tuple[list[int], list[float]]] = {
    "llama-3.1-70b": ([0, 128, 256, 384, 512, 640, 768, 896, 1024],
                      [0, 55, 85, 105, 125, 145, 165, 185, 205]),
    "qwen2.5-32b": ([0, 128, 256, 384, 512, 640, 768, 896, 1024],
                    [0, 48, 66, 84, 104, 124, 144, 164, 188]),
}


@dataclass(frozen=True)
class Family:
    """One of the artifact's model pairs. ``model_type`` is the target's Hugging Face
    ``model_type``: it picks the speculation constants and the acceptance model, as a real model's
    config does in the engine."""

    target: str
    draft: str
    model_type: str
    spec: SpecParams  # the artifact's speculation constants (D_max, B2, W_max, ...)
    tp_80g: int
    tp_40g: int
    baseline_ms: float
    max_batch_requests: int
    phase_ms: float  # draft speculation phase estimate at D_max

    @property
    def d_max(self) -> int:
        return self.spec.d_max

    @property
    def b2(self) -> int:
        """Draft tokens per speculation step."""
        return self.spec.b2

    @property
    def w_max(self) -> int:
        return self.spec.w_max

    def limits(self) -> Limits:
        return Limits(max_batch_requests=self.max_batch_requests, max_batch_tokens=1024,
                      prefill_chunk=1024, max_seq_len=2048)

    @property
    def typical_context(self) -> int:
        """KV context of the typical draft step: B2 // W_max requests x half the max seq len."""
        return (self.b2 // self.w_max) * (self.limits().max_seq_len // 2)


FAMILIES: dict[str, Family] = {
    "llama-3.1-70b": Family("llama-3.1-70b", "llama-3.2-1b", "llama", LLAMA_SPEC, tp_80g=4, tp_40g=8,
                            baseline_ms=ARTIFACT_BASELINE_MS, max_batch_requests=64, phase_ms=70.0),
    "qwen2.5-32b": Family("qwen2.5-32b", "qwen2.5-0.5b", "qwen2", QWEN_SPEC, tp_80g=2, tp_40g=4,
                          baseline_ms=28.0, max_batch_requests=80, phase_ms=35.0),
}
