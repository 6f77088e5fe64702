"""Starting a tensor-parallel engine (``--tensor-parallel-size N``, engine/tp.py for the layout).

Two ways in, one entry point (every engine command: ``run``, ``serve``, ``profile``, ``bench engine``):

* **One machine** (no ``torchrun`` environment): the command is rank 0 and spawns N-1 worker
  processes (``torch.multiprocessing``, spawn). They meet in a ``TCPStore`` on 127.0.0.1 (a free
  port); gloo on the CPU, NCCL on CUDA with rank r on GPU ``r`` (``--device cuda:k``: ``k + r``).
* **torchrun** (``RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR`` / ``MASTER_PORT`` set, WORLD_SIZE = N):
  every process runs the same command line; ranks join with ``env://``; rank 0 runs the command,
  every other rank becomes a worker when the command loads its model and exits when rank 0 is done.
  Two machines with one GPU each: ``torchrun --nnodes 2 --nproc-per-node 1 --node-rank {0,1}
  --master-addr HOST0 --master-port 29500 $(which adaserve) run ... --tensor-parallel-size 2``.

Each rank loads the model itself (the same checkpoint; tiny random models from the same seed) and
keeps its shard. Start-up waits for every rank to load (``START_TIMEOUT_S``, checking that spawned
workers are alive); afterwards every collective runs under ``ADASERVE_TP_TIMEOUT`` seconds (default
20), so a worker that dies or hangs ends the run with ``TPFailure`` well within 30 s. A spawned
worker that exits is noticed within a second even while the engine is idle (a monitor thread).
"""

from __future__ import annotations

import atexit
import json
import logging
import multiprocessing as mp
import os
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from adaserve.config import EngineConfig
from adaserve.core.errors import UserError
from adaserve.engine.config import ModelConfig
from adaserve.engine.loader import TINY_MODELS, resolve_model, tiny_random_model
from adaserve.engine.model import Transformer
from adaserve.engine.tp import (PREFIX, Channel, TPFailure, TPModel, check_shardable, error_line, serve_worker,
                                shard_model)

from .kernels import choose_linear_kernels

log = logging.getLogger("adaserve")
TIMEOUT_ENV = "ADASERVE_TP_TIMEOUT"
DEFAULT_TIMEOUT_S = 20.0
START_TIMEOUT_S = 600.0  # model loading on every rank
POLL_S = 0.05
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def collective_timeout_s() -> float:
    value = os.environ.get(TIMEOUT_ENV, "").strip()
    if not value:
        return DEFAULT_TIMEOUT_S
    try:
        t = float(value)
    except ValueError:
        t = -1.0
    if not 0 < t < float("inf"):
        raise UserError(f"{TIMEOUT_ENV}={value!r}: give a positive number of seconds")
    return t


def torchrun_rank(world: int) -> tuple[int, int] | None:
    """``(rank, local_rank)`` when launched by torchrun (None otherwise); its WORLD_SIZE must be ``world``."""
    if not all(os.environ.get(v) for v in TORCHRUN_VARS):
        return None
    env_world = int(os.environ["WORLD_SIZE"])
    if env_world != world:
        raise UserError(f"--tensor-parallel-size {world} but torchrun started WORLD_SIZE={env_world} processes: "
                        "give torchrun as many processes in all (nnodes x nproc-per-node) as the tensor-parallel size")
    return int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))


def rank_device(cfg: EngineConfig, local_rank: int) -> torch.device:
    """Rank ``local_rank``'s device on its machine: the CPU, or the ``local_rank``-th GPU after ``--device``'s."""
    if not cfg.on_cuda:
        return torch.device("cpu")
    base = torch.device(cfg.device).index or 0
    index = base + local_rank
    if not torch.cuda.is_available() or index >= torch.cuda.device_count():
        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        raise UserError(f"--tensor-parallel-size {cfg.tensor_parallel_size} on --device {cfg.device}: rank "
                        f"{local_rank} of this machine needs cuda:{index}, but {have} GPU(s) are visible")
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def _backend(cfg: EngineConfig) -> str:
    return "nccl" if cfg.on_cuda else "gloo"


