# Copyright 2026 The qilin-med-vl Authors. Licensed under the Apache License, Version 2.0.
"""Medical VQA benchmarks: PMC-VQA, VQA-RAD and SLAKE. Loaders, prompts, answer extraction, scoring, the runner.

`qilin-med-vl evaluate --model M --benchmark {pmc-vqa,vqa-rad,slake} --data-dir DIR` generates greedily in batches
(the `evaluate` command's `generate_predictions`) and writes `<tag>_predictions.jsonl`, `<tag>_scores.json` and
`<tag>_scores.md` (tag: the benchmark, `-zh`/`-all` for SLAKE's other languages, `-<split>` for splits other than
test). Scores are in the result format of the BLEU-4/METEOR evaluation (`per_task`, `average`, `overall`, ×100),
so `format_results_table` puts both in one table.

Data layouts (the public releases; none can be fetched here, so these are the assumptions the tests' files follow):

- PMC-VQA: `<split>.csv` in `--data-dir` (`test.csv`, `test_clean.csv`, ...; `--split test_clean` for the cleaned
  subset) with columns `Figure_path, Question, Answer, Choice A, Choice B, Choice C, Choice D, Answer_label`; the
  choices read "A:CT" or "A: CT" (the prefix is stripped); the gold letter is `Answer_label`, else `Answer` when it
  is a letter, else the choice whose text equals `Answer`. Images in `images/`, `figures/` or `images_2/`.
- VQA-RAD: `VQA_RAD Dataset Public.json` (the public release, one list; test = `phrase_type` "test_freeform" or
  "test_para", train = "freeform" or "para") or per-split files `testset.json` / `trainset.json` / `<split>.json`;
  keys `qid, image_name, question, answer, answer_type ("CLOSED"/"OPEN")`; images in `VQA_RAD Image Folder/`,
  `images/` or `imgs/`. Also the Hugging Face layout of `flaviagiammarino/vqa-rad` (parquet or arrow files with
  `image, question, answer` and train/test splits, read with `datasets`): it has no answer types, so a question
  is closed when its answer is "yes" or "no" (after normalisation), open otherwise; its images are written to
  `<output-dir>/images/<tag>/`.
- SLAKE: `<split>.json` (`test.json`; `validate.json` for `--split validation`) with keys `qid, img_name, question,
  answer, answer_type ("CLOSED"/"OPEN"), q_lang ("en"/"zh")`; images under `imgs/<img_name>`. `--language` picks
  English (default, as LLaVA-Med and its successors report), Chinese, or both.

Records that cannot be used (image missing, no gold answer, unknown answer type, empty answer) are skipped and
counted in the scores file (`skipped`) rather than stopping the run. `--limit N` keeps the first N usable questions.

Prompts. VQA-RAD and SLAKE: the question alone (`<image>\\n{question}`), as LLaVA-Med evaluated. PMC-VQA::

    <image>
    {question}
    A: {choice A}
    B: {choice B}
    C: {choice C}
    D: {choice D}
    请直接回答选项字母。

`--instruction TEXT` replaces the last line for PMC-VQA (`--instruction ""` drops it) and is appended as a last
line for VQA-RAD and SLAKE (none by default).

Normalisation (`normalize_answer`, used by every rule below): NFKC (full-width letters, digits and punctuation to
half-width), lower case, every Unicode punctuation character (categories P*: . , ; : ! ? ' " ( ) [ ] - / and
。，、；：？！（）“”《》) replaced by a space except a "." between two digits, whitespace collapsed to single spaces.
Tokens (`answer_tokens`): runs of ASCII letters and digits (with decimal points) are one token each; every other
character that is not a space (each Chinese character) is one token.

Closed questions (accuracy):

- References "yes"/"no" (and Chinese "是"/"是的"/"有" and "否"/"不是"/"没有"/"无"): the prediction's polarity
  decides. It says yes when it has the token "yes" or, after removing the neutral phrases "是不是", "有没有",
  "是否", "有无", "无法" and then the negative phrases "不是", "没有", "否", "无", the character "是" or "有"; it
  says no when it has the token "no" or one of those negative phrases. Correct when it says the reference's
  polarity and not the other one: "Yes, there is." is right for yes, "yes and no", "eyes" or "normal" are not.
  English and Chinese signals both count whatever the question's language (a Chinese model may answer "是" to an
  English question). Whole tokens, not substrings: "no" is not found in "normal", nor "yes" in "eyes".
- Other closed references ("left", "CT"): correct when the reference's tokens appear in the prediction's tokens,
  contiguous and in order.

Open questions (recall): the share of reference tokens found in the prediction's tokens, each counted as often as
it occurs in both (multiset intersection over reference length); averaged over questions. Empty prediction: 0.

PMC-VQA answer extraction (accuracy; no answer and an ambiguous answer count as wrong). On the answer after NFKC,
the first rule that applies:

1. letter: the answer is one letter A-D (any case) once punctuation and spaces are removed ("b", "（Ｂ）");
2. option text: the normalised answer equals one option's normalised text ("mri." for "MRI");
3. letter: after cutting the options' texts (2 characters or more, any case) out of the answer, exactly one
   distinct standalone uppercase letter A-D is left: one not touching an ASCII letter, a digit or a hyphen
   ("答案是C。", "The answer is B", "B: Type A dissection" when B's text is "Type A dissection"; not "B12" nor
   "C-reactive"). Two or more distinct letters ("A or B"): ambiguous. An "A" followed by a space and a word of
   two or more ASCII letters other than "or", "and", "is" is the English article, not a letter ("A CT scan");
4. option text: the normalised text of exactly one option occurs in the answer as contiguous tokens (an option
   found only inside another found option, "CT" in "CT scan", does not count); several: ambiguous;
5. none.

Each prediction row records the letter read and the rule's outcome (`extraction`: "letter", "option_text",
"ambiguous" or "none"); the scores count the outcomes.
"""

