"""Command line: ``python -m proxrank COMMAND [options]`` (``python -m proxrank demo --help``)."""

from __future__ import annotations

import argparse

from . import demo


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser; each command is a subparser whose ``func`` runs it."""
    parser = argparse.ArgumentParser(prog="python -m proxrank", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo_parser = commands.add_parser(
        "demo",
        help="train on handwritten digits with ProxRank, factorize, compare with dense",
        description=demo.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_arguments(demo_parser)
    demo_parser.set_defaults(func=demo.run)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