def _await_keys(store, keys: list[str], what: str, channel: Channel) -> None:
    """Wait (``START_TIMEOUT_S``) until every key exists, failing early when a spawned rank exits."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while not store.check(keys):
        dead = channel.liveness() if channel.liveness else []
        if dead or time.monotonic() > deadline:
            error = channel.describe(TimeoutError(f"{what} took longer than {START_TIMEOUT_S:g} s"))
            raise TPFailure(error)
        time.sleep(POLL_S)


# ---- rank 0 -----------------------------------------------------------------------------------------

def load_sharded(cfg: EngineConfig, say: Callable[[str], None] = log.info) -> tuple[TPModel, object]:
    """Rank 0's sharded target and the tokenizer, with every worker started, loaded and waiting.
    Under torchrun, a process of another rank serves as a worker here and exits when rank 0 is done."""
    world = cfg.tensor_parallel_size
    timeout_s = collective_timeout_s()
    launched = torchrun_rank(world)
    if launched is not None and launched[0] != 0:
        _torchrun_worker(cfg, *launched, timeout_s)
        raise SystemExit(0)
    if launched is None and cfg.on_cuda:
        rank_device(cfg, world - 1)  # every spawned rank needs a GPU of its own on this machine
    device = rank_device(cfg, 0)
    known = _model_config(cfg.model)
    if known is not None:  # refuse before starting anything
        check_shardable(known, world)
    if launched is not None:
        dist.init_process_group(_backend(cfg), timeout=timedelta(seconds=START_TIMEOUT_S))
        store, procs = dist.distributed_c10d._get_default_store(), []
        say(f"tensor parallel: rank 0 of {world} (torchrun, {_backend(cfg)})")
    else:
        store, procs = _spawn_workers(cfg, timeout_s)
        say(f"tensor parallel: spawned {world - 1} worker process(es) ({_backend(cfg)})")
    channel = Channel(store, 0, world, device, timeout_s=timeout_s, liveness=_liveness(procs) if procs else None)
    channel.on_close.append(lambda: _end_group(procs, kill=channel.failure is not None))
    try:
        if procs:
            _await_keys(store, [f"{PREFIX}/hello/{r}" for r in range(1, world)], "starting the workers", channel)
            dist.init_process_group(_backend(cfg), store=dist.PrefixStore("adaserve-pg", store), rank=0,
                                    world_size=world, timeout=timedelta(seconds=START_TIMEOUT_S))
        model, tok = resolve_model(cfg.model, getattr(torch, cfg.dtype_name), str(device))
        shard_model(model, 0, world)
        _await_keys(store, [f"{PREFIX}/ready/{r}" for r in range(1, world)], "loading the model on every rank",
                    channel)
        dist.distributed_c10d._set_pg_timeout(timedelta(seconds=timeout_s))
    except BaseException:
        channel.failure = TPFailure("start-up failed")  # no STOP: the workers end with the group
        channel.close()
        raise
    tp = TPModel(model, channel)
    tp.processes = procs
    atexit.register(channel.close)
    channel.on_close.append(lambda: atexit.unregister(channel.close))
    if procs:
        threading.Thread(target=_monitor, args=(channel, procs), name="adaserve-tp-monitor", daemon=True).start()
    return tp, tok


def _model_config(name: str) -> ModelConfig | None:
    """The model's shape without loading its weights where that is cheap (tiny models, folders)."""
    if name in TINY_MODELS:
        return tiny_random_model(TINY_MODELS[name]).config  # milliseconds
    cfg_file = Path(name).expanduser() / "config.json"
    if cfg_file.is_file():
        try:
            return ModelConfig.from_hf(json.loads(cfg_file.read_text()))
        except (ValueError, KeyError):
            return None  # the loader reports it
    return None


