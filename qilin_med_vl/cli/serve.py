# Copyright 2026 The qilin-med-vl Authors. Licensed under the Apache License, Version 2.0.
"""`qilin-med-vl serve`: the model, with HiA, behind an OpenAI-compatible API (`/v1/chat/completions`) built on
transformers' own `transformers serve` app."""

import argparse

from ..serving import QUANTIZATION_CHOICES, serve
from .model_arguments import DTYPES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", help="local folder or Hub repo id of a Qilin-Med-VL model "
                        "(default: the embedded demo model)")
    parser.add_argument("--adapter", default="auto", help='"auto" (default: the model folder\'s hia/ adapter when '
                        'present), "hia", an adapter folder or repo id, or "none" for the base model alone')
    parser.add_argument("--served-model-name", help="the name clients pass as `model` (default: MODEL as given)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default: %(default)s)")
    parser.add_argument("--device", default="auto", help='device or device_map, e.g. "cpu", "cuda:0", "auto" '
                        "(default: %(default)s)")
    parser.add_argument("--dtype", choices=DTYPES, help="weights dtype")
    # Spelled as `transformers serve` spells it, since this is its server; the other commands' --load-in-4bit/8bit.
    parser.add_argument("--quantization", choices=QUANTIZATION_CHOICES,
                        help="bitsandbytes quantization of the language model only (as in `transformers serve`)")
    parser.add_argument("--allow-missing-weights", action="store_true",
                        help="load a checkpoint whose weights do not match its config (missing ones are random)")
    parser.add_argument("--enable-cors", action="store_true", help="allow requests from any web origin")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    parser.add_argument("--continuous-batching", action="store_true",
                        help="refused: transformers' continuous batching passes no images to the model")


def run(args: argparse.Namespace) -> int:
    serve(args.model, args.adapter, host=args.host, port=args.port, log_level=args.log_level,
          served_model_name=args.served_model_name, device=args.device, dtype=args.dtype,
          quantization=args.quantization, allow_missing_weights=args.allow_missing_weights,
          continuous_batching=args.continuous_batching, enable_cors=args.enable_cors)
    return 0


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve", help="an OpenAI-compatible API server (/v1/chat/completions, images as base64 data URLs) on "
                      "transformers serve, with HiA (needs qilin-med-vl[serve])")
    add_arguments(parser)
    parser.set_defaults(handler=run)
