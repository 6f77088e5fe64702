"""``adaserve profiles``: list the built-in latency profiles; ``adaserve profiles show NAME`` prints
one profile's tables (NAME may also be a path to a JSON profile file); ``adaserve profiles roofline
MODEL --gpu G --tp N --interconnect-gbps B`` derives one from first principles."""

from __future__ import annotations

import argparse
import math

import numpy as np

from adaserve.core.errors import UserError
from adaserve.core.profile import LatencyProfile, Table
from adaserve.sim import roofline
from adaserve.sim.artifact import FAMILIES
from adaserve.sim.profiles import get_profile, list_profiles


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("profiles", help="list built-in latency profiles, or show one",
                       description="List the built-in latency profiles; `profiles show NAME` "
                                   "prints one profile's tables (NAME may also be the path of a "
                                   "JSON profile file).")
    actions = p.add_subparsers(dest="profiles_action", metavar="ACTION")
    show = actions.add_parser("show", help="print a profile's tables")
    show.add_argument("name", help="built-in profile name or path to a JSON profile")
    _register_roofline(actions)
    p.set_defaults(func=run)


def _register_roofline(actions: argparse._SubParsersAction) -> None:
    r = actions.add_parser(
        "roofline", help="derive a latency profile from first principles (GPU datasheet, model "
                         "shape, tensor parallelism, interconnect) and compare it with the "
                         "artifact's measured table",
        description="Derive a roofline latency profile (docs/simulator.md, 'The roofline'): "
                    "each layer's compute and memory time on one GPU of a tensor-parallel group "
                    "plus two ring all-reduces over the interconnect. For the artifact's models "
                    "the step times are printed beside its measured table (4x A100-80GB NVLink "
                    "for Llama-3.1-70B, 2x for Qwen2.5-32B).")
    r.add_argument("model", help=f"model shape: {', '.join(roofline.MODELS)}, or a config.json path")
    r.add_argument("--gpu", default="a100-80gb", help=f"one of {', '.join(roofline.GPUS)} "
                                                       "(default a100-80gb)")
    r.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (default 1)")
    r.add_argument("--interconnect-gbps", type=float, metavar="GB_S",
                   help="GPU-to-GPU bandwidth per direction and GPU in GB/s (default: the GPU's "
                        "NVLink, 300 for A100, 450 for H100/H200; PCIe 4.0 x16 is about 32)")
    r.add_argument("--draft", help="draft model shape on the first --draft-tp GPUs (default none)")
    r.add_argument("--draft-tp", type=int, default=1)
    r.add_argument("--context", type=float, default=0.0,
                   help="KV context tokens of the printed steps (default 0)")
    r.add_argument("--out", help="write the profile JSON here (for `simulate --profile FILE`)")


def run(args: argparse.Namespace) -> int:
    action = getattr(args, "profiles_action", None)
    if action == "show":
        print(format_profile(get_profile(args.name)))
    elif action == "roofline":
        print(run_roofline(args))
    else:
        print(format_list())
    return 0


def run_roofline(args: argparse.Namespace) -> str:
    """Build the roofline profile the flags describe, write it with ``--out``, and report its
    steps (with the all-reduce part) beside the artifact's measured table where one exists."""
    for flag, value in (("--tp", args.tp), ("--draft-tp", args.draft_tp)):
        if value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    if not (math.isfinite(args.context) and args.context >= 0):
        raise UserError(f"--context must be a non-negative number of tokens, got {args.context}")
    model = roofline.get_model(args.model)
    gpu = roofline.with_interconnect(args.gpu, args.interconnect_gbps)
    fam = FAMILIES.get(model.name)
    link = f"-link{args.interconnect_gbps:g}" if args.interconnect_gbps is not None else ""
    prof = roofline.roofline_profile(model, args.draft, gpu, args.tp, args.draft_tp,
                                     name=f"{model.name}-{args.gpu.lower()}-tp{args.tp}{link}",
                                     limits=fam.limits() if fam else None)
    prof.family = fam.model_type if fam else None
    lines = [f"roofline  {prof.name}: {prof.hardware}",
             f"link      {gpu.nvlink_bytes_per_s / roofline.GB:g} GB/s per direction "
             f"(x {roofline.DEFAULT_EFFICIENCY.nvlink:g} NCCL efficiency, "
             f"{roofline.DEFAULT_EFFICIENCY.allreduce_latency_us:g} us per all-reduce)",
             f"KV cap    {prof.limits.kv_capacity_tokens} tokens; 1-token step "
             f"{prof.decode_baseline_ms:.1f} ms", ""]
    lines += format_roofline_steps(model, gpu, args.tp, args.context)
    if args.out:
        prof.save(args.out)
        lines.append(f"wrote {args.out}")
    return "\n".join(lines)


def format_roofline_steps(model, gpu, tp: int, context: float) -> list[str]:
    """Step ms and its all-reduce part per token count; with the artifact's measurement and the
    relative difference for the models it measured."""
    diffs = {n: (ref, err) for n, ref, _, err in
             roofline.artifact_differences(model, gpu, tp, context_tokens=context)}
    tokens = sorted({1, *roofline.COMPARE_TOKENS})
    out = [f"{'tokens':>7}{'step ms':>10}{'all-reduce':>12}"
           + (f"{'artifact ms':>13}{'difference':>12}" if diffs else "")]
    for n in tokens:
        b = roofline.step_breakdown(model, gpu, tp, n, context)
        row = f"{n:>7}{b.total_ms:>10.1f}{b.comm_ms:>12.1f}"
        if n in diffs:
            row += f"{diffs[n][0]:>13.1f}{diffs[n][1]:>+12.1%}"
        out.append(row)
    if diffs:
        errs = [abs(err) for n, (_, err) in diffs.items() if n != 1]
        out.append(f"vs the artifact's table (128-1024 tokens; it was measured on "
                   f"{FAMILIES[model.name].tp_80g}x A100-SXM4-80GB, NVLink): max |difference| "
                   f"{max(errs):.1%}, mean {sum(errs) / len(errs):.1%}; 1 token vs its baseline "
                   f"{diffs[1][1]:+.1%}")
    else:
        out.append("the artifact measured no table for this model: nothing to compare")
    return out


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
