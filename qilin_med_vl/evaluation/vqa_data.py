# Copyright 2026 The qilin-med-vl Authors. Licensed under the Apache License, Version 2.0.
"""Medical VQA benchmarks' files -> `VQASample`s: PMC-VQA, VQA-RAD and SLAKE in their public layouts (see
`qilin_med_vl.evaluation.vqa` for the formats and rules), with every question left out listed and why."""

from __future__ import annotations

import csv
import glob
import json
import os
import re
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .vqa_scoring import CHOICE_LETTERS, VQASample, answer_tokens, normalize_answer

PMC_VQA_INSTRUCTION = "请直接回答选项字母。"

# Skip reasons of `LoadedBenchmark.skipped`.
MISSING_IMAGE = "missing_image"
NO_GOLD_ANSWER = "no_gold_answer"
UNKNOWN_ANSWER_TYPE = "unknown_answer_type"
EMPTY_ANSWER = "empty_answer"


class BenchmarkDataError(ValueError):
    """The benchmark's files are not where or what they should be."""


@dataclass
class LoadedBenchmark:
    samples: list
    skipped: list  # [{"id", "reason", "detail"}]
    source: str

    def skipped_counts(self) -> dict:
        return dict(Counter(item["reason"] for item in self.skipped).most_common())


# ----------------------------------------------------------------------------------------------------------------
# Loaders
# ----------------------------------------------------------------------------------------------------------------


def _find_image(name: str, folders: Sequence[str]) -> str | None:
    name = str(name).replace("\\", "/")
    for folder in folders:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return os.path.abspath(path)
    return None


def _image_folders(data_dir: str, image_dir: str | None, candidates: Sequence[str]) -> list[str]:
    if image_dir:
        return [image_dir]
    folders = [os.path.join(data_dir, candidate) for candidate in candidates]
    return [folder for folder in folders if os.path.isdir(folder)] + [data_dir]


def _data_file(data_dir: str, names: Sequence[str], what: str) -> str:
    if os.path.isfile(data_dir):
        return data_dir
    if not os.path.isdir(data_dir):
        raise BenchmarkDataError(f"{data_dir!r} is neither a folder nor a file")
    for name in names:
        if os.path.isfile(os.path.join(data_dir, name)):
            return os.path.join(data_dir, name)
    raise BenchmarkDataError(f"no {what} in {data_dir!r} (looked for {', '.join(names)})")


def _read_json_list(path: str) -> list:
    with open(path, encoding="utf-8-sig") as handle:
        items = json.load(handle)
    if not isinstance(items, list):
        raise BenchmarkDataError(f"{path}: expected a JSON list of questions")
    return items


def _english_only(name: str, language: str | None) -> None:
    if language not in (None, "en"):
        raise BenchmarkDataError(f"{name} is English only; --language is for SLAKE")


def _answer_kind(answer_type: Any) -> str | None:
    return {"CLOSED": "closed", "OPEN": "open"}.get(str(answer_type).strip().upper())


_CHOICE_PREFIX = re.compile(r"^\s*(?:[(（]\s*([A-D])\s*[)）]|([A-D])\s*[:：.、)）])\s*")


def _strip_choice_prefix(text: str, letter: str) -> str:
    match = _CHOICE_PREFIX.match(text)
    if match and (match.group(1) or match.group(2)) == letter:
        return text[match.end() :].strip()
    return text.strip()


