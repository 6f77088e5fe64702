"""Engine speed: ``adaserve bench engine [--model smollm2-135m] [--threads N] [--device cuda] [--json]``
A benchmark script, not a test: it prints numbers.

(a) **Engine overhead.** ``N`` requests decode through the real ``ServingLoop`` and ``TorchExecutor``;
every timed step is one full ``TorchExecutor.execute`` with the loop's own plan (batch building, KV
bookkeeping, the forward, argmax, verification walk, ``KVCache.commit``, token bookkeeping). The
target is wrapped so that the ``model(batch, cache)`` call inside ``execute`` is timed on its own:
that is the bare forward of exactly the same tokens on the same cache state. Overhead ratio =
``execute`` / forward (median over steps of the per-step ratio; target <= 1.15). Two modes:
``incremental`` (the vllm policy, no speculation: one token per request) and ``tree`` (the
adaserve policy selecting nodes of full beam-search candidate trees from ``BenchDrafter``: n-gram
continuations first, random fillers after; the prompts repeat a random 16-token pattern, so paths
are accepted and ``KVCache.commit`` moves KV as in real serving).

(c) **Host work per iteration** (``--only host``, not part of the default run): ``host_breakdown``
below; docs/engine.md, "Host work per iteration".

(b) **Tokens/s of greedy generation** at batch 1 and 16 with the same prompts (``--trace``'s, else
the first prompts of the generated RPS-4.8 trace drawn from the offline prompt pool that ships with
the package's dependencies — the mix of ``make reproduce`` — cut to ``--prompt-len`` tokens; the
source is printed) and the same number of new tokens (EOS
ignored): our engine end to end (``ServingLoop`` + ``TorchExecutor``: ``vllm`` without
speculation, ``adaserve`` with the n-gram drafter) vs transformers' ``generate`` on the same weights
(the same dtype, SDPA attention, batch 16 left-padded). Tokens/s = generated tokens / wall time
(prefill included), median of ``--repeat`` runs. Also reports how many requests produced the same
tokens as ``generate``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from adaserve.config import EngineConfig
from adaserve.core.errors import UserError
from adaserve.core.profile import LatencyProfile, Limits
from adaserve.core.request import Request
from adaserve.drafting.ngram import Filler, NgramDrafter
from adaserve.drafting.trees import RECORD_K
from adaserve.engine.executor import TorchExecutor
from adaserve.engine.kv_cache import BLOCK_SIZE
from adaserve.engine.model import Transformer
from adaserve.iteration import ServingLoop
from adaserve.runtime.build import load_models
from adaserve.runtime.profiler import hardware_string, quick_profile, sync
from adaserve.scheduling.policies import make_policy
from adaserve.scheduling.speculation import SpecParams

OVERHEAD_TARGET = 1.15
BENCH_SLO_FACTOR = 1.5  # SLO of the benchmark's requests: 1.5 x the profile's baseline decode latency
DEFAULT_PROMPTS = "generated RPS-4.8 trace, offline prompt pool"
PROMPT_SOURCES = ("pool", "synthetic-text")  # --prompts: the offline pool's trace, or built-in text


# ---- helpers -----------------------------------------------------------------------------------

def model_device(model: Transformer) -> torch.device:
    return model.lm_head.weight.device


class TimedModel:
    """The target with its forward timed: ``TorchExecutor`` calls it exactly like the model."""

    def __init__(self, model: Transformer):
        self.inner = model
        self.calls: list[tuple[float, float, int]] = []  # (start, end, tokens) of every forward

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, batch, cache):
        dev = model_device(self.inner)
        sync(dev)
        t0 = time.perf_counter()
        out = self.inner(batch, cache)
        sync(dev)
        self.calls.append((t0, time.perf_counter(), batch.num_tokens))
        return out


class BenchDrafter(NgramDrafter):
    """Full candidate trees without a draft model: at every frontier node the n-gram drafter's
    continuations come first, the remaining children are pseudo-random tokens with small
    confidences (``Filler``), so beam search and static shapes always find ``width`` children per
    node (the trees a draft model would give, at no cost)."""

    name = "bench"

    def __init__(self, vocab_size: int, seed: int = 0, max_ngram: int = 4):
        filler = Filler(3, vocab_size, tuple((0.05 / np.arange(1, RECORD_K + 1)).tolist()), seed)
        super().__init__(max_ngram=max_ngram, filler=filler)


def repeated_prompts(n: int, length: int, vocab: int, period: int = 32, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        pattern = rng.integers(3, vocab, period).tolist()
        out.append((pattern * (length // period + 1))[:length])
    return out


def trace_prompts(tokenizer, n: int, max_len: int, trace: str | Path | None = None,
                  prompts: str = PROMPT_SOURCES[0]) -> tuple[list[list[int]], str]:
    """The first ``n`` prompts of ``trace`` (else of the generated RPS-4.8 trace, whose prompts come
    from the offline pool; with ``prompts="synthetic-text"``, sentences of a built-in word list
    that need no package, see workload/synthetic_text.py), tokenized and cut to ``max_len``
    tokens, and where they came from. Never random tokens: they make the n-gram drafter look
    several times better than on text."""
    from adaserve.core.trace import load_trace
    from adaserve.workload.generate import generate_trace
    from adaserve.workload.prompts import PoolError
    from adaserve.workload.synthetic_text import POOL_SOURCE, SOURCE, synthetic_prompts

    if prompts not in PROMPT_SOURCES:
        raise UserError(f"unknown prompt source {prompts!r}; use one of {', '.join(PROMPT_SOURCES)}")
    if trace is not None:
        records, source = load_trace(trace)[:n], f"{Path(trace).name}"
    elif prompts == SOURCE:
        records, source = [SimpleNamespace(prompt=t) for t in synthetic_prompts(n)], POOL_SOURCE
    else:
        try:
            records, source = generate_trace("rps", rps=4.8, seed=0)[:n], DEFAULT_PROMPTS
        except PoolError as e:
            raise UserError(f"bench engine needs prompts: {e}; or pass --trace FILE") from None
    if len(records) < n:
        raise UserError(f"{source}: {len(records)} prompts, the benchmark needs {n}")
    prompts = [list(tokenizer(r.prompt).input_ids)[:max_len] for r in records]
    if not all(prompts):
        raise UserError(f"{source}: an empty prompt among the first {n}")
    return prompts, f"{source} (first {n} prompts, <= {max_len} tokens)"


def make_requests(prompts: Sequence[Sequence[int]], new_tokens: int, baseline_ms: float) -> list[Request]:
    slo = BENCH_SLO_FACTOR * baseline_ms
    return [Request(rid=i, arrival_ms=0.0, input_len=len(p), max_new_tokens=new_tokens, slo_ratio=BENCH_SLO_FACTOR,
                    slo_ms=slo, category="bench") for i, p in enumerate(prompts)]


def make_executor(model, profile: LatencyProfile, drafter, prompts: Sequence[Sequence[int]],
                  new_tokens: int, cuda_graphs: bool = False) -> TorchExecutor:
    per_seq = -(-(max(len(p) for p in prompts) + new_tokens + 128) // BLOCK_SIZE) + 2
    blocks = len(prompts) * per_seq + profile.limits.max_batch_requests  # the executor keeps one per slot
    ex = TorchExecutor(model, profile, drafter, num_blocks=blocks, block_size=BLOCK_SIZE, ignore_eos=True,
                       cuda_graphs=cuda_graphs)
    ex.set_prompts({i: p for i, p in enumerate(prompts)})
    return ex


# ---- (a) engine overhead ----------------------------------------------------------------------

@dataclass
class OverheadResult:
    mode: str  # incremental | tree
    requests: int
    steps: int
    tokens_per_step: float  # forward tokens (median)
    committed_per_step: float  # tokens committed per step over all requests (median)
    engine_ms: float  # TorchExecutor.execute (median)
    forward_ms: float  # model(batch, cache) inside it (median)
    ratio: float  # median per-step engine / forward
    before_ms: float  # execute time before the forward (trees, batch building): median
    after_ms: float  # after the forward (argmax, walk, commit): median


def engine_overhead(model: Transformer, profile: LatencyProfile, n_requests: int, mode: str,
                    context: int = 128, steps: int = 12, warmup: int = 2, seed: int = 0,
                    cuda_graphs: bool = False) -> OverheadResult:
    if mode not in ("incremental", "tree"):
        raise ValueError(f"mode must be 'incremental' or 'tree', got {mode!r}")
    prompts = repeated_prompts(n_requests, context, model.config.vocab_size, 16, seed)
    max_new = (warmup + steps + 2) * 10
    drafter = BenchDrafter(model.config.vocab_size, seed) if mode == "tree" else None
    ex = make_executor(model, profile, drafter, prompts, max_new, cuda_graphs)
    requests = make_requests(prompts, max_new, profile.decode_baseline_ms)
    policy = make_policy("adaserve" if mode == "tree" else "vllm", model.config.family)
    loop = ServingLoop(policy, ex, requests)
    ex.reset_clock()
    dev = model_device(model)
    with torch.inference_mode():
        while len(loop.running) < n_requests:  # prefill (and, for adaserve, the first decode steps)
            if not loop.run_once() and not loop.pending:
                raise RuntimeError("benchmark requests were rejected (KV pool too small?)")
        for _ in range(warmup):
            loop.step()
        inner = ex.model  # the model, or the model behind its CUDA graphs
        timed = TimedModel(inner)
        ex.model = timed
        execute = ex.execute
        records: list[tuple] = []

        def timed_execute(prefill, decode, forest, selected, max_commit):
            sync(dev)
            t0 = time.perf_counter()
            out = execute(prefill, decode, forest, selected, max_commit)
            sync(dev)
            t1 = time.perf_counter()
            f0, f1, tokens = timed.calls[-1]
            records.append((t1 - t0, f1 - f0, tokens, out.committed.sum(), f0 - t0, t1 - f1, len(prefill)))
            return out

        ex.execute = timed_execute
        try:
            for _ in range(steps):
                loop.step()
        finally:
            ex.execute, ex.model = execute, inner
    a = np.array([r[:6] for r in records if r[6] == 0], dtype=np.float64)  # decode-only steps
    if not len(a):
        raise RuntimeError("no decode-only step was measured")
    med = lambda j, scale=1e3: float(np.median(a[:, j]) * scale)  # noqa: E731
    return OverheadResult(mode, n_requests, len(a), med(2, 1), med(3, 1), med(0), med(1),
                          float(np.median(a[:, 0] / a[:, 1])), med(4), med(5))


# ---- (c) host work per iteration ----------------------------------------------------------------

HOST_PHASES = ("draft", "select", "build", "forward", "verify", "commit", "other")
HOST_TARGET_MS = 1.5  # issue 12's goal for host work per iteration (tiny-llama, 64 requests, D=8 W=3)


@dataclass
class HostResult:
    """One case of the host-work breakdown: medians over the timed iterations, in ms."""

    requests: int
    context: int  # prompt tokens per request
    depth: int
    width: int
    steps: int
    tokens_per_step: float  # forward tokens (median): the selected tree nodes
    committed_per_step: float  # tokens committed per iteration over all requests (median)
    iteration_ms: float  # ServingLoop.step
    host_ms: float  # iteration - forward: everything but the device forward (median per step)
    phases_ms: dict[str, float] = field(default_factory=dict)  # HOST_PHASES -> median ms
    # the same in CPU time of the benchmark's thread (time.thread_time): on a machine shared with
    # other processes it leaves out the time spent waiting for a core, which wall time includes
    host_cpu_ms: float = 0.0
    phases_cpu_ms: dict[str, float] = field(default_factory=dict)
    # the same iterations again with the forward replaced by the logits the first pass recorded
    # (``host_breakdown(replay=True)``): the host code then runs with the caches a GPU-served host
    # keeps, since a CPU forward between two steps evicts what the host code reads next (wall, ms)
    host_replayed_ms: float | None = None
    phases_replayed_ms: dict[str, float] = field(default_factory=dict)


class _PhaseClock:
    """Accumulates wall and thread-CPU seconds per phase for the current iteration (wrapped callables)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.now: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    def wrap(self, phase: str, fn: Callable, synchronize: bool = False) -> Callable:
        def timed(*args, **kwargs):
            if synchronize:
                sync(self.device)
            t0, c0 = time.perf_counter(), time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                if synchronize:
                    sync(self.device)
                self.now[phase] = self.now.get(phase, 0.0) + time.perf_counter() - t0
                self.cpu[phase] = self.cpu.get(phase, 0.0) + time.thread_time() - c0
        return timed


