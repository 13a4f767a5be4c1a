# Copyright 2026 The qilin-med-vl Authors. Licensed under the Apache License, Version 2.0.
"""What a conversion did with every source tensor, and whether the output is complete.

Every converter fills a `ConversionReport` (each source tensor mapped, or dropped with a reason) and checks the
tensors it is about to write against the model's own state dict (`check_complete`) before it writes any of them.
"""

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..modeling.configuration_qilin_med_vl import QilinMedVLConfig
from ..modeling.modeling_qilin_med_vl import QilinMedVLForConditionalGeneration


@dataclass
class ConversionReport:
    """What happened to every source tensor. Source keys read `"<origin>:<key>"` (origin: model, base, projector,
    clip, ...); target keys are the output checkpoint's names."""

    mapped: dict[str, str] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    created: dict[str, str] = field(default_factory=dict)
    ignored_files: list[str] = field(default_factory=list)
    output: str | None = None

    def summary(self) -> str:
        lines = [
            f"{len(self.mapped)} tensors mapped, {len(self.dropped)} dropped on purpose, {len(self.missing)} missing"
        ]
        reasons: dict[str, int] = {}
        for reason in self.dropped.values():
            reason = re.sub(r" \([^()]*\)$", "", reason)  # per-tensor details stay in the JSON report
            reasons[reason] = reasons.get(reason, 0) + 1
        lines += [f"  dropped x{count}: {reason}" for reason, count in sorted(reasons.items())]
        lines += [f"  changed {key}: {how}" for key, how in sorted(self.created.items())]
        lines += [f"  missing: {key}" for key in self.missing]
        if self.ignored_files:
            lines.append(f"  files not read (no weights or superseded): {', '.join(self.ignored_files)}")
        if self.output:
            lines.append(f"  written to {self.output}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "output": self.output,
            "mapped": self.mapped,
            "dropped": self.dropped,
            "missing": self.missing,
            "created": self.created,
            "ignored_files": self.ignored_files,
        }

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n")


class ConversionError(ValueError):
    """A conversion that cannot be completed faithfully; `report` holds what was accounted for so far."""

    def __init__(self, message: str, report: ConversionReport | None = None):
        super().__init__(message)
        self.report = report


def expected_state_dict_shapes(config: QilinMedVLConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor a `QilinMedVLForConditionalGeneration` of `config` saves (built on the meta
    device: no memory)."""
    with torch.device("meta"):
        model = QilinMedVLForConditionalGeneration(config)
    shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def check_complete(
    shapes: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], report: ConversionReport
) -> None:
    """Every expected tensor present in `shapes` (name -> shape of the tensors to write, such as
    `ShardWriter.keys`) with the expected shape, and nothing else; sets `report.missing`."""
    unexpected = sorted(set(shapes) - set(expected))
    if unexpected:
        raise ConversionError(f"Tensors the model does not have: {unexpected[:10]}", report)
    wrong = {key: (shape, expected[key]) for key, shape in shapes.items() if expected[key] != shape}
    if wrong:
        details = ", ".join(f"{key} {got} (expected {want})" for key, (got, want) in list(wrong.items())[:10])
        raise ConversionError(f"Shape mismatch: {details}", report)
    report.missing = sorted(set(expected) - set(shapes))
    if report.missing:
        raise ConversionError(
            f"{len(report.missing)} tensors of the model have no source, e.g. {report.missing[:10]}", report
        )
