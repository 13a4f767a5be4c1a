"""Medical VQA benchmarks: loaders on files in each public format, the documented prompt and answer rules against
hand-computed scores, and the runner end to end on a tiny model (its answers are gibberish: shape and format only)."""

import csv
import json

import pytest

from qilin_med_vl.cli import main as cli
from qilin_med_vl.evaluation.scoring import format_markdown_table
from qilin_med_vl.evaluation.vqa import (
    BenchmarkDataError,
    VQASample,
    answer_polarity,
    build_prompt,
    combine_results,
    extract_choice,
    format_results_table,
    load_benchmark,
    normalize_answer,
    score_closed,
    score_open,
    score_sample,
    score_vqa,
)
from qilin_med_vl.testing import random_image, tiny_model, tiny_processor

PMC_COLUMNS = ["index", "Figure_path", "Question", "Answer", "Choice A", "Choice B", "Choice C", "Choice D",
               "Answer_label"]
PMC_ROWS = [
    ["0", "PMC1_F1.jpg", "What imaging modality is shown?", "MRI", " A:CT scan ", "B:MRI", "C:X-ray",
     "D:Ultrasound", "B"],
    ["1", "PMC2_F1.jpg", "Which organ, if any, is affected?", "Liver", "A: Lung", "B: Liver", "C: Kidney",
     "D: Heart", "B"],
    ["2", "PMC9_F9.jpg", "Image missing?", "Lung", "A:Lung", "B:Liver", "C:Kidney", "D:Heart", "A"],
    ["3", "PMC1_F1.jpg", "Which vitamin is deficient?", "Vitamin D", "A:Vitamin A", "B:Vitamin B12",
     "C:Vitamin C", "D:Vitamin D", ""],  # no label: the answer text names the option
    ["4", "PMC2_F1.jpg", "No gold answer?", "Spleen", "A:Lung", "B:Liver", "C:Kidney", "D:Heart", "E"],
]
VQA_RAD = [
    {"qid": 1, "image_name": "synpic1.jpg", "question": "Is there a mass?", "answer": "Yes",
     "answer_type": "CLOSED", "question_type": "PRES", "phrase_type": "test_freeform"},
    {"qid": 2, "image_name": "synpic1.jpg", "question": "Where is the lesion?", "answer": "Left lower lung",
     "answer_type": "OPEN", "question_type": "POS", "phrase_type": "test_para"},
    {"qid": 3, "image_name": "synpic2.jpg", "question": "Left or right?", "answer": "right",
     "answer_type": "CLOSED ", "question_type": "POS", "phrase_type": "test_freeform"},
    {"qid": 4, "image_name": "synpic404.jpg", "question": "Missing image?", "answer": "no",
     "answer_type": "CLOSED", "question_type": "PRES", "phrase_type": "test_freeform"},
    {"qid": 5, "image_name": "synpic2.jpg", "question": "Odd type?", "answer": "x", "answer_type": "OTHER",
     "question_type": "PRES", "phrase_type": "test_para"},
    {"qid": 6, "image_name": "synpic2.jpg", "question": "Is it normal?", "answer": 0, "answer_type": "OPEN",
     "question_type": "ABN", "phrase_type": "freeform"},
    {"qid": 7, "image_name": "synpic1.jpg", "question": "Which organ?", "answer": "lung", "answer_type": "OPEN",
     "question_type": "ORGAN", "phrase_type": "para"},
]
SLAKE = [
    {"img_id": 1, "img_name": "xmlab1/source.jpg", "question": "Does the picture contain lung?", "answer": "Yes",
     "answer_type": "CLOSED", "q_lang": "en", "location": "Lung", "modality": "CT", "content_type": "Organ",
     "base_type": "vqa", "qid": 11},
    {"img_id": 1, "img_name": "xmlab1/source.jpg", "question": "Which organs appear?", "answer": "Lung, Heart",
     "answer_type": "OPEN", "q_lang": "en", "location": "Chest", "modality": "CT", "content_type": "Organ",
     "base_type": "vqa", "qid": 12},
    {"img_id": 1, "img_name": "xmlab1/source.jpg", "question": "图片中包含肺吗？", "answer": "是",
     "answer_type": "CLOSED", "q_lang": "zh", "location": "肺", "modality": "CT", "content_type": "器官",
     "base_type": "vqa", "qid": 13},
    {"img_id": 2, "img_name": "xmlab2/source.jpg", "question": "病变在哪里？", "answer": "右肺",
     "answer_type": "OPEN", "q_lang": "zh", "location": "肺", "modality": "MRI", "content_type": "位置",
     "base_type": "vqa", "qid": 14},
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("benchmarks")
    pmc = root / "pmc-vqa"
    (pmc / "images").mkdir(parents=True)
    random_image(0).save(pmc / "images" / "PMC1_F1.jpg")
    random_image(1).save(pmc / "images" / "PMC2_F1.jpg")
    with open(pmc / "test.csv", "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(PMC_COLUMNS)
        writer.writerows(PMC_ROWS)
    rad = root / "vqa-rad"
    (rad / "VQA_RAD Image Folder").mkdir(parents=True)
    random_image(2).save(rad / "VQA_RAD Image Folder" / "synpic1.jpg")
    random_image(3).save(rad / "VQA_RAD Image Folder" / "synpic2.jpg")
    (rad / "VQA_RAD Dataset Public.json").write_text(json.dumps(VQA_RAD), encoding="utf-8")
    slake = root / "slake"
    for folder in ("xmlab1", "xmlab2"):
        (slake / "imgs" / folder).mkdir(parents=True)
    random_image(4).save(slake / "imgs" / "xmlab1" / "source.jpg")
    random_image(5).save(slake / "imgs" / "xmlab2" / "source.jpg")
    (slake / "test.json").write_text(json.dumps(SLAKE, ensure_ascii=False), encoding="utf-8")
    model_dir = root / "model"
    tiny_model().save_pretrained(model_dir)
    tiny_processor().save_pretrained(model_dir)
    return root


# ---------------------------------------------------------------------------------------------------------------
# Loaders
# ---------------------------------------------------------------------------------------------------------------


def test_pmc_vqa_strips_choice_prefixes_finds_gold_letters_and_reports_skips(data):
    loaded = load_benchmark("pmc-vqa", str(data / "pmc-vqa"))
    assert [s.id for s in loaded.samples] == ["0", "1", "3"]
    first = loaded.samples[0]
    assert first.choices == {"A": "CT scan", "B": "MRI", "C": "X-ray", "D": "Ultrasound"}
    assert (first.answer_letter, first.answer, first.kind, first.task) == ("B", "MRI", "choice", "PMC-VQA")
    assert loaded.samples[2].answer_letter == "D"  # from the answer text, the label being empty
    assert loaded.skipped_counts() == {"missing_image": 1, "no_gold_answer": 1}
    assert first.image.endswith("images/PMC1_F1.jpg")


def test_pmc_vqa_prompt_lists_the_options_and_asks_for_the_letter_in_chinese(data):
    sample = load_benchmark("pmc-vqa", str(data / "pmc-vqa")).samples[0]
    assert build_prompt(sample, "请直接回答选项字母。") == (
        "What imaging modality is shown?\nA: CT scan\nB: MRI\nC: X-ray\nD: Ultrasound\n请直接回答选项字母。")
    open_sample = VQASample("x", "i.png", "Is there a mass?", "yes", "closed")
    assert build_prompt(open_sample) == "Is there a mass?"


def test_vqa_rad_public_file_splits_by_phrase_type(data):
    test = load_benchmark("vqa-rad", str(data / "vqa-rad"))
    assert [(s.id, s.kind, s.task) for s in test.samples] == [
        ("1", "closed", "VQA-RAD closed"), ("2", "open", "VQA-RAD open"), ("3", "closed", "VQA-RAD closed")]
    assert test.skipped_counts() == {"missing_image": 1, "unknown_answer_type": 1}
    train = load_benchmark("vqa-rad", str(data / "vqa-rad"), split="train")
    assert [(s.id, s.answer) for s in train.samples] == [("6", "0"), ("7", "lung")]
    assert len(load_benchmark("vqa-rad", str(data / "vqa-rad"), split="all").samples) == 5
    with pytest.raises(BenchmarkDataError, match="English only"):
        load_benchmark("vqa-rad", str(data / "vqa-rad"), language="zh")


def test_slake_picks_languages(data):
    english = load_benchmark("slake", str(data / "slake"))
    assert [(s.id, s.kind, s.task) for s in english.samples] == [("11", "closed", "SLAKE-en closed"),
                                                                ("12", "open", "SLAKE-en open")]
    chinese = load_benchmark("slake", str(data / "slake"), language="zh")
    assert [(s.answer, s.language, s.task) for s in chinese.samples] == [("是", "zh", "SLAKE-zh closed"),
                                                                       ("右肺", "zh", "SLAKE-zh open")]
    assert len(load_benchmark("slake", str(data / "slake"), language="all").samples) == 4
    assert chinese.samples[1].image.endswith("imgs/xmlab2/source.jpg")


def test_vqa_rad_hugging_face_layout_reads_parquet_and_types_questions_by_answer(data, tmp_path, monkeypatch):
    import datasets
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    folder = tmp_path / "vqa-rad-hf" / "data"
    folder.mkdir(parents=True)
    features = datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                                  "answer": datasets.Value("string")})
    datasets.Dataset.from_dict({"image": [random_image(0), random_image(1), random_image(0)],
                                "question": ["is there a mass?", "where is the lesion?", "is it normal?"],
                                "answer": ["Yes", "left lung", "no"]},
                               features=features).to_parquet(str(folder / "test-00000-of-00001.parquet"))
    loaded = load_benchmark("vqa-rad", str(tmp_path / "vqa-rad-hf"), image_cache_dir=str(tmp_path / "imgs"))
    assert [(s.id, s.kind, s.answer) for s in loaded.samples] == [
        ("test-0", "closed", "Yes"), ("test-1", "open", "left lung"), ("test-2", "closed", "no")]
    assert loaded.samples[0].image == loaded.samples[2].image != loaded.samples[1].image
    assert len(list((tmp_path / "imgs").iterdir())) == 2