def _spawn_workers(cfg: EngineConfig, timeout_s: float) -> tuple[dist.TCPStore, list]:
    world = cfg.tensor_parallel_size
    store = dist.TCPStore("127.0.0.1", 0, world, True, timeout=timedelta(seconds=START_TIMEOUT_S),
                          wait_for_workers=False)
    ctx = mp.get_context("spawn")
    procs = []
    for rank in range(1, world):
        p = ctx.Process(target=_spawned_worker, args=(cfg, rank, world, store.port, timeout_s),
                        name=f"adaserve-tp-rank{rank}", daemon=True)
        p.start()
        procs.append(p)
    return store, procs


def _liveness(procs: list) -> Callable[[], list[str]]:
    def dead() -> list[str]:
        out = []
        for rank, p in enumerate(procs, start=1):
            code = p.exitcode
            if code is not None:
                how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
                out.append(f"worker rank {rank} (pid {p.pid}) {how}")
        return out
    return dead


def _monitor(channel: Channel, procs: list) -> None:
    """Notice a spawned worker's exit even while rank 0 sends nothing (an idle server)."""
    while not channel.closed and channel.failure is None:
        if any(p.exitcode is not None for p in procs):
            time.sleep(0.2)  # let its report reach the store
            if not channel.closed:
                channel.fail(RuntimeError("a worker process exited"))
            return
        time.sleep(0.5)


def _end_group(procs: list, kill: bool) -> None:
    """After the STOP command (``kill``: after a failure, when no STOP was sent): reap the spawned
    workers, end this process's group."""
    for p in procs:
        if not kill:
            p.join(10)
        if p.is_alive():
            p.kill()
            p.join(5)
    if dist.is_initialized():
        dist.destroy_process_group()


# ---- workers ----------------------------------------------------------------------------------------

def _spawned_worker(cfg: EngineConfig, rank: int, world: int, port: int, timeout_s: float) -> None:
    store = dist.TCPStore("127.0.0.1", port, world, False, timeout=timedelta(seconds=START_TIMEOUT_S))
    channel = Channel(store, rank, world, torch.device("cpu"), timeout_s=timeout_s)
    try:
        device = rank_device(cfg, rank)
        store.set(f"{PREFIX}/hello/{rank}", b"1")
        dist.init_process_group(_backend(cfg), store=dist.PrefixStore("adaserve-pg", store), rank=rank,
                                world_size=world, timeout=timedelta(seconds=START_TIMEOUT_S))
        channel.device = device
        _load_and_serve(cfg, channel, timeout_s)
    except BaseException as e:
        channel.report(error_line(e))
        raise


def _torchrun_worker(cfg: EngineConfig, rank: int, local_rank: int, timeout_s: float) -> None:
    device = rank_device(cfg, local_rank)
    dist.init_process_group(_backend(cfg), timeout=timedelta(seconds=START_TIMEOUT_S))
    channel = Channel(dist.distributed_c10d._get_default_store(), rank, cfg.tensor_parallel_size, device,
                      timeout_s=timeout_s)
    try:
        _load_and_serve(cfg, channel, timeout_s)
    except BaseException as e:
        channel.report(error_line(e))
        raise


def _load_and_serve(cfg: EngineConfig, channel: Channel, timeout_s: float) -> None:
    torch.set_num_threads(cfg.threads)
    model: Transformer
    model, _ = resolve_model(cfg.model, getattr(torch, cfg.dtype_name), str(channel.device))
    shard_model(model, channel.rank, channel.world)
    choose_linear_kernels(model, say=lambda s: None, cache=os.environ.get("ADASERVE_PROFILE_CACHE", "1") != "0")
    channel.store.set(f"{PREFIX}/ready/{channel.rank}", b"1")
    dist.distributed_c10d._set_pg_timeout(timedelta(seconds=timeout_s))
    serve_worker(model, channel)
    try:
        dist.destroy_process_group()
    except Exception:  # rank 0 may already be gone
        pass
    sys.stdout.flush()