from __future__ import annotations

import csv
import glob
import json
import math
import os
import re
import sys
import tempfile
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .tokenization import normalize_text, tokenize_zh

__all__ = [
    "BENCHMARKS",
    "BenchmarkDataError",
    "ChoiceExtraction",
    "LoadedBenchmark",
    "VQASample",
    "answer_polarity",
    "answer_tokens",
    "build_prompt",
    "combine_results",
    "evaluate_benchmark",
    "extract_choice",
    "format_results_table",
    "load_benchmark",
    "load_pmc_vqa",
    "load_slake",
    "load_vqa_rad",
    "normalize_answer",
    "score_closed",
    "score_open",
    "score_sample",
    "score_vqa",
]

PMC_VQA_INSTRUCTION = "请直接回答选项字母。"
CHOICE_LETTERS = "ABCD"

# Skip reasons of `LoadedBenchmark.skipped`.
MISSING_IMAGE = "missing_image"
NO_GOLD_ANSWER = "no_gold_answer"
UNKNOWN_ANSWER_TYPE = "unknown_answer_type"
EMPTY_ANSWER = "empty_answer"


class BenchmarkDataError(ValueError):
    """The benchmark's files are not where or what they should be."""


@dataclass
class VQASample:
    """One benchmark question. `kind` is "choice" (PMC-VQA), "closed" or "open"; `answer` is the reference text
    (for "choice" the correct option's text); `image` an absolute path."""

    id: str
    image: str
    question: str
    answer: str
    kind: str
    language: str = "en"
    choices: dict = field(default_factory=dict)  # letter -> option text, "choice" only
    answer_letter: str | None = None
    task: str = ""  # the results row's column: "PMC-VQA", "VQA-RAD closed", "SLAKE-zh open", ...


@dataclass
class LoadedBenchmark:
    samples: list
    skipped: list  # [{"id", "reason", "detail"}]
    source: str

    def skipped_counts(self) -> dict:
        return dict(Counter(item["reason"] for item in self.skipped).most_common())