def load_pmc_vqa(data_dir: str, split: str = "test", *, language: str | None = None, image_dir: str | None = None,
                 image_cache_dir: str | None = None) -> LoadedBenchmark:
    """PMC-VQA multiple-choice questions from `<data_dir>/<split>.csv` (or the CSV file `data_dir`)."""
    _english_only("PMC-VQA", language)
    path = _data_file(data_dir, [f"{split}.csv"], f"PMC-VQA {split} CSV")
    root = os.path.dirname(path) if os.path.isfile(data_dir) else data_dir
    folders = _image_folders(root, image_dir, ["images", "figures", "images_2", "figures_2"])
    samples, skipped = [], []
    with open(path, encoding="utf-8-sig", newline="") as handle:
        for row_index, raw in enumerate(csv.DictReader(handle)):
            row = {str(key).strip(): ("" if value is None else str(value)) for key, value in raw.items()}
            sample_id = (row.get("index") or row.get("") or str(row_index)).strip()
            choices = {}
            for letter in CHOICE_LETTERS:
                option = _strip_choice_prefix(row.get(f"Choice {letter}", ""), letter)
                if option:
                    choices[letter] = option
            label = row.get("Answer_label", "").strip().upper()
            answer = row.get("Answer", "").strip()
            if label not in choices:
                label = answer.upper() if answer.upper() in choices else None
            if label is None:
                matching = [letter for letter, option in choices.items()
                            if normalize_answer(option) == normalize_answer(_strip_choice_prefix(answer, letter))]
                label = matching[0] if len(matching) == 1 else None
            if label is None:
                skipped.append({"id": sample_id, "reason": NO_GOLD_ANSWER,
                                "detail": f"answer {answer!r} / label {row.get('Answer_label')!r} is no choice"})
                continue
            image = _find_image(row.get("Figure_path", "").strip(), folders)
            if image is None:
                skipped.append({"id": sample_id, "reason": MISSING_IMAGE, "detail": row.get("Figure_path", "")})
                continue
            samples.append(VQASample(id=sample_id, image=image, question=row.get("Question", "").strip(),
                                     answer=choices[label], kind="choice", choices=choices, answer_letter=label,
                                     task="PMC-VQA"))
    return LoadedBenchmark(samples, skipped, path)


def _in_split(phrase_type: Any, split: str) -> bool:
    """VQA-RAD's public file marks test questions with a `phrase_type` starting "test_"."""
    if phrase_type is None or split == "all":
        return True
    is_test = str(phrase_type).strip().lower().startswith("test")
    return is_test if split == "test" else not is_test if split == "train" else True


def _closed_open_sample(sample_id, image, question, answer, kind, language, label) -> VQASample:
    return VQASample(id=str(sample_id), image=image, question=str(question).strip(), answer=str(answer).strip(),
                     kind=kind, language=language, task=f"{label} {kind}")


def _is_hf_layout(data_dir: str) -> bool:
    if not os.path.isdir(data_dir):
        return False
    markers = ("dataset_dict.json", "state.json")
    if any(os.path.isfile(os.path.join(data_dir, marker)) for marker in markers):
        return True
    return any(glob.glob(os.path.join(data_dir, "**", pattern), recursive=True)
               for pattern in ("*.parquet", "*.arrow"))


def load_vqa_rad(data_dir: str, split: str = "test", *, language: str | None = None, image_dir: str | None = None,
                 image_cache_dir: str | None = None) -> LoadedBenchmark:
    """VQA-RAD closed and open questions (layouts in the module doc). `image_cache_dir` receives the images of the
    Hugging Face layout (default: a new temporary folder)."""
    _english_only("VQA-RAD", language)
    names = [f"{split}set.json", f"{split}.json", "VQA_RAD Dataset Public.json", "VQA_RAD_Dataset_Public.json"]
    if os.path.isdir(data_dir) and not any(os.path.isfile(os.path.join(data_dir, n)) for n in names) \
            and _is_hf_layout(data_dir):
        return _load_vqa_rad_hf(data_dir, split, image_cache_dir)
    path = _data_file(data_dir, names, "VQA-RAD JSON")
    root = os.path.dirname(path) if os.path.isfile(data_dir) else data_dir
    folders = _image_folders(root, image_dir, ["VQA_RAD Image Folder", "images", "imgs"])
    samples, skipped = [], []
    for index, item in enumerate(_read_json_list(path)):
        if not _in_split(item.get("phrase_type"), split):
            continue
        sample_id = str(item.get("qid", index))
        sample = _checked_sample(item, sample_id, folders, "en", "VQA-RAD", skipped, image_key="image_name")
        if sample is not None:
            samples.append(sample)
    if not samples and not skipped:
        raise BenchmarkDataError(f"{path}: no {split} questions (phrase_type 'test_*' marks the test split)")
    return LoadedBenchmark(samples, skipped, path)


def _checked_sample(item, sample_id, folders, language, label, skipped, image_key) -> VQASample | None:
    kind = _answer_kind(item.get("answer_type"))
    answer = "" if item.get("answer") is None else str(item["answer"]).strip()
    if kind is None:
        skipped.append({"id": sample_id, "reason": UNKNOWN_ANSWER_TYPE, "detail": repr(item.get("answer_type"))})
        return None
    if not answer_tokens(answer):
        skipped.append({"id": sample_id, "reason": EMPTY_ANSWER, "detail": repr(item.get("answer"))})
        return None
    image = _find_image(item.get(image_key, ""), folders)
    if image is None:
        skipped.append({"id": sample_id, "reason": MISSING_IMAGE, "detail": str(item.get(image_key))})
        return None
    return _closed_open_sample(sample_id, image, item.get("question", ""), answer, kind, language, label)


