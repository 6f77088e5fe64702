"""Assembling an engine from names: models (built-in, tiny random, local folders, hub ids), the
drafter, the KV pool and the executor. Shared by ``adaserve profile`` and ``adaserve run``."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch

from adaserve.core.profile import LatencyProfile, Limits

from .drafters import Drafter, ModelDrafter, NgramDrafter
from .executor import TorchExecutor, default_num_blocks
from .loader import BUILTIN_MODELS, load_model, tiny_random_model
from .model import Transformer
from .recorder import AcceptanceRecorder

TINY_MODELS = {"tiny-llama": "llama", "tiny-qwen2": "qwen2"}  # random weights, byte "tokenizer"
TINY_DRAFT_SEED = 1  # a tiny draft is the same architecture with other random weights
DRAFTERS = ("ngram", "model")
BLOCK_SIZE = 16


class ByteTokenizer:
    """Text -> ids for tiny random models (UTF-8 bytes folded into the vocabulary, above id 2)."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def __call__(self, text: str) -> SimpleNamespace:
        span = self.vocab_size - 3
        return SimpleNamespace(input_ids=[3 + b % span for b in text.encode("utf-8")] or [3])


def model_names_help() -> str:
    return (f"built-in: {', '.join(BUILTIN_MODELS)}; random tiny models for tests: {', '.join(TINY_MODELS)}; "
            "or a local Hugging Face folder, a .gguf file or a hub id")


def resolve_model(name: str, dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0
                  ) -> tuple[Transformer, object]:
    """``(model, tokenizer)`` for a model name (``ModelNotFound`` / ``UnsupportedModel`` otherwise)."""
    if name in TINY_MODELS:
        model = tiny_random_model(TINY_MODELS[name], seed=seed, dtype=dtype, device=device)
        return model, ByteTokenizer(model.config.vocab_size)
    return load_model(name, dtype=dtype, device=device)


@dataclass
class EngineSpec:
    """What the command line chose."""

    model: str
    draft: str | None = None
    drafter: str | None = None  # "ngram" | "model"; default: model if a draft is named, else ngram
    dtype: str = "float32"
    device: str = "cpu"
    threads: int | None = None

    def drafter_kind(self) -> str:
        kind = self.drafter or ("model" if self.draft else "ngram")
        if kind not in DRAFTERS:
            raise ValueError(f"unknown drafter {kind!r}; valid drafters: {', '.join(DRAFTERS)}")
        if kind == "model" and not self.draft:
            raise ValueError("--drafter model needs --draft MODEL (a small LM with the target's vocabulary)")
        if kind == "ngram" and self.draft:
            raise ValueError("--draft is only used with --drafter model")
        return kind

    @property
    def torch_dtype(self) -> torch.dtype:
        dt = getattr(torch, self.dtype, None)
        if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
            raise ValueError(f"unknown dtype {self.dtype!r}; use float32, float16 or bfloat16")
        return dt


def load_pair(spec: EngineSpec) -> tuple[Transformer, object, Transformer | None]:
    """Target, tokenizer and (for the model drafter) the draft model."""
    if spec.threads:
        torch.set_num_threads(spec.threads)
    kind = spec.drafter_kind()
    model, tok = resolve_model(spec.model, spec.torch_dtype, spec.device)
    draft = None
    if kind == "model":
        draft, _ = resolve_model(spec.draft, spec.torch_dtype, spec.device, seed=TINY_DRAFT_SEED)
        if draft.config.vocab_size > model.config.vocab_size:
            raise ValueError(f"draft vocabulary ({draft.config.vocab_size}) is larger than the target's "
                             f"({model.config.vocab_size}): the models must share a tokenizer")
    return model, tok, draft


def num_blocks_for(limits: Limits, block_size: int = BLOCK_SIZE) -> int:
    """The KV pool: the profile's ``kv_capacity_tokens`` plus one block per request slot (rounding),
    or room for ``max_batch_requests`` full-length sequences when the capacity is unset/larger."""
    full = default_num_blocks(limits, block_size)
    from_capacity = limits.kv_capacity_tokens // block_size + limits.max_batch_requests
    return max(1, min(full, from_capacity))


def make_drafter(kind: str, draft: Transformer | None, num_blocks: int) -> Drafter:
    if kind == "model":
        return ModelDrafter(draft, num_blocks, BLOCK_SIZE)
    return NgramDrafter()


def make_executor(model: Transformer, tokenizer, draft: Transformer | None, kind: str,
                  profile: LatencyProfile, *, temperature: float = 0.0, seed: int = 0,
                  recorder: AcceptanceRecorder | None = None, ignore_eos: bool = False) -> TorchExecutor:
    blocks = num_blocks_for(profile.limits)
    return TorchExecutor(model, profile, make_drafter(kind, draft, blocks), tokenizer=tokenizer,
                         num_blocks=blocks, block_size=BLOCK_SIZE, temperature=temperature, seed=seed,
                         recorder=recorder, ignore_eos=ignore_eos)
