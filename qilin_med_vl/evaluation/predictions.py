# Copyright 2026 The qilin-med-vl Authors. Licensed under the Apache License, Version 2.0.
"""Greedy predictions for evaluation records (the LLaVA conversation format), batched: shared by `evaluate` on a
record file and by the medical VQA benchmarks."""

import os

import torch
from tqdm.auto import tqdm

from ..inference import generate_answers
from ..records import record_images, record_task, record_to_messages


def split_for_evaluation(record: dict) -> tuple[list[dict], str]:
    """The conversation up to the last answer (earlier answers stay as context), and that answer as reference."""
    messages = record_to_messages(record)
    last_answer = max(i for i, message in enumerate(messages) if message["role"] == "assistant")
    return messages[:last_answer], messages[last_answer]["content"]


@torch.no_grad()
def generate_predictions(model, processor, records, image_root=".", batch_size=8, max_new_tokens=256,
                         progress=True, on_batch=None) -> list[dict]:
    """Greedy answers for `records`, batched with left padding. Returns one dict per record: `id`, `task`,
    `prediction`, `references`. `on_batch(rows)` is called with each batch's rows as soon as they exist (to write
    them before the next batch can fail)."""
    # Without an active HiA adapter the high-resolution view would be computed and ignored.
    return_high_res = bool(getattr(model, "peft_config", None))
    results = []
    for start in tqdm(range(0, len(records), batch_size), desc="generating", disable=not progress, unit="batch"):
        chunk = records[start : start + batch_size]
        prompts, references = zip(*(split_for_evaluation(record) for record in chunk))
        images = [[os.path.join(image_root, image) for image in record_images(record)] for record in chunk]
        texts = generate_answers(model, processor, list(prompts), max_new_tokens, processor_kwargs={
            "images": images if any(images) else None, "padding_side": "left", "return_high_res": return_high_res})
        rows = [{"id": record.get("id"), "task": record_task(record), "prediction": text,
                 "references": [reference]} for record, reference, text in zip(chunk, references, texts)]
        if on_batch is not None:
            on_batch(rows)
        results.extend(rows)
    return results
