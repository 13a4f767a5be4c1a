# Copyright 2026 The qilin-med-vl Authors. Licensed under the Apache License, Version 2.0.
"""ChiMed-VL, Qilin-Med-VL's training data, read into the training record format; Hugging Face `datasets` too.

The release, as published with Qilin-Med-VL (the files cannot be fetched here; what follows is the public format
these readers are written against, and the tests build small files in it):

- `ChiMed-VL-Alignment.jsonl`: stage 1 (feature alignment), about 580k image-caption pairs, one JSON object a line.
- `ChiMed-VL-Instruction.json`: stage 2 (instruction tuning), about 469k question-answer records, one JSON list.
- Both hold LLaVA records in Chinese::

      {"id": "PMC4397512_F1", "image": "PMC4397512_F1.jpg",
       "conversations": [{"from": "human", "value": "<image>\\n这张图片显示了什么？"},
                         {"from": "gpt", "value": "..."}]}

- The images (PMC figures) are not part of the release (Qilin-Med-VL issues #1, #2, #6, #8): users gather them in
  one folder, and some are always missing.

Those records already are the training format of `qilin_med_vl.training.data`, so
`qilin-med-vl train --data ChiMed-VL-Instruction.json --image-root IMAGES` reads the released files as they are,
provided every image is there: `ConversationDataset` validates every record and refuses the whole run, listing the
missing images, when one is not. `convert_chimed_vl` (`qilin-med-vl convert-chimed-vl`) streams the files (the
JSON list too, never loading it whole), keeps the usable records in a clean JSONL and reports the rest.

Tolerated variations (each counted in the report):

- speakers "human"/"user" and "gpt"/"assistant" in any case, and turns written `{"role", "content"}`; written back
  as "human"/"gpt";
- "image" (one path) or "images" (a list); a path is relative to the image root and may name a subfolder; a leading
  "./" and Windows separators are dropped; a path not found under the root whose file name is found there directly
  is rewritten to the file name (the release names files, users sometimes keep the PMC folders);
- records with images but no `<image>` placeholder get one `<image>\\n` per image before the first human turn;
- caption pairs without conversations (`{"image", "caption"}`) become `<image>\\n请描述这张图片。` + caption;
- a record without an id gets `<file name>:<line or list index>`; ids are written as strings.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ..processing.processing_qilin import IMAGE_TOKEN
from ..records import JSON_CHUNK_CHARACTERS, iter_source_records

logger = logging.getLogger(__name__)

__all__ = [
    "CAPTION_PROMPT",
    "ConversionReport",
    "RejectReason",
    "convert_chimed_vl",
    "iter_chimed_vl_records",
    "iter_source_records",
    "load_local_dataset",
    "normalize_record",
    "records_from_hf_dataset",
    "save_dataset_image",
]

#: The human turn given to caption pairs that come without a conversation (the `plain` alignment template drops
#: it anyway; the `v1` template shows it).
CAPTION_PROMPT = "请描述这张图片。"

SPEAKERS = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}
# How many rejected records of each reason the report keeps by name (the counts are always complete).
MAX_EXAMPLES_PER_REASON = 20


class RejectReason:
    """Why a record could not be used; the keys of `ConversionReport.rejected`."""

    INVALID_JSON = "invalid_json"
    NOT_A_RECORD = "not_a_record"
    NO_CONVERSATIONS = "no_conversations"
    UNKNOWN_SPEAKER = "unknown_speaker"
    EMPTY_TURN = "empty_turn"
    NO_ANSWER = "no_answer"
    PLACEHOLDER_MISMATCH = "placeholder_mismatch"
    MISSING_IMAGE = "missing_image"
    UNREADABLE_IMAGE = "unreadable_image"


@dataclass
class ConversionReport:
    """What a conversion read, kept, rejected (by reason, with the first records of each named) and repaired."""

    read: int = 0
    kept: int = 0
    rejected: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)  # reason -> [{"id", "source", "detail"}]
    repairs: Counter = field(default_factory=Counter)  # "image path -> file name", "placeholder inserted", ...
    missing_images: set = field(default_factory=set)

    def reject(self, reason: str, record_id: str, source: str, detail: str) -> None:
        self.rejected[reason] += 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < MAX_EXAMPLES_PER_REASON:
            examples.append({"id": record_id, "source": source, "detail": detail})

    def summary(self) -> str:
        lines = [f"records read: {self.read}, usable: {self.kept}, unusable: {sum(self.rejected.values())}"]
        for reason, count in self.rejected.most_common():
            first = self.examples.get(reason, [{}])[0]
            lines.append(f"  {reason}: {count} (first: {first.get('id')!r} at {first.get('source')}: "
                         f"{first.get('detail')})")
        if self.missing_images:
            lines.append(f"  distinct missing image files: {len(self.missing_images)}")
        for repair, count in self.repairs.most_common():
            lines.append(f"  repaired, {repair}: {count}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "read": self.read,
            "usable": self.kept,
            "unusable": sum(self.rejected.values()),
            "rejected": dict(self.rejected.most_common()),
            "repairs": dict(self.repairs.most_common()),
            "distinct_missing_images": len(self.missing_images),
            "examples": self.examples,
        }


# ----------------------------------------------------------------------------------------------------------------
# Reading the files, streamed
# ----------------------------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------------------------
# One record
# ----------------------------------------------------------------------------------------------------------------


def _clean_image_path(path: str) -> str:
    path = str(path).replace("\\", "/")
    while path.startswith("./"):
        path = path[2:]
    return path


def normalize_record(raw: Any, source: str, task: str | None = None, report: ConversionReport | None = None
                     ) -> tuple[dict | None, list[tuple[str, str]]]:
    """One released record as a training record, or the problems that make it unusable.

    Returns `(record, [])` or `(None, [(reason, detail), ...])`. Images are not looked at here (see
    `iter_chimed_vl_records`). Repairs are counted in `report` when given.
    """
    if not isinstance(raw, dict):
        return None, [(RejectReason.NOT_A_RECORD, f"a {type(raw).__name__}, not an object")]
    repairs = report.repairs if report is not None else Counter()
    record_id = str(raw["id"]) if raw.get("id") is not None else source
    images = raw.get("images", raw.get("image"))
    images = [] if images in (None, "", []) else [images] if isinstance(images, str) else list(images)
    images = [_clean_image_path(image) for image in images]

    conversations = raw.get("conversations")
    if not conversations and isinstance(raw.get("caption"), str):
        conversations = [{"from": "human", "value": CAPTION_PROMPT}, {"from": "gpt", "value": raw["caption"]}]
        repairs["caption pair given a conversation"] += 1
    if not isinstance(conversations, list) or not conversations:
        return None, [(RejectReason.NO_CONVERSATIONS, "no conversations")]

    problems, turns = [], []
    for turn_index, turn in enumerate(conversations):
        if not isinstance(turn, dict):
            problems.append((RejectReason.NOT_A_RECORD, f"turn {turn_index} is not an object"))
            continue
        speaker = turn.get("from", turn.get("role"))
        value = turn.get("value", turn.get("content"))
        role = SPEAKERS.get(str(speaker).strip().lower())
        if role is None:
            problems.append((RejectReason.UNKNOWN_SPEAKER, f"turn {turn_index}: speaker {speaker!r}"))
        if not isinstance(value, str) or not value.strip():
            problems.append((RejectReason.EMPTY_TURN, f"turn {turn_index}: empty text"))
        turns.append({"from": role, "value": value if isinstance(value, str) else ""})
    if not problems and not any(turn["from"] == "gpt" for turn in turns):
        problems.append((RejectReason.NO_ANSWER, "no gpt turn to learn from"))
    if problems:
        return None, problems

    placeholders = sum(turn["value"].count(IMAGE_TOKEN) for turn in turns)
    if placeholders == 0 and images:
        first_human = next((turn for turn in turns if turn["from"] == "human"), None)
        if first_human is not None:
            first_human["value"] = f"{IMAGE_TOKEN}\n" * len(images) + first_human["value"]
            placeholders = len(images)
            repairs["<image> placeholder inserted"] += 1
    if placeholders != len(images):
        return None, [(RejectReason.PLACEHOLDER_MISMATCH,
                       f"{placeholders} {IMAGE_TOKEN} placeholder(s) but {len(images)} image(s)")]

    record = {"id": record_id}
    if len(images) == 1:
        record["image"] = images[0]
    elif images:
        record["images"] = images
    record["conversations"] = turns
    if raw.get("task") or task:
        record["task"] = raw.get("task") or task
    return record, []


def _resolve_images(record: dict, image_root: str, check_images: str, report: ConversionReport
                    ) -> list[tuple[str, str]]:
    """Check (and where needed rewrite) the record's image paths in place; the problems found."""
    from ..processing.image_loading_qilin import ImageLoadingError, load_image

    key = "image" if "image" in record else "images"
    images = [record[key]] if key == "image" else list(record.get(key, []))
    problems, resolved = [], []
    for image in images:
        path = os.path.join(image_root, image)
        if not os.path.isfile(path) and os.path.basename(image) != image:
            flat = os.path.basename(image)
            if os.path.isfile(os.path.join(image_root, flat)):
                report.repairs["image path -> file name"] += 1
                image, path = flat, os.path.join(image_root, flat)
        if not os.path.isfile(path):
            report.missing_images.add(image)
            problems.append((RejectReason.MISSING_IMAGE, f"image file {image!r} not found under {image_root!r}"))
        elif check_images == "decode":
            try:
                load_image(path)
            except (ImageLoadingError, ImportError, OSError) as error:
                problems.append((RejectReason.UNREADABLE_IMAGE, str(error)))
            except Exception as error:  # a decoder bug on a corrupted file is still one bad record, not the run
                problems.append((RejectReason.UNREADABLE_IMAGE, f"{path}: {type(error).__name__}: {error}"))
        resolved.append(image)
    if not problems and images:
        record[key] = resolved[0] if key == "image" else resolved
    return problems