def test_a_folder_without_benchmark_files_is_a_clear_error(tmp_path):
    with pytest.raises(BenchmarkDataError, match="no SLAKE test JSON"):
        load_benchmark("slake", str(tmp_path))
    with pytest.raises(BenchmarkDataError, match="unknown benchmark"):
        load_benchmark("mimic", str(tmp_path))


# ---------------------------------------------------------------------------------------------------------------
# Answer rules, against hand-worked answers
# ---------------------------------------------------------------------------------------------------------------

CHOICES = {"A": "CT scan", "B": "MRI", "C": "C-reactive protein", "D": "Hepatitis B"}


@pytest.mark.parametrize("prediction, letter, outcome", [
    ("B", "B", "letter"),
    ("b", "B", "letter"),
    ("（Ｂ）", "B", "letter"),  # full width, brackets
    ("答案是C。", "C", "letter"),
    ("The answer is D.", "D", "letter"),
    ("B: MRI", "B", "letter"),
    ("D: Hepatitis B", "D", "letter"),  # the echoed option's own "B" is not a second letter
    ("mri.", "B", "option_text"),
    ("C-reactive protein", "C", "option_text"),  # not the letter C
    ("A CT scan of the chest", "A", "option_text"),  # the article "A" is no letter; the option text decides
    ("It shows hepatitis b", "D", "option_text"),
    ("A or B", None, "ambiguous"),  # two letters
    ("选A，也可能是C", None, "ambiguous"),
    ("Both MRI and CT scan", None, "ambiguous"),  # two option texts
    ("", None, "none"),  # empty
    ("   ", None, "none"),
    (None, None, "none"),
    ("我不知道", None, "none"),  # no letter, no option
    ("B12", None, "none"),
])
def test_choice_extraction(prediction, letter, outcome):
    extraction = extract_choice(prediction, CHOICES)
    assert (extraction.letter, extraction.outcome) == (letter, outcome)


