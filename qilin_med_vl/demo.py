# Copyright 2026 The qilin-med-vl Authors. Licensed under the Apache License, Version 2.0.
"""The embedded demo model: a small Qilin-Med-VL + HiA trained on synthetic radiographs with this package's own
commands (see `experiments/synthetic_hia/`), shipped inside the package so that `qilin-med-vl demo` and
`qilin-med-vl chat` run with nothing downloaded.

It is a demonstration of the software on synthetic data, not a medical model.
"""

import json
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


def report_markdown(report: str, images, question: str, truth: str | None = None) -> str:
    """The report as a markdown file: notice, images, question, answer and (shipped examples) the ground truth."""
    return (f"# 对比报告 / Comparative report\n\n{NOT_FOR_CLINICAL_USE}\n\n- images: {', '.join(map(str, images))}\n"
            f"- question: {question}\n\n{report}\n"
            + (f"\n合成数据真值 / synthetic ground truth: {truth}\n" if truth else ""))