def host_profile(model: Transformer, limits: Limits) -> LatencyProfile:
    """A flat latency profile (every step costs the same): the policy's budget then covers whole
    trees, and the breakdown does not wait for a measured profile."""
    from adaserve.core.profile import Table

    flat = Table(np.array([1.0, float(limits.max_batch_tokens)]), np.array([1.0, 1.0]))
    return LatencyProfile("bench-host", verify=flat, draft=flat, prefill=flat, baseline_ms=1.0, limits=limits,
                          source="bench engine --only host (flat)")


def host_breakdown(model: Transformer, n_requests: int, context: int = 1024, depth: int = 8, width: int = 3,
                   steps: int = 12, warmup: int = 3, seed: int = 0, cuda_graphs: bool = False,
                   replay: bool = True) -> HostResult:
    """Time every phase of ``steps`` decode iterations of the adaserve policy over ``n_requests``
    requests with ``context``-token prompts and full ``depth`` x ``width`` beam-search trees.

    ``replay``: run the same iterations a second time (same prompts, drafts, trees and batches),
    the forward of each timed step replaced by the logits the first pass recorded, and report that
    pass's host work too. On a CPU the forward runs on the cores the host code runs on and evicts
    the n-gram tables, masks and KV bookkeeping from their caches between two steps; on a GPU host
    it does not. The two passes must commit the same tokens at every step (else RuntimeError).
    The recorded logits stay on the model's device: ``steps`` × tree tokens × vocabulary values
    (about 5 GB in bf16 for 12 steps of 1,600 tokens with a 128k vocabulary)."""
    first = _host_pass(model, n_requests, context, depth, width, steps, warmup, seed, cuda_graphs,
                       record=replay)
    med = lambda xs: round(float(np.median(xs) * 1e3), 4)  # noqa: E731
    phases = {p: med([r[1][p] for r in first.rows]) for p in HOST_PHASES}
    phases_cpu = {p: med([r[3][p] for r in first.rows]) for p in HOST_PHASES}
    result = HostResult(n_requests, context, depth, width, len(first.rows), float(np.median(first.tokens)),
                        float(np.median(first.committed)), med([r[0] for r in first.rows]),
                        med([r[0] - r[1]["forward"] for r in first.rows]), phases,
                        med([r[2] - r[3]["forward"] for r in first.rows]), phases_cpu)
    if replay:
        again = _host_pass(model, n_requests, context, depth, width, steps, warmup, seed, cuda_graphs,
                           replayed=first.logits)
        _check_replay(first, again)
        result.host_replayed_ms = med([r[0] - r[1]["forward"] for r in again.rows])
        result.phases_replayed_ms = {p: med([r[1][p] for r in again.rows]) for p in HOST_PHASES}
    return result


