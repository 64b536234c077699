"""The ``medimb`` subcommands: one module each (``add_parser(subparsers)`` sets ``func(args) -> int``).

The top layer of the package: commands import the library, nothing imports a command. Parsers are built
from light modules only; torch, MONAI and the library are imported when a command runs, so ``medimb
--help`` answers without them.
"""
