"""Latency profiles: step time vs tokens, read by the scheduler (predicted iteration time) and by
the simulator (simulated time). The JSON format is what ``adaserve profile`` writes.

Format (all times in ms)::

    {"name": str, "source": "artifact-table" | "roofline" | "measured" | ...,
     "hardware": str, "baseline_ms": float,
     "family": "llama" | "qwen2",                    # optional: the target's model_type
     "verify":  {"tokens": [...], "ms": [...],
                 "context_tokens": [...],            # optional: KV context axis
                 "ms_by_context": [[...], ...]},     # optional: one row per context_tokens value
     "draft":   {"tokens": [...], "ms": [...]},      # one draft-model forward with this many tokens
     "prefill": {"tokens": [...], "ms": [...],       # optional; defaults to the verify table
                 "context_tokens": [...],            # optional: tokens of the prompt already prefilled
                 "ms_by_context": [[...], ...]},
     "step_model": "table" | "engine",               # optional, default "table" (below)
     "attention_queries": {"tokens": [...], "ms": [...]},  # optional ("engine"): extra attention ms at
                                                     # a fixed context vs new tokens per request
     "attention_calls": {"fixed_keys": x, "query_key": y},  # optional ("engine"): the engine splits
                                                     # its shared attention call by these costs
     "compiled_steps": {"max_tokens": int,           # optional ("engine", CPU): steps of up to this
                        "keys": {"tokens": [...], "ms": [...]}},  # many tokens run compiled layers;
                                                     # extra ms of one row over this many context keys
     "host": {"speculative": {"tokens": [...], "ms": [...]},   # optional: host ms per iteration
              "incremental": {"tokens": [...], "ms": [...]},   # vs decoding requests ("tokens");
              "draft": {"tokens": [...], "ms": [...]}},        # drafting per iteration (n-gram)
     "host_systems": {"adaserve_plus": {"tokens": [...], "ms": [...]}, ...},  # optional: a system's own
                                                     # host ms per iteration verifying drafted nodes
     "limits":  {"max_batch_requests": int, "max_batch_tokens": int, "prefill_chunk": int,
                 "max_seq_len": int, "kv_capacity_tokens": int}}

``step_model`` says how the simulator prices one target step (docs/fidelity.md):

- ``"table"`` (the artifact's tables, the roofline, profiles measured before it existed): one
  lookup, ``verify_ms(all new tokens, total KV context)``.
- ``"engine"`` (``adaserve profile`` of our engine): the verify table at context 0 for all new
  tokens, plus each prompt chunk's excess over as many verified tokens from the prefill table (at
  its prefilled length), plus the attention of the one padded attention call that holds the trees
  and short chunks, read from the verify table's context axis at the *padded* key slots (requests
  x the longest key length) and scaled by ``attention_queries`` for trees of several tokens, plus
  the host work per iteration (``host``; a system with its own row in ``host_systems`` pays that
  row for its iterations that verify drafted nodes, ``LatencyProfile.for_system``). Drafting stays
  in ``draft``. With ``attention_calls`` (measured on a CPU) the engine cuts that call into several as
  ``scheduling/attention_calls.padding_groups`` decides, and each is priced so. With
  ``compiled_steps`` (a CPU engine whose steps of a few tokens run one compiled call per layer,
  ``engine/cpu_decode.py``) a step of at most ``max_tokens`` new tokens makes no attention call:
  each row reads its own keys, so it is priced as the verify table at context 0 plus, per row, the
  ``keys`` table at its sequence's committed keys (the context before the step).
"""

from __future__ import annotations

import bisect
import functools
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from adaserve.core import jit
from adaserve.core.errors import UserError
from adaserve.core.files import JsonFileError, read_json


