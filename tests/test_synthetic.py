import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qilin_med_vl.cli import build_parser
from qilin_med_vl.synthetic import (
    CHANGES,
    DISEASES,
    TASKS,
    SynthConfig,
    generate_dataset,
    generate_record,
    lesion_visibility_report,
    plan_split,
)
from qilin_med_vl.synthetic import findings as clinical
from qilin_med_vl.synthetic.dataset import write_shipped_examples

EXAMPLES = Path(__file__).resolve().parent.parent / "qilin_med_vl" / "demo_model" / "examples"
COUNTS = {"train": 24, "validation": 8, "test": 8}


def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _records(folder: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (folder / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synthetic")
    generate_dataset(str(folder), SynthConfig(seed=3, counts=COUNTS, image_size=128), workers=1)
    return folder


def test_same_seed_gives_byte_identical_output_for_any_worker_count(dataset, tmp_path):
    generate_dataset(str(tmp_path), SynthConfig(seed=3, counts=COUNTS, image_size=128), workers=2)
    assert _tree(tmp_path) == _tree(dataset)


def test_another_seed_gives_other_data(dataset, tmp_path):
    generate_dataset(str(tmp_path), SynthConfig(seed=4, counts={"train": 4}, image_size=128))
    assert (tmp_path / "train.jsonl").read_bytes() != (dataset / "train.jsonl").read_bytes()
    assert (tmp_path / "images/train/train-000000-0.png").read_bytes() != (
        dataset / "images/train/train-000000-0.png"
    ).read_bytes()


def test_splits_share_no_patient(dataset):
    patients = {split: {r["meta"]["anatomy_hash"] for r in _records(dataset, split)} for split in COUNTS}
    assert all(len(patients[split]) == COUNTS[split] for split in COUNTS)  # one patient per record
    assert not patients["train"] & patients["validation"]
    assert not patients["train"] & patients["test"]
    assert not patients["validation"] & patients["test"]


def test_records_follow_the_training_format(dataset):
    for split, count in COUNTS.items():
        records = _records(dataset, split)
        assert len(records) == count
        assert len({r["id"] for r in records}) == len(records)
        for record in records:
            assert record["task"] in TASKS
            human, gpt = record["conversations"]
            assert (human["from"], gpt["from"]) == ("human", "gpt")
            assert human["value"].count("<image>") == len(record["images"])
            assert human["value"].startswith("<image>\n" * len(record["images"]))
            assert gpt["value"] and "<image>" not in gpt["value"]
            assert len(record["images"]) == (2 if record["task"] == "comparative" else 1)
            assert len(record["meta"]["findings"]) == len(record["images"])
            for path in record["images"]:
                assert not os.path.isabs(path) and (dataset / path).is_file()


def test_manifest_counts_and_hashes_match_the_files(dataset):
    import hashlib

    manifest = json.loads((dataset / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["seed"] == 3 and manifest["generator_version"]
    assert manifest["lesion_size_px"]["small_flake_diameter"] == [0.75, 1.5]  # 6-12 px at 1024, scaled to 128
    for split, count in COUNTS.items():
        summary = manifest["splits"][split]
        assert summary["records"] == count
        assert summary["sha256"] == hashlib.sha256((dataset / f"{split}.jsonl").read_bytes()).hexdigest()
        assert summary["tasks"] == dict(Counter(r["task"] for r in _records(dataset, split)))


def test_tasks_and_labels_are_balanced_in_every_split():
    for split, count in (("train", 203), ("validation", 37), ("test", 37)):
        plans = plan_split(split, count, seed=0)
        assert [p.index for p in plans] == list(range(count))
        tasks = Counter(p.task for p in plans)
        assert set(tasks) == set(TASKS) and max(tasks.values()) - min(tasks.values()) <= 1
        for task in TASKS:
            labels = Counter(p.label for p in plans if p.task == task)
            expected = CHANGES if task == "comparative" else DISEASES
            assert max(labels[label] for label in expected) - min(labels[label] for label in expected) <= 1
        for task in TASKS:
            sides = Counter(p.leg for p in plans if p.task == task)
            assert abs(sides[0] - sides[1]) <= 1
    comparative = [p for p in plan_split("train", 400, seed=0) if p.task == "comparative"]
    combos = Counter((p.label, p.kind) for p in comparative)
    assert (
        len(combos) == len(CHANGES) * len(clinical.COMPARATIVE_KINDS)
        and max(combos.values()) - min(combos.values()) <= 1
    )
    # every finding kind is placed on both sides and both bones
    placements = Counter((p.kind, p.leg, p.bone) for p in comparative)
    assert len(placements) == len(clinical.COMPARATIVE_KINDS) * 4


def test_images_are_8bit_grayscale_png_of_the_requested_size(dataset):
    record = _records(dataset, "train")[0]
    with Image.open(dataset / record["images"][0]) as image:
        assert (image.format, image.mode, image.size) == ("PNG", "L", (128, 128))
    full = next(p for p in plan_split("test", 8, seed=0) if p.task == "comparative")
    _, images = generate_record(full, SynthConfig(seed=0))
    assert len(images) == 2
    for image in images:
        assert image.shape == (1024, 1024) and image.dtype == np.uint8
        assert 0 < image.mean() < 255 and image.std() > 20  # drawn content, not a blank or saturated frame


def test_small_lesions_lose_most_contrast_at_336_but_keep_it_at_672():
    # bicubic, as the image processor resizes
    rows = lesion_visibility_report(diameters=(8, 24), lesions_per_diameter=3, resamples=("bicubic",), seed=0)
    at = {(r["diameter"], r["resolution"]): r for r in rows}
    small_336, small_672 = at[(8.0, 336)], at[(8.0, 672)]
    assert small_336["retained"] < 0.4  # most of the darkening is gone at 336 px ...
    assert small_672["retained"] > 1.6 * small_336["retained"]  # ... far more of it is left at 672 px
    assert small_336["cnr"] < 2.0  # below the bone texture's own fluctuations
    assert small_672["cnr"] > 1.5 * small_336["cnr"]
    # The control: a large flake stays visible at the low resolution.
    assert at[(24.0, 336)]["retained"] > 0.7 and at[(24.0, 336)]["cnr"] > 2.5


def _texture_match(a, b, reach=3):
    """Best correlation of horizontal gradients over integer shifts: the shared bone texture of one patient."""
    a, b = a.astype(np.float32), b.astype(np.float32)
    reference = np.diff(a, axis=1)[reach:-reach, reach:-reach].ravel()
    best = -1.0
    for dy in range(-reach, reach + 1):
        for dx in range(-reach, reach + 1):
            shifted = np.diff(b, axis=1)[
                reach + dy : b.shape[0] - reach + dy, reach + dx : b.shape[1] - 1 - reach + dx
            ]
            best = max(best, float(np.corrcoef(reference, shifted.ravel())[0, 1]))
    return best


def test_comparative_pairs_show_one_patient():
    config = SynthConfig(seed=0, image_size=256)
    plans = [p for p in plan_split("train", 24, seed=0) if p.task == "comparative"][:3]
    pairs = [generate_record(plan, config)[1] for plan in plans]
    for i, (before, after) in enumerate(pairs):
        stranger = pairs[(i + 1) % len(pairs)][0]
        assert _texture_match(before, after) > 0.5 > _texture_match(before, stranger) + 0.15
        assert not np.array_equal(before, after)  # a new exposure, not a copy


@pytest.mark.parametrize("change", CHANGES)
def test_change_type_drives_the_follow_up_image_and_the_answer(change):
    rng = np.random.default_rng(0)
    from qilin_med_vl.synthetic import sample_anatomy

    anatomy = sample_anatomy(rng)
    before = clinical.sample_finding(rng, "flake", 1, "tibia", clinical.FlakeSizes(), comparative=True)
    after = clinical.apply_change(rng, anatomy, before, change)
    flake_after = next(f for f in after if f.kind == "flake")
    if change == "unchanged":
        assert after == [before]
    elif change == "worsened":
        assert flake_after.size > before.size
    else:
        assert flake_after.size < before.size and flake_after.strength < before.strength
    assert any(f.kind == "implant" for f in after) == (change == "postop")
    answer = clinical.comparative_answer(rng, before, change)
    assert "左侧胫骨上段" in answer
    assert {"improved": "好转", "worsened": "加重", "unchanged": "无明显变化", "postop": "术后改变"}[change] in answer


def test_description_and_location_answers_name_side_and_segment():
    config = SynthConfig(seed=0, image_size=64)
    for plan in plan_split("validation", 40, seed=0):
        if plan.task not in ("description", "location") or plan.label == "normal":
            continue
        record, _ = generate_record(plan, config)
        answer = record["conversations"][1]["value"]
        side = "右侧" if plan.leg == 0 else "左侧"
        site = "膝关节内侧间隙" if plan.label == "narrowing" else {"femur": "股骨下段", "tibia": "胫骨上段"}[plan.bone]
        assert side + site in answer, (plan, answer)


def test_cli_subcommand_writes_a_dataset(tmp_path, capsys):
    parser = build_parser()
    args = parser.parse_args(
        [
            "synth-data",
            "--output",
            str(tmp_path),
            "--seed",
            "1",
            "--train",
            "4",
            "--validation",
            "4",
            "--test",
            "4",
            "--image-size",
            "64",
            "--workers",
            "1",
        ]
    )
    assert args.handler(args) == 0
    assert {p.name for p in tmp_path.iterdir()} == {
        "train.jsonl",
        "validation.jsonl",
        "test.jsonl",
        "manifest.json",
        "images",
    }


def test_shipped_examples_are_what_the_generator_draws(tmp_path):
    records = [
        json.loads(line) for line in (EXAMPLES / "examples.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    assert sorted(r["task"] for r in records) == sorted(TASKS)
    regenerated = write_shipped_examples(str(tmp_path))
    assert regenerated == records
    for name in {path for r in records for path in r["images"]}:
        with Image.open(EXAMPLES / name) as shipped, Image.open(tmp_path / name) as fresh:
            assert shipped.mode == "L" and shipped.size == (1024, 1024)
            assert np.array_equal(np.asarray(shipped), np.asarray(fresh))  # pixels, not bytes: zlib may differ
