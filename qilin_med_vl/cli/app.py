# Copyright 2026 The qilin-med-vl Authors. Licensed under the Apache License, Version 2.0.
"""`qilin-med-vl app`: the Gradio web demo (also what `app.py` runs on a Hub Space)."""

import os

from ..app.server import DEFAULT_MAX_NEW_TOKENS, serve
from .model_arguments import add_model_arguments


def run(args) -> int:
    return serve(
        model=args.model,
        adapter=None if args.no_adapter else (args.adapter or "auto"),
        quantization="4bit" if args.load_in_4bit else "8bit" if args.load_in_8bit else None,
        device=args.device,
        dtype=args.dtype,
        host=args.host,
        port=args.port,
        max_new_tokens=args.max_new_tokens,
        allow_model_switching=args.allow_model_switching,
    )


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "app", help="the web demo: upload images, stream answers, HiA heatmaps (needs qilin-med-vl[app])")
    add_model_arguments(parser, "local folder or Hub repo id (default: the embedded demo model)",
                        quantization_help=", needs a GPU", missing_weights=False)
    parser.add_argument("--no-adapter", action="store_true", help="serve the base model without HiA")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                        help="address to listen on (default 127.0.0.1; 0.0.0.0 to serve the network)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    parser.add_argument("--allow-model-switching", action="store_true",
                        help="let page visitors load another model (any folder the server can read, any Hub repo); "
                             "off by default: only --model is served")
    parser.set_defaults(handler=run)