def iter_chimed_vl_records(paths: str | os.PathLike | Iterable, image_root: str = ".", check_images: str = "exists",
                           task: str | None = None, report: ConversionReport | None = None,
                           chunk_characters: int = JSON_CHUNK_CHARACTERS) -> Iterator[dict]:
    """Stream the usable training records of ChiMed-VL files (or any LLaVA-format `.json`/`.jsonl`).

    Args:
        paths: one file or several, read in order.
        image_root: the folder the images' paths are relative to.
        check_images: "exists" (the file is there), "decode" (it also decodes: PNG/JPEG/DICOM, slow) or "none".
        task: written as the records' `task` where they have none (for per-task evaluation tables).
        report: filled with what was read, kept, rejected and repaired.
    """
    if check_images not in ("exists", "decode", "none"):
        raise ValueError("check_images must be 'exists', 'decode' or 'none'")
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    report = report if report is not None else ConversionReport()
    for path in paths:
        for source, raw, error in iter_source_records(path, chunk_characters):
            yield from _usable(raw, source, error, image_root, check_images, task, report)


def _usable(raw, source, error, image_root, check_images, task, report) -> Iterator[dict]:
    report.read += 1
    if error is not None:
        report.reject(RejectReason.INVALID_JSON, source, source, error)
        return
    record, problems = normalize_record(raw, source, task, report)
    if record is not None and check_images != "none":
        problems = _resolve_images(record, image_root, check_images, report)
    if problems:
        record_id = record["id"] if record else (str(raw["id"]) if isinstance(raw, dict) and "id" in raw else source)
        # One reason a record: the first problem decides; the detail lists them all.
        report.reject(problems[0][0], record_id, source, "; ".join(detail for _, detail in problems))
        return
    report.kept += 1
    yield record


