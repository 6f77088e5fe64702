"""One engine configuration for every command that builds an engine (``run``, ``serve``, ``profile``,
``bench engine``): the dataclass, its validation, and the command-line flags generated from it.

Torch-free on purpose: every ``adaserve`` command builds the whole parser, so this module must stay
cheap to import. Flag names follow vLLM where vLLM has one (``--max-num-seqs``,
``--max-num-batched-tokens``, ``--max-model-len``, ``--tensor-parallel-size``)."""

from __future__ import annotations

import argparse
import math
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any

from adaserve.core.errors import UserError
from adaserve.core.profile import Limits

DRAFTERS = ("ngram", "model")
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEFAULT_THREADS = 1  # measured fastest for one model process on the 2-core development VM (docs/engine.md)
MODEL_HELP = ("built-in: smollm2-135m; random tiny models for tests: tiny-llama, tiny-qwen2; "
              "or a local Hugging Face folder, a .gguf file or a hub id")

# Defaults of the limits per device kind; a latency profile file carries its own.
CPU_LIMITS = Limits(max_batch_requests=16, max_batch_tokens=256, prefill_chunk=256, max_seq_len=2048)
GPU_LIMITS = Limits(max_batch_requests=64, max_batch_tokens=1024, prefill_chunk=1024, max_seq_len=2048)


def _opt(help: str, flag: str | None = None, **kw: Any) -> Any:
    """A dataclass field described for the command line (``flag`` None: not a flag)."""
    default = kw.pop("default", None)
    return field(default=default, metadata={"help": help, "flag": flag, **kw})


