# Copyright 2026 The qilin-med-vl Authors. Licensed under the Apache License, Version 2.0.
"""Train / validation / test splits of the synthetic knee benchmark, written in the LLaVA-style training format.

Layout of an output folder (the `--image-root` of training):

    train.jsonl  validation.jsonl  test.jsonl  manifest.json  images/<split>/<record id>-<view>.png

One record per line, one patient per record (so splits never share a patient):

    {"id": "train-000007", "task": "comparative", "images": ["images/train/train-000007-0.png", "...-1.png"],
     "conversations": [{"from": "human", "value": "<image>\\n<image>\\n请比较..."}, {"from": "gpt", "value": "..."}],
     "meta": {...labels, lesion sizes and boxes in pixels...}}

Everything derives from `SynthConfig.seed`: record `i` of split `s` is drawn from its own
`np.random.SeedSequence([seed, s, i])`, so the output is byte-identical for any number of workers. Tasks are
balanced within each split, and so are the labels within each task (diseases for the single-image tasks; change
type x finding kind for the comparative one), together with the side and the bone segment.
"""

import hashlib
import json
import multiprocessing
import os
from dataclasses import asdict, dataclass, field, replace

import numpy as np
from PIL import Image

from ..processing.processing_qilin import IMAGE_TOKEN
from . import findings as clinical
from .render import (
    REFERENCE_SIZE,
    Anatomy,
    Finding,
    finding_box,
    render_radiograph,
    sample_anatomy,
    sample_follow_up_view,
    sample_view,
    to_uint8,
)

__all__ = [
    "GENERATOR_VERSION",
    "IMAGE_TOKEN",
    "SPLITS",
    "RecordPlan",
    "SynthConfig",
    "generate_dataset",
    "generate_record",
    "plan_split",
    "write_shipped_examples",
]

GENERATOR_VERSION = "1.0"
SPLITS = ("train", "validation", "test")
_SPLIT_CODES = {"train": 0, "validation": 1, "test": 2, "examples": 3}
# Largest pose change between the two views of a comparative pair, reference pixels per axis.
PAIR_SHIFT = 4.0
_PNG_COMPRESS_LEVEL = 6


@dataclass
class SynthConfig:
    """Every knob of the generator. Sizes in reference pixels (of a 1024 image) unless they say otherwise."""

    seed: int = 0
    counts: dict = field(default_factory=lambda: {"train": 1000, "validation": 200, "test": 200})
    image_size: int = REFERENCE_SIZE
    small_flake_diameter: tuple = (6.0, 12.0)  # vanishes at 336 px, visible at 672 px
    large_flake_diameter: tuple = (16.0, 32.0)  # visible at 336 px: the low-resolution control inside the class
    large_flake_fraction: float = 0.25

    def flake_sizes(self) -> clinical.FlakeSizes:
        return clinical.FlakeSizes(self.small_flake_diameter, self.large_flake_diameter, self.large_flake_fraction)


@dataclass(frozen=True)
class RecordPlan:
    """What record `index` of `split` is: its task, its label, and where its finding goes."""

    split: str
    index: int
    task: str
    label: str  # a disease (single-image tasks) or a change (comparative)
    kind: str  # the comparative finding kind; equals `label`'s disease for single-image tasks
    leg: int
    bone: str

    @property
    def record_id(self) -> str:
        return f"{self.split}-{self.index:06d}"


def _rng(seed: int, split: str, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, _SPLIT_CODES[split], *key]))


