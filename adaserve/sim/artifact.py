"""What the paper's artifact fixes for its two model pairs: the measured verification tables, the
baselines, tensor parallelism, batch limits (FlexFlow and vLLM) and the draft phase figure its
scheduler was given (docs/definitions.md).

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
    # the artifact's --ssm-spec-latency-ms: the speculation-phase figure its scheduler was given,
    # not a measurement; the simulator prices drafting from the draft model's roofline instead
    phase_ms: float
    # the target's context window (config.json max_position_embeddings): vLLM's max_model_len when
    # the artifact sets none, which without chunked prefill is its max_num_batched_tokens
    max_model_len: int

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

    def vllm_limits(self, system: str) -> Limits:
        """The artifact's vLLM flags for ``system`` (exps/test.sh). vLLM and vLLM-Spec:
        ``--max-num-seqs 512 --enable-chunked-prefill False``, no ``--max-num-batched-tokens``, so
        vLLM batches whole prompts up to max(max_model_len, 2048) tokens. Sarathi-Serve:
        ``--enable-chunked-prefill True --max-num-seqs 2048 --max-num-batched-tokens 2048`` (a
        chunk may take the whole token budget). Priority is not in the artifact's scripts; it gets
        Sarathi's (vLLM with chunked prefill). ``max_seq_len`` stays the trace's 2048 for every
        system, so all of them serve the same requests."""
        if system == "vllm" or system.startswith("vllm_spec_"):
            return Limits(max_batch_requests=512, max_batch_tokens=max(self.max_model_len, 2048),
                          prefill_chunk=max(self.max_model_len, 2048), max_seq_len=2048)
        return Limits(max_batch_requests=2048, max_batch_tokens=2048, prefill_chunk=2048,
                      max_seq_len=2048)


FAMILIES: dict[str, Family] = {
    "llama-3.1-70b": Family("llama-3.1-70b", "llama-3.2-1b", "llama", LLAMA_SPEC, tp_80g=4, tp_40g=8,
                            baseline_ms=ARTIFACT_BASELINE_MS, max_batch_requests=64, phase_ms=70.0,
                            max_model_len=131072),
    "qwen2.5-32b": Family("qwen2.5-32b", "qwen2.5-0.5b", "qwen2", QWEN_SPEC, tp_80g=2, tp_40g=4,
                          baseline_ms=28.0, max_batch_requests=80, phase_ms=35.0,
                          max_model_len=32768),
}
