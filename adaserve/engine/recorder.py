"""Acceptance records for the simulator's trace-driven acceptance model (JSON Lines).

One line per (request, decode position along the committed output) where the drafter had
expanded the tree node the target decoded from::

    {"rid": 3, "category": "coding", "pos": 17, "probs": [0.81, 0.07, ...], "rank": 0}

``pos``: index in the request's output of the token the target produced (0 is the token of the
prefill, so decode positions start at 1). ``probs``: the draft's top-K (K <= 8) confidences for the
next token at that node, descending (conditional draft probabilities; n-gram confidences for the
n-gram drafter). ``rank``: index in ``probs`` of the token the target actually produced, -1 when it
is not among them. Where the drafter had no proposal at all (an n-gram miss) the line reads
``"probs": [0.0], "rank": -1`` (the simulator's reader needs a non-empty list).

Beside them, one line per (request, draft call) with the size of the tree the drafter grew::

    {"rid": 3, "category": "coding", "pos": 17, "tree": 11}

``pos``: the request's output length when it drafted (the output position its level-1 nodes
predict), ``tree``: the tree's nodes without its root. The records above hold only the target's
path; the simulator's replay grows its trees from them and pads each to this size
(``sim/acceptance.py``), so that a replayed step verifies as many nodes as the engine's did.

And one line per request as it leaves (``record_tokens``, from ``TorchExecutor.release``)::

    {"rid": 3, "category": "coding", "drafter": "ngram", "prompt": [...], "output": [...]}

its token ids and the drafter's name: the simulator runs the n-gram drafter over them to replay
the engine's drafts exactly (``sim/ngram_replay.py``).

The serving loop only keeps the records (a step's committed positions in one ``record_batch``): formatting
each line in the loop (~5 us) made an AdaServe iteration that records 0.02-0.04 ms slower at 2
requests and 0.2-0.4 ms at 16 (tiny model, this VM, two alternating runs of 200 iterations), serving time
that a run recording acceptance (every run of ``scripts/gpu-check.sh``) charged to the speculative
systems alone; now at most 0.02 and 0.03-0.06 ms. The lines are written when the engine waits idle for
an arrival (``flush``, from ``TorchExecutor.wait_until``), at ``close``, and by the loop itself once
``FLUSH_AT`` records are held (an overloaded run never idles: about 0.5 s per 100,000 records, ~400
requests of 256 tokens). A writer thread was tried first: competing with the loop for the GIL, it
made an iteration of 2 requests slower than formatting in place. The file is byte-identical to the
per-record writer's (checked on an AdaServe and a SpecInfer run).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO

import numpy as np

FLUSH_AT = 100_000  # records held before the serving loop writes them itself


class AcceptanceRecorder:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] | None = self.path.open("w", encoding="utf-8")
        self.records = 0
        self._held: list[tuple] = []  # record_tree's (rid, category, pos, nodes, conf) and record_batch's batches
        self._held_records = 0

    def record(self, rid: int, category: str, pos: int, probs, tokens, produced: int) -> None:
        """``probs``/``tokens``: the draft's top next tokens (descending; pads have token -1)."""
        self.record_batch([rid], [category], [pos], [probs], [tokens], [produced])

    def record_batch(self, rids: list[int], categories: list[str], pos, probs, tokens, produced) -> None:
        """``record`` of many positions at once: per entry its request, category, position, the
        rows of ``probs``/``tokens`` (copied: the caller's arrays may change) and the produced token."""
        self._hold((list(rids), list(categories), np.asarray(pos).tolist(), np.array(probs), np.array(tokens),
                    np.asarray(produced).tolist()), len(rids))
        self.records += len(rids)

    def record_tree(self, rid: int, category: str, pos: int, nodes: int, conf=None) -> None:
        """The drafter grew ``nodes`` non-root nodes for request ``rid`` at output length ``pos``;
        ``conf``: their path confidences (the drafter's, as the selection saw them; any order)."""
        if conf is not None:
            conf = sorted((round(float(c), 6) for c in np.asarray(conf).ravel()), reverse=True)
        self._hold((int(rid), category, int(pos), int(nodes), conf), 1)

    def record_tokens(self, rid: int, category: str, ids, n_prompt: int, drafter: str | None) -> None:
        """Request ``rid`` left with token ids ``ids``: its prompt (the first ``n_prompt``), then its
        committed output; ``drafter``: the drafter's name (None: the run drafted nothing)."""
        self._hold(("tokens", int(rid), category, [int(t) for t in ids], int(n_prompt), drafter), 1)

    def _hold(self, item: tuple, records: int) -> None:
        self._held.append(item)
        self._held_records += records
        if self._held_records >= FLUSH_AT:
            self.flush()

    @staticmethod
    def _lines(item: tuple):
        """The JSON lines of one held item."""
        if item[0] == "tokens":
            _, rid, category, ids, n_prompt, drafter = item
            yield json.dumps({"rid": rid, "category": category, "drafter": drafter, "prompt": ids[:n_prompt],
                              "output": ids[n_prompt:]})
            return
        if len(item) == 5:
            rid, category, pos, nodes, conf = item
            line = {"rid": rid, "category": category, "pos": pos, "tree": nodes}
            yield json.dumps(line if conf is None else {**line, "conf": conf})
            return
        rids, categories, pos, probs, tokens, produced = item
        for k, rid in enumerate(rids):
            kept = [(p, t) for p, t in zip(probs[k].tolist(), tokens[k].tolist()) if t >= 0 and p > 0] or [(0.0, -1)]
            rank = next((j for j, (_, t) in enumerate(kept) if t == produced[k] and t >= 0), -1)
            yield json.dumps({"rid": int(rid), "category": categories[k], "pos": int(pos[k]),
                              "probs": [round(float(p), 6) for p, _ in kept], "rank": rank})

    def flush(self) -> None:
        """Write the held records."""
        if self._held and self._file is not None:
            self._file.write("".join(line + "\n" for item in self._held for line in self._lines(item)))
            self._held.clear()
            self._held_records = 0

    def close(self) -> None:
        if self._file is not None:
            self.flush()
            self._file.close()
            self._file = None

    def __enter__(self) -> "AcceptanceRecorder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
