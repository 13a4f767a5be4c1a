# Copyright 2026 The qilin-med-vl Authors. Licensed under the Apache License, Version 2.0.
"""Which source tensor becomes which output tensor: full-match regex rules, first match wins, and a reason for
every tensor left out on purpose. A source tensor no rule knows is an error, never silently dropped.

The tables, one per source layout: the original LLaVA-fork release and its CLIP checkpoint (`convert_original`),
and transformers' llava-hf layouts in both directions (`convert_llava_hf`, `export_llava_hf`).
"""

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint_io import iter_tensors
from .report import ConversionError, ConversionReport


@dataclass(frozen=True)
class KeyRule:
    """`pattern` (a full-match regex) -> `target` (a `re.sub` template), or dropped when `target` is None."""

    pattern: str
    target: str | None
    reason: str | None = None

    def apply(self, key: str) -> str | None:
        return re.sub(self.pattern, self.target, key) if self.target is not None else None


def map_key(rules: Iterable[KeyRule], key: str) -> tuple[bool, str | None, str | None]:
    """`(matched, target, drop_reason)` of the first rule whose pattern matches all of `key`."""
    for rule in rules:
        if re.fullmatch(rule.pattern, key):
            return True, rule.apply(key), rule.reason
    return False, None, None


def drop(pattern: str, reason: str) -> KeyRule:
    return KeyRule(pattern, None, reason)


def map_tensors(
    files: Iterable[Path], rules: Iterable[KeyRule], origin: str, report: ConversionReport
) -> Iterator[tuple[str, str, torch.Tensor]]:
    """`(source key, target, tensor)` for every tensor of `files` (one file at a time, memory-mapped) that `rules`
    map; the source key reads `"<origin>:<key>"`. Tensors a rule drops go to `report.dropped` with its reason; a
    tensor no rule knows raises `ConversionError` naming it and its file."""
    rules = tuple(rules)
    for path in files:
        for key, tensor in iter_tensors(path):
            matched, target, reason = map_key(rules, key)
            if not matched:
                raise ConversionError(f"Unexpected tensor {key} in {path.name} ({origin}): no rule maps it", report)
            if target is None:
                report.dropped[f"{origin}:{key}"] = reason
            else:
                yield f"{origin}:{key}", target, tensor


INV_FREQ_REASON = "rotary inv_freq buffer: recomputed from the config at load time"

# The LLaVA v1.1 fork (and a plain HF LLaMA checkpoint, for projector-only releases): LLaMA under `model.*`.
ORIGINAL_LLM_RULES = (
    KeyRule(r"model\.embed_tokens\.weight", "model.language_model.embed_tokens.weight"),
    drop(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq", INV_FREQ_REASON),
    KeyRule(r"model\.layers\.(.+)", r"model.language_model.layers.\1"),
    KeyRule(r"model\.norm\.weight", "model.language_model.norm.weight"),
    KeyRule(r"lm_head\.weight", "lm_head.weight"),
    KeyRule(r"model\.mm_projector\.0\.(weight|bias)", r"model.multi_modal_projector.linear_1.\1"),
    KeyRule(r"model\.mm_projector\.2\.(weight|bias)", r"model.multi_modal_projector.linear_2.\1"),
    KeyRule(r"model\.mm_projector\.(weight|bias)", r"model.multi_modal_projector.linear_1.\1"),
    # The CLIP copy some files carry; the original loader ignored it (it loaded CLIP from mm_vision_tower).
    drop(r"model\.vision_tower\.vision_tower\.vision_model\.embeddings\.position_ids", "CLIP position_ids buffer"),
    KeyRule(r"model\.vision_tower\.vision_tower\.vision_model\.(.+)", r"model.vision_tower.\1"),
)

CLIP_HEAD_REASON = "CLIP contrastive head: LLaVA reads a hidden layer of the vision tower, not the projection"
# A CLIP checkpoint: a full `CLIPModel` or `CLIPVisionModel(WithProjection)` as saved by transformers 4.x
# (`vision_model.*`), or a `CLIPVisionModel` saved by transformers 5.x (no `vision_model.` level).
CLIP_RULES = (
    drop(r"(vision_model\.)?embeddings\.position_ids", "CLIP position_ids buffer (not persistent in transformers 5)"),
    drop(r"text_model\..+", "CLIP text tower: not part of the LLaVA architecture"),
    drop(r"(visual_projection|text_projection)\.weight|logit_scale", CLIP_HEAD_REASON),
    KeyRule(r"vision_model\.(.+)", r"model.vision_tower.\1"),
    KeyRule(r"((embeddings|encoder|pre_layrnorm|post_layernorm)\..+)", r"model.vision_tower.\1"),
)

# Every layout transformers has saved llava-hf checkpoints in: 4.x (`language_model.model.*`,
# `vision_tower.vision_model.*`), 4.52+ (`model.language_model.*`, `model.vision_tower.vision_model.*`) and 5.x
# (`model.vision_tower.*` without the `vision_model` level).
LLAVA_HF_IMPORT_RULES = (
    drop(r"(language_model\.model|model\.language_model)\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",
         INV_FREQ_REASON),
    drop(r"(model\.)?vision_tower\.(vision_model\.)?embeddings\.position_ids", "CLIP position_ids buffer"),
    KeyRule(r"language_model\.lm_head\.(.+)", r"lm_head.\1"),
    KeyRule(r"language_model\.model\.(.+)", r"model.language_model.\1"),
    KeyRule(r"(model\.)?vision_tower\.vision_model\.(.+)", r"model.vision_tower.\2"),
    KeyRule(r"vision_tower\.(.+)", r"model.vision_tower.\1"),
    KeyRule(r"multi_modal_projector\.(.+)", r"model.multi_modal_projector.\1"),
    KeyRule(r"((model\.(language_model|vision_tower|multi_modal_projector)|lm_head)\..+)", r"\1"),
)

# The llava-hf layout of the Hub's llava-hf/llava-1.5-*-hf repos: read by every transformers version, vLLM, SGLang.
LLAVA_HF_EXPORT_RULES = (
    KeyRule(r"model\.language_model\.(.+)", r"language_model.model.\1"),
    KeyRule(r"lm_head\.(.+)", r"language_model.lm_head.\1"),
    KeyRule(r"model\.vision_tower\.(.+)", r"vision_tower.vision_model.\1"),
    KeyRule(r"model\.multi_modal_projector\.(.+)", r"multi_modal_projector.\1"),
)
