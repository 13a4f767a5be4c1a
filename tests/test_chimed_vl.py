"""ChiMed-VL readers: the released formats into training records, streamed, with a report of what is unusable."""

import json

import pytest

from qilin_med_vl.cli import build_parser
from qilin_med_vl.data import (
    ConversionReport,
    RejectReason,
    convert_chimed_vl,
    iter_chimed_vl_records,
    iter_source_records,
    normalize_record,
    records_from_hf_dataset,
)
from qilin_med_vl.testing import random_image, tiny_processor
from qilin_med_vl.training import ConversationDataset, DataValidationError, validate_records

# ChiMed-VL-Alignment.jsonl: LLaVA caption pairs, one a line.
ALIGNMENT = [
    {"id": "PMC1_F1", "image": "PMC1_F1.jpg",
     "conversations": [{"from": "human", "value": "<image>\n描述这张图片。"},
                       {"from": "gpt", "value": "胸部CT可见结节。"}]},
    {"id": "PMC2_F1", "image": "PMC2_F1.jpg",  # the image is not in the folder (the release has none)
     "conversations": [{"from": "human", "value": "<image>\n描述这张图片。"},
                       {"from": "gpt", "value": "膝关节X线片。"}]},
    {"id": "PMC3_F2", "image": "PMC3/PMC3_F2.jpg",  # a subfolder path that exists
     "conversations": [{"from": "human", "value": "描述这张图片。\n<image>"}, {"from": "gpt", "value": "头颅MRI。"}]},
    {"id": "PMC4_F1", "image": "PMC4/PMC4_F1.jpg",  # a subfolder path; the file lies flat in the root
     "conversations": [{"from": "human", "value": "<image>\n描述这张图片。"}, {"from": "gpt", "value": "腹部超声。"}]},
]
# ChiMed-VL-Instruction.json: one list; multi-turn; speakers in other spellings.
INSTRUCTION = [
    {"id": 7, "image": "PMC1_F1.jpg",
     "conversations": [{"from": "Human", "value": "<image>\n这是什么检查？"}, {"from": "GPT", "value": "CT检查。"},
                       {"from": "human", "value": "有结节吗？"}, {"from": "gpt", "value": "有, 位于右肺 [上叶]。"}]},
    {"id": "no-placeholder", "image": "./PMC1_F1.jpg",
     "conversations": [{"role": "user", "content": "病变在哪里？"}, {"role": "assistant", "content": "右肺。"}]},
    {"id": "two-placeholders", "image": "PMC1_F1.jpg",
     "conversations": [{"from": "human", "value": "<image><image>对比"}, {"from": "gpt", "value": "好转。"}]},
    {"id": "no-answer", "image": "PMC1_F1.jpg", "conversations": [{"from": "human", "value": "<image>\n描述"}]},
    {"id": "robot", "image": "PMC1_F1.jpg",
     "conversations": [{"from": "robot", "value": "<image>\n描述"}, {"from": "gpt", "value": "好"}]},
]


@pytest.fixture
def release(tmp_path):
    images = tmp_path / "images"
    (images / "PMC3").mkdir(parents=True)
    random_image(0).save(images / "PMC1_F1.jpg")
    random_image(1).save(images / "PMC3" / "PMC3_F2.jpg")
    random_image(2).save(images / "PMC4_F1.jpg")
    alignment = tmp_path / "ChiMed-VL-Alignment.jsonl"
    lines = [json.dumps(record, ensure_ascii=False) for record in ALIGNMENT]
    lines.insert(2, '{"id": "broken", "image": ')  # a truncated line: reported, the rest still read
    alignment.write_text("\n".join(lines) + "\n", encoding="utf-8")
    instruction = tmp_path / "ChiMed-VL-Instruction.json"
    instruction.write_text(json.dumps(INSTRUCTION, ensure_ascii=False, indent=1), encoding="utf-8")
    return tmp_path


def test_released_records_already_are_training_records_but_one_missing_image_refuses_the_file(release):
    # Why the converter exists: train --data reads ChiMed-VL directly, and refuses it when an image is missing.
    clean = release / "clean.jsonl"
    clean.write_text(json.dumps(ALIGNMENT[0], ensure_ascii=False) + "\n", encoding="utf-8")
    assert len(ConversationDataset(str(clean), tiny_processor(), str(release / "images"))) == 1
    raw = release / "raw.jsonl"
    raw.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in ALIGNMENT[:2]), encoding="utf-8")
    with pytest.raises(DataValidationError, match="PMC2_F1.jpg"):
        ConversationDataset(str(raw), tiny_processor(), str(release / "images"))


