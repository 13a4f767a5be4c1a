# Copyright 2026 The qilin-med-vl Authors. Licensed under the Apache License, Version 2.0.
"""Medical VQA answers -> scores: answer normalisation, closed (yes/no) accuracy, open recall, multiple-choice letter
extraction, per-task aggregation and the results table (see `qilin_med_vl.evaluation.vqa` for the rules)."""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .scoring import mean_or_nan
from .tokenization import normalize_text, tokenize_zh

CHOICE_LETTERS = "ABCD"


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
        per_task[task] = {group["metric"]: 100 * mean_or_nan(group["scores"]), "count": len(group["scores"])}
        if group["extraction"]:
            per_task[task]["extraction"] = dict(group["extraction"].most_common())
    metrics = [metric for metric in ("accuracy", "recall") if metric in by_metric]
    average = {metric: mean_or_nan([scores[metric] for scores in per_task.values() if metric in scores])
               for metric in metrics}
    overall = {metric: 100 * mean_or_nan(by_metric[metric]) for metric in metrics}
    overall["count"] = sum(len(values) for values in by_metric.values())
    return {"per_task": per_task, "average": average, "overall": overall}