@dataclass
class Table:
    """Piecewise-linear time vs tokens, optionally also vs KV context tokens (bilinear)."""

    tokens: np.ndarray
    ms: np.ndarray
    context_tokens: np.ndarray | None = None
    ms_by_context: np.ndarray | None = None  # shape (len(context_tokens), len(tokens))

    @classmethod
    def from_dict(cls, d: dict, where: str) -> "Table":
        try:
            tokens = np.asarray(d["tokens"], dtype=np.float64)
            ms = np.asarray(d["ms"], dtype=np.float64)
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{where}: needs numeric 'tokens' and 'ms' lists ({e})") from None
        if tokens.ndim != 1 or tokens.shape != ms.shape or len(tokens) < 2:
            raise UserError(f"{where}: 'tokens' and 'ms' must be lists of the same length >= 2")
        if not (np.all(np.isfinite(tokens)) and np.all(np.isfinite(ms))):
            raise UserError(f"{where}: values must be finite")
        if np.any(np.diff(tokens) <= 0):
            raise UserError(f"{where}: 'tokens' must be strictly increasing")
        if np.any(ms < 0):
            raise UserError(f"{where}: 'ms' must be non-negative")
        ctx = grid = None
        if "context_tokens" in d:
            try:
                ctx = np.asarray(d["context_tokens"], dtype=np.float64)
                grid = np.asarray(d["ms_by_context"], dtype=np.float64)
            except (KeyError, TypeError, ValueError) as e:
                raise UserError(f"{where}: needs numeric 'context_tokens' and 'ms_by_context' "
                                f"lists ({e})") from None
            if ctx.ndim != 1 or grid.shape != (len(ctx), len(tokens)) or np.any(np.diff(ctx) <= 0):
                raise UserError(f"{where}: 'ms_by_context' must be len(context_tokens) x len(tokens)"
                                " with increasing context_tokens")
        return cls(tokens, ms, ctx, grid)

    def to_dict(self) -> dict:
        d = {"tokens": self.tokens.tolist(), "ms": self.ms.tolist()}
        if self.context_tokens is not None:
            d["context_tokens"] = self.context_tokens.tolist()
            d["ms_by_context"] = self.ms_by_context.tolist()
        return d

    def __post_init__(self) -> None:
        # Python-float copies of what a scalar lookup reads: the scheduler and the simulator call
        # tables ~10 times per iteration, and numpy's scalar machinery cost more than the arithmetic
        self._xs = [float(x) for x in self.tokens]
        self._x_last = self._xs[-1]
        self._tail = _tail(self.tokens, self.ms)
        self._fs = [float(f) for f in self.ms]
        self._arrays = [np.ascontiguousarray(a, np.float64) for a in  # what _compiled reads
                        (self.tokens, self.ms, *(() if self.ms_by_context is None else self.ms_by_context))]
        if self.context_tokens is not None:
            self._ctx = [float(c) for c in self.context_tokens]
            self._ctx_tails = [_tail(self.tokens, row) for row in self.ms_by_context]
            self._ctx_fs = [[float(f) for f in row] for row in self.ms_by_context]

    def __call__(self, tokens, context_tokens: float | None = None):
        """Interpolated time; linear extrapolation past the last point."""
        if type(tokens) is np.ndarray and tokens.ndim and jit.enabled():
            return self._compiled(tokens, context_tokens)
        if self.context_tokens is None or context_tokens is None:
            return self._row(tokens, self.ms, self._fs, self._tail)
        i, a = self._context_row(context_tokens)
        lo = self._row(tokens, self.ms_by_context[i], self._ctx_fs[i], self._ctx_tails[i])
        hi = self._row(tokens, self.ms_by_context[i + 1], self._ctx_fs[i + 1], self._ctx_tails[i + 1])
        return lo * (1 - a) + hi * a

    def _context_row(self, context_tokens: float) -> tuple[int, float]:
        """The context row ``i`` below ``context_tokens`` (clipped to the axis) and the weight
        ``a`` of row ``i + 1``."""
        ctx = self._ctx
        c = min(max(float(context_tokens), ctx[0]), ctx[-1])
        i = min(max(bisect.bisect_left(ctx, c) - 1, 0), len(ctx) - 2)
        c0, c1 = ctx[i], ctx[i + 1]
        return i, (c - c0) / (c1 - c0)

    def _compiled(self, tokens: np.ndarray, context_tokens: float | None) -> np.ndarray:
        """The array lookup in one compiled call (``core/table_kernels.py``, the same bits)."""
        table_kernels = _table_kernels()
        x, (xp, ms, *rows) = np.asarray(tokens, np.float64), self._arrays
        if self.context_tokens is None or context_tokens is None:
            return table_kernels.lookup(x, xp, ms, self._tail, ms, self._tail, math.nan)
        i, a = self._context_row(context_tokens)
        return table_kernels.lookup(x, xp, rows[i], self._ctx_tails[i], rows[i + 1],
                                    self._ctx_tails[i + 1], a)

    def _row(self, x, fp: np.ndarray, fs: list[float], tail: tuple[float, float]):
        """np.interp over one row with linear extrapolation past the last point; scalars stay
        Python floats, computed as np.interp computes them (same operations, same order: tested
        bit-equal in tests/test_latency_models.py)."""
        if isinstance(x, (int, float, np.number)) or (isinstance(x, np.ndarray) and x.ndim == 0):
            x, xs = float(x), self._xs
            if x > self._x_last:
                return tail[0] + (x - self._x_last) * tail[1]
            if x <= xs[0] or x == self._x_last:
                return fs[0] if x <= xs[0] else fs[-1]
            j = bisect.bisect_right(xs, x) - 1
            return (fs[j + 1] - fs[j]) / (xs[j + 1] - xs[j]) * (x - xs[j]) + fs[j]
        x = np.asarray(x, dtype=np.float64)
        return np.where(x > self._x_last, tail[0] + (x - self._x_last) * tail[1], np.interp(x, self.tokens, fp))


