# Copyright 2026 The qilin-med-vl Authors. Licensed under the Apache License, Version 2.0.
"""Training data: LLaVA-format records (`qilin_med_vl.records`: the format, the reader, the structural rules), their
validation against a processor and an image folder, and the collator that turns them into batches.

Image paths are relative to an image root. Multi-turn and multi-image records are allowed; each `<image>` in the
human turns stands for the next image of the record.
"""

import logging
import os
from collections import Counter
from dataclasses import dataclass, field

import torch

from ..processing.image_loading_qilin import ImageLoadingError, load_image
from ..processing.processing_qilin import IMAGE_TOKEN
from ..records import (  # noqa: F401  (re-exported: the training API names them)
    ROLE_NAMES,
    DataValidationError,
    read_records,
    record_images,
    record_structure_problems,
    record_task,
    record_to_messages,
)

logger = logging.getLogger(__name__)


@dataclass
class ValidationReport:
    errors: list[str] = field(default_factory=list)
    too_long: dict = field(default_factory=dict)  # record id (made unique with its position) -> message
    too_long_indices: set = field(default_factory=set)  # positions in the records: what to drop
    tasks: Counter = field(default_factory=Counter)
    images_per_sample: Counter = field(default_factory=Counter)
    token_lengths: list[int] = field(default_factory=list)

    def summary(self) -> str:
        lengths = sorted(self.token_lengths) or [0]
        lines = [
            f"records: {sum(self.tasks.values())}, errors: {len(self.errors)}, over-long: {len(self.too_long)}",
            "per task: " + ", ".join(f"{task} {count}" for task, count in sorted(self.tasks.items())),
            "images per sample: " + ", ".join(f"{n}: {c}" for n, c in sorted(self.images_per_sample.items())),
            f"tokens: min {lengths[0]}, median {lengths[len(lengths) // 2]}, max {lengths[-1]}",
        ]
        return "\n".join(lines)


def validate_records(records, processor, image_root: str = ".", max_length: int | None = None,
                     check_images: bool = True, chat_template: str | None = None) -> ValidationReport:
    """Check every record before a long run: speakers and empty turns, placeholder/image counts, that each image
    exists and decodes (PNG/JPEG/DICOM), and the token length after image expansion, rendered with `chat_template`
    (the one the collator will use; None: the processor's default). Never raises; see `errors`."""
    report = ValidationReport()
    limit = max_length or processor.tokenizer.model_max_length
    for index, record in enumerate(records):
        structure = record_structure_problems(record)
        if structure:
            record_id = record.get("id", f"#{index}") if isinstance(record, dict) else f"#{index}"
            report.errors.extend(f"record {record_id!r}: {problem}" for problem in structure)
            continue
        record_id = record.get("id", f"#{index}")
        problems = []
        conversations = record.get("conversations")
        if not conversations:
            problems.append("no conversations")
        else:
            for turn_index, turn in enumerate(conversations):
                if turn.get("from") not in ROLE_NAMES:
                    problems.append(f"turn {turn_index}: unknown speaker {turn.get('from')!r}")
                if not str(turn.get("value", "")).strip():
                    problems.append(f"turn {turn_index}: empty text")
            if not any(ROLE_NAMES.get(turn.get("from")) == "assistant" for turn in conversations):
                problems.append("no answer (gpt) turn to learn from")
        images = record_images(record)
        placeholders = sum(str(turn.get("value", "")).count(IMAGE_TOKEN) for turn in conversations or [])
        if placeholders != len(images):
            problems.append(f"{placeholders} {IMAGE_TOKEN} placeholder(s) but {len(images)} image(s)")
        if check_images:
            for image in images:
                try:
                    load_image(os.path.join(image_root, image))
                except (ImageLoadingError, ImportError) as error:
                    problems.append(str(error))
        if not problems:
            try:
                text = processor.apply_chat_template(record_to_messages(record), chat_template=chat_template)
                length = processor.count_tokens(text)
            except Exception as error:  # a template error names no record; this message does
                problems.append(f"cannot be rendered with the chat template ({type(error).__name__}: {error})")
                length = None
            if length is not None:
                report.token_lengths.append(length)
            if length is not None and limit is not None and length > limit:
                # Ids are not unique in real data (duplicates, 1 vs "1"): the position decides what is dropped.
                key = str(record_id) if str(record_id) not in report.too_long else f"{record_id} (record #{index})"
                report.too_long[key] = f"record {record_id!r} (#{index}): {length} tokens, over the limit of {limit}"
                report.too_long_indices.add(index)
        report.errors.extend(f"record {record_id!r}: {problem}" for problem in problems)
        report.tasks[record_task(record)] += 1
        report.images_per_sample[len(images)] += 1
    return report


