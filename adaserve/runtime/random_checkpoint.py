"""Random-weight Hugging Face checkpoints of real model shapes, for measuring speed where no
weights can be downloaded (scripts/gpu-check.sh): ``config.json`` + ``model.safetensors``, no
tokenizer files, so the loader gives them the byte tokenizer.

    python -m adaserve.runtime.random_checkpoint --shape llama-3.2-1b --out DIR [--dtype bfloat16]

The shapes are those of the models' own ``config.json`` files. Weights are N(0, 0.02) (norms 1),
drawn on the GPU when there is one (fast) from a fixed seed; the output is deterministic per
device type.

``--cycles 8,16,32,64,128``: weights whose greedy next token is a fixed function of the current
token, its successor on a cycle of the vocabulary (cycle lengths taken in turn from the list; EOS
tokens are their own successors and on no cycle). Why: on random weights the n-gram drafter finds
almost nothing (1.13 tokens per step on an H200), so a GPU run cannot show what speculation buys.
On these, a request's output runs around its cycle: once it has come round (after the cycle's
length in tokens) every next token is in its own history, and the drafter predicts it. How: the
attention and MLP output projections are scaled down 1,000× (every GEMM still runs on non-zero
data, so a step costs what the real shape's does), the residual stream stays the token's
embedding, and the (untied) LM head's row of token ``next(t)`` is the direction of ``t``'s
embedding: the largest logit by ~10× the typical largest other (checked on the tiny shape in
``tests/test_gpu_check.py``). A synthetic stand-in for a model whose output repeats itself, not a
language model: results on it say what speculation buys at its acceptance, nothing about text."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
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


RESIDUAL_SCALE = 1e-3  # --cycles: the layers' output projections, relative to the random ones


def cycle_successors(vocab: int, lengths: Sequence[int], fixed: Sequence[int] = (), seed: int = 0) -> np.ndarray:
    """``next[t]`` for every token: the vocabulary (less ``fixed``, their own successors) shuffled
    and cut into cycles of ``lengths`` in turn (a last, shorter cycle takes the rest)."""
    if not lengths or min(lengths) < 1:
        raise ValueError(f"cycle lengths must be positive, got {list(lengths)}")
    nxt = np.arange(vocab, dtype=np.int64)
    fixed_set = {int(t) for t in fixed if 0 <= t < vocab}
    order = np.random.default_rng(seed).permutation([t for t in range(vocab) if t not in fixed_set])
    at, k = 0, 0
    while at < len(order):
        cycle = order[at: at + lengths[k % len(lengths)]]
        nxt[cycle] = np.roll(cycle, -1)
        at, k = at + len(cycle), k + 1
    return nxt


def cyclic_state_dict(config: ModelConfig, lengths: Sequence[int], dtype: torch.dtype,
                      device: str | torch.device = "cpu", seed: int = 0) -> dict[str, torch.Tensor]:
    """``random_state_dict`` of ``config`` (untied) turned into a model whose greedy next token is
    ``cycle_successors(...)[token]`` (module docstring)."""
    out = random_state_dict(config.with_(tie_word_embeddings=False), torch.float32, device, seed)
    for name in out:
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            out[name] *= RESIDUAL_SCALE
    emb = out["model.embed_tokens.weight"]
    nxt = torch.from_numpy(cycle_successors(config.vocab_size, lengths, config.eos_token_ids, seed))
    head = torch.empty_like(emb)
    head[nxt] = emb / emb.norm(dim=1, keepdim=True)  # row next(t): the direction of t's embedding
    out["lm_head.weight"] = head
    return {k: v.to(dtype) for k, v in out.items()}


def save_random_checkpoint(config: ModelConfig, folder: str | Path, dtype: torch.dtype = torch.bfloat16,
                           device: str | torch.device | None = None, seed: int = 0,
                           cycles: Sequence[int] | None = None) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (no tokenizer) into ``folder``; with
    ``cycles``, the cycling weights of the module docstring (and an untied LM head)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if cycles:
        config = config.with_(tie_word_embeddings=False)
        tensors = cyclic_state_dict(config, cycles, dtype, device, seed)
    else:
        tensors = random_state_dict(config, dtype, device, seed)
    hf = config.to_hf_dict()
    hf["torch_dtype"] = str(dtype).removeprefix("torch.")
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True))
    return folder


def _lengths(text: str) -> list[int]:
    try:
        lengths = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"cycle lengths must be integers separated by commas, got {text!r}") from None
    if not lengths or min(lengths) < 1:
        raise argparse.ArgumentTypeError(f"cycle lengths must be positive, got {text!r}")
    return lengths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m adaserve.runtime.random_checkpoint", description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", required=True, choices=sorted(SHAPES))
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cycles", type=_lengths, help="comma-separated cycle lengths: weights whose greedy next "
                   "token runs around a cycle of the vocabulary (see the module docstring), e.g. 8,16,32,64,128")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    folder = save_random_checkpoint(SHAPES[args.shape], args.out, getattr(torch, args.dtype), seed=args.seed,
                                    cycles=args.cycles)
    size = sum(f.stat().st_size for f in folder.iterdir()) / 2**30
    kind = f"cycling weights, cycles {','.join(map(str, args.cycles))}" if args.cycles else "random weights"
    print(f"wrote {args.shape} ({args.dtype}, {kind}, {size:.2f} GiB) to {folder} "
          f"in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