@functools.cache
def _table_kernels():
    """``core.table_kernels``, imported on first use (importing it imports numba)."""
    from adaserve.core import table_kernels
    return table_kernels


def _tail(xp: np.ndarray, fp: np.ndarray) -> tuple[float, float]:
    """The last value and the last segment's slope (the extrapolation past the table)."""
    return float(fp[-1]), float((fp[-1] - fp[-2]) / (xp[-1] - xp[-2]))


@dataclass
class Limits:
    max_batch_requests: int = 64
    max_batch_tokens: int = 1024
    prefill_chunk: int = 1024
    max_seq_len: int = 2048
    kv_capacity_tokens: int = 1_000_000


@dataclass
class LatencyProfile:
    name: str
    verify: Table
    draft: Table
    prefill: Table | None = None
    baseline_ms: float | None = None
    source: str = "unknown"
    hardware: str = ""
    limits: Limits = field(default_factory=Limits)
    # how a measured profile was taken (model, device, dtype, threads): checked when it is reused
    measured_with: dict = field(default_factory=dict)
    # the target's Hugging Face model_type ("llama", "qwen2"): picks the artifact's speculation
    # constants and the simulator's acceptance model; None: Llama's
    family: str | None = None
    step_model: str = "table"  # "table" | "engine" (module docstring)
    attention_queries: Table | None = None
    host: dict[str, Table] = field(default_factory=dict)  # HOST_MODES -> ms vs decoding requests
    attention_calls: tuple[float, float] | None = None  # (fixed_keys, query_key) of padding_groups
    compiled_tokens: int = 0  # steps of up to this many new tokens run compiled layers (0: none)
    compiled_keys: Table | None = None  # extra ms of one row of such a step vs the keys it attends
    host_systems: dict[str, Table] = field(default_factory=dict)  # system -> its host row (tree iterations)
    tree_host: Table | None = None  # set by ``for_system`` (not saved): that system's row

    def verify_ms(self, tokens, context_tokens: float | None = None):
        return self.verify(tokens, context_tokens)

    def draft_ms(self, tokens, context_tokens: float | None = None):
        return self.draft(tokens, context_tokens)

    def prefill_ms(self, tokens, context_tokens: float | None = None):
        return (self.prefill or self.verify)(tokens, context_tokens)

    def host_ms(self, requests: int, speculative: bool, tree: bool = False) -> float:
        """Host work of one iteration with ``requests`` decoding requests (0 without a host table);
        ``tree``: a speculative iteration that verifies drafted nodes, priced by the system's own
        row where ``for_system`` set one."""
        if speculative and tree and self.tree_host is not None:
            return float(self.tree_host(max(requests, 1)))
        table = self.host.get("speculative" if speculative else "incremental")
        return float(table(max(requests, 1))) if table is not None else 0.0

    def for_system(self, system: str) -> "LatencyProfile":
        """This profile as ``system`` pays it: the host row measured for that system's policy
        (``host_systems``; vLLM-Spec(k) takes the row of the k that was measured) prices its
        speculative iterations that verify drafted nodes (``host_ms(..., tree=True)``); the others
        keep the shared tables, measured with the adaserve and vllm policies. Why: policies differ
        in host work, and mostly when there is a tree to choose from: on the CPU engine
        ``adaserve_plus``, which scores up to ten budgets per iteration, paid 0.35-0.5 ms more than adaserve
        in iterations that verified drafted nodes and about as much where the drafter found none
        (docs/fidelity.md, "Host work per system"). Without a row for ``system``, this profile itself."""
        row = self.host_systems.get(system)
        if row is None and system.startswith("vllm_spec_"):
            row = next((t for s, t in sorted(self.host_systems.items()) if s.startswith("vllm_spec_")), None)
        return self if row is None else replace(self, tree_host=row)

    @property
    def graphed(self) -> bool:
        """Measured with CUDA graphs: the engine runs a step of several attention calls as one
        graphed forward per call (engine/cuda_graphs.py), and the simulator prices it so."""
        return bool(self.measured_with.get("cuda_graphs"))

    @property
    def ngram_drafter(self) -> bool:
        """Measured with the n-gram drafter: no draft model (no draft prefill; drafting is priced
        per iteration from the ``host`` table's ``draft`` row)."""
        return self.measured_with.get("drafter") == "ngram"

    def draft_iteration_ms(self, requests: int) -> float | None:
        """Drafting of one iteration with ``requests`` decoding requests, from the ``host`` table's
        ``draft`` row (measured for the n-gram drafter); None without one."""
        table = self.host.get("draft")
        return float(table(max(requests, 1))) if table is not None else None

    def query_factor(self, queries: int) -> float:
        """Attention over the same keys with ``queries`` new tokens per request, relative to one."""
        t = self.attention_queries
        if t is None or queries <= 1:
            return 1.0
        one = float(t(1))
        return max(float(t(queries)) / one, 1.0) if one > 0 else 1.0

    @property
    def decode_baseline_ms(self) -> float:
        """Per-token latency of one request without speculation (docs/definitions.md §1)."""
        return self.baseline_ms if self.baseline_ms else float(self.verify_ms(1))

    @classmethod
    def from_dict(cls, d: dict, where: str = "profile") -> "LatencyProfile":
        if not isinstance(d, dict):
            raise UserError(f"{where}: a profile must be a JSON object")
        for key in ("verify", "draft"):
            if key not in d:
                raise UserError(f"{where}: missing field '{key}'")
        limits = d.get("limits", {})
        if not isinstance(limits, dict):
            raise UserError(f"{where}: 'limits' must be a JSON object")
        unknown = set(limits) - set(Limits.__dataclass_fields__)
        if unknown:
            raise UserError(f"{where}: unknown limits {sorted(unknown)}")
        for key, value in limits.items():
            if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
                raise UserError(f"{where}: limit '{key}' must be a positive integer, got {value!r}")
        baseline = d.get("baseline_ms")
        if baseline is not None and not (isinstance(baseline, (int, float)) and math.isfinite(baseline)
                                         and baseline > 0):
            raise UserError(f"{where}: 'baseline_ms' must be a positive number, got {baseline!r}")
        return cls(
            name=str(d.get("name", where)),
            verify=Table.from_dict(d["verify"], f"{where}: verify"),
            draft=Table.from_dict(d["draft"], f"{where}: draft"),
            prefill=Table.from_dict(d["prefill"], f"{where}: prefill") if d.get("prefill") else None,
            baseline_ms=baseline,
            source=str(d.get("source", "unknown")),
            hardware=str(d.get("hardware", "")),
            limits=Limits(**limits),
            measured_with=dict(d.get("measured_with") or {}),
            family=_family(d.get("family"), where),
            step_model=_choice(d.get("step_model", "table"), STEP_MODELS, f"{where}: step_model"),
            attention_queries=(Table.from_dict(d["attention_queries"], f"{where}: attention_queries")
                               if d.get("attention_queries") else None),
            host=_host_tables(d.get("host"), where),
            host_systems=_host_system_tables(d.get("host_systems"), where),
            attention_calls=_attention_calls(d.get("attention_calls"), where),
            **_compiled_steps(d.get("compiled_steps"), where),
        )

    def to_dict(self) -> dict:
        d = {"name": self.name, "source": self.source, "hardware": self.hardware,
             "baseline_ms": self.baseline_ms, "verify": self.verify.to_dict(),
             "draft": self.draft.to_dict(), "limits": self.limits.__dict__.copy()}
        if self.prefill is not None:
            d["prefill"] = self.prefill.to_dict()
        if self.measured_with:
            d["measured_with"] = dict(self.measured_with)
        if self.family is not None:
            d["family"] = self.family
        if self.step_model != "table":
            d["step_model"] = self.step_model
        if self.attention_queries is not None:
            d["attention_queries"] = self.attention_queries.to_dict()
        if self.host:
            d["host"] = {mode: t.to_dict() for mode, t in self.host.items()}
        if self.host_systems:
            d["host_systems"] = {system: t.to_dict() for system, t in self.host_systems.items()}
        if self.attention_calls is not None:
            d["attention_calls"] = dict(zip(("fixed_keys", "query_key"), self.attention_calls))
        if self.compiled_keys is not None:
            d["compiled_steps"] = {"max_tokens": self.compiled_tokens, "keys": self.compiled_keys.to_dict()}
        return d

    @classmethod
    def load(cls, path: str | Path) -> "LatencyProfile":
        try:
            d = read_json(path)
        except JsonFileError as e:
            raise UserError(f"latency profile file {e}") from None
        return cls.from_dict(d, str(path))

    def save(self, path: str | Path) -> None:
        from adaserve.core.files import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=1))


