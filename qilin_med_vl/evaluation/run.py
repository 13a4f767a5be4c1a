# Copyright 2026 The qilin-med-vl Authors. Licensed under the Apache License, Version 2.0.
"""`qilin-med-vl evaluate`: batched greedy generation on a test file, predictions as JSONL, and BLEU-4 / METEOR
per task in a table shaped like the HiA paper's Table 1 (markdown + JSON)."""

import json
import os
import sys

from ..records import DataValidationError, read_records
from ..training.data import validate_records
from .predictions import generate_predictions, split_for_evaluation
from .scoring import format_markdown_table, score_by_task


def check_evaluation_records(records: list, processor, image_root: str, data_path) -> None:
    """Every record usable before the first answer is generated: a record that fails after hours of generation
    would otherwise cost the whole run. Raises `DataValidationError` naming the file and each bad record."""
    report = validate_records(records, processor, image_root, max_length=10**9)
    if report.errors:
        shown = "\n".join(report.errors[:20])
        more = f"\n... and {len(report.errors) - 20} more" if len(report.errors) > 20 else ""
        raise DataValidationError(f"{len(report.errors)} problem(s) in {data_path}:\n{shown}{more}")


def resume_predictions(path: str, records: list) -> list[dict]:
    """The rows an earlier (interrupted) run already wrote to `path`, checked against `records` in order. A last
    line cut short by a crash is dropped from the file. Raises `DataValidationError` when the file holds
    predictions for other data."""
    if not os.path.isfile(path):
        return []
    rows, good_bytes = [], 0
    with open(path, "rb") as handle:
        for line in handle:
            try:
                row = json.loads(line)
            except ValueError:
                break  # a partial last line: generated again
            if not line.endswith(b"\n") or not isinstance(row, dict):
                break
            rows.append(row)
            good_bytes += len(line)
    if os.path.getsize(path) != good_bytes:
        with open(path, "r+b") as handle:
            handle.truncate(good_bytes)
    if len(rows) > len(records):
        raise DataValidationError(f"{path} holds {len(rows)} predictions but the data has {len(records)} records: it "
                                  "belongs to other data; move it away or choose another --output-dir")
    for index, (row, record) in enumerate(zip(rows, records)):
        reference = split_for_evaluation(record)[1]
        if row.get("id") != record.get("id") or row.get("references") != [reference]:
            raise DataValidationError(
                f"{path} line {index + 1} (id {row.get('id')!r}) does not match record #{index} (id "
                f"{record.get('id')!r}) of the data: it belongs to other data; move it away or choose another "
                "--output-dir")
    return rows


def evaluate_file(model, processor, data_path, output_dir, image_root=".", batch_size=8, max_new_tokens=256,
                  tokenizer="char", name=None) -> dict:
    """Generate, score and write `predictions.jsonl`, `scores.json` and `scores.md` into `output_dir`.

    The whole file is validated first (a bad record raises `DataValidationError` naming it before anything is
    generated). Predictions are appended to `predictions.jsonl` batch by batch, so an interruption (a crash,
    Ctrl-C) keeps what was generated, and a rerun with the same data and `output_dir` resumes after it."""
    records = list(read_records(data_path))
    check_evaluation_records(records, processor, image_root, data_path)
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "predictions.jsonl")
    done = resume_predictions(path, records)
    if done:
        print(f"resuming: {len(done)} of {len(records)} predictions already in {path}", file=sys.stderr)
    with open(path, "a", encoding="utf-8") as handle:

        def write(rows):
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

        predictions = done + generate_predictions(model, processor, records[len(done):], image_root, batch_size,
                                                  max_new_tokens, on_batch=write)
    scores = score_by_task(predictions, tokenizer=tokenizer)
    scores["tokenizer"] = tokenizer
    with open(os.path.join(output_dir, "scores.json"), "w", encoding="utf-8") as handle:
        json.dump(scores, handle, ensure_ascii=False, indent=2)
    table = format_markdown_table({name or "model": scores} if name else scores)
    with open(os.path.join(output_dir, "scores.md"), "w", encoding="utf-8") as handle:
        handle.write(table + "\n")
    return scores
