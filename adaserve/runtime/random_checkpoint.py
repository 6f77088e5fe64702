"""Random-weight Hugging Face checkpoints of real model shapes, for measuring speed where no
weights can be downloaded (scripts/gpu-check.sh): ``config.json`` + ``model.safetensors``, no
tokenizer files, so the loader gives them the byte tokenizer.

    python -m adaserve.runtime.random_checkpoint --shape llama-3.2-1b --out DIR [--dtype bfloat16]

The shapes are those of the models' own ``config.json`` files. Weights are N(0, 0.02) (norms 1),
drawn on the GPU when there is one (fast) from a fixed seed; the output is deterministic per
device type."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from adaserve.engine.config import ModelConfig, RopeScaling

LLAMA3_EOS = (128001, 128008, 128009)
SHAPES = {
    "llama-3.2-1b": ModelConfig(
        family="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
        num_kv_heads=8, head_dim=64, rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
        rope_scaling=RopeScaling("llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=8192),
        max_position_embeddings=131072, bos_token_id=128000, eos_token_ids=LLAMA3_EOS),
    "llama-3.1-8b": ModelConfig(
        family="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
        num_kv_heads=8, head_dim=128, rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_scaling=RopeScaling("llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=8192),
        max_position_embeddings=131072, bos_token_id=128000, eos_token_ids=LLAMA3_EOS),
}
# the 1B shape cut down to seconds on a CPU: what scripts/gpu-check.sh uses with DEVICE=cpu
SHAPES["llama-tiny"] = SHAPES["llama-3.2-1b"].with_(num_layers=2, hidden_size=128, intermediate_size=256, num_heads=4,
                                                     num_kv_heads=2, head_dim=32, vocab_size=1024,
                                                     bos_token_id=1, eos_token_ids=(2,))


def random_state_dict(config: ModelConfig, dtype: torch.dtype, device: str | torch.device = "cpu",
                      seed: int = 0) -> dict[str, torch.Tensor]:
    """Hugging Face-named random tensors of ``config`` (on the CPU; drawn on ``device``)."""
    from adaserve.engine.model import Transformer

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(config).state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    gen = torch.Generator(device=device).manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        if "norm" in name:
            t = torch.ones(shape, dtype=dtype, device=device)
        else:
            t = torch.empty(shape, dtype=dtype, device=device).normal_(0.0, 0.02, generator=gen)
        out[name] = t.cpu()
    return out


def save_random_checkpoint(config: ModelConfig, folder: str | Path, dtype: torch.dtype = torch.bfloat16,
                           device: str | torch.device | None = None, seed: int = 0) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (no tokenizer) into ``folder``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    hf = config.to_hf_dict()
    hf["torch_dtype"] = str(dtype).removeprefix("torch.")
    save_file(random_state_dict(config, dtype, device, seed), str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True))
    return folder


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m adaserve.runtime.random_checkpoint", description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", required=True, choices=sorted(SHAPES))
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    folder = save_random_checkpoint(SHAPES[args.shape], args.out, getattr(torch, args.dtype), seed=args.seed)
    size = sum(f.stat().st_size for f in folder.iterdir()) / 2**30
    print(f"wrote {args.shape} ({args.dtype}, random weights, {size:.2f} GiB) to {folder} "
          f"in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