@pytest.mark.parametrize("prediction, reference, score", [
    ("Yes, there is a mass.", "yes", 1.0),
    ("Yes", "Yes", 1.0),
    ("no", "yes", 0.0),
    ("yes and no", "no", 0.0),  # both polarities: wrong
    ("Eyes are clear", "yes", 0.0),  # "yes" only as a whole word
    ("normal", "no", 0.0),  # "no" only as a whole word
    ("", "no", 0.0),
    ("是的", "是", 1.0),
    ("不是", "是", 0.0),
    ("不是", "否", 1.0),
    ("没有", "有", 0.0),
    ("无异常", "否", 1.0),
    ("是否有骨折？是", "是", 1.0),  # the echoed "是否" is neutral
    ("是", "yes", 1.0),  # a Chinese answer to an English question
    ("The left side.", "left", 1.0),  # other closed answers: contained tokens
    ("right side", "left", 0.0),
    ("CT scan", "CT", 1.0),
])
def test_closed_questions(prediction, reference, score):
    assert score_closed(prediction, reference) == score


@pytest.mark.parametrize("prediction, reference, recall", [
    ("the lung on the left", "Left lung", 1.0),
    ("lower lobe", "left lower lobe", 2 / 3),
    ("Brain!", "brain, brain, liver", 1 / 3),  # each reference token counted as often as it occurs in both
    ("肺", "肺部", 1 / 2),  # Chinese: characters
    ("右肺上叶", "右肺", 1.0),
    ("T2WI image", "t2wi", 1.0),
    ("", "brain", 0.0),
])
def test_open_questions_recall(prediction, reference, recall):
    assert score_open(prediction, reference) == pytest.approx(recall)