def convert_chimed_vl(inputs, output: str | os.PathLike, image_root: str = ".", check_images: str = "exists",
                      task: str | None = None, report_path: str | os.PathLike | None = None,
                      limit: int | None = None, records: Iterable | None = None) -> ConversionReport:
    """Write the usable records of `inputs` (ChiMed-VL files) to `output` (JSONL), streaming; return the report.

    `report_path` (default `<output>.report.json`) receives `ConversionReport.to_dict()`. `limit` stops after that
    many usable records. `records` replaces reading `inputs` by an iterable of `(source, raw_record)` pairs (as
    `records_from_hf_dataset` gives with `with_source=True`).
    """
    report = ConversionReport()
    if records is None:
        usable = iter_chimed_vl_records(inputs, image_root, check_images, task, report)
    else:
        usable = (record for source, raw in records
                  for record in _usable(raw, source, None, image_root, check_images, task, report))
    output = os.fspath(output)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    report_path = os.fspath(report_path) if report_path else output + ".report.json"
    # Both files are written next to their destination and renamed into place only when complete: a failure or
    # Ctrl-C half-way leaves an earlier output as it was, never a clean.jsonl holding some of the records.
    partial = f"{output}.partial-{os.getpid()}"
    try:
        with open(partial, "w", encoding="utf-8") as handle:
            for record in usable:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
                if limit is not None and report.kept >= limit:
                    break
        with open(report_path + ".partial", "w", encoding="utf-8") as handle:
            json.dump({"inputs": [os.fspath(p) for p in ([inputs] if isinstance(inputs, (str, os.PathLike)) else
                                                        list(inputs or []))],
                       "output": output, "image_root": image_root, **report.to_dict()},
                      handle, ensure_ascii=False, indent=2)
        os.replace(partial, output)
        os.replace(report_path + ".partial", report_path)
    finally:
        for leftover in (partial, report_path + ".partial"):
            if os.path.exists(leftover):
                os.remove(leftover)
    return report


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face datasets
# ----------------------------------------------------------------------------------------------------------------


