# Copyright 2026 The qilin-med-vl Authors. Licensed under the Apache License, Version 2.0.
"""The `qilin-med-vl` command line: one module per command.

Each command module has `add_parser(subparsers)`, which adds its subcommand and sets `handler` (a function of the
parsed arguments returning the exit status); `train` parses its own arguments (`train.main`), since it takes every
`TrainingArguments` flag. The modules translate arguments into calls of the package's features;
nothing in the package imports this one.
"""

import argparse
import os
import sys

from . import app, chat, convert, convert_chimed_vl, demo, evaluate, push, serve, synth_data, train

# In `--help` order.
COMMANDS = (chat, train, evaluate, demo, app, serve, synth_data, convert_chimed_vl, convert, push)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qilin-med-vl", description="Qilin-Med-VL and the HiA adapter.")
    commands = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(commands)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == train.NAME:
        # `train` takes every TrainingArguments flag: it has its own transformers.HfArgumentParser.
        return train.main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, OSError) as error:
        # The package's errors (ConversionError, ImageLoadingError, DataValidationError, ... are ValueErrors; a
        # refused or missing file is an OSError) name the file and the problem: one line, not a traceback.
        if os.environ.get("QILIN_MED_VL_TRACEBACK"):
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