@dataclass
class _HostPass:
    rows: list[tuple]  # per timed step: (wall s, wall s per phase, thread CPU s, CPU s per phase)
    tokens: list[int]  # forward tokens per timed step
    committed: list[int]  # tokens committed per timed step
    logits: list[torch.Tensor]  # the timed steps' logits (recorded passes only)


def _check_replay(recorded: _HostPass, replayed: _HostPass) -> None:
    """A replayed pass must have run the recorded pass's steps: same batches, same commits."""
    if replayed.committed != recorded.committed or replayed.tokens != recorded.tokens:
        raise RuntimeError("the replayed pass diverged from the recorded one (committed tokens per step "
                           f"{replayed.committed} vs {recorded.committed})")


def _host_pass(model: Transformer, n_requests: int, context: int, depth: int, width: int, steps: int,
               warmup: int, seed: int, cuda_graphs: bool, record: bool = False,
               replayed: Sequence[torch.Tensor] | None = None) -> _HostPass:
    """One pass of ``host_breakdown``: ``record`` keeps every timed step's logits; ``replayed``
    (a recorded pass's logits) stands in for the forward of the timed steps."""
    tree_nodes = 1 + depth * width
    max_new = (warmup + steps + 2) * (depth + 1)
    limits = Limits(max_batch_requests=n_requests, max_batch_tokens=max(n_requests * tree_nodes, context),
                    prefill_chunk=max(n_requests * tree_nodes, context), max_seq_len=context + max_new + 64)
    profile = host_profile(model, limits)
    prompts = repeated_prompts(n_requests, context, model.config.vocab_size, 16, seed)
    drafter = BenchDrafter(model.config.vocab_size, seed)
    ex = make_executor(model, profile, drafter, prompts, max_new, cuda_graphs)
    requests = make_requests(prompts, max_new, profile.decode_baseline_ms)
    spec = SpecParams(d_min=depth, d_max=depth, w_max=width, b1=10**9, b2=10**9)
    policy = make_policy("adaserve", model.config.family, spec=spec)
    loop = ServingLoop(policy, ex, requests)
    dev = model_device(model)
    clock = _PhaseClock(dev)
    out = _HostPass([], [], [], [])
    ex.reset_clock()
    with torch.inference_mode():
        while len(loop.running) < n_requests:
            if not loop.run_once() and not loop.pending:
                raise RuntimeError("benchmark requests were rejected (KV pool too small?)")
        for _ in range(warmup):
            loop.step()
        saved = {"speculate": ex.speculate, "_build": ex._build, "_verify": ex._verify,
                 "_commit_trees": ex._commit_trees}
        select, model_call = policy.select, ex.model
        ex.speculate = clock.wrap("draft", ex.speculate)
        ex._build = clock.wrap("build", ex._build)
        ex._verify = clock.wrap("verify", ex._verify)
        ex._commit_trees = clock.wrap("commit", ex._commit_trees)
        policy.select = clock.wrap("select", select)

        def counted(batch, cache):
            out.tokens.append(batch.num_tokens)
            if replayed is None:
                logits = model_call(batch, cache)
                if record:
                    out.logits.append(logits.clone())
                return logits
            logits = replayed[len(out.tokens) - 1] if len(out.tokens) <= len(replayed) else None
            if logits is None or logits.shape[0] != batch.num_tokens:
                raise RuntimeError("the replayed pass diverged from the recorded one (its batches differ)")
            return logits

        ex.model = clock.wrap("forward", counted, synchronize=True)
        try:
            for _ in range(steps):
                if len(loop.running) < n_requests:
                    break  # a request finished: the batch would shrink
                clock.now, clock.cpu = {}, {}
                before = loop.stats.committed_tokens
                sync(dev)
                t0, c0 = time.perf_counter(), time.thread_time()
                loop.step()
                sync(dev)
                total, total_cpu = time.perf_counter() - t0, time.thread_time() - c0
                parts = {p: clock.now.get(p, 0.0) for p in HOST_PHASES[:-1]}
                parts["other"] = total - sum(parts.values())
                cpu = {p: clock.cpu.get(p, 0.0) for p in HOST_PHASES[:-1]}
                cpu["other"] = total_cpu - sum(cpu.values())
                out.rows.append((total, parts, total_cpu, cpu))
                out.committed.append(loop.stats.committed_tokens - before)
        finally:
            for k, v in saved.items():
                setattr(ex, k, v)
            ex.model, policy.select = model_call, select
    if not out.rows:
        raise RuntimeError("no iteration was measured")
    return out


