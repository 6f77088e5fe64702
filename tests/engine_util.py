"""Helpers shared by the engine and server tests."""

from adaserve.engine import BatchBuilder


def plain_greedy(model, prompt, n, eos=()):
    """Greedy decoding one token at a time through our own forward: the reference output."""
    cache = model.make_cache(num_blocks=(len(prompt) + n) // 16 + 2, block_size=16)
    b = BatchBuilder(cache)
    b.add_prefill(0, prompt)
    out = []
    for _ in range(n):
        out.append(int(model(b.build(), cache)[-1].argmax()))
        if out[-1] in eos:
            break
        b = BatchBuilder(cache)
        b.add_decode(0, out[-1])
    return out


def root_path(parents, node):
    """Node indices from the root (parent -1) down to ``node``."""
    path = []
    while node >= 0:
        path.append(node)
        node = parents[node]
    return path[::-1]