@dataclass
class EngineConfig:
    """What an engine is built from. ``None`` limits mean: the latency profile's, else the device's
    defaults (``CPU_LIMITS`` / ``GPU_LIMITS``)."""

    model: str = field(default=MISSING, metadata={"help": f"target model ({MODEL_HELP})", "flag": "--model"})
    draft: str | None = _opt("draft model for --drafter model (same tokenizer as the target)", "--draft")
    drafter: str | None = _opt("candidate-tree drafter: ngram (prompt lookup) or model (default: model with "
                               "--draft, else ngram)", "--drafter", choices=DRAFTERS)
    dtype: str = _opt("weights and activations: auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16, "
                      "float16", "--dtype", default="auto", choices=DTYPES)
    device: str = _opt("cpu (default) or cuda[:N]", "--device", default="cpu")
    threads: int = _opt(f"torch CPU threads (default {DEFAULT_THREADS}; recorded in profiles)", "--threads",
                        default=DEFAULT_THREADS, type=int)
    profile: str | None = _opt("latency profile: a JSON file from `adaserve profile` or a built-in name "
                               "(default: a quick profile measured on first use and cached per model, "
                               "device, dtype and threads)", "--profile")
    max_num_seqs: int | None = _opt("requests per batch", "--max-num-seqs", type=int, group="limits")
    max_num_batched_tokens: int | None = _opt("tokens per iteration", "--max-num-batched-tokens", type=int,
                                              group="limits")
    prefill_chunk: int | None = _opt("prompt tokens per request per iteration", "--prefill-chunk", type=int,
                                     group="limits")
    max_model_len: int | None = _opt("prompt + output tokens per request", "--max-model-len", type=int,
                                     group="limits")
    kv_cache_gb: float | None = _opt("cap the KV pool (target + draft) at this many GiB", "--kv-cache-gb",
                                     type=float, group="limits")
    tensor_parallel_size: int = _opt("GPUs (or CPU processes) the target is sharded over (tensor parallel; "
                                     "must divide its KV heads): the command spawns N-1 workers, or under "
                                     "torchrun (WORLD_SIZE=N) joins them; rank 0 schedules and drafts "
                                     "(docs/engine.md, \"Tensor parallelism\")", "--tensor-parallel-size",
                                     default=1, type=int)
    cuda_graphs: bool | None = _opt("replay decode, tree-verification and prefill steps as CUDA graphs, captured "
                                    "per bucket of requests, query rows and context (default: on with --device "
                                    "cuda; CUDA only)", "--cuda-graphs", action=argparse.BooleanOptionalAction)

    # ---- derived ------------------------------------------------------------------------------
    @property
    def on_cuda(self) -> bool:
        return str(self.device).startswith("cuda")

    @property
    def use_cuda_graphs(self) -> bool:
        """``--cuda-graphs`` as given, else on for CUDA (with one rank) and off on the CPU."""
        if self.cuda_graphs is None:
            return self.on_cuda and self.tensor_parallel_size == 1
        return bool(self.cuda_graphs)

    @property
    def dtype_name(self) -> str:
        if self.dtype == "auto":
            return "bfloat16" if self.on_cuda else "float32"
        return self.dtype

    def drafter_kind(self) -> str:
        kind = self.drafter or ("model" if self.draft else "ngram")
        if kind not in DRAFTERS:
            raise UserError(f"unknown drafter {kind!r}; valid drafters: {', '.join(DRAFTERS)}")
        if kind == "model" and not self.draft:
            raise UserError("--drafter model needs --draft MODEL (a small LM with the target's vocabulary)")
        if kind == "ngram" and self.draft:
            raise UserError("--draft is only used with --drafter model")
        return kind

    def default_limits(self) -> Limits:
        return replace(GPU_LIMITS if self.on_cuda else CPU_LIMITS)

    def apply_limits(self, base: Limits, max_positions: int | None = None) -> Limits:
        """``base`` with the explicit limit options applied; the sequence length capped by the
        model's positions and the prefill chunk by the tokens per iteration."""
        lim = replace(base, max_batch_requests=self.max_num_seqs or base.max_batch_requests,
                      max_batch_tokens=self.max_num_batched_tokens or base.max_batch_tokens,
                      max_seq_len=self.max_model_len or base.max_seq_len)
        if max_positions:
            lim = replace(lim, max_seq_len=min(lim.max_seq_len, max_positions))
        return replace(lim, prefill_chunk=min(self.prefill_chunk or lim.prefill_chunk, lim.max_batch_tokens))

    @property
    def limits_given(self) -> bool:
        return any(getattr(self, f.name) is not None for f in fields(self) if f.metadata.get("group") == "limits")

    def validate(self) -> "EngineConfig":
        if not self.model or not str(self.model).strip():
            raise UserError("--model must name a model")
        self.drafter_kind()
        if self.dtype not in DTYPES:
            raise UserError(f"unknown --dtype {self.dtype!r}; use one of {', '.join(DTYPES)}")
        if not (self.device == "cpu" or self.on_cuda):
            raise UserError(f"unknown --device {self.device!r}; use cpu or cuda[:N]")
        if self.cuda_graphs and not self.on_cuda:
            raise UserError(f"--cuda-graphs needs --device cuda (the device is {self.device!r})")
        for name in ("threads", "max_num_seqs", "max_num_batched_tokens", "prefill_chunk", "max_model_len",
                     "tensor_parallel_size"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise UserError(f"{flag_of(name)} must be >= 1, got {v}")
        if self.kv_cache_gb is not None and not (math.isfinite(self.kv_cache_gb) and self.kv_cache_gb > 0):
            raise UserError(f"--kv-cache-gb must be a positive finite number of GiB, got {self.kv_cache_gb}")
        if self.tensor_parallel_size > 1 and self.cuda_graphs:
            raise UserError(f"--cuda-graphs with --tensor-parallel-size {self.tensor_parallel_size}: CUDA graphs "
                            "are not implemented for tensor-parallel ranks yet; drop --cuda-graphs")
        return self

    # ---- command line ---------------------------------------------------------------------------
    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser, *, exclude: tuple[str, ...] = (),
                      defaults: dict[str, Any] | None = None) -> None:
        """Add one flag per field (minus ``exclude``); ``defaults`` overrides field defaults."""
        defaults = defaults or {}
        groups: dict[str, Any] = {}
        for f in fields(cls):
            meta = f.metadata
            if not meta.get("flag") or f.name in exclude:
                continue
            target = parser
            if meta.get("group"):
                target = groups.setdefault(meta["group"], parser.add_argument_group(
                    "limits (default: the profile's, else 16 requests, 256 tokens, chunk 256, 2048 tokens "
                    "per sequence on CPU; 64/1024/1024/2048 on CUDA)"))
            kw = {k: meta[k] for k in ("type", "choices", "action") if k in meta}
            default = defaults.get(f.name, f.default)
            if default is MISSING:
                kw["required"] = True
            else:
                kw["default"] = default
            target.add_argument(meta["flag"], dest=f.name, help=meta["help"], **kw)

    @classmethod
    def from_args(cls, args: argparse.Namespace, **overrides: Any) -> "EngineConfig":
        values = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
        values.update(overrides)
        return cls(**values).validate()


def flag_of(name: str) -> str:
    for f in fields(EngineConfig):
        if f.name == name and f.metadata.get("flag"):
            return f.metadata["flag"]
    return "--" + name.replace("_", "-")
