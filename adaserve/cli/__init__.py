"""The ``adaserve`` command. Each module in this package with a ``register(subparsers)`` function
adds one sub-command; a handler returns the exit code. Errors meant for the user are raised as
``UserError`` (or ``ValueError`` from input validation) and printed without a traceback."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys


from adaserve.core.errors import UserError  # noqa: F401  (re-exported for the sub-commands)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adaserve", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for mod in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{mod.name}")
        if hasattr(module, "register"):
            module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (UserError, ValueError, FileNotFoundError) as e:
        print(f"adaserve: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("adaserve: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