def host_table(results: Sequence[HostResult]) -> str:
    """The breakdown as a Markdown table (ms per iteration, medians)."""
    head = ["requests", "tree tokens", "committed", "clock", *HOST_PHASES, "host (all but forward)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        clocks = [("wall", r.phases_ms, r.host_ms), ("cpu", r.phases_cpu_ms, r.host_cpu_ms)]
        if r.host_replayed_ms is not None:
            clocks.append(("wall, forward replayed", r.phases_replayed_ms, r.host_replayed_ms))
        for clock, phases, host in clocks:
            cells = [str(r.requests), f"{r.tokens_per_step:.0f}", f"{r.committed_per_step:.0f}", clock,
                     *(f"{phases[p]:.3f}" for p in HOST_PHASES), f"**{host:.3f}**"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_host(r: HostResult) -> str:
    flag = lambda ms: "ok" if ms <= HOST_TARGET_MS else f"above the {HOST_TARGET_MS} ms goal"  # noqa: E731
    parts = "  ".join(f"{p} {r.phases_ms[p]:.3f}" for p in HOST_PHASES)
    line = (f"host  {r.requests:3d} req  ctx {r.context}  D={r.depth} W={r.width}  {r.tokens_per_step:5.0f} tok/step  "
            f"{r.committed_per_step:4.0f} committed/step  iteration {r.iteration_ms:7.2f} ms  "
            f"host {r.host_ms:6.2f} ms ({flag(r.host_ms)}), thread CPU {r.host_cpu_ms:6.2f} ms\n      ms: {parts}")
    if r.host_replayed_ms is not None:
        line += (f"\n      forward replayed (the same steps, no forward between them): host "
                 f"{r.host_replayed_ms:6.2f} ms ({flag(r.host_replayed_ms)})")
    return line


# ---- (b) tokens/s ------------------------------------------------------------------------------

@dataclass
class GenResult:
    system: str  # vllm | adaserve+ngram | transformers
    batch: int
    new_tokens: int
    wall_s: float  # median
    tokens_per_s: float
    walls: list[float] = field(default_factory=list)
    tokens_per_step: float | None = None  # engine: committed tokens per decoding request-step
    same_as_hf: int | None = None  # requests whose tokens equal generate's


def generation_executor(model: Transformer, profile: LatencyProfile, prompts: Sequence[Sequence[int]],
                        new_tokens: int, system: str, cuda_graphs: bool = False) -> TorchExecutor:
    """The executor of ``system``'s runs over ``prompts`` (``engine_generate``), made once so that
    its CUDA graphs, captured in the warm-up run, are replayed by the timed ones."""
    drafter = NgramDrafter() if system != "vllm" else None
    return make_executor(model, profile, drafter, prompts, new_tokens, cuda_graphs)


def engine_generate(ex: TorchExecutor, profile: LatencyProfile, prompts: Sequence[Sequence[int]],
                    new_tokens: int, system: str) -> tuple[float, list[list[int]], float]:
    """One run on ``ex`` (``generation_executor``): (wall seconds, output tokens per request,
    tokens per request-step). The executor is left empty for the next run."""
    model = ex.model
    ex.set_prompts({i: p for i, p in enumerate(prompts)})
    requests = make_requests(prompts, new_tokens, profile.decode_baseline_ms)
    loop = ServingLoop(make_policy(system, model.config.family), ex, requests)
    dev = model_device(model)
    sync(dev)
    ex.reset_clock()
    t0 = time.perf_counter()
    with torch.inference_mode():
        loop.run()
    sync(dev)
    wall = time.perf_counter() - t0
    outputs = [ex.outputs[i] for i in range(len(prompts))]
    for rid in range(len(prompts)):
        ex.forget(rid)
    if any(len(o) != new_tokens for o in outputs):
        raise RuntimeError(f"engine produced {[len(o) for o in outputs]} tokens, expected {new_tokens} each")
    per_step = loop.stats.committed_tokens / max(loop.stats.request_steps, 1)
    return wall, outputs, per_step


def hf_twin(model: Transformer):
    """transformers' model with our weights (same dtype and device, SDPA attention, EOS disabled)."""
    from transformers import AutoModelForCausalLM

    w = model.lm_head.weight
    hf = AutoModelForCausalLM.from_config(model.config.to_hf_config(), attn_implementation="sdpa", dtype=w.dtype)
    hf.load_state_dict(model.state_dict())
    hf = hf.to(w.device).eval()
    hf.generation_config.eos_token_id = None  # generate exactly max_new_tokens, like --ignore-eos
    hf.generation_config.pad_token_id = 0
    return hf


def hf_generate(hf, prompts: Sequence[Sequence[int]], new_tokens: int, cache: str | None = None
                ) -> tuple[float, list[list[int]]]:
    """``generate`` (greedy) on the batch, left-padded; (wall seconds, new tokens per request).
    ``cache="static"``: transformers' preallocated KV cache (no per-step growth), the fair peer of
    an engine with a paged pool; eager, as ours is (transformers would otherwise compile the forward
    on first use: 20 s of a 32-token run on an H200, issue 12)."""
    dev = hf.device
    width = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(dev), mask.to(dev)
    sync(dev)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          do_sample=False, pad_token_id=0,
                          **({"cache_implementation": cache, "disable_compile": True} if cache else {}))
    sync(dev)
    wall = time.perf_counter() - t0
    return wall, out[:, width:].tolist()


def tokens_per_second(model: Transformer, profile: LatencyProfile, prompts: Sequence[Sequence[int]],
                      new_tokens: int, repeat: int = 3, hf=None,
                      systems: Sequence[str] = ("vllm", "adaserve"), cuda_graphs: bool = False) -> list[GenResult]:
    """Tokens per second of generating ``new_tokens`` for every prompt at once, per system: the
    median of ``repeat`` timed runs after one untimed run (on a GPU the first run pays kernel
    loading and, with CUDA graphs, the capture of every bucket it meets)."""
    n = len(prompts)
    results = []
    ref = None
    if hf is not None:
        for name, cache in (("transformers", None), ("transformers-static", "static")):
            hf_generate(hf, prompts, new_tokens, cache)  # warm-up
            walls = []
            for _ in range(repeat):
                w, outs = hf_generate(hf, prompts, new_tokens, cache)
                walls.append(w)
            r = _gen(name, n, new_tokens, walls)
            if ref is None:
                ref = outs  # the dynamic cache's tokens: what every other row is compared with
            else:
                r.same_as_hf = sum(a == b for a, b in zip(outs, ref))
            results.append(r)
    for system in systems:
        walls, per_step = [], None
        ex = generation_executor(model, profile, prompts, new_tokens, system, cuda_graphs)
        engine_generate(ex, profile, prompts, new_tokens, system)  # warm-up
        for _ in range(repeat):
            w, outs, per_step = engine_generate(ex, profile, prompts, new_tokens, system)
            walls.append(w)
        r = _gen("vllm" if system == "vllm" else f"{system}+ngram", n, new_tokens, walls)
        r.tokens_per_step = round(per_step, 3)
        if ref is not None:
            r.same_as_hf = sum(a == b for a, b in zip(outs, ref))
        results.append(r)
    return results


def _gen(system, n, new_tokens, walls) -> GenResult:
    wall = statistics.median(walls)
    return GenResult(system, n, new_tokens, round(wall, 4), round(n * new_tokens / wall, 2),
                     [round(w, 4) for w in walls])


# ---- the whole benchmark ---------------------------------------------------------------------

@dataclass
class BenchConfig:
    engine: EngineConfig = field(default_factory=lambda: EngineConfig("smollm2-135m"))
    batches: tuple[int, ...] = (1, 16)
    context: int = 128  # prompt tokens per request in the overhead steps
    steps: int = 12  # timed engine steps per overhead case
    prompt_len: int = 64  # prompts cut to this many tokens (tokens/s)
    new_tokens: int = 64  # generated tokens per request (tokens/s)
    repeat: int = 3  # generation runs per case (median)
    trace: str | None = None
    prompts: str = PROMPT_SOURCES[0]  # without --trace: "pool" (generated trace) or "synthetic-text"
    hf: bool = True  # compare with transformers' generate
    overhead: bool = True
    generation: bool = True
    host: bool = False  # (c) the host-work breakdown (``--only host``)
    depth: int = 8  # (c): tree depth and beam width
    width: int = 3
    replay: bool = True  # (c): also time the same steps with the forward replayed


def run_benchmark(cfg: BenchConfig, log: Callable[[str], None] | None = None) -> dict:
    say = log or (lambda s: None)
    ec = replace(cfg.engine, max_num_seqs=max(cfg.engine.max_num_seqs or 0, *cfg.batches)).validate()
    t_load = time.perf_counter()
    model, tokenizer, _ = load_models(ec, say=say)
    say(f"loaded {ec.model} in {time.perf_counter() - t_load:.1f} s")
    graphs = ec.use_cuda_graphs
    out = {"model": ec.model, "hardware": hardware_string(model), "threads": torch.get_num_threads(),
           "device": ec.device, "dtype": ec.dtype_name, "cuda_graphs": graphs, "config": asdict(cfg),
           "overhead": [], "generation": []}
    if cfg.host:
        out["host"] = []
        for n in cfg.batches:
            h = host_breakdown(model, n, cfg.context, cfg.depth, cfg.width, cfg.steps, cuda_graphs=graphs,
                               replay=cfg.replay)
            say(format_host(h))
            out["host"].append(asdict(h))
        say(host_table([HostResult(**h) for h in out["host"]]))
    if not (cfg.overhead or cfg.generation):
        return out
    limits = ec.apply_limits(ec.default_limits(), model.config.max_position_embeddings)
    t0 = time.perf_counter()
    profile = quick_profile("bench", model, limits, cuda_graphs=graphs)
    say(f"quick profile in {time.perf_counter() - t0:.1f} s (baseline {profile.decode_baseline_ms:.1f} ms)")
    out["baseline_ms"] = round(profile.decode_baseline_ms, 3)
    if cfg.overhead:
        for mode in ("incremental", "tree"):
            for n in cfg.batches:
                r = engine_overhead(model, profile, n, mode, cfg.context, cfg.steps, cuda_graphs=graphs)
                say(format_overhead(r))
                out["overhead"].append(_rounded(asdict(r)))
    if cfg.generation:
        # a tensor-parallel target holds only rank 0's shard: no transformers twin of it
        hf = hf_twin(model) if cfg.hf and getattr(model, "world_size", 1) == 1 else None
        prompts_all, source = trace_prompts(tokenizer, max(cfg.batches), cfg.prompt_len, cfg.trace, cfg.prompts)
        say(f"prompts: {source}")
        out["prompts"] = source
        for n in cfg.batches:
            for r in tokens_per_second(model, profile, prompts_all[:n], cfg.new_tokens, cfg.repeat, hf,
                                       cuda_graphs=graphs):
                say(format_generation(r))
                out["generation"].append(asdict(r))
    return out


def _rounded(d: dict) -> dict:
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in d.items()}


