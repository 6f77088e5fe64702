"""Tensor parallelism for an unchanged ``Transformer``: sharding after loading (the layout of gpt-fast's
``tp.py``) and the rank-0 side / worker side of the engine's forward.

**Layout** (N ranks, rank r): q/k/v and gate/up are column-parallel (rank r keeps its contiguous
slice of the heads, of the KV heads and of the intermediate features, biases sliced alike); o_proj and
down_proj are row-parallel (the matching slice of their input features) and end with one all-reduce
each (``RowParallelLinear``; a bias there is kept by rank 0 only, so it is added once). So each
rank attends with ``num_heads / N`` query heads over its own ``num_kv_heads / N`` KV heads (query
head h uses KV head h // group on every rank, so GQA groups never straddle ranks) and keeps only
those heads in its paged KV cache: the sharded model's ``config`` holds the local head counts and
intermediate size, and ``make_cache`` sizes each rank's shard from it. The embedding and the LM head
stay whole: every rank embeds the tokens, and only rank 0 runs the final norm and the LM head
(workers stop after the last layer). Models whose ``num_kv_heads``, ``num_heads`` or
``intermediate_size`` do not divide by N are refused (KV heads are not replicated).

**Rank 0 owns everything on the host**: the scheduler, the drafter, the block allocator. The flat
batch it builds carries every index a forward needs (slot mapping, block tables, masks), so a
worker only needs the batch's tensors: ``TPModel`` (what ``TorchExecutor.model`` is at N > 1) sends
them, then runs rank 0's shard; the all-reduces inside the forward keep the ranks in lockstep. The
one storage write outside the forward, ``KVCache.move_slots`` (the commit of accepted tree KV), is
replayed on every rank by ``TPKVCache``, the cache ``TPModel.make_cache`` returns.

**Commands** (rank 0 -> workers): ``Channel.send`` writes a small pickled header (command, the
tensors' dtypes and shapes) under a numbered key of the process group's store -- workers block on
that key, so an idle server has no collective pending and nothing times out -- then broadcasts the
tensors, concatenated per dtype (two broadcasts for a forward). Store keys of commands every rank
has passed are deleted after each forward.

**Failures**: collectives run under the process group's timeout (``timeout_s``, 20 s by default).
A worker that raises writes its traceback to the store and exits; rank 0's next collective then
fails (a closed connection) or times out, and rank 0 raises ``TPFailure`` naming the rank and its
error (or its exit code, from the launcher's ``liveness`` check). After a failure the group is
unusable: every later command raises at once, and ``on_failure`` callbacks (e.g. the server's) run
once.
"""

from __future__ import annotations

import logging
import pickle
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from adaserve.core.errors import UserError

from .batch import AttnGroup, FlatBatch, MaskWindow
from .kv_cache import BLOCK_SIZE, KVCache
from .model import Linear, Transformer

log = logging.getLogger("adaserve.engine")

FORWARD, MOVE, NEW_CACHE, FREE_CACHES, STOP = "forward", "move", "new-cache", "free-caches", "stop"
PREFIX = "adaserve/tp"
REAP_WAIT_S = 1.0
IDLE_WAIT = timedelta(days=7)  # a worker waits this long for the next command (its store going away ends it)


class TPFailure(RuntimeError):
    """A rank of the tensor-parallel group died, raised, or a collective timed out: the group is
    unusable and the run ends."""


# ---- sharding --------------------------------------------------------------------------------------

def check_shardable(config, world: int, where: str = "--tensor-parallel-size") -> None:
    """Refuse (``UserError``) a model whose heads, KV heads or MLP width do not split over ``world``."""
    bad = [f"{name} {value}" for name, value in (("num_kv_heads", config.num_kv_heads),
                                                  ("num_heads", config.num_heads),
                                                  ("intermediate_size", config.intermediate_size))
           if value % world]
    if bad:
        valid = [n for n in range(1, config.num_kv_heads + 1) if not (config.num_kv_heads % n or
                                                                      config.num_heads % n or
                                                                      config.intermediate_size % n)]
        raise UserError(f"{where} {world}: the model's {', '.join(bad)} {'is' if len(bad) == 1 else 'are'} not "
                        f"divisible by {world} (each rank holds whole KV heads; they are not replicated); "
                        f"valid sizes for this model: {', '.join(map(str, valid))}")


class RowParallelLinear(Linear):
    """A linear over this rank's slice of the input features: the ranks' partial outputs are summed
    by one all-reduce (the bias, if any, lives on rank 0 only)."""

    group: Any = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        dist.all_reduce(y, group=self.group)
        return y