def test_normalisation_is_nfkc_lowercase_without_punctuation():
    assert normalize_answer("Ｔ２ＷＩ，  the (Left) lung… 3.5cm! “肺”。") == "t2wi the left lung 3.5cm 肺"
    assert answer_polarity("Yes/no") == "both" and answer_polarity("maybe") is None


def test_scores_aggregate_per_task_average_and_overall():
    choice = dict(image="i.png", question="q", answer="MRI", kind="choice", choices=CHOICES, answer_letter="B",
                  task="PMC-VQA")
    samples_and_predictions = [
        (VQASample("p1", **choice), "B"),
        (VQASample("p2", **choice), "答案是B"),
        (VQASample("p3", **choice), "A or B"),
        (VQASample("p4", **choice), ""),
        (VQASample("p5", **{**choice, "answer_letter": "D", "answer": "Hepatitis B"}), "hepatitis b"),
        (VQASample("c1", "i", "q", "yes", "closed", task="VQA-RAD closed"), "Yes, there is a mass."),
        (VQASample("c2", "i", "q", "yes", "closed", task="VQA-RAD closed"), "no"),
        (VQASample("c3", "i", "q", "left", "closed", task="VQA-RAD closed"), "The left side"),
        (VQASample("c4", "i", "q", "no", "closed", task="VQA-RAD closed"), "yes and no"),
        (VQASample("o1", "i", "q", "left lower lung", "open", task="VQA-RAD open"), "left lung"),
        (VQASample("o2", "i", "q", "brain", "open", task="VQA-RAD open"), ""),
        (VQASample("o3", "i", "q", "liver", "open", task="VQA-RAD open"), "the liver"),
    ]
    rows = [{"task": sample.task, "kind": sample.kind, **score_sample(sample, prediction)}
            for sample, prediction in samples_and_predictions]
    assert [row["score"] for row in rows[:5]] == [1, 1, 0, 0, 1]
    result = score_vqa(rows)
    assert result["per_task"]["PMC-VQA"] == {"accuracy": 60.0, "count": 5, "extraction": {
        "letter": 2, "ambiguous": 1, "none": 1, "option_text": 1}}
    assert result["per_task"]["VQA-RAD closed"] == {"accuracy": 50.0, "count": 4}
    assert result["per_task"]["VQA-RAD open"]["recall"] == pytest.approx(100 * (2 / 3 + 0 + 1) / 3)
    assert result["average"] == pytest.approx({"accuracy": 55.0, "recall": 500 / 9})
    assert result["overall"] == pytest.approx({"accuracy": 500 / 9, "recall": 500 / 9, "count": 12})


BLEU_RESULT = {"per_task": {"description": {"bleu_4": 10.0, "meteor": 20.0, "count": 2},
                            "disease": {"bleu_4": 30.04, "meteor": 40.0, "count": 1}},
               "average": {"bleu_4": 20.02, "meteor": 30.0}, "overall": {"bleu_4": 15.0, "meteor": 25.0, "count": 3}}
VQA_RESULT = {"per_task": {"PMC-VQA": {"accuracy": 60.0, "count": 5},
                           "VQA-RAD open": {"recall": 55.55, "count": 3}},
              "average": {"accuracy": 60.0, "recall": 55.55}, "overall": {"accuracy": 60.0, "recall": 55.55}}


