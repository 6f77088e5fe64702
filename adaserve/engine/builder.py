"""Assembling an engine from names: models (built-in, tiny random, local folders, hub ids), the
drafter, the KV pool and the executor. Shared by ``adaserve profile`` and ``adaserve run``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from adaserve.core.profile import LatencyProfile, Limits

from .drafters import Drafter, ModelDrafter, NgramDrafter
from .executor import TorchExecutor, default_num_blocks
from .loader import BUILTIN_MODELS, load_model, tiny_random_model
from .model import Transformer
from .recorder import AcceptanceRecorder

TINY_MODELS = {"tiny-llama": "llama", "tiny-qwen2": "qwen2"}  # random weights, ByteTokenizer
TINY_DRAFT_SEED = 1  # a tiny draft is the same architecture with other random weights
DRAFTERS = ("ngram", "model")
BLOCK_SIZE = 16


def simple_chat_text(messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> str:
    """A minimal ChatML-like template, for tokenizers that have none (the byte tokenizer's)."""
    text = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages)
    return text + "<|assistant|>\n" if add_generation_prompt else text


class ByteTokenizer:
    """The tokenizer of the tiny random models (``adaserve run`` and ``adaserve serve`` both use
    this one): UTF-8 bytes shifted past the special ids, token id =
    byte + ``OFFSET``. Ids 0, 1, 2 (pad, BOS, EOS of the tiny models) are never produced by
    ``encode`` and are dropped by ``decode``. UTF-8 never uses bytes above 0xF4, so every id that
    encoding produces is at most 247 < 256 = the tiny vocabulary, and ``decode(encode(text)) ==
    text`` for any valid text (a lone surrogate is encoded without an error and decodes to U+FFFD).
    Ids of no byte (>= OFFSET + 256) decode to nothing; bytes that are not valid UTF-8 (a model
    may generate them) decode to U+FFFD.

    Implements both the Hugging Face calls the engine uses (``tok(text).input_ids``,
    ``apply_chat_template``, ``decode``) and the server's ``Codec`` protocol (``name``, ``encode``,
    ``decode``, ``chat_ids``). The chat template is ``simple_chat_text``."""

    OFFSET = 3
    name = "bytes"
    chat_template = "simple_chat_text"  # <|role|>\ncontent\n ... <|assistant|>\n

    def __init__(self, vocab_size: int = 256):
        if vocab_size < self.OFFSET + 0xF5:
            raise ValueError(f"a byte tokenizer needs a vocabulary of at least {self.OFFSET + 0xF5} ids "
                             f"(ids {self.OFFSET}..{self.OFFSET + 0xF4} for UTF-8 bytes), got {vocab_size}")
        self.vocab_size = vocab_size
        self.special = frozenset(range(self.OFFSET))

    def encode(self, text: str) -> list[int]:
        return [b + self.OFFSET for b in text.encode("utf-8", errors="surrogatepass")]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        data = bytes(t - self.OFFSET for t in map(int, ids) if self.OFFSET <= t < self.OFFSET + 256)
        return data.decode("utf-8", errors="replace")

    def __call__(self, text: str) -> SimpleNamespace:
        return SimpleNamespace(input_ids=self.encode(text))

    def chat_ids(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        return self.encode(simple_chat_text(messages))

    def apply_chat_template(self, messages: Sequence[Mapping[str, str]], tokenize: bool = True,
                            add_generation_prompt: bool = True, **_) -> list[int] | str:
        text = simple_chat_text(messages, add_generation_prompt)
        return self.encode(text) if tokenize else text


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
