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
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO


class AcceptanceRecorder:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] | None = self.path.open("w", encoding="utf-8")
        self.records = 0

    def record(self, rid: int, category: str, pos: int, probs, tokens, produced: int) -> None:
        """``probs``/``tokens``: the draft's top next tokens (descending; pads have token -1)."""
        kept = [(float(p), int(t)) for p, t in zip(probs, tokens) if t >= 0 and p > 0] or [(0.0, -1)]
        rank = next((k for k, (_, t) in enumerate(kept) if t == produced and t >= 0), -1)
        line = {"rid": int(rid), "category": category, "pos": int(pos),
                "probs": [round(p, 6) for p, _ in kept], "rank": rank}
        self._file.write(json.dumps(line) + "\n")
        self.records += 1

    def record_tree(self, rid: int, category: str, pos: int, nodes: int) -> None:
        """The drafter grew ``nodes`` non-root nodes for request ``rid`` at output length ``pos``."""
        line = {"rid": int(rid), "category": category, "pos": int(pos), "tree": int(nodes)}
        self._file.write(json.dumps(line) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "AcceptanceRecorder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