# ----------------------------------------------------------------------------------------------------------------
# Normalisation and scoring
# ----------------------------------------------------------------------------------------------------------------


def normalize_answer(text: Any) -> str:
    """NFKC, lower case, punctuation (Unicode P*) to spaces except a "." between digits, spaces collapsed."""
    text = normalize_text("" if text is None else str(text)).lower()
    characters = []
    for index, character in enumerate(text):
        decimal_point = (character == "." and 0 < index < len(text) - 1 and text[index - 1] in "0123456789"
                         and text[index + 1] in "0123456789")
        punctuation = unicodedata.category(character).startswith("P") and not decimal_point
        characters.append(" " if punctuation else character)
    return " ".join("".join(characters).split())


def answer_tokens(text: Any) -> list[str]:
    """Tokens of the normalised text: ASCII letter/digit runs whole, every other non-space character alone."""
    return tokenize_zh(normalize_answer(text), mode="char")


YES_REFERENCES = frozenset({"yes", "是", "是的", "有"})
NO_REFERENCES = frozenset({"no", "否", "不是", "没有", "无"})
ZH_NEUTRAL_PHRASES = ("是不是", "有没有", "是否", "有无", "无法")
ZH_NEGATIVE_PHRASES = ("不是", "没有", "否", "无")
ZH_POSITIVE_CHARACTERS = ("是", "有")


def answer_polarity(text: Any) -> str | None:
    """What a free-text answer says to a yes/no question: "yes", "no", "both" or None (rule in the module doc)."""
    tokens = set(answer_tokens(text))
    says_yes, says_no = "yes" in tokens, "no" in tokens
    compact = normalize_answer(text).replace(" ", "")
    for phrase in ZH_NEUTRAL_PHRASES:
        compact = compact.replace(phrase, " ")
    for phrase in ZH_NEGATIVE_PHRASES:
        if phrase in compact:
            says_no = True
            compact = compact.replace(phrase, " ")
    says_yes = says_yes or any(character in compact for character in ZH_POSITIVE_CHARACTERS)
    if says_yes and says_no:
        return "both"
    return "yes" if says_yes else "no" if says_no else None


def _reference_polarity(reference: str) -> str | None:
    compact = normalize_answer(reference).replace(" ", "")
    return "yes" if compact in YES_REFERENCES else "no" if compact in NO_REFERENCES else None


def _contains_sequence(tokens: Sequence[str], part: Sequence[str]) -> bool:
    if not part:
        return False
    return any(list(tokens[start : start + len(part)]) == list(part) for start in range(len(tokens) - len(part) + 1))


def score_closed(prediction: Any, reference: Any) -> float:
    """1.0 or 0.0: yes/no by polarity, other references by contiguous token containment."""
    polarity = _reference_polarity(reference)
    if polarity is not None:
        return float(answer_polarity(prediction) == polarity)
    return float(_contains_sequence(answer_tokens(prediction), answer_tokens(reference)))


def score_open(prediction: Any, reference: Any) -> float:
    """Recall in [0, 1]: reference tokens found in the prediction (multiset intersection / reference length)."""
    reference_counts = Counter(answer_tokens(reference))
    if not reference_counts:
        return 0.0
    prediction_counts = Counter(answer_tokens(prediction))
    found = sum(min(count, prediction_counts[token]) for token, count in reference_counts.items())
    return found / sum(reference_counts.values())


@dataclass(frozen=True)
class ChoiceExtraction:
    """The letter read from a multiple-choice answer and how: "letter", "option_text", "ambiguous" or "none"."""

    letter: str | None
    outcome: str


# "A" followed by a word (not "or", "and", "is") is the English article.
_LETTER = r"(?:A(?!\s+(?!(?:or|and|is)\b)[A-Za-z]{2})|[B-D])"
_STANDALONE_LETTER = re.compile(r"(?<![A-Za-z0-9-])(" + _LETTER + r")(?![A-Za-z0-9]|-[A-Za-z0-9])")
# Option texts shorter than this are not cut out of an answer before its letters are read.
_MIN_ECHOED_OPTION_CHARACTERS = 2


