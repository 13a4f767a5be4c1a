# Copyright 2026 The qilin-med-vl Authors. Licensed under the Apache License, Version 2.0.
"""`qilin-med-vl train --stage {align,instruct,hia}`: one `transformers.HfArgumentParser` over the stage's
arguments, HiA's `HiAConfig` and every `TrainingArguments` flag (defaults: the stage's, then a `--config` file, then
the command line)."""

import argparse
import dataclasses
import sys

NAME = "train"
# Earlier spellings of two HiA flags, still accepted.
RENAMED_FLAGS = {"--hia-layers": "--layers", "--adapter-width": "--hidden-size"}
# HiAConfig fields that PEFT fills in itself: hidden from --help and refused on the command line.
PEFT_BOOKKEEPING = ("task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
                    "inference_mode", "target_modules", "base_hidden_size", "base_num_layers")


def build_parser(stage: str | None = None, config_file: str | None = None):
    from transformers import HfArgumentParser, TrainingArguments

    from ..modeling.configuration_hia import HiAConfig
    from ..training.train import StageArguments, training_defaults

    parser = HfArgumentParser((StageArguments, HiAConfig, TrainingArguments), prog="qilin-med-vl train",
                              description=__doc__.split("\n\n")[0])
    for action in parser._actions:
        if action.dest in PEFT_BOOKKEEPING:
            action.help = argparse.SUPPRESS
    if stage is not None:
        parser.set_defaults(**training_defaults(stage, config_file))
    return parser


def _renamed(argument: str) -> str:
    """`--hia-layers` -> `--layers` (also in the `--flag=value` form); anything else unchanged."""
    flag, equals, value = argument.partition("=")
    return RENAMED_FLAGS.get(flag, flag) + equals + value


def parse_args(argv: list[str]):
    """`(StageArguments, HiAConfig, TrainingArguments)` from the command line."""
    argv = [_renamed(argument) for argument in argv]
    given = {flag.split("=")[0].lstrip("-").replace("-", "_") for flag in argv if flag.startswith("--")}
    refused = sorted(given & set(PEFT_BOOKKEEPING))
    if refused:
        raise SystemExit(f"qilin-med-vl train: --{refused[0]} is set by PEFT itself, not on the command line")
    # The stage and the config file choose the defaults, so they are read before the full parse.
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--stage", choices=["align", "instruct", "hia"])
    early.add_argument("--config")
    known, _ = early.parse_known_args(argv)
    return build_parser(known.stage, known.config).parse_args_into_dataclasses(argv)


def main(argv: list[str]) -> int:
    from ..records import DataValidationError
    from ..training.train import train

    stage_args, hia_config, training_args = parse_args(argv)
    if stage_args.stage != "hia":
        default = type(hia_config)()
        changed = [f.name for f in dataclasses.fields(hia_config)
                   if f.name not in PEFT_BOOKKEEPING and getattr(hia_config, f.name) != getattr(default, f.name)]
        if changed:
            raise SystemExit(f"qilin-med-vl train: --{changed[0]} is a HiA option; it needs --stage hia")
    try:
        return train(stage_args, hia_config, training_args)
    except DataValidationError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


def add_parser(subparsers) -> None:
    # Listed in `qilin-med-vl --help`; `main` parses the arguments (see `qilin_med_vl.cli.main`).
    subparsers.add_parser(NAME, help="train a stage (align, instruct, hia) with the HF Trainer; --help for flags",
                          add_help=False)
