"""How the engine's shared attention call costs with mixed contexts (docs/fidelity.md).

    python scripts/attention_padding.py [--model smollm2-135m] [--repeat 5]

Times (thread CPU time, median of ``--repeat``) one step of 8 sequences with ``q`` new tokens each
(a chain: 1, 4, 16) at three KV layouts: no context; 1,024 context tokens each (8,192 in all); one
sequence with 4,096 and seven with 584 (the same 8,192 in all, but the one padded attention call
then covers 8 x 4,096 key slots). If attention cost followed the total context, the last two would
cost the same; it follows the padded key slots.
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


def step_cpu_ms(model, cache, contexts: list[int], q: int, repeat: int) -> float:
    for s, c in enumerate(contexts):
        cache.add(s)
        cache.alloc.append(s, c)

    def step() -> None:
        b = BatchBuilder(cache)
        for s in range(len(contexts)):
            b.add_tree(s, [5] * q, list(range(-1, q - 1)))
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
    print("| new tokens per sequence | " + " | ".join(LAYOUTS) + " |")
    print("|---|" + "---|" * len(LAYOUTS))
    with torch.inference_mode():
        for q in (1, 4, 16):
            ms = {name: step_cpu_ms(model, cache, ctx, q, a.repeat) for name, ctx in LAYOUTS.items()}
            base = ms["no context"]
            cells = [f"{base:.1f}"] + [f"{v:.1f} (+{v - base:.1f})" for k, v in ms.items() if k != "no context"]
            print(f"| {q} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
