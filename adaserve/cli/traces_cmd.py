"""``adaserve traces``: the original artifact's trace files.

``adaserve traces fetch [--to DIR] [--url URL | --from PATH]`` downloads the artifact repository's
archive (or reads a local folder or archive), verifies the checksums of the traces we know and
installs every ``emission_*.json`` as ``DIR/<figure>/<file>``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from adaserve.workload import artifact_traces as at


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("traces", help="fetch the original artifact's traces", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    traces_sub = p.add_subparsers(dest="traces_command", required=True, metavar="ACTION")
    f = traces_sub.add_parser(
        "fetch", help="download (or import) and verify the artifact's emission traces",
        description="Download the artifact repository's archive, or read a local copy, and "
                    "install its emission_*.json traces as DIR/<figure>/<file>. Files with a "
                    "known checksum must match it, or nothing is written; other trace files are "
                    "kept and listed as unverified.")
    f.add_argument("--to", type=Path, default=None, metavar="DIR",
                   help=f"destination folder (default {at.default_dir()}, i.e. traces/ in "
                        f"$ADASERVE_CACHE, $XDG_CACHE_HOME/adaserve or ~/.cache/adaserve)")
    src = f.add_mutually_exclusive_group()
    src.add_argument("--url", default=at.DEFAULT_URL,
                     help="archive (.tar.gz or .zip) to download (default %(default)s)")
    src.add_argument("--from", dest="source", type=Path, metavar="PATH",
                     help="a local copy instead: a folder (e.g. a clone of the artifact "
                          "repository) or a .zip / .tar.gz archive of it")
    f.add_argument("--no-progress", action="store_true", help="no download progress bar")
    f.set_defaults(func=run_fetch)


def run_fetch(args: argparse.Namespace) -> int:
    dest = args.to if args.to is not None else at.default_dir()
    if args.source is not None:
        report = at.import_local(args.source, dest)
        source = str(args.source)
    else:
        print(f"downloading {args.url}", file=sys.stderr)
        report = at.fetch(args.url, dest, show_progress=not args.no_progress)
        source = args.url
    for name in report.installed:
        state = "verified" if name in report.verified else "no checksum known: unverified"
        same = ", unchanged" if name in report.unchanged else ""
        print(f"  {name}  ({state}{same})")
    print(f"{len(report.installed)} trace file(s) from {source} in {dest}: "
          f"{len(report.verified)} verified, {len(report.unverified)} unverified")
    for note in report.notes:
        print(f"adaserve: note: {note}", file=sys.stderr)
    return 0
