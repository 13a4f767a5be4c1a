# Copyright 2026 The qilin-med-vl Authors. Licensed under the Apache License, Version 2.0.
"""`qilin-med-vl convert-chimed-vl`: ChiMed-VL files (or a local datasets folder) -> one clean training JSONL."""

import sys

from ..data.chimed_vl import convert_chimed_vl, records_from_hf_dataset


def run(args) -> int:
    if bool(args.inputs) == bool(args.hf_dataset):
        print("error: give ChiMed-VL files or --hf-dataset (one of the two)", file=sys.stderr)
        return 2
    records = None
    if args.hf_dataset:
        records = records_from_hf_dataset(args.hf_dataset, args.image_root, args.split,
                                          image_column=args.image_column, task=args.task, with_source=True)
    report = convert_chimed_vl(args.inputs or [args.hf_dataset], args.output, args.image_root, args.check_images,
                               args.task, args.report, args.limit, records=records)
    print(report.summary())
    print(f"wrote {report.kept} records to {args.output} (report: {args.report or args.output + '.report.json'})")
    print(f"train with: qilin-med-vl train --data {args.output} --image-root {args.image_root} ...")
    return 0 if report.kept else 1


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert-chimed-vl",
        help="ChiMed-VL files (or a local datasets folder) -> a clean training JSONL + a report of unusable records",
        description="Convert ChiMed-VL alignment/instruction files (or a local Hugging Face dataset) into one "
                    "training JSONL, with a report of every record left out and why.",
    )
    parser.add_argument("inputs", nargs="*", help="ChiMed-VL-Alignment.jsonl, ChiMed-VL-Instruction.json, ...")
    parser.add_argument("--image-root", default=".",
                        help="folder of the images (with --hf-dataset: where the dataset's images are written)")
    parser.add_argument("--output", required=True, help="the training JSONL to write")
    parser.add_argument("--report", help="JSON report of unusable records (default: <output>.report.json)")
    parser.add_argument("--check-images", choices=["exists", "decode", "none"], default="exists",
                        help="keep records whose images exist (default), also decode (slow), or do not look")
    parser.add_argument("--task", help="task name written into records that have none")
    parser.add_argument("--limit", type=int, help="stop after this many usable records")
    parser.add_argument("--hf-dataset", help="a local Hugging Face dataset folder instead of ChiMed-VL files")
    parser.add_argument("--split", default="train", help="split of --hf-dataset")
    parser.add_argument("--image-column", default="image", help="image column of --hf-dataset")
    parser.set_defaults(handler=run)
