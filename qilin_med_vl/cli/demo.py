# Copyright 2026 The qilin-med-vl Authors. Licensed under the Apache License, Version 2.0.
"""`qilin-med-vl demo`: a comparative report for a before/after pair, by default the embedded demo model's."""

import sys
from pathlib import Path

from ..demo import COMPARATIVE_QUESTION, generate_report, report_markdown, shipped_ground_truth
from ..loading import (
    DEMO_EXAMPLES_DIR,
    DEMO_MODEL_DIR,
    NOT_FOR_CLINICAL_USE,
    check_images,
    default_adapter,
    demo_model_available,
)
from .model_arguments import add_model_arguments, load_from_arguments


def run(args) -> int:
    if not args.model and not demo_model_available():
        print("The embedded demo model is not in this installation; pass --model.", file=sys.stderr)
        return 1
    args.model = args.model or str(DEMO_MODEL_DIR)
    adapter = None if args.no_adapter else (args.adapter or default_adapter(args.model))
    images = args.image or [str(DEMO_EXAMPLES_DIR / "before.png"), str(DEMO_EXAMPLES_DIR / "after.png")]
    problem = check_images(images)  # before the model load, which takes a while
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    model, processor = load_from_arguments(args, adapter)
    print(NOT_FOR_CLINICAL_USE, file=sys.stderr)
    print(f"images: {', '.join(map(str, images))}\nquestion: {args.question}\nHiA: {'on' if adapter else 'off'}\n",
          file=sys.stderr)
    report = generate_report(model, processor, images, args.question, args.max_new_tokens, stream=True)
    truth = shipped_ground_truth(images, args.question)
    if truth:
        print(f"\nsynthetic ground truth (generator): {truth}", file=sys.stderr)
    if args.output:
        Path(args.output).write_text(report_markdown(report, images, args.question, truth), encoding="utf-8")
        print(f"\nreport written to {args.output}", file=sys.stderr)
    return 0


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="write a Chinese comparative report for a before/after pair "
                                                "(the embedded demo model and example pair by default)")
    add_model_arguments(parser, "a model folder or repo id (default: the embedded demo model)")
    parser.add_argument("--no-adapter", action="store_true", help="run the base model without HiA")
    parser.add_argument("--image", action="append", help="image files (default: the shipped before/after pair)")
    parser.add_argument("--question", default=COMPARATIVE_QUESTION)
    parser.add_argument("--output", help="also write the report to this markdown file")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.set_defaults(handler=run)
