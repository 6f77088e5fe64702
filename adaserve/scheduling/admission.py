"""Admission and prefill planning shared by the policies.

KV memory is managed by reservation: a request is admitted (gets its first prefill chunk) only if
the KV cache can hold its prompt, its maximum output and the deepest speculation tree, so a running
request never runs out of KV and nothing is preempted. Requests that do not fit wait in FIFO order.
"""

from __future__ import annotations

from adaserve.core.request import Request
from adaserve.scheduling.plan import IterationView

SPEC_HEADROOM = 64  # tentative tree tokens a request may hold beyond its committed context
# Tokens per block of the engine's paged KV cache. Named here, torch-free, beside the reservation
# rule that the engine's block accounting follows, so every front end can size caches from it.
BLOCK_SIZE = 16
# Batch entries with this many new tokens get an attention call of their own; smaller ones share one
# call padded to the longest (engine/batch.py), and the simulator prices steps the same way.
SOLO_QUERY_THRESHOLD = 32
# With CUDA graphs a step of several such calls (a prefill chunk beside decoding rows) runs as one
# graphed forward per call, when it has at most MAX_GRAPH_PARTS of them and each fits a graph of
# MAX_GRAPH_TOKENS padded rows (engine/cuda_graphs.py); the simulator prices it as those forwards.
MAX_GRAPH_PARTS = 3
MAX_GRAPH_TOKENS = 1024


def graph_rows(max_batch_tokens: int) -> int:
    """The most padded rows one CUDA graph of an engine with this batch token limit holds."""
    return min(max_batch_tokens, MAX_GRAPH_TOKENS)


def kv_reservation(r: Request, max_seq_len: int) -> int:
    return min(r.input_len + r.max_new_tokens, max_seq_len) + SPEC_HEADROOM


def _free_slots(view: IterationView, n_decoding: int) -> int:
    admitted = sum(1 for r in view.waiting if r.admitted_ms is not None)
    return view.limits.max_batch_requests - n_decoding - admitted


def _admit(view: IterationView, r: Request, slots: int, kv_free: int) -> tuple[bool, int, int]:
    """Whether ``r`` may get prefill now; returns (ok, slots, kv_free) after reserving."""
    if r.admitted_ms is not None:
        return True, slots, kv_free
    need = kv_reservation(r, view.limits.max_seq_len)
    if slots <= 0 or need > kv_free:
        return False, slots, kv_free
    return True, slots - 1, kv_free - need


def chunked_prefill(view: IterationView, token_room: int, n_decoding: int) -> list[tuple[Request, int]]:
    """Chunks of at most ``prefill_chunk`` tokens per request, ``token_room`` in total, in the view's
    order of waiting prompts. A prompt that cannot be admitted (no slot or KV memory for it) stops
    admission: no later prompt overtakes it. Prompts admitted before go on: they hold their slot
    and memory already. (In arrival order they all come first; an order by TTFT deadline,
    ``adaserve_plus``, can put a new prompt before started ones, and with every slot held by
    started prompts nothing was prefilled and nothing could ever be: the run stalled.)"""
    out: list[tuple[Request, int]] = []
    slots = _free_slots(view, n_decoding)
    kv_free = view.kv_free_tokens
    blocked = False
    for r in view.waiting:
        if token_room <= 0:
            break
        if blocked and r.admitted_ms is None:
            continue
        ok, slots, kv_free = _admit(view, r, slots, kv_free)
        if not ok:
            blocked = True
            continue
        chunk = min(r.remaining_prefill, token_room, view.limits.prefill_chunk)
        out.append((r, chunk))
        token_room -= chunk
    return out


def whole_prefill(view: IterationView, n_decoding: int) -> list[tuple[Request, int]]:
    """vLLM without chunked prefill: whole prompts, FIFO, up to ``max_batch_tokens`` in total (a
    single prompt longer than that still goes alone)."""
    out: list[tuple[Request, int]] = []
    slots = _free_slots(view, n_decoding)
    kv_free = view.kv_free_tokens
    room = view.limits.max_batch_tokens
    for r in view.waiting:
        ok, slots, kv_free = _admit(view, r, slots, kv_free)
        if not ok or (out and r.remaining_prefill > room):
            break
        out.append((r, r.remaining_prefill))
        room -= r.remaining_prefill
    return out
