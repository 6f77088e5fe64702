"""Exact replay of an engine run's n-gram drafts (docs/simulator.md, "Replayed n-gram drafts").

The engine's n-gram drafter needs nothing but the request's token ids, so the simulator can run the
same drafter (``adaserve.drafting.ngram``) over the ids an engine run recorded (the recording's
token lines, ``adaserve.engine.recorder``): each simulated draft is then the tree the engine's
drafter grows at that output length and with that shape, whatever steps led there, with its own
confidences, and a node is right when its path spells the tokens the target produced next. A
greedy run's output is the target's greedy continuation, so that is exactly what the engine's
verification accepts. The per-position records (``RecordedAcceptance``) approximate the same trees
from the target's path alone; they remain for draft-model runs and for requests the recording
does not hold."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from adaserve.core.request import Request
from adaserve.core.slo import category_of
from adaserve.core.trace import TraceRecord
from adaserve.scheduling.plan import SpecShape
from adaserve.scheduling.trees import CandidateForest
from adaserve.sim.acceptance import AcceptanceRecordError, RecordedAcceptance, record_lines


@dataclass
class _Seq:
    seq_id: int
    ids: list[int]

    @property
    def last(self) -> int:
        return self.ids[-1]


def right_nodes(forest: CandidateForest, outputs: list[np.ndarray], generated: list[int]) -> np.ndarray:
    """Per node: whether its path from the root spells the tokens request ``i`` produced next
    (``outputs[i][generated[i]:]``); roots are right. Nodes are stored parents first."""
    owner = forest.owner
    at = np.asarray(generated, np.int64)[owner] + forest.depth - 1  # output index each node predicts
    lengths = np.array([len(o) for o in outputs], np.int64)
    flat = np.concatenate([np.asarray(o, np.int64) for o in outputs] + [np.zeros(1, np.int64)])
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    inside = (forest.depth > 0) & (at < lengths[owner])
    target = np.where(inside, flat[np.where(inside, starts[owner] + at, len(flat) - 1)], -1)
    ok = (forest.depth == 0) | (inside & (forest.token == target))
    for d in range(1, int(forest.depth.max(initial=0)) + 1):  # a right node's parent is right
        nodes = np.flatnonzero(forest.depth == d)
        ok[nodes] &= ok[forest.parent[nodes]]
    return ok


class NgramReplay:
    """Acceptance replayed by running the n-gram drafter over an engine run's token ids.

    ``tokens``: (category, rid) -> (prompt ids, output ids), the run's token lines (``load_tokens``).
    Only the recording's own requests can be simulated, each for at most the output it recorded
    (``recorded_acceptance`` checks)."""

    def __init__(self, tokens: dict[tuple[str, int], tuple[list[int], np.ndarray]], name: str = "ngram replay"):
        from adaserve.drafting.ngram import NgramDrafter  # here: importing it imports numba (jit.njit)

        self.name = name
        self.tokens = tokens
        self.drafter = NgramDrafter()
        self._seqs: dict[int, _Seq] = {}

    def draft(self, requests: list[Request], shape: SpecShape, rng: np.random.Generator) -> CandidateForest:
        seqs, outputs = [], []
        for r in requests:
            rec = self.tokens.get((r.category, r.rid))
            if rec is None:
                raise ValueError(f"request {r.rid} ({r.category}) has no token line in {self.name}")
            prompt, output = rec
            if r.generated > len(output):
                raise ValueError(f"request {r.rid} has {r.generated} tokens, its recording {len(output)}")
            s = self._seqs.get(r.rid)
            if s is None:
                s = self._seqs[r.rid] = _Seq(r.rid, list(prompt))
            have = len(s.ids) - len(prompt)
            s.ids.extend(output[have:r.generated].tolist())
            seqs.append(s)
            outputs.append(output)
        forest = self.drafter.draft(seqs, shape)
        forest.extra["correct"] = right_nodes(forest, outputs, [r.generated for r in requests])
        return forest

    def release(self, request: Request) -> None:
        if self._seqs.pop(request.rid, None) is not None:
            self.drafter.release(request.rid)


def load_tokens(path: str | Path) -> dict[tuple[str, int], tuple[list[int], np.ndarray]]:
    """The recording's token lines -> {(category, rid): (prompt ids, output ids)}; empty for a
    recording without them (made before 2026-11-28) or from the draft-model drafter."""
    out = {}
    for where, d in record_lines(Path(path)):
        if "output" not in d:
            continue
        try:
            key = (str(d["category"]), int(d["rid"]))
            prompt, output = [int(t) for t in d["prompt"]], np.array([int(t) for t in d["output"]], np.int64)
            drafter = d.get("drafter")
        except (KeyError, TypeError, ValueError) as e:
            raise AcceptanceRecordError(f"{where}: a token line needs rid, category, prompt and output ({e!r})") from None
        if drafter != "ngram":
            return {}
        if not prompt or (output < 0).any():
            raise AcceptanceRecordError(f"{where}: prompt must be non-empty and token ids >= 0")
        out[key] = (prompt, output)
    return out


def recorded_acceptance(path: str | Path, requests: Iterable[tuple[int, TraceRecord]] | None = None,
                        replay: str = "auto"):
    """The acceptance model of a recording: ``NgramReplay`` when ``replay`` is "auto" and the
    recording holds the n-gram drafter's token ids for every one of ``requests`` ((rid, record)
    pairs) with its whole output, else ``RecordedAcceptance`` (``replay="records"``: always)."""
    if replay not in ("auto", "records"):
        raise ValueError(f"replay must be 'auto' or 'records', got {replay!r}")
    if replay == "auto" and requests is not None:
        tokens = load_tokens(path)
        if tokens and all(len(tokens.get((category_of(rec.slo_ratio, rec.category), rid), ((), ()))[1])
                          >= rec.output_length for rid, rec in requests):
            return NgramReplay(tokens, name=f"ngram replay:{path}")
    return RecordedAcceptance.load(path)
