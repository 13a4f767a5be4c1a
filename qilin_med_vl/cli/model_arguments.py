# Copyright 2026 The qilin-med-vl Authors. Licensed under the Apache License, Version 2.0.
"""The model-loading flags shared by the commands that load a model (chat, demo, evaluate, app)."""

import argparse

from ..loading import load_model_and_processor

DTYPES = ["float32", "bfloat16", "float16"]


def add_model_arguments(parser: argparse.ArgumentParser, model_help: str, model_required: bool = False,
                        quantization_help: str = "", missing_weights: bool = True,
                        adapter_default: str = "hia when the model folder has one") -> None:
    """`--model --adapter --device --dtype --load-in-4bit/--load-in-8bit [--allow-missing-weights]`."""
    parser.add_argument("--model", required=model_required, help=model_help)
    parser.add_argument("--adapter", help='adapter to load: "hia" (the model repo\'s hia/ subfolder) or a folder / '
                        f"repo id (default: {adapter_default})")
    parser.add_argument("--device", help='device or device_map, e.g. "cpu", "cuda:0", "auto"')
    parser.add_argument("--dtype", choices=DTYPES, help="weights dtype")
    quantization = parser.add_mutually_exclusive_group()
    quantization.add_argument("--load-in-4bit", action="store_true",
                              help=f"bitsandbytes 4-bit (language model only){quantization_help}")
    quantization.add_argument("--load-in-8bit", action="store_true",
                              help=f"bitsandbytes 8-bit (language model only){quantization_help}")
    if missing_weights:
        parser.add_argument("--allow-missing-weights", action="store_true",
                            help="load a checkpoint whose weights do not match its config (missing ones are random)")


def load_from_arguments(args, adapter):
    """(model, processor) from the flags of `add_model_arguments`, with `adapter` resolved by the caller."""
    return load_model_and_processor(args.model, adapter, args.device, args.dtype, args.load_in_4bit,
                                    args.load_in_8bit, allow_missing_weights=getattr(args, "allow_missing_weights",
                                                                                      False))
