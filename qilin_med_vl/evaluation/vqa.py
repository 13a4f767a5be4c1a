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

import json
import os
import sys

from .scoring import combine_results, format_results_table
from .vqa_data import (
    BENCHMARKS,
    PMC_VQA_INSTRUCTION,
    BenchmarkDataError,
    LoadedBenchmark,
    load_benchmark,
    load_pmc_vqa,
    load_slake,
    load_vqa_rad,
)
from .vqa_scoring import (
    ChoiceExtraction,
    VQASample,
    answer_polarity,
    answer_tokens,
    extract_choice,
    normalize_answer,
    score_closed,
    score_open,
    score_sample,
    score_vqa,
)

__all__ = [
    "BENCHMARKS",
    "PMC_VQA_INSTRUCTION",
    "BenchmarkDataError",
    "ChoiceExtraction",
    "LoadedBenchmark",
    "VQASample",
    "answer_polarity",
    "answer_tokens",
    "benchmark_tag",
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
    "sample_to_record",
    "score_closed",
    "score_open",
    "score_sample",
    "score_vqa",
]


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
