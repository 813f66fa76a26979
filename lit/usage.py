"""Command-line errors of every ``fwpkm`` command as one line, ``<prog>: error: <option>=<value> ...allowed...``,
exit code 2, no traceback (``--debug`` shows it).

- :class:`OneLineParser`: an ``argparse.ArgumentParser`` without prefix matching (``allow_abbrev=False``)
  whose errors are that one line (no usage block);
- :func:`int_at_least`, :func:`float_in`: argparse types that name the allowed values;
- :class:`UsageError`: raised by a command for a value only it can check (a slot of the model).
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional


class UsageError(ValueError):
    """A bad command-line value, its message already names the option, the value and what is allowed."""


class OneLineParser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        print(f"{self.prog}: error: {' '.join(message.split())}", file=sys.stderr)
        raise SystemExit(2)


def int_at_least(low: int):
    """An argparse type: an integer >= ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"invalid value {text!r}; allowed: an integer >= {low}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def float_in(low: float, high: float):
    """An argparse type: a number in [low, high]."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = None
        if value is None or not low <= value <= high:
            raise argparse.ArgumentTypeError(f"invalid value {text!r}; allowed: a number in [{low}, {high}]")
        return value

    parse.__name__ = f"number in [{low}, {high}]"
    return parse


def one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def report(prog: str, err: BaseException, code: int = 2, debug: bool = False) -> int:
    """Print ``<prog>: error: <err>`` on one line (and the traceback with ``debug``); return ``code``."""
    if debug:
        import traceback

        traceback.print_exception(err)
    print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
    return code


def debug_flag(argv: list[str]) -> tuple[list[str], bool]:
    """``argv`` without ``--debug``, and whether it was there."""
    rest = [a for a in argv if a != "--debug"]
    return rest, len(rest) != len(argv)


def option_value(option: str, value, allowed: str, why: Optional[str] = None) -> UsageError:
    return UsageError(f"{option}={value}: {why + '; ' if why else ''}allowed: {allowed}")
