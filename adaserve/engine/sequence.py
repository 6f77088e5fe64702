"""A request's tokens as the engine sees them (the scheduler's ``Request`` holds no token ids)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(eq=False)
class SeqState:
    """The prompt, then every committed output token.

    The target's KV covers the prompt's first ``prefilled`` tokens while prefilling, and every token
    but the last once decoding: the last committed token has no KV yet, it is the root of the next
    candidate tree (so ``Request.context_len == len(ids) - 1``)."""

    seq_id: int
    ids: list[int]
    n_prompt: int
    prefilled: int = 0

    @property
    def output(self) -> list[int]:
        return self.ids[self.n_prompt:]

    @property
    def last(self) -> int:
        return self.ids[-1]

    @property
    def num_output(self) -> int:
        return len(self.ids) - self.n_prompt
