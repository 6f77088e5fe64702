"""How the engine's shared attention call costs with mixed contexts (docs/fidelity.md, docs/engine.md).

    python scripts/attention_padding.py [--model smollm2-135m] [--repeat 5]

Times (thread CPU time, median of ``--repeat``) one step of 8 sequences with ``q`` new tokens each
(a chain: 1, 4, 16) at three KV layouts: no context; 1,024 context tokens each (8,192 in all); one
sequence with 4,096 and seven with 584 (the same 8,192 in all, but one padded attention call
then covers 8 x 4,096 key slots). If attention cost followed the total context, the last two would
cost the same; in one call it follows the padded key slots. Each mixed layout is timed twice: in
one call (``split_padding=False``) and as the engine runs it on a CPU, cut into the calls
``scheduling/attention_calls.padding_groups`` picks. Then two serving-like steps, one call against
the split: 16 decodes over contexts drawn from 50-1,000 tokens, and 16 trees of 1-25 tokens over
100-600.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from adaserve.config import EngineConfig  # noqa: E402
from adaserve.engine.batch import BatchBuilder  # noqa: E402
from adaserve.runtime.build import load_models  # noqa: E402

LAYOUTS = {"no context": [0] * 8, "8 x 1024": [1024] * 8, "4096 + 7 x 584": [4096] + [584] * 7}


MIXED = {"16 decodes, contexts 50-1,000": (list(range(50, 1000, 59)), [1] * 16),
         "16 trees of 1-25 tokens, contexts 100-600": (list(range(100, 600, 31)),
                                                       [1, 1, 1, 1, 1, 1, 8, 8, 1, 1, 3, 1, 1, 25, 1, 2])}


def step_cpu_ms(model, cache, contexts: list[int], q: int | list[int], repeat: int, split: bool = True) -> float:
    sizes = q if isinstance(q, list) else [q] * len(contexts)
    for s, c in enumerate(contexts):
        cache.add(s)
        cache.alloc.append(s, c)

    def step() -> None:
        b = BatchBuilder(cache, split_padding=split)
        for s, n in enumerate(sizes):
            b.add_tree(s, [5] * n, list(range(-1, n - 1)))
        model(b.build(), cache)
        for s, c in enumerate(contexts):
            cache.truncate(s, c)
    step()
    times = []
    for _ in range(repeat):
        t0 = time.thread_time()
        step()
        times.append(time.thread_time() - t0)
    for s in range(len(contexts)):
        cache.free(s)
    return 1e3 * statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    model, _, _ = load_models(EngineConfig(model=a.model, drafter="ngram", threads=1), say=lambda s: None)
    cache = model.make_cache(3000, 16)
    names = ["no context"] + [f"{n}, {how}" for n in list(LAYOUTS)[1:] for how in ("one call", "split")]
    print("ms per step (thread CPU time)\n\n| new tokens per sequence | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    with torch.inference_mode():
        for q in (1, 4, 16):
            base = step_cpu_ms(model, cache, LAYOUTS["no context"], q, a.repeat)
            cells = [f"{base:.1f}"]
            for ctx in list(LAYOUTS.values())[1:]:
                for split in (False, True):
                    v = step_cpu_ms(model, cache, ctx, q, a.repeat, split)
                    cells.append(f"{v:.1f} (+{v - base:.1f})")
            print(f"| {q} | " + " | ".join(cells) + " |", flush=True)
        print("\n| step | one call | split | split / one call |\n|---|---|---|---|")
        for name, (ctx, sizes) in MIXED.items():
            one, split = (step_cpu_ms(model, cache, ctx, sizes, a.repeat, s) for s in (False, True))
            print(f"| {name} | {one:.1f} | {split:.1f} | {split / one:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