def split_per_answer(record: dict) -> list[dict]:
    """One record per assistant turn: the conversation up to and including that answer, with the images its turns
    reference. Paired with `ConversationCollator(supervise="last")`, each answer is learned with the question it
    answers as the last instruction, which is what HiA reads at inference (h_last: the end of the latest question)."""
    conversations = record["conversations"]
    answer_ends = [i for i, turn in enumerate(conversations) if ROLE_NAMES.get(turn.get("from")) == "assistant"]
    if len(answer_ends) <= 1:
        return [record]
    images = record_images(record)
    pieces = []
    for end in answer_ends:
        kept = conversations[: end + 1]
        count = sum(str(turn.get("value", "")).count(IMAGE_TOKEN) for turn in kept)
        piece = {key: value for key, value in record.items() if key not in ("image", "images", "conversations")}
        pieces.append({**piece, "images": images[:count], "conversations": kept})
    return pieces


class ConversationDataset(torch.utils.data.Dataset):
    """Records of one or more data files, validated; over-long records dropped (with a warning) or refused, and
    with `require_images` records without images dropped. `chat_template` is the template the collator renders
    with (lengths are checked with it); `one_sample_per_answer` splits multi-turn records (`split_per_answer`)."""

    def __init__(self, paths, processor, image_root: str = ".", max_length: int | None = None,
                 on_overflow: str = "drop", validate: bool = True, require_images: bool = False,
                 chat_template: str | None = None, one_sample_per_answer: bool = False):
        if on_overflow not in ("drop", "error"):
            raise ValueError("on_overflow must be 'drop' or 'error'")
        paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        records = [record for path in paths for record in read_records(path)]
        self.image_root = image_root
        if validate:
            report = validate_records(records, processor, image_root, max_length, chat_template=chat_template)
            if report.errors:
                shown = "\n".join(report.errors[:20])
                more = f"\n... and {len(report.errors) - 20} more" if len(report.errors) > 20 else ""
                raise DataValidationError(f"{len(report.errors)} problem(s) in the training data:\n{shown}{more}")
            if report.too_long:
                messages = list(report.too_long.values())
                if on_overflow == "error":
                    raise DataValidationError("over-long records:\n" + "\n".join(messages[:20]))
                for message in messages:
                    logger.warning("dropping %s (never truncated inside an image)", message)
                records = [r for i, r in enumerate(records) if i not in report.too_long_indices]
            logger.info("training data:\n%s", report.summary())
        if one_sample_per_answer:
            # Before the image filter: the first answers of a record whose image comes in a later question have
            # no image.
            records = [piece for record in records for piece in split_per_answer(record)]
        if require_images:
            # Stages that train only image paths (the projector, HiA) learn nothing from text-only records, and a
            # batch of them would have no gradient at all.
            kept = [record for record in records if record_images(record)]
            if len(kept) < len(records):
                logger.warning("dropping %d record(s) without images: this stage trains only on images",
                               len(records) - len(kept))
            records = kept
        self.records = records

    def __len__(self):
        return len(self.records)

    def __getitem__(self, index):
        return self.records[index]


class ConversationCollator:
    """Turns records into a batch: `input_ids`, `attention_mask`, `labels` (assistant tokens, including each
    turn's "</s>", everything else -100), `pixel_values` and `high_res_pixel_values`.

    The labels come from the chat template's generation tags (`return_assistant_tokens_mask`), so the first
    supervised token of each sample is exactly where HiA's instruction ends (its `h_last` is the token before).
    `supervise="last"` labels only the last answer of each sample (earlier answers are context), for records split
    with `split_per_answer`. Records that are too long raise: filter them beforehand (`ConversationDataset` does).
    """

    def __init__(self, processor, image_root: str = ".", chat_template: str | None = None,
                 max_length: int | None = None, padding_side: str = "right", return_high_res: bool = True,
                 supervise: str = "all"):
        if supervise not in ("all", "last"):
            raise ValueError(f"supervise must be 'all' or 'last', not {supervise!r}")
        self.supervise = supervise
        self.processor = processor
        # Stages without HiA skip the high-resolution view: it would double the image preprocessing for nothing.
        self.return_high_res = return_high_res
        self.image_root = image_root
        self.chat_template = chat_template
        self.max_length = max_length
        self.padding_side = padding_side

    def __call__(self, records: list[dict]) -> dict:
        conversations = [record_to_messages(record) for record in records]
        images = [[os.path.join(self.image_root, image) for image in record_images(record)] for record in records]
        batch = self.processor.apply_chat_template(
            conversations,
            chat_template=self.chat_template,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
            return_tensors="pt",
            processor_kwargs={
                "images": images if any(images) else None,
                "padding_side": self.padding_side,
                "max_length": self.max_length,
                "return_high_res": self.return_high_res,
            },
        )
        assistant_mask = torch.as_tensor(batch.pop("assistant_masks")).bool()
        if self.supervise == "last":
            assistant_mask = last_span(assistant_mask)
        labels = batch["input_ids"].masked_fill(~assistant_mask, -100)
        return {**batch, "labels": labels}


def last_span(mask: torch.Tensor) -> torch.Tensor:
    """`mask` `(batch_size, length)` with only each row's last run of True values kept."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last_true = torch.where(mask, positions, -1).amax(dim=1, keepdim=True)
    # The last run starts after the last False that precedes the row's last True.
    gap = torch.where(~mask & (positions < last_true), positions, -1).amax(dim=1, keepdim=True)
    return mask & (positions > gap) & (positions <= last_true)
