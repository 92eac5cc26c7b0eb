"""`fedpriv COMMAND ...`: the console command (installed with the package) in front of the
`python -m fedpriv.simulate | fedpriv.report | fedpriv.data` entry points.

Each command gets the rest of the command line unchanged, so `fedpriv simulate` takes every
Hydra override and flag (`-m` sweeps, `--cfg job`, `hydra.run.dir=…`) as `python -m
fedpriv.simulate` does.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import fedpriv

USAGE = """usage: fedpriv COMMAND [ARGS...]

commands:
  simulate [KEY=VALUE ...] [-m]      run one simulation, or a sweep with -m (Hydra overrides)
  report RUN_OR_SWEEP_DIR... [--out DIR]   tables and plots across finished runs
  data check data=NAME [data.KEY=VALUE ...]   read every record of a data set, train nothing
  data manifest DICOM_DIR --labels CSV --out manifest.csv   a manifest CSV from DICOM tags

`fedpriv COMMAND --help` describes each command."""


def _simulate(argv: list[str]) -> int:
    from fedpriv import simulate

    sys.argv = ["fedpriv simulate", *argv]  # Hydra parses sys.argv itself
    simulate.cli()
    return 0


def _report(argv: list[str]) -> int:
    from fedpriv import report

    return report.main(argv, prog="fedpriv report")


def _data(argv: list[str]) -> int:
    from fedpriv.data.__main__ import main as data_main

    return data_main(argv, prog="fedpriv data")


COMMANDS: dict[str, Callable[[list[str]], int]] = {"simulate": _simulate, "report": _report, "data": _data}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"fedpriv {fedpriv.__version__}")
        return 0
    command = COMMANDS.get(argv[0])
    if command is None:
        print(f"fedpriv: unknown command {argv[0]!r}; choose one of {', '.join(COMMANDS)}\n\n{USAGE}", file=sys.stderr)
        return 2
    return command(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
