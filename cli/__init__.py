"""The ``edgec`` command line. Thin: parse, call the library, print, set the exit code.

Subcommands import their packages only when they run, so ``edgec --help`` loads no ML
package. Errors raised on purpose print as one line; ``-v`` adds the traceback. The exit
status of an error is chosen here alone, by its type (``exit_code``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from edgec import __version__
from edgec.errors import (
    EXIT_BAD_INPUT,
    EXIT_INTERNAL,
    EXIT_SERVER,
    EXIT_TARGET_FAILED,
    BuildError,
    EdgecError,
    FetchError,
    ProtocolError,
    ServerError,
    TrustError,
    UserInputError,
)

__all__ = ["exit_code", "main"]

OUR_PACKAGES = (
    "edgec",
    "cli",
    "compiler",
    "device_profiles",
    "agent",
    "ota_server",
    "bundle_runtime",
    "sim",
    "localfleet",
)


# Each branch of the error tree and its exit status, most specific first: an error in two
# branches (none is, today) gets the first. Bad input is checked first: nothing was built.
_EXIT_CODES: tuple[tuple[type[EdgecError], int], ...] = (
    (UserInputError, EXIT_BAD_INPUT),
    (ProtocolError, EXIT_BAD_INPUT),
    (BuildError, EXIT_TARGET_FAILED),
    (TrustError, EXIT_TARGET_FAILED),
    (FetchError, EXIT_TARGET_FAILED),
    (ServerError, EXIT_SERVER),
)


def exit_code(error: BaseException) -> int:
    """The exit status for ``error``, by its branch of ``edgec.errors``' tree; anything else
    (another ``EdgecError``, a bug) is ``EXIT_INTERNAL``."""
    for kind, code in _EXIT_CODES:
        if isinstance(error, kind):
            return code
    return EXIT_INTERNAL


def _parser() -> argparse.ArgumentParser:
    from cli import agent, audit, build, demo, explain, fleet, inspect, profiles, repo, rollout, server, sim

    parser = argparse.ArgumentParser(
        prog="edgec",
        description="Compile models for edge devices, verify them, and ship them over the air.",
    )
    parser.add_argument("--version", action="version", version=f"edgec {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging; tracebacks on errors"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (build, profiles, inspect, explain, repo, fleet, server, agent, rollout, audit, demo, sim):
        module.register(commands)
    return parser


def _configure_logging(verbose: int) -> None:
    """Our warnings always; other libraries' (converters are chatty) only with ``-v``."""
    ours = max(logging.WARNING - 10 * verbose, logging.DEBUG)
    logging.basicConfig(
        level=ours if verbose else logging.ERROR, format="%(levelname)s %(name)s: %(message)s"
    )
    for package in OUR_PACKAGES:
        logging.getLogger(package).setLevel(ours)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose)
    try:
        code: int = args.run(args)
        return code
    except EdgecError as e:
        if args.verbose:
            logging.exception("edgec failed")
        print(f"edgec: error: {e}", file=sys.stderr)
        return exit_code(e)
    except KeyboardInterrupt:
        print("edgec: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.verbose:
            logging.exception("internal error")
        print(
            f"edgec: internal error: {type(e).__name__}: {e} (run with -v for the traceback)", file=sys.stderr
        )
        return EXIT_INTERNAL