def load_local_dataset(dataset_or_path, split: str | None = "train"):
    """A `datasets.Dataset` from a `Dataset`, a `DatasetDict` (its `split`), a folder written by `save_to_disk`, or
    a local data folder/file that `datasets.load_dataset` reads (parquet, arrow, json, csv, imagefolder...).

    Only local paths are accepted: a name that is not a file or folder here raises instead of reaching the Hub.
    To use a Hub dataset already in the cache, load it yourself (`HF_DATASETS_OFFLINE=1`) and pass the object.
    """
    import datasets

    dataset = dataset_or_path
    if isinstance(dataset, (str, os.PathLike)):
        path = os.fspath(dataset)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path!r} is not a local file or folder (datasets are never downloaded here)")
        if os.path.isdir(path) and any(os.path.isfile(os.path.join(path, name))
                                       for name in ("dataset_dict.json", "state.json")):
            dataset = datasets.load_from_disk(path)
        elif os.path.isfile(path):
            extension = path.rsplit(".", 1)[-1].lower()
            builder = {"jsonl": "json", "parquet": "parquet", "arrow": "arrow", "csv": "csv"}.get(extension, extension)
            dataset = datasets.load_dataset(builder, data_files=path)
        else:
            dataset = datasets.load_dataset(path)
    if isinstance(dataset, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if split not in dataset:
            raise KeyError(f"no split {split!r}; the dataset has {sorted(dataset)}")
        dataset = dataset[split]
    return dataset


def _image_extension(data: bytes, path: str | None) -> str:
    if path and "." in os.path.basename(path):
        return "." + os.path.basename(path).rsplit(".", 1)[-1].lower()
    if data[128:132] == b"DICM":
        return ".dcm"
    from PIL import Image

    try:
        image_format = (Image.open(io.BytesIO(data)).format or "png").lower()
    except OSError:
        return ".bin"
    return {"jpeg": ".jpg", "tiff": ".tif"}.get(image_format, "." + image_format)


def save_dataset_image(value: Any, image_dir: str | os.PathLike | None) -> str:
    """Store one image cell of a `datasets` column under `image_dir`; return its path relative to `image_dir`.

    Cells: a `PIL.Image` (a decoded `Image` feature; written as PNG), `{"bytes", "path"}` (an undecoded one; its
    bytes written as they are) or a path string (returned unchanged: the image is already a file). Files are named
    by the SHA-1 of their bytes, so an image shared by many questions is written once and a rerun writes nothing.
    """
    if isinstance(value, (str, os.PathLike)):
        return _clean_image_path(os.fspath(value))
    path = None
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if data is None:
            if not path:
                raise ValueError("an image cell with neither bytes nor path")
            return _clean_image_path(path)
    elif hasattr(value, "save"):  # a PIL image
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        data, path = buffer.getvalue(), "image.png"
    else:
        raise TypeError(f"cannot store an image cell of type {type(value).__name__}")
    if image_dir is None:
        raise ValueError("the dataset holds images, not paths: give image_dir to write them to")
    name = hashlib.sha1(data).hexdigest()[:20] + _image_extension(data, path)
    target = os.path.join(os.fspath(image_dir), name)
    if not os.path.exists(target):
        os.makedirs(os.fspath(image_dir), exist_ok=True)
        with open(target + ".partial", "wb") as handle:
            handle.write(data)
        os.replace(target + ".partial", target)
    return name


def records_from_hf_dataset(dataset_or_path, image_dir: str | os.PathLike | None = None, split: str = "train", *,
                            image_column: str = "image", conversations_column: str = "conversations",
                            id_column: str = "id", question_column: str = "question",
                            answer_column: str = "answer", caption_column: str = "caption",
                            task: str | None = None, with_source: bool = False) -> Iterator:
    """Training records from a Hugging Face `datasets` dataset (see `load_local_dataset` for what it accepts).

    A row becomes a record through `conversations_column` (LLaVA turns), else `question_column` +
    `answer_column` (one turn: `<image>\\n` + question, answer), else `caption_column` (a caption pair). Image cells
    (one or a list) are written to `image_dir` by `save_dataset_image` (required when the column holds images
    rather than paths); the records' image paths are relative to `image_dir`, the `--image-root` to train with.
    Rows without an id get `<split>-<row index>`.

    Yields raw records, not yet checked: pass them through `normalize_record`, or pass the `(source, raw)` pairs
    of `with_source=True` to `convert_chimed_vl(records=...)`, which checks them and their images as it does the
    ChiMed-VL files (`qilin-med-vl convert-chimed-vl --hf-dataset DIR` does that).
    """
    dataset = load_local_dataset(dataset_or_path, split)
    columns = set(dataset.column_names)
    if image_column in columns:
        import datasets

        feature = dataset.features[image_column]
        # Undecoded cells keep the original bytes: no decode + PNG re-encode per row.
        if isinstance(feature, datasets.Image) and feature.decode:
            dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    for index, row in enumerate(dataset):
        source = f"{split}[{index}]"
        raw = {"id": row[id_column] if row.get(id_column) is not None else f"{split}-{index}"}
        cell = row.get(image_column)
        if cell is not None:
            raw["images"] = [save_dataset_image(c, image_dir) for c in (cell if isinstance(cell, list) else [cell])]
        if row.get(conversations_column):
            raw["conversations"] = row[conversations_column]
        elif row.get(question_column) is not None and row.get(answer_column) is not None:
            raw["conversations"] = [{"from": "human", "value": str(row[question_column])},
                                    {"from": "gpt", "value": str(row[answer_column])}]
        elif row.get(caption_column) is not None:
            raw["caption"] = str(row[caption_column])
        if task or row.get("task"):
            raw["task"] = row.get("task") or task
        yield (source, raw) if with_source else raw
