"""Model shape and hyper-parameters for the families the engine runs (Llama, Qwen2)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from adaserve.core.errors import UserError

SUPPORTED_FAMILIES = ("llama", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class UnsupportedModel(UserError):
    """The checkpoint's architecture or one of its options is not implemented by our forward."""


@dataclass(frozen=True)
class RopeScaling:
    rope_type: str = "default"  # default | linear | llama3
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    family: str = "llama"
    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2: always True; Llama: attention_bias
    o_bias: bool = False  # Llama attention_bias also puts a bias on o_proj
    mlp_bias: bool = False
    max_position_embeddings: int = 2048
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.family not in SUPPORTED_FAMILIES:
            raise UnsupportedModel(f"unsupported model family {self.family!r}; supported: {', '.join(SUPPORTED_FAMILIES)}")
        if self.rope_scaling.rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModel(
                f"unsupported rope_type {self.rope_scaling.rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModel(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")

    def with_(self, **overrides) -> "ModelConfig":
        return replace(self, **overrides)

    # ---- conversion from / to Hugging Face configs -------------------------------------------

    @classmethod
    def from_hf(cls, cfg: Any) -> "ModelConfig":
        """Build from a transformers ``PretrainedConfig`` or a ``config.json`` dict."""
        d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
        model_type = d.get("model_type")
        archs = d.get("architectures") or []
        if model_type not in SUPPORTED_FAMILIES:
            shown = f"{model_type!r}" + (f" ({', '.join(archs)})" if archs else "")
            raise UnsupportedModel(f"unsupported architecture {shown}; supported model types: {', '.join(SUPPORTED_FAMILIES)}")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModel(f"unsupported hidden_act {act!r} for {model_type}; only 'silu' is implemented")
        if d.get("use_sliding_window"):
            raise UnsupportedModel(f"{model_type} with use_sliding_window=True is not supported")

        heads = d["num_attention_heads"]
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        rope_theta = float(rope.get("rope_theta", d.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        scaling = RopeScaling() if rope_type == "default" else RopeScaling(
            rope_type=rope_type,
            factor=float(rope.get("factor", 1.0)),
            low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
            high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(
                rope.get("original_max_position_embeddings", d.get("max_position_embeddings", 8192))),
        )
        eos = d.get("eos_token_id")
        eos_ids = () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)
        attention_bias = bool(d.get("attention_bias", False))
        is_qwen = model_type == "qwen2"
        return cls(
            family=model_type,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            rope_theta=rope_theta,
            rope_scaling=scaling,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=True if is_qwen else attention_bias,
            o_bias=False if is_qwen else attention_bias,
            mlp_bias=bool(d.get("mlp_bias", False)),
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )

    def to_hf_dict(self) -> dict:
        """A ``config.json``-style dict that transformers turns into the equivalent model."""
        rope = {"rope_type": self.rope_scaling.rope_type, "rope_theta": self.rope_theta}
        if self.rope_scaling.rope_type != "default":
            rope.update({k: v for k, v in asdict(self.rope_scaling).items() if k != "rope_type"})
            if self.rope_scaling.rope_type == "linear":
                rope = {"rope_type": "linear", "rope_theta": self.rope_theta, "factor": self.rope_scaling.factor}
        d = {
            "model_type": self.family,
            "architectures": ["LlamaForCausalLM" if self.family == "llama" else "Qwen2ForCausalLM"],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rope_theta": self.rope_theta,
            "rope_parameters": rope,
            "rope_scaling": rope,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids) if len(self.eos_token_ids) > 1 else (
                self.eos_token_ids[0] if self.eos_token_ids else None),
        }
        if self.family == "llama":
            if self.qkv_bias != self.o_bias:
                raise UnsupportedModel("transformers' Llama has one attention_bias flag for q/k/v/o")
            d.update(attention_bias=self.qkv_bias, mlp_bias=self.mlp_bias)
        elif not self.qkv_bias or self.o_bias or self.mlp_bias:
            raise UnsupportedModel("transformers' Qwen2 always has q/k/v bias and no o/mlp bias")
        return d

    def to_hf_config(self):
        from transformers import AutoConfig

        d = self.to_hf_dict()
        return AutoConfig.for_model(d.pop("model_type"), **d)

    # ---- derived quantities ------------------------------------------------------------------

    def rope_inv_freq(self) -> torch.Tensor:
        """Inverse RoPE frequencies [head_dim // 2] in fp32, including Llama-3 / linear scaling."""
        dim = self.head_dim
        inv_freq = 1.0 / (self.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))
        s = self.rope_scaling
        if s.rope_type == "linear":
            return inv_freq / s.factor
        if s.rope_type == "llama3":
            old_len = s.original_max_position_embeddings
            low_wavelen = old_len / s.low_freq_factor
            high_wavelen = old_len / s.high_freq_factor
            wavelen = 2 * math.pi / inv_freq
            scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
            smooth = (old_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
            smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
            is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
            return torch.where(is_medium, smoothed, scaled)
        return inv_freq
