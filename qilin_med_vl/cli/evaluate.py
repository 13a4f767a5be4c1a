# Copyright 2026 The qilin-med-vl Authors. Licensed under the Apache License, Version 2.0.
"""`qilin-med-vl evaluate`: BLEU-4/METEOR per task on a test file, or a medical VQA benchmark (`--benchmark`)."""

import os
import sys

from ..evaluation.run import evaluate_file
from ..evaluation.vqa import (
    BENCHMARKS,
    PMC_VQA_INSTRUCTION,
    BenchmarkDataError,
    benchmark_tag,
    evaluate_benchmark,
    format_results_table,
)
from ..records import DataValidationError
from .model_arguments import add_model_arguments, load_from_arguments


def run_benchmark(args) -> int:
    if not args.data_dir:
        print("error: --benchmark needs --data-dir", file=sys.stderr)
        return 2
    if not os.path.exists(args.data_dir):
        print(f"error: --data-dir {args.data_dir!r} does not exist", file=sys.stderr)
        return 2
    model, processor = load_from_arguments(args, args.adapter)
    try:
        scores = evaluate_benchmark(
            model, processor, args.benchmark, args.data_dir, args.output_dir, args.split, args.language,
            args.batch_size, args.max_new_tokens, args.limit, args.instruction,
            image_dir=args.image_root if args.image_root not in (None, ".") else None, name=args.name)
    except (BenchmarkDataError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(format_results_table({args.name or "model": scores}), end="")
    tag = benchmark_tag(args.benchmark, args.split, args.language)
    print(f"wrote {os.path.join(args.output_dir, tag)}_{{predictions.jsonl,scores.json,scores.md}}")
    return 0


def run(args) -> int:
    if args.benchmark:
        return run_benchmark(args)
    if not args.data:
        print("error: evaluate needs --data (a test file) or --benchmark", file=sys.stderr)
        return 2
    if not os.path.isfile(args.data):
        print(f"error: --data {args.data}: no such file", file=sys.stderr)
        return 2
    model, processor = load_from_arguments(args, args.adapter)
    try:
        scores = evaluate_file(model, processor, args.data, args.output_dir, args.image_root, args.batch_size,
                               args.max_new_tokens, args.tokenizer, args.name)
    except DataValidationError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(format_results_table({args.name or "model": scores}), end="")
    return 0


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate", help="generate answers for a test file and score BLEU-4/METEOR per task"
    )
    add_model_arguments(parser, "local folder or Hub repo id of the model to evaluate", model_required=True,
                        adapter_default="none: the base model")
    parser.add_argument("--data", help="test JSON/JSONL in the training format (or use --benchmark)")
    parser.add_argument("--image-root", default=".")
    parser.add_argument("--output-dir", default="evaluation")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--tokenizer", choices=["char", "jieba"], default="char",
                        help="how Chinese text is split into tokens for BLEU/METEOR (default: characters)")
    parser.add_argument("--name", help="row name in the table")

    group = parser.add_argument_group("medical VQA benchmarks (instead of --data)")
    group.add_argument("--benchmark", choices=sorted(BENCHMARKS),
                       help="score PMC-VQA (multiple choice), VQA-RAD or SLAKE (closed accuracy, open recall)")
    group.add_argument("--data-dir", help="the benchmark's folder (its CSV/JSON files and images) or data file")
    group.add_argument("--split", default="test", help="split or file name: test (default), test_clean, train, ...")
    group.add_argument("--language", choices=["en", "zh", "all"],
                       help="SLAKE questions: en (default, as LLaVA-Med reports), zh, or all")
    group.add_argument("--limit", type=int, help="evaluate only the first N usable questions")
    group.add_argument("--instruction",
                       help=f"PMC-VQA: the prompt's last line (default {PMC_VQA_INSTRUCTION!r}, \"\" for none); "
                            "VQA-RAD/SLAKE: a line appended after the question (default none)")
    parser.set_defaults(handler=run)
