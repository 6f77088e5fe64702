"""``adaserve profiles``: list the built-in latency profiles; ``adaserve profiles show NAME`` prints
one profile's tables (NAME may also be a path to a JSON profile file)."""

from __future__ import annotations

import argparse

import numpy as np

from adaserve.core.profile import LatencyProfile, Table
from adaserve.sim.profiles import get_profile, list_profiles


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("profiles", help="list built-in latency profiles, or show one",
                       description="List the built-in latency profiles; `profiles show NAME` "
                                   "prints one profile's tables (NAME may also be the path of a "
                                   "JSON profile file).")
    actions = p.add_subparsers(dest="profiles_action", metavar="ACTION")
    show = actions.add_parser("show", help="print a profile's tables")
    show.add_argument("name", help="built-in profile name or path to a JSON profile")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "profiles_action", None) == "show":
        print(format_profile(get_profile(args.name)))
    else:
        print(format_list())
    return 0


def format_list() -> str:
    lines = [f"{'name':<24}{'baseline ms':>12}  hardware / source"]
    for name in list_profiles():
        p = get_profile(name)
        lines.append(f"{name:<24}{p.decode_baseline_ms:>12.2f}  {p.hardware}")
        lines.append(f"{'':<38}{p.source}")
    return "\n".join(lines)


def format_profile(p: LatencyProfile) -> str:
    lim = p.limits
    lines = [f"profile   {p.name}", f"source    {p.source}", f"hardware  {p.hardware}",
             f"baseline  {p.decode_baseline_ms:.2f} ms per token",
             f"limits    {lim.max_batch_requests} requests, {lim.max_batch_tokens} tokens/batch, "
             f"prefill chunk {lim.prefill_chunk}, max seq len {lim.max_seq_len}, "
             f"KV capacity {lim.kv_capacity_tokens} tokens"]
    sections = [("verify (target forward)", p.verify), ("draft (one draft step)", p.draft)]
    sections.append(("prefill", p.prefill) if p.prefill else ("prefill", None))
    for title, table in sections:
        lines.append("")
        if table is None:
            lines.append(f"{title}: = verify table")
        else:
            lines.append(f"{title}, ms:")
            lines.extend(format_table(table))
    return "\n".join(lines)


def format_table(t: Table) -> list[str]:
    """Tokens down the rows; one column per context value (or a single ``ms`` column)."""
    if t.context_tokens is None:
        cols, grid = ["ms"], t.ms[None, :]
    else:
        cols = [f"ctx {int(c)}" for c in t.context_tokens]
        grid = np.asarray(t.ms_by_context)
    width = max(10, *(len(c) + 2 for c in cols))
    out = [f"{'tokens':>8}" + "".join(f"{c:>{width}}" for c in cols)]
    for j, n in enumerate(t.tokens):
        out.append(f"{int(n):>8}" + "".join(f"{grid[i, j]:>{width}.2f}" for i in range(len(cols))))
    return out