def _column(lin: Linear, rank: int, world: int) -> None:
    """Keep output features ``[rank * n, (rank + 1) * n)`` (a contiguous copy: the full weight is freed)."""
    n = lin.out_features // world
    lin.weight = nn.Parameter(lin.weight.detach().narrow(0, rank * n, n).clone(), requires_grad=False)
    if lin.bias is not None:
        lin.bias = nn.Parameter(lin.bias.detach().narrow(0, rank * n, n).clone(), requires_grad=False)
    lin.out_features = n


def _row(lin: Linear, rank: int, world: int, group) -> RowParallelLinear:
    """A ``RowParallelLinear`` over input features ``[rank * n, (rank + 1) * n)`` of ``lin``."""
    n = lin.in_features // world
    keep_bias = lin.bias is not None and rank == 0
    with torch.device("meta"):
        out = RowParallelLinear(n, lin.out_features, bias=keep_bias)
    out.weight = nn.Parameter(lin.weight.detach().narrow(1, rank * n, n).contiguous(), requires_grad=False)
    if keep_bias:
        out.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
    out.group = group
    return out


def shard_model(model: Transformer, rank: int, world: int, group=None) -> Transformer:
    """Shard ``model`` in place for ``rank`` of ``world`` (see the module docstring); its ``config``
    becomes the local one (heads, KV heads, intermediate size divided by ``world``)."""
    c = model.config
    check_shardable(c, world)
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
            _column(lin, rank, world)
        attn.o_proj = _row(attn.o_proj, rank, world, group)
        mlp.down_proj = _row(mlp.down_proj, rank, world, group)
        attn.num_heads, attn.num_kv_heads = c.num_heads // world, c.num_kv_heads // world
    model.config = c.with_(num_heads=c.num_heads // world, num_kv_heads=c.num_kv_heads // world,
                           intermediate_size=c.intermediate_size // world)
    return model


# ---- commands: rank 0 -> workers ------------------------------------------------------------------

def batch_tensors(batch: FlatBatch) -> tuple[list, list[torch.Tensor]]:
    """What a worker's forward reads of a batch: per group (queries, all_rows, windowed), and the
    tensors (per group: rows, padded rows, block tables, then the dense mask or its window's three)."""
    tensors = [batch.token_ids, batch.positions, batch.slot_mapping]
    groups = []
    for g in batch.groups:
        w = g.window
        tensors += [g.rows, g.pad_index, g.block_tables] + ([g.mask] if w is None else [w.prefix, w.start, w.local])
        groups.append((g.num_queries, g.all_rows, w is not None))
    return groups, tensors


def batch_from(groups: Sequence, tensors: Sequence[torch.Tensor]) -> FlatBatch:
    """The inverse of ``batch_tensors`` (no entries, seq_index or logits rows: workers run no head)."""
    token_ids, positions, slots = tensors[:3]
    attn, at = [], 3
    for q, all_rows, windowed in groups:
        rows, pad, tables, *mask = tensors[at:at + (6 if windowed else 4)]
        at += len(mask) + 3
        attn.append(AttnGroup(rows, pad, tables, None if windowed else mask[0], num_queries=q, all_rows=all_rows,
                              window=MaskWindow(*mask) if windowed else None))
    empty = token_ids[:0]
    return FlatBatch(token_ids, positions, slots, empty, empty, [], attn)


class Channel:
    """Commands from rank 0 to the workers: a header in the store, the tensors by broadcast."""

    def __init__(self, store, rank: int, world: int, device: torch.device, *, group=None,
                 timeout_s: float = 20.0, liveness: Callable[[], list[str]] | None = None):
        self.store, self.rank, self.world, self.device, self.group = store, rank, world, device, group
        self.timeout_s = timeout_s
        self.liveness = liveness  # rank 0 of a spawned group: descriptions of ranks that exited
        self.on_failure: list[Callable[[TPFailure], None]] = []
        self.on_close: list[Callable[[], None]] = []  # the launcher's clean-up (join workers, end the group)
        self.failure: TPFailure | None = None
        self.closed = False
        self._n = 0  # next command number
        self._deleted = 0  # keys below this number are deleted
        self._lock = threading.RLock()
        self._frees: list[int] = []  # caches garbage-collected on rank 0, freed with the next command

    def key(self, n: int) -> str:
        return f"{PREFIX}/cmd/{n}"

    # ---- rank 0 --------------------------------------------------------------------------------
    def send(self, cmd: str, meta: Any = None, tensors: Sequence[torch.Tensor] = ()) -> None:
        """Send one command (call inside ``command``, which holds the lock and turns errors into
        ``TPFailure``)."""
        specs = [(t.dtype, tuple(t.shape)) for t in tensors]
        self.store.set(self.key(self._n), pickle.dumps((cmd, meta, specs)))
        self._n += 1
        for buf in _pack(tensors):
            dist.broadcast(buf, 0, group=self.group)

    def command(self, cmd: str, meta: Any = None, tensors: Sequence[torch.Tensor] = ()):
        """``with channel.command(...)``: send a command, then run rank 0's part of it; any error
        in between breaks the group (``TPFailure``)."""
        return _Command(self, cmd, meta, tensors)

    def synced(self) -> None:
        """Every rank has passed the commands sent so far (a collective completed): drop their keys."""
        for n in range(self._deleted, self._n):
            self.store.delete_key(self.key(n))
        self._deleted = self._n

    def free_later(self, cache_id: int) -> None:
        self._frees.append(cache_id)  # a finalizer may run on any thread, inside another command

    def _flush_frees(self) -> None:
        ids = []
        while self._frees:  # list.pop is atomic: a finalizer appending meanwhile loses nothing
            ids.append(self._frees.pop())
        if ids:
            self.send(FREE_CACHES, ids)

    def fail(self, exc: BaseException) -> TPFailure:
        """Mark the group broken (once) and return the error that describes it."""
        with self._lock:
            if self.failure is None:
                self.failure = TPFailure(self.describe(exc))
                callbacks = list(self.on_failure)
            else:
                return self.failure
        for cb in callbacks:
            try:
                cb(self.failure)
            except Exception:
                log.exception("a tensor-parallel failure callback raised")
        return self.failure

    def describe(self, exc: BaseException) -> str:
        """Which rank failed and how: the workers' reported errors, dead processes, else the collective's."""
        found = []
        for r in range(1, self.world):
            try:
                key = f"{PREFIX}/error/{r}"
                if self.store.check([key]):
                    found.append(f"rank {r} raised: {self.store.get(key).decode(errors='replace').strip()}")
            except Exception:  # the store went away with the rank that hosted it
                pass
        if self.liveness is not None:  # a killed rank's sockets close a moment before it can be reaped
            deadline = time.monotonic() + REAP_WAIT_S
            dead = self.liveness()
            while not (dead or found) and time.monotonic() < deadline:
                time.sleep(0.05)
                dead = self.liveness()
            found += dead
        head = f"tensor-parallel group of {self.world} failed"
        if found:
            return f"{head}: " + "; ".join(found)
        return (f"{head}: {type(exc).__name__}: {exc} (a rank died, hung longer than the {self.timeout_s:g} s "
                "timeout, or rank 0's own forward failed)")

    def close(self) -> None:
        """Stop the workers (rank 0; no command after a failure), then run the ``on_close`` clean-up."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            if self.failure is None:
                try:
                    self.send(STOP)
                except Exception as e:  # a worker already gone: nothing left to stop
                    log.warning("stopping the tensor-parallel workers: %s", e)
        for fn in self.on_close:
            try:
                fn()
            except Exception:
                log.exception("tensor-parallel clean-up failed")

    # ---- workers -------------------------------------------------------------------------------
    def recv(self) -> tuple[str, Any, list[torch.Tensor]]:
        key = self.key(self._n)
        self.store.wait([key], IDLE_WAIT)
        cmd, meta, specs = pickle.loads(self.store.get(key))
        self._n += 1
        return cmd, meta, _unpack(specs, self.device, self.group)

    def report(self, text: str) -> None:
        """A worker's error, for rank 0's message (best effort: the store may be gone)."""
        try:
            self.store.set(f"{PREFIX}/error/{self.rank}", text.encode())
        except Exception:
            pass


class _Command:
    def __init__(self, channel: Channel, cmd: str, meta: Any, tensors: Sequence[torch.Tensor]):
        self.ch, self.cmd, self.meta, self.tensors = channel, cmd, meta, tensors

    def __enter__(self) -> Channel:
        ch = self.ch
        ch._lock.acquire()
        try:
            if ch.failure is not None:
                raise ch.failure
            if ch.closed:
                raise TPFailure("the tensor-parallel group was shut down")
            ch._flush_frees()
            ch.send(self.cmd, self.meta, self.tensors)
        except TPFailure:
            ch._lock.release()
            raise
        except Exception as e:
            ch._lock.release()
            raise ch.fail(e) from e
        return ch

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc is not None and not isinstance(exc, TPFailure):
                raise self.ch.fail(exc) from exc
        finally:
            self.ch._lock.release()
        return False


def _pack(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """One flat buffer per dtype, in order of first appearance."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t.reshape(-1))
    return [torch.cat(ts) for ts in by_dtype.values()]


def _unpack(specs: Sequence, device: torch.device, group) -> list[torch.Tensor]:
    sizes: dict[torch.dtype, int] = {}
    for dtype, shape in specs:
        sizes[dtype] = sizes.get(dtype, 0) + _numel(shape)
    bufs = {}
    for dtype, size in sizes.items():
        bufs[dtype] = torch.empty(size, dtype=dtype, device=device)
        dist.broadcast(bufs[dtype], 0, group=group)
    out, offset = [], dict.fromkeys(sizes, 0)
    for dtype, shape in specs:
        n = _numel(shape)
        out.append(bufs[dtype][offset[dtype]: offset[dtype] + n].view(shape))
        offset[dtype] += n
    return out


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# ---- rank 0 ------------------------------------------------------------------------------------------

class TPKVCache(KVCache):
    """Rank 0's shard of a paged KV cache whose twins live on the workers: the allocator is rank 0's
    alone, and ``move_slots`` is replayed on every rank."""

    def __init__(self, channel: Channel, cache_id: int, *args, **kw):
        super().__init__(*args, **kw)
        self.channel, self.cache_id = channel, cache_id
        weakref.finalize(self, channel.free_later, cache_id)

    def move_slots(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        with self.channel.command(MOVE, self.cache_id, (src, dst)):
            super().move_slots(src, dst)


class TPModel:
    """Rank 0's shard behind the model's call, ``(batch, cache) -> logits``: it sends the batch to
    the workers and runs its own shard (the all-reduces make every rank's hidden states whole);
    every other attribute is the shard's (``config`` holds the local head counts)."""

    def __init__(self, model: Transformer, channel: Channel):
        self.inner, self.channel = model, channel
        self.processes: list = []  # the spawned workers (multiprocessing.Process), set by the launcher
        self._caches = 0

    @property
    def world_size(self) -> int:
        return self.channel.world

    def __call__(self, batch: FlatBatch, cache: KVCache) -> torch.Tensor:
        if not isinstance(cache, TPKVCache) or cache.channel is not self.channel:
            raise ValueError("a tensor-parallel model runs on caches made by its own make_cache")
        groups, tensors = batch_tensors(batch)
        with self.channel.command(FORWARD, (cache.cache_id, groups), tensors) as ch:
            logits = self.inner(batch, cache)
            ch.synced()
        return logits

    def make_cache(self, num_blocks: int, block_size: int = BLOCK_SIZE) -> TPKVCache:
        p = self.inner.lm_head.weight
        self._caches += 1
        with self.channel.command(NEW_CACHE, (self._caches, num_blocks, block_size)):
            return TPKVCache(self.channel, self._caches, self.inner.config, num_blocks, block_size,
                             dtype=p.dtype, device=p.device)

    def close(self) -> None:
        self.channel.close()

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


# ---- workers -----------------------------------------------------------------------------------------

def serve_worker(model: Transformer, channel: Channel) -> None:
    """A worker's loop: execute rank 0's commands until ``stop``. An exception is reported to rank 0
    (through the store) and raised."""
    caches: dict[int, KVCache] = {}
    p = model.lm_head.weight
    try:
        while True:
            cmd, meta, tensors = channel.recv()
            if cmd == FORWARD:
                cache_id, groups = meta
                model.hidden(batch_from(groups, tensors), caches[cache_id])
            elif cmd == MOVE:
                caches[meta].move_slots(*tensors)
            elif cmd == NEW_CACHE:
                cache_id, num_blocks, block_size = meta
                caches[cache_id] = KVCache(model.config, num_blocks, block_size, dtype=p.dtype, device=p.device)
            elif cmd == FREE_CACHES:
                for cache_id in meta:
                    caches.pop(cache_id, None)
            elif cmd == STOP:
                return
            else:
                raise RuntimeError(f"unknown tensor-parallel command {cmd!r}")
    except BaseException as e:
        channel.report(error_line(e))
        raise


def error_line(e: BaseException) -> str:
    """``Type: message (file:line in function)`` of the innermost frame: what rank 0 shows."""
    text = "".join(traceback.format_exception_only(type(e), e)).strip()
    frames = traceback.extract_tb(e.__traceback__)
    if frames:
        f = frames[-1]
        text += f" ({f.filename}:{f.lineno} in {f.name})"
    return text