STEP_MODELS = ("table", "engine")
HOST_MODES = ("speculative", "incremental", "draft")


def _choice(value, valid: tuple[str, ...], where: str) -> str:
    if value not in valid:
        raise UserError(f"{where}: must be one of {', '.join(valid)}, got {value!r}")
    return value


def _host_tables(d, where: str) -> dict[str, Table]:
    """The optional ``host`` field: one table per mode of ``HOST_MODES``."""
    if d is None:
        return {}
    if not isinstance(d, dict) or set(d) - set(HOST_MODES):
        raise UserError(f"{where}: 'host' must be an object with keys among {', '.join(HOST_MODES)}")
    return {mode: Table.from_dict(t, f"{where}: host.{mode}") for mode, t in d.items()}


def _host_system_tables(d, where: str) -> dict[str, Table]:
    """The optional ``host_systems`` field: system name -> its host table (``for_system``)."""
    if d is None:
        return {}
    if not isinstance(d, dict) or not all(isinstance(k, str) and k for k in d):
        raise UserError(f"{where}: 'host_systems' must be an object of system name -> table")
    return {system: Table.from_dict(t, f"{where}: host_systems.{system}") for system, t in d.items()}


def _attention_calls(d, where: str) -> tuple[float, float] | None:
    """The optional ``attention_calls`` field: ``{"fixed_keys": x, "query_key": y}``, both >= 0."""
    if d is None:
        return None
    keys = ("fixed_keys", "query_key")
    if not isinstance(d, dict) or set(d) != set(keys):
        raise UserError(f"{where}: 'attention_calls' must be an object with keys {', '.join(keys)}, got {d!r}")
    for k in keys:
        v = d[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise UserError(f"{where}: attention_calls.{k} must be a number >= 0, got {v!r}")
    return float(d["fixed_keys"]), float(d["query_key"])


def _compiled_steps(d, where: str) -> dict:
    """The optional ``compiled_steps`` field as ``LatencyProfile`` fields."""
    if d is None:
        return {}
    if not isinstance(d, dict) or set(d) != {"max_tokens", "keys"}:
        raise UserError(f"{where}: 'compiled_steps' must be an object with keys max_tokens, keys")
    n = d["max_tokens"]
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UserError(f"{where}: compiled_steps.max_tokens must be an integer >= 1, got {n!r}")
    return {"compiled_tokens": n, "compiled_keys": Table.from_dict(d["keys"], f"{where}: compiled_steps.keys")}


def _family(value, where: str) -> str | None:
    if value is not None and not (isinstance(value, str) and value):
        raise UserError(f"{where}: 'family' must be a model type such as \"llama\" or \"qwen2\", got {value!r}")
    return value
