# Copyright 2026 The qilin-med-vl Authors. Licensed under the Apache License, Version 2.0.
"""`qilin-med-vl synth-data`: the synthetic knee radiograph benchmark (train/validation/test JSONL + PNG)."""

import os
import sys

from ..synthetic.dataset import SynthConfig, generate_dataset
from ..synthetic.render import REFERENCE_SIZE
from ..synthetic.visibility import format_visibility_report, lesion_visibility_report


def run(args) -> int:
    if args.visibility_report:
        print(format_visibility_report(lesion_visibility_report()), flush=True)
        if args.output is None:
            return 0
    if args.output is None:
        print("synth-data: --output is required (unless only --visibility-report is asked for)", file=sys.stderr)
        return 2
    config = SynthConfig(
        seed=args.seed,
        counts={"train": args.train, "validation": args.validation, "test": args.test},
        image_size=args.image_size,
        large_flake_fraction=args.large_flake_fraction,
    )
    step = max(1, (args.train + args.validation + args.test) // 20)

    def progress(split, done, count):
        if done % step == 0 or done == count:
            print(f"{split}: {done}/{count}", flush=True)

    manifest = generate_dataset(args.output, config, workers=args.workers, progress=progress)
    for split, summary in manifest["splits"].items():
        print(f"{split}: {summary['records']} records, {summary['images']} images, tasks {summary['tasks']}")
    print(f"wrote {os.path.join(args.output, 'manifest.json')}")
    return 0


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "synth-data",
        help="generate the synthetic knee radiograph benchmark (train/validation/test JSONL + PNG)",
        description="Generate the synthetic knee radiograph benchmark: reproducible splits of comparative, "
                    "description, location and disease questions over rendered radiographs with known findings.",
    )
    parser.add_argument("--output", help="output folder (the --image-root of training)")
    parser.add_argument("--seed", type=int, default=0, help="everything derives from it")
    parser.add_argument("--train", type=int, default=1000, help="training records")
    parser.add_argument("--validation", type=int, default=200, help="validation records")
    parser.add_argument("--test", type=int, default=200, help="test records")
    parser.add_argument("--image-size", type=int, default=REFERENCE_SIZE, help="square image side in pixels")
    parser.add_argument("--large-flake-fraction", type=float, default=0.25,
                        help="share of low-density flakes drawn large (16-32 px at 1024), visible at low resolution")
    parser.add_argument("--workers", type=int, default=1, help="rendering processes (output does not depend on it)")
    parser.add_argument("--visibility-report", action="store_true",
                        help="print how much contrast small flakes keep at 336 / 672 / 1024 px (about 10 s)")
    parser.set_defaults(handler=run)