def plan_split(split: str, count: int, seed: int) -> list[RecordPlan]:
    """
    Balanced plans for `count` records: tasks cycle, and within a task the labels cycle, each with a side and a
    bone (see below); the records are shuffled afterwards. Counts per task, per label within a task and per side
    within a task differ by at most one.
    """
    rng = _rng(seed, split, 2**31 - 1)
    tasks = [clinical.TASKS[i % len(clinical.TASKS)] for i in range(count)]
    seen = dict.fromkeys(clinical.TASKS, 0)
    plans = []
    for index, task in enumerate(tasks):
        j = seen[task]
        seen[task] += 1
        if task == "comparative":
            combos = [(c, k) for k in clinical.COMPARATIVE_KINDS for c in clinical.CHANGES]
        else:
            combos = [(d, d) for d in clinical.DISEASES]
        label_index, cycle = j % len(combos), j // len(combos)
        label, kind = combos[label_index]
        # Sides alternate within every cycle of labels (balanced to one record) and swap between cycles; bones
        # swap every second cycle, so each label meets every (side, bone) once in four cycles.
        leg = (label_index + cycle) % 2
        bone = ("femur", "tibia")[(label_index // 2 + cycle // 2) % 2]
        plans.append(RecordPlan(split, index, task, label, kind, leg, bone))
    order = rng.permutation(count)
    return [replace(plans[o], index=i) for i, o in enumerate(order)]


def anatomy_hash(anatomy: Anatomy) -> str:
    """Fingerprint of a patient's anatomy (equal for the two views of a pair, distinct across patients)."""
    return hashlib.sha256(repr(asdict(anatomy)).encode()).hexdigest()[:16]


def _finding_meta(anatomy, view, finding: Finding, image_size: int, small_flake_max: float = 12.0) -> dict:
    scale = image_size / REFERENCE_SIZE
    meta = {
        "kind": finding.kind,
        "disease": clinical.disease_of(finding),
        "location": clinical.location_text(finding),
        "side": clinical.SIDE_WORDS[finding.leg],
        "box": finding_box(anatomy, view, finding, image_size),
    }
    if finding.kind == "flake":
        meta["diameter_px"] = round(finding.size * scale, 2)
        meta["strength"] = round(finding.strength, 3)
        # "small": at most the small-flake range's upper end at 1024 px, i.e. lost at 336 px.
        meta["size_class"] = "small" if finding.size <= small_flake_max else "large"
    elif finding.kind == "fracture":
        meta["line_width_px"] = round(finding.size * scale, 2)
    elif finding.kind == "osteophyte":
        meta["spur_length_px"] = round(finding.size * scale, 2)
    elif finding.kind == "narrowing":
        meta["medial_gap_px"] = round(finding.size * scale, 2)
    return meta


def generate_record(plan: RecordPlan, config: SynthConfig) -> tuple[dict, list[np.ndarray]]:
    """
    Draw one record. Returns the JSON record and its images (uint8 `(image_size, image_size)` arrays, in the
    order of `record["images"]`).
    """
    rng = _rng(config.seed, plan.split, plan.index)
    anatomy = sample_anatomy(rng)
    first_view = sample_view(rng)
    size = config.image_size
    meta = {
        "patient_id": plan.record_id,
        "anatomy_hash": anatomy_hash(anatomy),
        "image_size": size,
        "label": plan.label,
    }
    if plan.task == "comparative":
        before = clinical.sample_finding(rng, plan.kind, plan.leg, plan.bone, config.flake_sizes(), comparative=True)
        after = clinical.apply_change(rng, anatomy, before, plan.label)
        second_view = sample_follow_up_view(rng, first_view, shift=PAIR_SHIFT)
        views, finding_sets = [first_view, second_view], [[before], after]
        answer = clinical.comparative_answer(rng, before, plan.label)
        meta.update(change=plan.label, change_name=clinical.CHANGE_NAMES[plan.label], kind=plan.kind)
    else:
        finding_sets = [
            []
            if plan.label == "normal"
            else [clinical.sample_finding(rng, plan.label, plan.leg, plan.bone, config.flake_sizes())]
        ]
        views = [first_view]
        answer = {
            "description": clinical.description_answer,
            "disease": clinical.disease_answer,
            "location": clinical.location_answer,
        }[plan.task](rng, finding_sets[0])
        meta.update(disease=plan.label, disease_name=clinical.DISEASE_NAMES[plan.label])
    question = clinical.question(rng, plan.task)
    images = [to_uint8(render_radiograph(anatomy, view, found, size)) for view, found in zip(views, finding_sets)]
    meta["findings"] = [
        [_finding_meta(anatomy, view, f, size, config.small_flake_diameter[1]) for f in found]
        for view, found in zip(views, finding_sets)
    ]
    paths = [f"images/{plan.split}/{plan.record_id}-{i}.png" for i in range(len(images))]
    record = {
        "id": plan.record_id,
        "task": plan.task,
        "images": paths,
        "conversations": [
            {"from": "human", "value": f"{IMAGE_TOKEN}\n" * len(images) + question},
            {"from": "gpt", "value": answer},
        ],
        "meta": meta,
    }
    return record, images


def _save_png(path: str, image: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(image).save(path, format="PNG", compress_level=_PNG_COMPRESS_LEVEL)


def _generate_and_save(job) -> str:
    plan, config, output_dir = job
    record, images = generate_record(plan, config)
    for relative, image in zip(record["images"], images):
        _save_png(os.path.join(output_dir, relative), image)
    return json.dumps(record, ensure_ascii=False)


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def generate_dataset(output_dir: str, config: SynthConfig, workers: int = 1, progress=None) -> dict:
    """
    Write `<split>.jsonl`, `images/` and `manifest.json` under `output_dir`; returns the manifest.

    `workers > 1` renders in a process pool; the output does not depend on it.
    """
    os.makedirs(output_dir, exist_ok=True)
    manifest = {
        "generator": "qilin_med_vl.synthetic",
        "generator_version": GENERATOR_VERSION,
        "seed": config.seed,
        "config": asdict(config),
        "image_size": config.image_size,
        "orientation": "radiological: patient's right knee (右侧) on the image's left",
        "lesion_size_px": {
            "small_flake_diameter": [d * config.image_size / REFERENCE_SIZE for d in config.small_flake_diameter],
            "large_flake_diameter": [d * config.image_size / REFERENCE_SIZE for d in config.large_flake_diameter],
            "large_flake_fraction": config.large_flake_fraction,
        },
        "splits": {},
    }
    pool = multiprocessing.get_context().Pool(workers) if workers > 1 else None
    try:
        for split in SPLITS:
            count = int(config.counts.get(split, 0))
            plans = plan_split(split, count, config.seed)
            jobs = [(plan, config, output_dir) for plan in plans]
            lines = pool.imap(_generate_and_save, jobs, chunksize=4) if pool else map(_generate_and_save, jobs)
            path = os.path.join(output_dir, f"{split}.jsonl")
            with open(path, "w", encoding="utf-8") as handle:
                for done, line in enumerate(lines, 1):
                    handle.write(line + "\n")
                    if progress:
                        progress(split, done, count)
            tasks = dict.fromkeys(clinical.TASKS, 0)
            labels = {task: {} for task in clinical.TASKS}
            for plan in plans:
                tasks[plan.task] += 1
                key = f"{plan.label}/{plan.kind}" if plan.task == "comparative" else plan.label
                labels[plan.task][key] = labels[plan.task].get(key, 0) + 1
            manifest["splits"][split] = {
                "file": f"{split}.jsonl",
                "records": count,
                "images": sum(2 if plan.task == "comparative" else 1 for plan in plans),
                "tasks": tasks,
                "labels": {task: dict(sorted(counts.items())) for task, counts in labels.items()},
                "sha256": _sha256(path),
            }
    finally:
        if pool:
            pool.close()
            pool.join()
    with open(os.path.join(output_dir, "manifest.json"), "w", encoding="utf-8") as handle:
        json.dump(manifest, handle, ensure_ascii=False, indent=2)
        handle.write("\n")
    return manifest


def write_shipped_examples(folder: str, seed: int = 7, image_size: int = REFERENCE_SIZE) -> list[dict]:
    """
    The examples shipped in the repository: one patient, a small flake (8 px at 1024, gone at 336 px) that
    worsens at follow-up, and one record per task. Writes `before.png`, `after.png` and
    `examples.jsonl` (image paths relative to `folder`).
    """
    rng = _rng(seed, "examples", 0)
    anatomy = sample_anatomy(rng)
    before = Finding(
        "flake", 0, "femur", depth=70.0, across=0.25, size=8.0, strength=0.8, seed=int(rng.integers(2**31))
    )
    after = clinical.apply_change(rng, anatomy, before, "worsened")
    # Low-noise, dark-air exposures from the generator's ranges: the PNGs compress to about 0.4 MB instead of 0.5.
    first_view = replace(sample_view(rng), noise_sigma=0.015, offset=-0.05)
    views = [first_view, replace(sample_follow_up_view(rng, first_view, PAIR_SHIFT), noise_sigma=0.015, offset=-0.05)]
    names = ["before.png", "after.png"]
    finding_sets = [[before], after]
    for name, view, found in zip(names, views, finding_sets):
        _save_png(os.path.join(folder, name), to_uint8(render_radiograph(anatomy, view, found, image_size)))
    meta = {
        "patient_id": "example-0",
        "anatomy_hash": anatomy_hash(anatomy),
        "image_size": image_size,
        "findings": [
            [_finding_meta(anatomy, v, f, image_size) for f in found] for v, found in zip(views, finding_sets)
        ],
    }
    answers = {
        "description": clinical.description_answer(rng, [before]),
        "disease": clinical.disease_answer(rng, [before]),
        "location": clinical.location_answer(rng, [before]),
        "comparative": clinical.comparative_answer(rng, before, "worsened"),
    }
    records = []
    for task in clinical.TASKS:
        images = names if task == "comparative" else names[:1]
        record_meta = dict(
            meta, findings=meta["findings"][: len(images)], label="worsened" if task == "comparative" else "flake"
        )
        records.append(
            {
                "id": f"example-{task}",
                "task": task,
                "images": images,
                "conversations": [
                    {
                        "from": "human",
                        "value": f"{IMAGE_TOKEN}\n" * len(images) + clinical.QUESTION_TEMPLATES[task][0],
                    },
                    {"from": "gpt", "value": answers[task]},
                ],
                "meta": record_meta,
            }
        )
    with open(os.path.join(folder, "examples.jsonl"), "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    return records
