"""The one error type Atlas raises for people, and the CLI wrapper that prints it.

Every error meant for a user (a bad config key, a missing corpus, a corrupt checkpoint) is an
`AtlasError` whose message is one line naming the file or key, what was wrong and what to do.
Entry points wrap their main in `run_cli`, which prints that line and exits non-zero with no
traceback. Anything else is a bug and keeps its traceback. Under `run_cli` an argparse mistake (an
unknown flag or subcommand, a value of the wrong type) is such a line too, not argparse's usage
block: every parser of the entry point raises `AtlasError` from its `error()`.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Callable


class AtlasError(Exception):
    """A problem with the user's input or files, explained in one line."""


class ConfigError(AtlasError):
    pass


class DataError(AtlasError):
    pass


class CheckpointError(AtlasError):
    pass


EXIT_USER_ERROR = 2


def _argparse_error(self: argparse.ArgumentParser, message: str):
    raise AtlasError(f"{self.prog}: {message}; see {self.prog} --help")


@contextlib.contextmanager
def _argparse_errors_as_lines():
    """argparse's `error()` (usage block + message + exit 2) -> an AtlasError naming the parser and
    the argument, for every parser made while it is active (subcommand parsers included)."""
    saved = argparse.ArgumentParser.error
    argparse.ArgumentParser.error = _argparse_error
    try:
        yield
    finally:
        argparse.ArgumentParser.error = saved


def run_cli(main: Callable[[], int | None]) -> None:
    """Run an entry point: AtlasError -> one line on stderr and exit 2; Ctrl-C -> exit 130."""
    try:
        with _argparse_errors_as_lines():
            code = main()
    except AtlasError as e:
        msg = " ".join(str(e).split("\n"))
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # stdout closed early (`| head`): stop quietly, as other Unix tools do
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)
    sys.exit(code or 0)
