# Copyright 2026 The qilin-med-vl Authors. Licensed under the Apache License, Version 2.0.
"""Synthetic knee radiographs with small lesions, and Chinese instructions for the four HiA tasks.

- `render`: procedural radiographs (`sample_anatomy`, `sample_view`, `Finding`, `render_radiograph`).
- `visibility`: `lesion_visibility_report`, how much of a small lesion survives downscaling to 336 / 672 px.
- `findings`: disease and change labels, finding sampling, question and answer templates.
- `dataset`: balanced, seed-deterministic train/validation/test splits in the training JSONL format
  (`generate_dataset`, what the `synth-data` command runs).

Only numpy and PIL are needed; nothing here imports torch.
"""

from .dataset import GENERATOR_VERSION, SPLITS, SynthConfig, generate_dataset, generate_record, plan_split
from .findings import CHANGES, DISEASES, TASKS
from .render import (
    Anatomy,
    Finding,
    View,
    render_radiograph,
    sample_anatomy,
    sample_follow_up_view,
    sample_view,
    to_uint8,
)
from .visibility import format_visibility_report, lesion_visibility_report

__all__ = [
    "CHANGES",
    "DISEASES",
    "GENERATOR_VERSION",
    "SPLITS",
    "TASKS",
    "Anatomy",
    "Finding",
    "SynthConfig",
    "View",
    "format_visibility_report",
    "generate_dataset",
    "generate_record",
    "lesion_visibility_report",
    "plan_split",
    "render_radiograph",
    "sample_anatomy",
    "sample_follow_up_view",
    "sample_view",
    "to_uint8",
]
