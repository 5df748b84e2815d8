"""The ``danet`` console entry point: one subcommand per job.

Each subcommand lives in its own module, which provides ``add_arguments(parser)`` and
``run(args) -> int``; this file only wires them together, so ``danet --help`` and
``danet <command> --help`` list every option.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> module providing add_arguments(parser) and run(args)
COMMANDS: dict[str, str] = {
    "train": "danet.train",
    "eval": "danet.evaluate",
    "predict": "danet.predict",
    "attention": "danet.visualize",
    "lr-plot": "danet.lr_policies",
}


def build_parser() -> argparse.ArgumentParser:
    """Return the ``danet`` argument parser with every subcommand registered."""
    parser = argparse.ArgumentParser(prog="danet", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        summary = (module.__doc__ or name).strip().splitlines()[0]
        cmd = sub.add_parser(name, help=summary, description=module.__doc__,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(cmd)
        cmd.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen subcommand; user errors exit with status 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except (OSError, ValueError, KeyError) as err:  # OSError: a missing file, a full or read-only disk
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"danet {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