def extract_choice(prediction: Any, choices: Mapping[str, str]) -> ChoiceExtraction:
    """The option a free-text answer picks among `choices` (letter -> text); the rules in the module doc."""
    text = normalize_text("" if prediction is None else str(prediction)).strip()
    if not text:
        return ChoiceExtraction(None, "none")
    bare = re.sub(r"[\W_]+", "", text)
    if len(bare) == 1 and bare.upper() in CHOICE_LETTERS:
        return ChoiceExtraction(bare.upper(), "letter")
    normalized = normalize_answer(text)
    option_texts = {letter: normalize_answer(option) for letter, option in choices.items()}
    equal = [letter for letter, option in option_texts.items() if option and option == normalized]
    if len(equal) == 1:
        return ChoiceExtraction(equal[0], "option_text")
    # Echoed option texts go first, so that "B: Type A dissection" reads as B alone.
    without_options = text
    for option in sorted(choices.values(), key=len, reverse=True):
        if len(option.strip()) >= _MIN_ECHOED_OPTION_CHARACTERS:
            without_options = re.sub(re.escape(normalize_text(option).strip()), " ", without_options,
                                     flags=re.IGNORECASE)
    letters = list(dict.fromkeys(_STANDALONE_LETTER.findall(without_options)))
    if len(letters) == 1:
        return ChoiceExtraction(letters[0], "letter")
    if len(letters) > 1:
        return ChoiceExtraction(None, "ambiguous")
    tokens = answer_tokens(text)
    found = {letter: tokenize_zh(option) for letter, option in option_texts.items()
             if option and _contains_sequence(tokens, tokenize_zh(option))}
    # An option found only as part of another found option ("CT" in "CT scan") is not a second answer.
    kept = [letter for letter, option in found.items()
            if not any(len(other) > len(option) and _contains_sequence(other, option) for other in found.values())]
    if len(kept) == 1:
        return ChoiceExtraction(kept[0], "option_text")
    return ChoiceExtraction(None, "ambiguous" if kept else "none")


def score_sample(sample: VQASample, prediction: Any) -> dict:
    """`{"score": float in [0, 1]}`, plus `"extraction": {"letter", "outcome"}` for a multiple-choice sample."""
    if sample.kind == "choice":
        extraction = extract_choice(prediction, sample.choices)
        return {"score": float(extraction.letter is not None and extraction.letter == sample.answer_letter),
                "extraction": {"letter": extraction.letter, "outcome": extraction.outcome}}
    if sample.kind == "closed":
        return {"score": score_closed(prediction, sample.answer)}
    if sample.kind == "open":
        return {"score": score_open(prediction, sample.answer)}
    raise ValueError(f"unknown question kind {sample.kind!r}")


METRIC_OF_KIND = {"choice": "accuracy", "closed": "accuracy", "open": "recall"}


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def score_vqa(rows: Iterable[Mapping[str, Any]]) -> dict:
    """Aggregate scored rows (`task`, `kind`, `score` in [0, 1], optional `extraction`) into the result format of
    `score_by_task`, ×100:

        {"per_task": {task: {"accuracy" | "recall", "count"[, "extraction": {outcome: count}]}},
         "average": {metric: unweighted mean over the tasks that have it},
         "overall": {"accuracy": over every choice/closed question, "recall": over every open one, "count"}}
    """
    groups: dict = {}
    by_metric: dict = {}
    for row in rows:
        metric = METRIC_OF_KIND[row["kind"]]
        group = groups.setdefault(row["task"], {"metric": metric, "scores": [], "extraction": Counter()})
        if group["metric"] != metric:
            raise ValueError(f"task {row['task']!r} mixes {group['metric']} and {metric} questions")
        group["scores"].append(float(row["score"]))
        by_metric.setdefault(metric, []).append(float(row["score"]))
        if row.get("extraction"):
            group["extraction"][row["extraction"]["outcome"]] += 1
    if not groups:
        raise ValueError("score_vqa needs at least one scored row")
    per_task = {}
    for task, group in groups.items():
        per_task[task] = {group["metric"]: 100 * _mean(group["scores"]), "count": len(group["scores"])}
        if group["extraction"]:
            per_task[task]["extraction"] = dict(group["extraction"].most_common())
    metrics = [metric for metric in ("accuracy", "recall") if metric in by_metric]
    average = {metric: _mean([scores[metric] for scores in per_task.values() if metric in scores])
               for metric in metrics}
    overall = {metric: 100 * _mean(by_metric[metric]) for metric in metrics}
    overall["count"] = sum(len(values) for values in by_metric.values())
    return {"per_task": per_task, "average": average, "overall": overall}


