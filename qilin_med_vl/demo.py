# Copyright 2026 The qilin-med-vl Authors. Licensed under the Apache License, Version 2.0.
"""The embedded demo model: a small Qilin-Med-VL + HiA trained on synthetic radiographs with this package's own
commands (see `experiments/synthetic_hia/`), shipped inside the package so that `qilin-med-vl demo` and
`qilin-med-vl chat` run with nothing downloaded.

It is a demonstration of the software on synthetic data, not a medical model.
"""

import json
import sys
from pathlib import Path

from .inference import generate_answers, user_message
from .loading import (  # noqa: F401  (the demo's public names)
    DEMO_EXAMPLES_DIR,
    DEMO_MODEL_DIR,
    NOT_FOR_CLINICAL_USE,
    default_adapter,
    demo_model_available,
)

COMPARATIVE_QUESTION = "第一张和第二张分别是患者治疗前后的膝关节X光片，请对比两张图片。"


def generate_report(model, processor, images, question=COMPARATIVE_QUESTION, max_new_tokens=128, stream=None):
    """Greedy answer to `question` about `images` (paths or PIL images); printed as it comes when `stream`."""
    from transformers import TextStreamer

    streamer = TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    (report,) = generate_answers(model, processor, [[user_message(images, question)]], max_new_tokens,
                                 streamer=streamer)
    return report


def shipped_ground_truth(images, question) -> str | None:
    """The generator's reference answer when `images` are shipped examples (`examples/*.jsonl`): the record with these
    images and this question, else the first record with these images (its report); None for other images."""
    names = [Path(image).name for image in images]
    if any(Path(image).resolve() != (DEMO_EXAMPLES_DIR / name).resolve() for image, name in zip(images, names)):
        return None
    records = [json.loads(line) for path in sorted(DEMO_EXAMPLES_DIR.glob("*.jsonl"))
               for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    matching = [r for r in records if r["images"] == names]
    exact = [r for r in matching if r["conversations"][0]["value"].endswith(question)]
    chosen = (exact or matching)[:1]
    return chosen[0]["conversations"][-1]["value"] if chosen else None


def run_demo(args) -> int:
    from .loading import load_model_and_processor

    model_path = args.model or str(DEMO_MODEL_DIR)
    if not args.model and not demo_model_available():
        print("The embedded demo model is not in this installation; pass --model.", file=sys.stderr)
        return 1
    adapter = None if args.no_adapter else (args.adapter or default_adapter(model_path))
    images = args.image or [str(DEMO_EXAMPLES_DIR / "before.png"), str(DEMO_EXAMPLES_DIR / "after.png")]
    from .loading import check_images

    problem = check_images(images)  # before the model load, which takes a while
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    model, processor = load_model_and_processor(model_path, adapter, args.device)
    print(NOT_FOR_CLINICAL_USE, file=sys.stderr)
    print(f"images: {', '.join(map(str, images))}\nquestion: {args.question}\nHiA: {'on' if adapter else 'off'}\n",
          file=sys.stderr)
    report = generate_report(model, processor, images, args.question, args.max_new_tokens, stream=True)
    truth = shipped_ground_truth(images, args.question)
    if truth:
        print(f"\nsynthetic ground truth (generator): {truth}", file=sys.stderr)
    if args.output:
        Path(args.output).write_text(
            f"# 对比报告 / Comparative report\n\n{NOT_FOR_CLINICAL_USE}\n\n- images: {', '.join(map(str, images))}\n"
            f"- question: {args.question}\n\n{report}\n"
            + (f"\n合成数据真值 / synthetic ground truth: {truth}\n" if truth else ""),
            encoding="utf-8",
        )
        print(f"\nreport written to {args.output}", file=sys.stderr)
    return 0


def add_cli(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="write a Chinese comparative report for a before/after pair "
                                                "(the embedded demo model and example pair by default)")
    parser.add_argument("--model", help="a model folder or repo id (default: the embedded demo model)")
    parser.add_argument("--adapter", help='adapter to load (default: "hia" when the model folder has one)')
    parser.add_argument("--no-adapter", action="store_true", help="run the base model without HiA")
    parser.add_argument("--image", action="append", help="image files (default: the shipped before/after pair)")
    parser.add_argument("--question", default=COMPARATIVE_QUESTION)
    parser.add_argument("--output", help="also write the report to this markdown file")
    parser.add_argument("--device")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.set_defaults(handler=run_demo)