def test_conversion_keeps_usable_records_and_reports_each_unusable_one(release):
    output = release / "out" / "chimed.jsonl"
    report = convert_chimed_vl([release / "ChiMed-VL-Alignment.jsonl", release / "ChiMed-VL-Instruction.json"],
                               output, image_root=str(release / "images"))
    kept = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    assert [record["id"] for record in kept] == ["PMC1_F1", "PMC3_F2", "PMC4_F1", "7", "no-placeholder"]
    assert report.read == 10 and report.kept == 5
    assert report.rejected == {RejectReason.MISSING_IMAGE: 1, RejectReason.INVALID_JSON: 1,
                               RejectReason.PLACEHOLDER_MISMATCH: 1, RejectReason.NO_ANSWER: 1,
                               RejectReason.UNKNOWN_SPEAKER: 1}
    assert report.examples[RejectReason.MISSING_IMAGE][0]["id"] == "PMC2_F1"
    assert report.examples[RejectReason.INVALID_JSON][0]["source"] == "ChiMed-VL-Alignment.jsonl:3"
    assert report.examples[RejectReason.NO_ANSWER][0]["source"] == "ChiMed-VL-Instruction.json[3]"
    assert report.repairs == {"image path -> file name": 1, "<image> placeholder inserted": 1}
    by_id = {record["id"]: record for record in kept}
    assert by_id["PMC3_F2"]["image"] == "PMC3/PMC3_F2.jpg" and by_id["PMC4_F1"]["image"] == "PMC4_F1.jpg"
    assert by_id["no-placeholder"]["image"] == "PMC1_F1.jpg"
    assert by_id["no-placeholder"]["conversations"] == [{"from": "human", "value": "<image>\n病变在哪里？"},
                                                        {"from": "gpt", "value": "右肺。"}]
    assert [turn["from"] for turn in by_id["7"]["conversations"]] == ["human", "gpt", "human", "gpt"]
    written = json.loads((release / "out" / "chimed.jsonl.report.json").read_text(encoding="utf-8"))
    assert written["usable"] == 5 and written["unusable"] == 5 and written["distinct_missing_images"] == 1
    # The clean file passes the training data's own validation, images included.
    processor = tiny_processor()
    assert validate_records(kept, processor, str(release / "images")).errors == []
    assert len(ConversationDataset(str(output), processor, str(release / "images"))) == 5


def test_the_instruction_list_is_decoded_item_by_item_across_chunk_boundaries(release, tmp_path):
    tricky = INSTRUCTION + [{"id": "s", "note": "a ] , [ { \" } in a string", "n": 12345678901234,
                             "conversations": [{"from": "human", "value": "问"}, {"from": "gpt", "value": "答"}]}]
    path = tmp_path / "tricky.json"
    path.write_text(json.dumps(tricky, ensure_ascii=False, indent=2), encoding="utf-8")
    for chunk in (1, 3, 7, 64, 1 << 20):
        items = [item for _, item, _ in iter_source_records(path, chunk_characters=chunk)]
        assert items == tricky
    sources = [source for source, _, _ in iter_source_records(path)]
    assert sources[0] == "tricky.json[0]" and sources[-1] == f"tricky.json[{len(tricky) - 1}]"
    (tmp_path / "empty.json").write_text(" [ ] ", encoding="utf-8")
    assert list(iter_source_records(tmp_path / "empty.json")) == []
    (tmp_path / "bad.json").write_text('[{"id": 1} {"id": 2}]', encoding="utf-8")
    with pytest.raises(ValueError, match="expected ',' or ']'"):
        list(iter_source_records(tmp_path / "bad.json"))


def test_records_stream_lazily(release):
    records = iter_chimed_vl_records(release / "ChiMed-VL-Alignment.jsonl", str(release / "images"))
    assert next(records)["id"] == "PMC1_F1"  # a generator: nothing past the first usable line was needed


