"""Our forward vs transformers' on the same model: ``python -m adaserve.engine.benchmark [--model smollm2-135m]``.

Times one decode step (batch 1) and one step decoding a token for each of 16 sequences, both over a
context of ``--context`` tokens per sequence, fp32, median of ``--repeat`` runs.
"""

from __future__ import annotations

import argparse

import torch

from .batch import BatchBuilder
from .loader import load_model
from .profiler import median_ms


def ours_decode_ms(model, n_seqs: int, context: int, repeat: int, solo_threshold: int = 32) -> float:
    bs = 16
    cache = model.make_cache(num_blocks=n_seqs * ((context + 1) // bs + 2), block_size=bs)
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, model.config.vocab_size, (n_seqs, context + 1), generator=gen).tolist()
    b = BatchBuilder(cache)
    for s in range(n_seqs):
        b.add_prefill(s, prompts[s][:context])
    model(b.build(), cache)

    def step():
        b = BatchBuilder(cache, solo_threshold)
        for s in range(n_seqs):
            b.add_decode(s, prompts[s][context])
        model(b.build(), cache)
        for s in range(n_seqs):
            cache.truncate(s, context)  # decode the same step again next time

    return median_ms(step, repeat)


def hf_decode_ms(hf, n_seqs: int, context: int, repeat: int) -> float:
    from transformers import DynamicCache

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, hf.config.vocab_size, (n_seqs, context + 1), generator=gen)
    with torch.no_grad():
        out = hf(ids[:, :context], use_cache=True)
    past = getattr(out, "cache", None) or out.past_key_values

    def step():
        with torch.no_grad():
            hf(ids[:, context:], cache=past, use_cache=True)
        past.crop(-1)

    assert isinstance(past, DynamicCache)
    return median_ms(step, repeat)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    from .loader import BUILTIN_MODELS, builtin_model_dir

    model, _ = load_model(args.model, tokenizer=False)
    path = builtin_model_dir(args.model) if args.model in BUILTIN_MODELS else args.model
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation="sdpa").eval()
    print(f"{args.model}, fp32, {torch.get_num_threads()} threads, context {args.context} per sequence")
    for n in (1, 16):
        ours = ours_decode_ms(model, n, args.context, args.repeat)
        theirs = hf_decode_ms(hf, n, args.context, args.repeat)
        print(f"decode {n:2d} seq x 1 token: ours {ours:7.2f} ms   transformers {theirs:7.2f} ms   "
              f"ratio {ours / theirs:.2f}")


if __name__ == "__main__":
    main()
