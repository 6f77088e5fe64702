"""The ``adaserve`` command. Each module in this package with a ``register(subparsers)`` function
adds one sub-command; a handler returns the exit code.

Error contract: mistakes in what the user gave (a file, a record, a flag) are raised as
``UserError`` (or, for a path the user named, ``FileNotFoundError`` / ``PermissionError`` /
``IsADirectoryError``) and printed as one ``adaserve: error: ...`` line with exit status 2; every
other exception keeps its traceback, so an internal bug never looks like a user mistake."""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import os
import pkgutil
import sys

from adaserve.core.errors import UserError  # noqa: F401  (re-exported for the sub-commands)

DESCRIPTION = ("AdaServe: LLM serving with SLO-customized speculative decoding,\n"
               "its simulator and the paper's artifact harness.")

EPILOG = """main commands:
  trace inspect FILE        validate a trace and print its statistics
  trace generate ...        write a deterministic synthetic trace
  simulate ...              replay a trace through a policy on the simulator
  profiles [show NAME]      list the built-in latency profiles, or print one
  run / serve / profile     the real engine: replay a trace, OpenAI-compatible server, profiling
  bench ...                 scheduler speed, engine speed-up, HTTP load against a server
  exp FIG MODEL             one figure's sweep (the artifact's exps/ scripts call this)
  reproduce / plot          every figure in simulation; plots from results/

`adaserve COMMAND --help` shows a command's options; README.md and docs/ describe them."""

EXIT_USAGE = 2          # what argparse uses for a bad command line, and we for bad input
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a writer whose reader went away
EXIT_INTERRUPTED = 130  # 128 + SIGINT

# Exceptions printed as one line. OSError subclasses only for paths the user named: a missing,
# unreadable or directory path is the user's to fix.
_USER_PATH_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError)


def _is_user_error(exc: BaseException) -> bool:
    """Whether ``exc`` is the user's mistake (printed short) rather than a bug (traceback)."""
    return isinstance(exc, (UserError, *_USER_PATH_ERRORS))


def _user_error_text(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        return f"{exc.filename}: {exc.strerror}"
    return str(exc)


def package_version() -> str:
    try:
        return importlib.metadata.version("adaserve")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree, not installed
        return "unknown (not installed)"


# command -> the module that registers it: a command line naming one imports only that module
# (every module imports its own dependencies; ``adaserve simulate`` has no use for the engine's or the
# harness's). tests/test_cli_misc.py checks this against what the modules register.
COMMANDS = {"bench": "bench_cmd", "exp": "exp_cmd", "plot": "plot_cmd", "profile": "engine_cmd",
            "profiles": "profile_info_cmd", "reproduce": "exp_cmd", "run": "engine_cmd",
            "serve": "serve_cmd", "simulate": "simulate_cmd", "trace": "trace_cmd", "traces": "traces_cmd"}


class _Version(argparse.Action):
    """``--version``: the installed version, looked up only when asked (importlib.metadata is slow)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog} {package_version()}")
        parser.exit()


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; with ``command`` (a key of ``COMMANDS``) only that command's."""
    parser = argparse.ArgumentParser(prog="adaserve", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action=_Version, help="show the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    if command in COMMANDS:
        names = [COMMANDS[command]]
    else:
        names = sorted(m.name for m in pkgutil.iter_modules(__path__))
    for name in names:
        module = importlib.import_module(f"{__name__}.{name}")
        if hasattr(module, "register"):
            module.register(sub)
    return parser


def _silence_stdout() -> None:
    """After a broken pipe: point stdout at /dev/null so the interpreter's final flush does not
    raise again (the recipe of the Python docs, "Note on SIGPIPE")."""
    try:
        fd = sys.stdout.fileno()
    except (OSError, ValueError):  # not backed by a file descriptor (e.g. captured in tests)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def _run(args: argparse.Namespace) -> int:
    try:
        return int(args.func(args) or 0)
    except Exception as e:
        if not _is_user_error(e):
            raise
        print(f"adaserve: error: {_user_error_text(e)}", file=sys.stderr)
        return EXIT_USAGE


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv[0] if argv else None)
    args = parser.parse_args(argv)
    try:
        code = _run(args)
        sys.stdout.flush()  # inside the try: buffered output may only fail here
        return code
    except BrokenPipeError:  # e.g. `adaserve profiles show NAME | head`
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        print("adaserve: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
