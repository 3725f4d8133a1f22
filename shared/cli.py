"""The ``fedabus`` command line.

Each command lives in the module that owns its work and exposes ``register(subparsers)``, which adds its
sub-parser and sets ``func`` to a callable taking the parsed arguments and returning an exit status. Modules
are imported only when the command line is built, so ``import shared`` stays cheap.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from shared import __version__

__all__ = ["build_parser", "main"]

#: Modules that contribute commands, in the order they appear in ``fedabus --help``.
COMMAND_MODULES: tuple[str, ...] = (
    "shared.data.commands",
    "shared.data.synth",
    "shared.training.commands",
    "shared.inference",
    "shared.demo",
    "shared.study.commands",
    "shared.certs",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedabus",
        description="Federated SAM-Med3D-LoRA segmentation and tri-plane classification for 3D ABUS.",
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"fedabus {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