def test_one_table_holds_bleu_and_vqa_results():
    # For BLEU-4/METEOR results the table is exactly the existing one.
    assert format_results_table(BLEU_RESULT) == format_markdown_table(BLEU_RESULT)
    assert format_results_table(BLEU_RESULT, name="m") == format_markdown_table(BLEU_RESULT, name="m")
    two_rows = {"base": BLEU_RESULT, "other": {"per_task": {"disease": BLEU_RESULT["per_task"]["disease"]}}}
    assert format_results_table(two_rows) == format_markdown_table(two_rows)
    combined = combine_results(BLEU_RESULT, VQA_RESULT)
    assert combined["average"] == pytest.approx({"bleu_4": 20.02, "meteor": 30.0, "accuracy": 60.0,
                                                 "recall": 55.55})
    table = format_results_table({"Qilin-Med-VL": combined, "baseline": VQA_RESULT})
    assert table.splitlines()[0] == ("| Model | description B4 | description M | disease B4 | disease M | "
                                     "PMC-VQA Acc | VQA-RAD open Recall | AVG |")
    # AVG: the mean of the row's numbers, (10 + 20 + 30.04 + 40 + 60 + 55.55) / 6 = 35.93
    assert table.splitlines()[2] == "| Qilin-Med-VL | 10.0 | 20.0 | 30.0 | 40.0 | 60.0 | 55.5 | 35.9 |"
    assert table.splitlines()[3] == "| baseline | - | - | - | - | 60.0 | 55.5 | 57.8 |"
    with pytest.raises(ValueError, match="two results"):
        combine_results(VQA_RESULT, VQA_RESULT)


# ---------------------------------------------------------------------------------------------------------------
# The runner, end to end on a tiny model
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("benchmark, flags, tag, tasks, count", [
    ("pmc-vqa", [], "pmc-vqa", {"PMC-VQA"}, 3),
    ("vqa-rad", ["--limit", "2"], "vqa-rad", {"VQA-RAD closed", "VQA-RAD open"}, 2),
    ("slake", ["--language", "all"], "slake-all",
     {"SLAKE-en closed", "SLAKE-en open", "SLAKE-zh closed", "SLAKE-zh open"}, 4),
])
def test_evaluate_benchmark_writes_predictions_scores_and_table(data, tmp_path, benchmark, flags, tag, tasks, count,
                                                                capsys):
    assert cli(["evaluate", "--model", str(data / "model"), "--benchmark", benchmark, "--data-dir",
                str(data / benchmark), "--output-dir", str(tmp_path), "--max-new-tokens", "3", "--batch-size", "2",
                "--name", "tiny", *flags]) == 0
    rows = [json.loads(line) for line in (tmp_path / f"{tag}_predictions.jsonl").read_text("utf-8").splitlines()]
    assert len(rows) == count
    assert all(isinstance(row["prediction"], str) and 0 <= row["score"] <= 1 for row in rows)
    scores = json.loads((tmp_path / f"{tag}_scores.json").read_text("utf-8"))
    assert set(scores["per_task"]) == tasks and scores["overall"]["count"] == count
    assert scores["benchmark"] == benchmark and {"per_task", "average", "overall", "skipped"} <= set(scores)
    table = (tmp_path / f"{tag}_scores.md").read_text("utf-8")
    assert table.splitlines()[2].startswith("| tiny |") and "| tiny |" in capsys.readouterr().out
    if benchmark == "pmc-vqa":
        assert rows[0]["prompt"].endswith("D: Ultrasound\n请直接回答选项字母。")
        assert rows[0]["extraction"]["outcome"] in {"letter", "option_text", "ambiguous", "none"}
        assert scores["skipped"] == {"missing_image": 1, "no_gold_answer": 1}


def test_benchmark_without_data_dir_or_with_missing_files_fails_cleanly(data, tmp_path, capsys):
    assert cli(["evaluate", "--model", str(data / "model"), "--benchmark", "slake"]) == 2
    assert "--data-dir" in capsys.readouterr().err
    assert cli(["evaluate", "--model", str(data / "model"), "--benchmark", "slake", "--data-dir", str(tmp_path),
                "--output-dir", str(tmp_path / "out")]) == 1
    assert "no SLAKE test JSON" in capsys.readouterr().err


def test_cli_evaluate_benchmark(data, tmp_path):
    assert cli(["evaluate", "--model", str(data / "model"), "--benchmark", "slake", "--data-dir",
                str(data / "slake"), "--output-dir", str(tmp_path), "--max-new-tokens", "2"]) == 0
    assert (tmp_path / "slake_scores.json").exists()