# ----------------------------------------------------------------------------------------------------------------
# Tables: BLEU-4/METEOR tasks and VQA tasks side by side
# ----------------------------------------------------------------------------------------------------------------

#: Metric keys a table shows, in this order within a task, and their column names.
METRIC_COLUMNS = {"bleu_4": "B4", "meteor": "M", "accuracy": "Acc", "recall": "Recall"}


def _format_number(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.1f}"


def format_results_table(result: Mapping[str, Any], task_order: Sequence[Any] | None = None,
                         name: str | None = None) -> str:
    """`scoring.format_markdown_table` generalised to any metric of `METRIC_COLUMNS`: one column per task and
    metric (`<task> B4`, `<task> M`, `<task> Acc`, `<task> Recall`), then AVG, the mean of the row's numbers. For
    BLEU-4/METEOR results it gives exactly `format_markdown_table`'s table. `result` is one result (a `per_task`
    mapping) or `{row name: result}`; see `combine_results` to put several results of one model in one row."""
    if "per_task" in result:
        rows, labelled = [(name, result)], name is not None
    else:
        rows, labelled = list(result.items()), True
    if not rows:
        raise ValueError("nothing to format")
    if task_order is None:
        task_order = []
        for _, row in rows:
            task_order.extend(task for task in row["per_task"] if task not in task_order)
    metrics_of_task = {}
    for task in task_order:
        scores = next((row["per_task"][task] for _, row in rows if task in row["per_task"]), {})
        metrics_of_task[task] = [metric for metric in METRIC_COLUMNS if metric in scores]
    header = (["Model"] if labelled else []) + [f"{task} {METRIC_COLUMNS[metric]}" for task in task_order
                                                for metric in metrics_of_task[task]] + ["AVG"]
    align = ([":---"] if labelled else []) + ["---:"] * (len(header) - (1 if labelled else 0))
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    for label, row in rows:
        cells, numbers = ([str(label)] if labelled else []), []
        for task in task_order:
            scores = row["per_task"].get(task)
            for metric in metrics_of_task[task]:
                value = None if scores is None else scores.get(metric)
                if value is not None:
                    numbers.append(value)
                cells.append(_format_number(value))
        cells.append(_format_number(_mean(numbers)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def combine_results(*results: Mapping[str, Any]) -> dict:
    """One model's results of several evaluations (BLEU-4/METEOR per task, VQA benchmarks) as one result:
    `per_task` merged (a task in two results is an error), `average` recomputed per metric over all tasks.
    `overall` is left out: corpus-level BLEU of different test sets does not add up."""
    per_task: dict = {}
    for result in results:
        for task, scores in result["per_task"].items():
            if task in per_task:
                raise ValueError(f"task {task!r} is in two results")
            per_task[task] = scores
    average = {metric: _mean([scores[metric] for scores in per_task.values() if metric in scores])
               for metric in METRIC_COLUMNS if any(metric in scores for scores in per_task.values())}
    return {"per_task": per_task, "average": average}


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


# ----------------------------------------------------------------------------------------------------------------
# Prompts and the runner
# ----------------------------------------------------------------------------------------------------------------


def build_prompt(sample: VQASample, instruction: str | None = None) -> str:
    """The user text after `<image>\\n`: the question, the options "A: ..." (multiple choice), the instruction."""
    lines = [sample.question]
    if sample.kind == "choice":
        lines += [f"{letter}: {option}" for letter, option in sample.choices.items()]
    if instruction:
        lines.append(instruction)
    return "\n".join(lines)


def sample_to_record(sample: VQASample, instruction: str | None = None) -> dict:
    """The question as a training-format record, the input of `generate_predictions`."""
    return {"id": sample.id, "image": sample.image, "task": sample.task,
            "conversations": [{"from": "human", "value": "<image>\n" + build_prompt(sample, instruction)},
                              {"from": "gpt", "value": sample.answer}]}


def benchmark_tag(benchmark: str, split: str = "test", language: str | None = None) -> str:
    """The file-name prefix of a run: "pmc-vqa", "slake-zh", "vqa-rad-train"..."""
    tag = benchmark
    if benchmark == "slake" and language not in (None, "en"):
        tag += f"-{language}"
    return tag if split == "test" else f"{tag}-{split}"


def evaluate_benchmark(model, processor, benchmark: str, data_dir: str, output_dir: str, split: str = "test",
                       language: str | None = None, batch_size: int = 8, max_new_tokens: int = 256,
                       limit: int | None = None, instruction: str | None = None, image_dir: str | None = None,
                       name: str | None = None, progress: bool = True) -> dict:
    """Load, generate, score; write `<tag>_predictions.jsonl`, `<tag>_scores.json`, `<tag>_scores.md` into
    `output_dir`; return the scores (the `score_vqa` result plus `benchmark`, `split`, `language`, `source`,
    `instruction`, `skipped`)."""
    from .predictions import generate_predictions

    tag = benchmark_tag(benchmark, split, language)
    loaded = load_benchmark(benchmark, data_dir, split, language, image_dir,
                            image_cache_dir=os.path.join(output_dir, "images", tag))
    samples = loaded.samples[:limit] if limit is not None else loaded.samples
    if not samples:
        raise BenchmarkDataError(f"no usable {benchmark} questions in {loaded.source} "
                                 f"(skipped: {loaded.skipped_counts() or 'none'})")
    if loaded.skipped:
        print(f"warning: {len(loaded.skipped)} {benchmark} question(s) skipped: {loaded.skipped_counts()}",
              file=sys.stderr)
    if instruction is None:
        instruction = BENCHMARKS[benchmark].instruction
    records = [sample_to_record(sample, instruction) for sample in samples]
    predictions = generate_predictions(model, processor, records, "", batch_size, max_new_tokens, progress)

    rows = []
    for sample, record, predicted in zip(samples, records, predictions):
        row = {"id": sample.id, "task": sample.task, "kind": sample.kind, "language": sample.language,
               "image": sample.image, "prompt": record["conversations"][0]["value"],
               "prediction": predicted["prediction"], "references": [sample.answer]}
        if sample.kind == "choice":
            row["answer_letter"] = sample.answer_letter
        row.update(score_sample(sample, predicted["prediction"]))
        rows.append(row)
    scores = score_vqa(rows)
    scores.update({"benchmark": benchmark, "split": split, "language": language or "en", "source": loaded.source,
                   "instruction": instruction, "skipped": loaded.skipped_counts(),
                   "skipped_examples": loaded.skipped[:20]})

    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, f"{tag}_predictions.jsonl"), "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    with open(os.path.join(output_dir, f"{tag}_scores.json"), "w", encoding="utf-8") as handle:
        json.dump(scores, handle, ensure_ascii=False, indent=2)
    with open(os.path.join(output_dir, f"{tag}_scores.md"), "w", encoding="utf-8") as handle:
        handle.write(format_results_table({name or "model": scores}))
    return scores
