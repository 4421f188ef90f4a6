"""Argument parsing for the ``farms-lightning`` command line: every usage error is one line.

argparse prints a usage block and exits; here an error is raised instead, naming the (sub)command,
so the caller prints one line and a hint to that command's ``--help``. A misspelled option gets the
nearest real one; a PATH typed among the values of an option that takes several gets the fix.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import os
from typing import NoReturn

#: Options that take several values: a PATH typed after them is read as one of their values.
LIST_OPTIONS = ("--include", "--exclude", "--layer-types")


class UsageError(Exception):
    """A command-line usage error of the (sub)command ``prog``: one line, exit code 2."""

    def __init__(self, prog: str, message: str) -> None:
        super().__init__(message)
        self.prog = prog


class Parser(argparse.ArgumentParser):
    """argparse, but an error is raised (for the caller to print as one line), not a usage block."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(self.prog, message)


def parse_arguments(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse ``argv``; a usage error names the subcommand, suggests a near option, or says how to fix it.

    The namespace's ``parser`` is the subcommand's parser (:func:`name_subcommands` sets it).

    Raises:
        UsageError: any usage error (exit code 2).
    """
    try:
        args, extra = parser.parse_known_args(argv)
    except UsageError as error:
        moved = _path_after_list_option(argv) if "required: PATH" in str(error) else None
        if moved:
            option, path = moved
            raise UsageError(error.prog, f"PATH is missing: {path!r} was read as a value of {option}, which "
                                         f"takes several; put PATH first: {error.prog} {path} {option} ...") from None
        raise
    if extra:
        known = [s for action in args.parser._actions for s in action.option_strings]
        word = extra[0].split("=")[0]
        close = [c for c in difflib.get_close_matches(word, known, n=1) if c != word] if word.startswith("-") else []
        raise UsageError(args.parser.prog, f"unrecognized arguments: {' '.join(extra)}"
                                           + (f" (did you mean {close[0]}?)" if close else ""))
    return args


def _path_after_list_option(argv: list[str]) -> tuple[str, str] | None:
    """``(option, path)`` for the last existing path that was typed among a list option's values."""
    option, found = None, None
    for token in argv:
        if token.startswith("-"):
            option = token if token in LIST_OPTIONS else None  # "--include=GLOB" takes that one value
        elif option is not None:
            with contextlib.suppress(OSError, ValueError):
                found = (option, token) if os.path.exists(token) else found
    return found


def name_subcommands(commands: argparse._SubParsersAction) -> None:
    """Record each subcommand's parser in its defaults (``args.parser``), for its name and options,
    and list every subcommand in the usage line and in the error when none is given."""
    commands.metavar = "{" + ",".join(commands.choices) + "}"
    for sub in commands.choices.values():
        sub.set_defaults(parser=sub)
