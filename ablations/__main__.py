"""The ``fwpkm`` command: one table of subcommands (as litgpt's ``__main__``).

    fwpkm <subcommand> [options]      fwpkm <subcommand> --help
    python -m ablations <subcommand> [options]
"""

from __future__ import annotations

import sys
from typing import Callable, Optional

from ablations.cli import ablate, report, tune
from lit.cli import train
from lit.evaluation.cli import evaluate
from lit.runtime import tune_allocator

COMMANDS: dict[str, Callable[[list[str]], Optional[int]]] = {
    "train": train,
    "eval": evaluate,
    "ablate": ablate,
    "tune": tune,
    "report": report,
}


def usage() -> str:
    lines = ["usage: fwpkm <subcommand> [options]   (fwpkm <subcommand> --help for its options)", "",
             "Fast-weight Product Key Memory: training, evaluation, ablation grids and studies.", "", "subcommands:"]
    for name, command in COMMANDS.items():
        summary = (command.__doc__ or "").strip().splitlines()[0] if command.__doc__ else ""
        lines.append(f"  {name:<10} {summary}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"fwpkm: error: unknown subcommand {name!r}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        tune_allocator()  # before any tensor exists: freed blocks are kept for reuse (lit/runtime.py)
    except ValueError as err:
        print(f"fwpkm: error: {err}", file=sys.stderr)
        return 2
    try:
        code = COMMANDS[name](rest)
    except SystemExit as exit_:  # argparse's --help or its (one-line) error
        code = exit_.code if isinstance(exit_.code, int) or exit_.code is None else 1
    return 0 if code is None else int(code)


if __name__ == "__main__":
    sys.exit(main())