def format_overhead(r: OverheadResult) -> str:
    flag = "ok" if r.ratio <= OVERHEAD_TARGET else f"ABOVE {OVERHEAD_TARGET}"
    return (f"overhead {r.mode:11s} {r.requests:2d} req  {r.tokens_per_step:5.1f} tok/step  "
            f"engine {r.engine_ms:7.2f} ms  forward {r.forward_ms:7.2f} ms  ratio {r.ratio:.3f} ({flag})  "
            f"[before fwd {r.before_ms:.2f} ms, after {r.after_ms:.2f} ms, {r.committed_per_step:.0f} committed/step]")


def format_generation(r: GenResult) -> str:
    extra = ""
    if r.tokens_per_step is not None:
        extra += f"  {r.tokens_per_step:.2f} tok/req-step"
    if r.same_as_hf is not None:
        extra += f"  same tokens as generate: {r.same_as_hf}/{r.batch}"
    return (f"generate  {r.system:16s} batch {r.batch:2d}  {r.new_tokens} new tokens  "
            f"{r.tokens_per_s:8.1f} tok/s  (wall {r.wall_s:.2f} s){extra}")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    host = args.only == "host"
    if args.batches is None:
        args.batches = "16,64" if host else "1,16"
    if args.context is None:
        args.context = 1024 if host else 128
    for name in ("depth", "width"):
        v = getattr(args, name)
        if v < 1:
            raise UserError(f"--{name} must be >= 1, got {v}")
    try:
        batches = tuple(int(x) for x in str(args.batches).split(",") if x.strip())
    except ValueError:
        raise UserError(f"--batches must be comma-separated integers, got {args.batches!r}") from None
    for name in ("context", "steps", "prompt_len", "new_tokens", "repeat"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if not batches or min(batches) < 1:
        raise UserError(f"--batches must be positive integers, got {args.batches!r}")
    return BenchConfig(engine=EngineConfig.from_args(args), batches=batches, context=args.context,
                       steps=args.steps, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                       repeat=args.repeat, trace=args.trace, prompts=args.prompts, hf=not args.no_hf,
                       overhead=args.only in (None, "overhead"), generation=args.only in (None, "generation"),
                       host=host, depth=args.depth, width=args.width, replay=not args.no_replay)


def run_cli(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    log = None if args.json else print
    ec = cfg.engine
    if log:
        print(f"adaserve bench engine: {ec.model}, {ec.dtype_name}, {ec.device}, threads {ec.threads}, "
              f"CUDA graphs {'on' if ec.use_cuda_graphs else 'off'}")
    result = run_benchmark(cfg, log)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"hardware: {result['hardware']}")
    return 0
