"""A request's tokens as the engine sees them (the scheduler's ``Request`` holds no token ids), and
its sampling settings."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from adaserve.core.errors import UserError


@dataclass(frozen=True)
class SamplingOptions:
    """How one request's tokens are chosen (``TorchExecutor.set_options``; default: the executor's).

    * ``temperature`` 0: greedy, token-identical to plain greedy decoding (``top_p``, ``top_k`` and
      ``seed`` are then unused). > 0: the target distribution is ``softmax(logits / temperature)``,
      restricted to the ``top_k`` most likely tokens (0: all) and to the nucleus of mass ``top_p``
      (the smallest set of most likely tokens whose mass reaches ``top_p``), renormalized. Tree
      verification samples exactly from that distribution.
    * ``seed`` (with temperature > 0): the output is a function of the seed, the prompt and these
      settings alone, whatever the batch and the speculation trees: the token at output position k
      is ``argmax(log p + g_k)`` with Gumbel noise ``g_k`` drawn from ``(seed, k)`` (Gumbel-max
      sampling), and the tree is walked like a greedy one against those tokens. Without a seed,
      tokens come from the executor's random generator (multi-step speculative sampling).
    * ``ignore_eos``: EOS does not end the request (benchmarks with fixed output lengths).
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    ignore_eos: bool = False

    def __post_init__(self):
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise UserError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise UserError(f"top_k must be >= 0 (0: no limit), got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


GREEDY = SamplingOptions()


@dataclass(eq=False)
class SeqState:
    """The prompt, then every committed output token.

    While prefilling, the target's KV covers the prompt's first ``Request.prefilled`` tokens (the
    serving loop owns that count); once decoding, it covers every token but the last: the last committed token has no KV yet, it is the root of the next
    candidate tree (so ``Request.context_len == len(ids) - 1``). ``eos``: the token ids that end
    this request (empty with ``ignore_eos``)."""

    seq_id: int
    ids: list[int]
    n_prompt: int
    options: SamplingOptions = GREEDY
    eos: frozenset[int] = field(default_factory=frozenset)

    @property
    def output(self) -> list[int]:
        return self.ids[self.n_prompt:]

    @property
    def last(self) -> int:
        return self.ids[-1]

    @property
    def num_output(self) -> int:
        return len(self.ids) - self.n_prompt