def _load_vqa_rad_hf(data_dir: str, split: str, image_cache_dir: str | None) -> LoadedBenchmark:
    import datasets

    from ..data.chimed_vl import load_local_dataset, save_dataset_image

    dataset = load_local_dataset(data_dir, split)
    if isinstance(dataset.features.get("image"), datasets.Image):
        dataset = dataset.cast_column("image", datasets.Image(decode=False))  # bytes as they are, no re-encoding
    image_cache_dir = image_cache_dir or tempfile.mkdtemp(prefix="qilin-vqa-rad-images-")
    samples, skipped = [], []
    for index, row in enumerate(dataset):
        sample_id = str(row.get("qid") or f"{split}-{index}")
        answer = "" if row.get("answer") is None else str(row["answer"]).strip()
        if not answer_tokens(answer):
            skipped.append({"id": sample_id, "reason": EMPTY_ANSWER, "detail": repr(row.get("answer"))})
            continue
        kind = _answer_kind(row["answer_type"]) if row.get("answer_type") else (
            "closed" if normalize_answer(answer) in ("yes", "no") else "open")
        if row.get("image") is None:
            skipped.append({"id": sample_id, "reason": MISSING_IMAGE, "detail": "no image in the row"})
            continue
        image = os.path.abspath(os.path.join(image_cache_dir, save_dataset_image(row["image"], image_cache_dir)))
        samples.append(_closed_open_sample(sample_id, image, row.get("question", ""), answer, kind, "en", "VQA-RAD"))
    return LoadedBenchmark(samples, skipped, f"{data_dir} ({split} split, datasets)")


def load_slake(data_dir: str, split: str = "test", *, language: str | None = "en", image_dir: str | None = None,
               image_cache_dir: str | None = None) -> LoadedBenchmark:
    """SLAKE closed and open questions of `language` ("en", "zh" or "all") from `<data_dir>/<split>.json`."""
    language = language or "en"
    if language not in ("en", "zh", "all"):
        raise BenchmarkDataError(f"SLAKE languages are 'en', 'zh' and 'all', not {language!r}")
    names = [f"{split}.json"] + (["validate.json", "val.json"] if split in ("validation", "validate", "val") else [])
    path = _data_file(data_dir, names, f"SLAKE {split} JSON")
    root = os.path.dirname(path) if os.path.isfile(data_dir) else data_dir
    folders = _image_folders(root, image_dir, ["imgs", "images"])
    samples, skipped = [], []
    for index, item in enumerate(_read_json_list(path)):
        item_language = str(item.get("q_lang", "en")).strip().lower()
        if language != "all" and item_language != language:
            continue
        sample_id = str(item.get("qid", index))
        sample = _checked_sample(item, sample_id, folders, item_language, f"SLAKE-{item_language}", skipped,
                                 image_key="img_name")
        if sample is not None:
            samples.append(sample)
    return LoadedBenchmark(samples, skipped, path)


@dataclass(frozen=True)
class Benchmark:
    name: str
    loader: Callable[..., LoadedBenchmark]
    instruction: str | None  # the default last prompt line


BENCHMARKS = {
    "pmc-vqa": Benchmark("PMC-VQA", load_pmc_vqa, PMC_VQA_INSTRUCTION),
    "vqa-rad": Benchmark("VQA-RAD", load_vqa_rad, None),
    "slake": Benchmark("SLAKE", load_slake, None),
}


def load_benchmark(benchmark: str, data_dir: str, split: str = "test", language: str | None = None,
                   image_dir: str | None = None, image_cache_dir: str | None = None) -> LoadedBenchmark:
    """The usable questions of a benchmark of `BENCHMARKS` and what was skipped (reason, id, detail)."""
    if benchmark not in BENCHMARKS:
        raise BenchmarkDataError(f"unknown benchmark {benchmark!r}; one of {sorted(BENCHMARKS)}")
    return BENCHMARKS[benchmark].loader(data_dir, split, language=language, image_dir=image_dir,
                                        image_cache_dir=image_cache_dir)
