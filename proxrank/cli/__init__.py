"""The command line, ``python -m proxrank COMMAND [options]`` (see ``demo --help``)."""

from __future__ import annotations

import argparse
from typing import Any

from . import demo


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser; each command is a subparser whose ``func`` runs it after its
    ``prepare`` has checked the options together."""
    parser = argparse.ArgumentParser(prog="python -m proxrank", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo_parser = commands.add_parser(
        "demo",
        help="train on handwritten digits with ProxRank, factorize, compare with dense",
        description=demo.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_arguments(demo_parser)
    demo_parser.set_defaults(func=demo.run, prepare=demo.prepare)
    return parser


def main(argv: list[str] | None = None) -> Any:
    """Parse ``argv``, report options that do not fit together as a usage error (exit status
    2), and run the command; returns what it returns."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.prepare(args)
    except (TypeError, ValueError) as exc:
        parser.error(f"{args.command}: {exc}")
    return args.func(args)