def test_caption_pairs_and_missing_ids_become_records():
    record, problems = normalize_record({"image": "a.png", "caption": "胸片。"}, "x.jsonl:4", task="alignment")
    assert problems == [] and record == {
        "id": "x.jsonl:4", "image": "a.png", "task": "alignment",
        "conversations": [{"from": "human", "value": "<image>\n请描述这张图片。"}, {"from": "gpt", "value": "胸片。"}]}
    assert normalize_record(["not", "a", "record"], "x")[1][0][0] == RejectReason.NOT_A_RECORD
    assert normalize_record({"id": 1, "conversations": []}, "x")[1][0][0] == RejectReason.NO_CONVERSATIONS


def test_convert_command_writes_output_and_report(release, capsys):
    parser = build_parser()
    args = parser.parse_args(["convert-chimed-vl", str(release / "ChiMed-VL-Alignment.jsonl"),
                              "--image-root", str(release / "images"), "--output", str(release / "a.jsonl"),
                              "--report", str(release / "a.json"), "--limit", "2"])
    assert args.handler(args) == 0
    assert len((release / "a.jsonl").read_text(encoding="utf-8").splitlines()) == 2
    assert json.loads((release / "a.json").read_text(encoding="utf-8"))["usable"] == 2
    out = capsys.readouterr().out
    assert "missing_image: 1" in out and f"--image-root {release / 'images'}" in out


@pytest.fixture
def offline_datasets_cache(tmp_path, monkeypatch):
    import datasets
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    return datasets


def _image_dataset(datasets):
    images = [random_image(0), random_image(1), random_image(0)]  # the first image twice
    features = datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                                  "answer": datasets.Value("string")})
    return datasets.Dataset.from_dict({"image": images, "question": ["这是什么？", "在哪里？", "是否异常？"],
                                       "answer": ["CT。", "右肺。", "是。"]}, features=features)


def test_records_from_a_datasets_dataset_write_each_image_once(offline_datasets_cache, tmp_path):
    dataset = _image_dataset(offline_datasets_cache)
    raw = list(records_from_hf_dataset(dataset, tmp_path / "imgs", split="train", task="vqa"))
    assert [r["id"] for r in raw] == ["train-0", "train-1", "train-2"]
    assert raw[0]["images"] == raw[2]["images"] != raw[1]["images"]
    assert len(list((tmp_path / "imgs").iterdir())) == 2
    record, problems = normalize_record(raw[1], "train[1]")
    assert problems == [] and record["conversations"][0]["value"] == "<image>\n在哪里？" and record["task"] == "vqa"
    with pytest.raises(ValueError, match="image_dir"):
        list(records_from_hf_dataset(dataset))


def test_convert_command_reads_a_local_datasets_folder(offline_datasets_cache, tmp_path):
    folder = tmp_path / "hf" / "data"
    folder.mkdir(parents=True)
    _image_dataset(offline_datasets_cache).to_parquet(str(folder / "train-00000-of-00001.parquet"))
    parser = build_parser()
    args = parser.parse_args(["convert-chimed-vl", "--hf-dataset", str(tmp_path / "hf"), "--image-root",
                              str(tmp_path / "images"), "--output", str(tmp_path / "hf.jsonl")])
    assert args.handler(args) == 0
    records = [json.loads(line) for line in (tmp_path / "hf.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(records) == 3
    assert validate_records(records, tiny_processor(), str(tmp_path / "images")).errors == []
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        list(records_from_hf_dataset("someone/not-a-local-folder", tmp_path))


def test_report_summary_names_reasons_and_first_records():
    report = ConversionReport()
    report.read = 2
    report.reject(RejectReason.MISSING_IMAGE, "x1", "f.jsonl:1", "image file 'x.jpg' not found")
    assert "missing_image: 1 (first: 'x1' at f.jsonl:1" in report.summary()


def test_decode_check_rejects_files_that_are_not_images(release, tmp_path):
    (release / "images" / "corrupt.jpg").write_bytes(b"not an image")
    path = tmp_path / "one.jsonl"
    record = {**ALIGNMENT[0], "id": "corrupt", "image": "corrupt.jpg"}
    path.write_text(json.dumps(record, ensure_ascii=False) + "\n", encoding="utf-8")
    assert len(list(iter_chimed_vl_records(path, str(release / "images")))) == 1  # it exists
    report = ConversionReport()
    assert list(iter_chimed_vl_records(path, str(release / "images"), check_images="decode", report=report)) == []
    assert report.rejected == {RejectReason.UNREADABLE_IMAGE: 1}
