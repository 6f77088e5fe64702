"""Serve a few throwaway requests before the real ones, so that one-off costs land before serving.

Why: the host kernels (``core/jit.py``) compile on their first call, or load from numba's disk cache,
and each policy, drafter and sampling mode calls its own. Measured on an H200 (docs/engine.md, "GPU
results (H200, second visit)"): in the first ``adaserve_plus`` run on a fresh machine one iteration
took 5.9 s, its scheduling kernels compiling in the middle of the run, and eight coding requests
missed their SLO for it. ``warm_serving`` runs the same policy, drafter kind and sampling mode on a
separate executor (its own small KV pool and drafter state, no CUDA graphs, no acceptance recorder)
over a few short requests, so the real executor, its cache and its statistics are untouched.

It covers the paths a short run takes: prefill, drafting, selection, verification, commit,
finishing. A path it does not reach (e.g. a request refused because the KV pool is full) can still
compile mid-run, once per machine: numba caches it on disk.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from adaserve.core.request import Request
from adaserve.core.slo import slo_ms
from adaserve.drafting.ngram import Filler, NgramDrafter
from adaserve.drafting.trees import RECORD_K
from adaserve.engine.drafters import Drafter
from adaserve.engine.cuda_graphs import CHUNK_QUERY_BUCKETS, QUERY_BUCKETS
from adaserve.engine.executor import TorchExecutor
from adaserve.engine.kv_cache import BLOCK_SIZE
from adaserve.iteration import ServingLoop
from adaserve.scheduling.policies import make_policy

from .build import Engine, make_drafter

# one request of each category the traces carry (SLO ratios as in a trace: a multiple of the
# baseline, or minus an absolute SLO in ms), so category-keyed state and tight and loose SLOs are met
SLO_RATIOS = {"coding": 1.2, "chat": -50.0, "summarization": -150.0}
PROMPT = 48  # tokens: a 16-token pattern repeated (at most half of --max-model-len)
NEW_TOKENS = 16
LATE_AFTER = 3  # iterations of the first request alone; the others then prefill beside its decoding
MAX_ITERATIONS = 300


@dataclass(frozen=True)
class WarmUp:
    serving_s: float  # the throwaway requests
    graphs: int = 0  # CUDA graphs captured ahead
    graphs_s: float = 0.0

    def describe(self, system: str) -> str:
        text = f"warmed up {system}'s serving path on throwaway requests in {self.serving_s:.2f} s"
        if self.graphs:
            text += f"; captured {self.graphs} CUDA graphs ahead in {self.graphs_s:.1f} s"
        return text


def warm_serving(eng: Engine, system: str) -> WarmUp:
    """Serve one throwaway request of each category with ``system``'s policy on a copy of
    ``eng``'s serving path (same model, drafter kind, sampling mode, profile); then, with CUDA
    graphs on, capture the real executor's graph buckets ahead (plain decode buckets only when the
    policy did not speculate in the warm-up: vLLM and Sarathi never do)."""
    t0 = time.perf_counter()
    model, n = eng.model, len(SLO_RATIOS)
    prompt = max(1, min(PROMPT, eng.profile.limits.max_seq_len // 2))  # within --max-model-len
    per_seq = -(-(prompt + NEW_TOKENS + 128) // BLOCK_SIZE) + 2
    blocks = n * per_seq + eng.profile.limits.max_batch_requests
    ex = TorchExecutor(model, eng.profile, _drafter(eng, blocks), num_blocks=blocks,
                       temperature=eng.executor.default_options.temperature, ignore_eos=True)
    pattern = np.random.default_rng(0).integers(3, model.config.vocab_size, (n, 16))
    ex.set_prompts({i: np.resize(pattern[i], prompt).tolist() for i in range(n)})
    requests = [Request(rid=i, arrival_ms=0.0, input_len=prompt, max_new_tokens=NEW_TOKENS, slo_ratio=ratio,
                        slo_ms=slo_ms(ratio, eng.baseline_ms), category=category)
                for i, (category, ratio) in enumerate(SLO_RATIOS.items())]
    speculated: list[bool] = []
    draft = ex.speculate

    def noting(reqs, shape):  # which query sizes to capture graphs for: did the policy draft?
        speculated.append(shape.speculative)
        return draft(reqs, shape)

    ex.speculate = noting
    loop = ServingLoop(make_policy(system, model.config.family), ex, requests[:1])
    with torch.inference_mode():
        for i in range(MAX_ITERATIONS):
            if i == LATE_AFTER:
                for r in requests[1:]:
                    r.arrival_ms = ex.now()
                    loop.submit(r)
            if not loop.busy and i > LATE_AFTER:
                break
            loop.run_once()
        else:
            raise RuntimeError(f"warm-up: {n} requests of {NEW_TOKENS} tokens did not finish in "
                               f"{MAX_ITERATIONS} iterations")
    serving_s = time.perf_counter() - t0
    graphs = eng.executor.graphs
    if graphs is None:
        return WarmUp(serving_s)
    t1 = time.perf_counter()
    with torch.inference_mode():
        captured = graphs.capture_ahead((QUERY_BUCKETS if any(speculated) else (1,)) + CHUNK_QUERY_BUCKETS)
    return WarmUp(serving_s, captured, time.perf_counter() - t1)


def _drafter(eng: Engine, blocks: int) -> Drafter:
    """The engine's drafter kind; the n-gram one with filler tokens of high confidence, so that
    every tree is full and the policies verify drafted tokens. An n-gram table drafts only where
    the model's last token appeared before in its sequence: on random weights it may draft nothing
    in a short warm-up, and the selection's and learning step's kernels then compiled mid-run.
    Same kernels, same argument types with and without the filler."""
    if eng.drafter_kind == "model":
        return make_drafter("model", eng.draft, blocks)
    vocab = eng.model.config.vocab_size
    return NgramDrafter(filler=Filler(3, vocab, tuple(float(p) for p in 0.6 / np.arange(1, RECORD_K + 1))))
