# Copyright 2026 The qilin-med-vl Authors. Licensed under the Apache License, Version 2.0.
"""The original Qilin-Med-VL release (LLaVA v1.1-era layout) + CLIP -> an HF-native Qilin-Med-VL folder.

The release's config maps to a `QilinMedVLConfig` (`qilin_config_from_original`); its tensors stream through the
key rules of `key_rules.py` into a `ShardWriter` (`checkpoint_io.py`), with every source tensor accounted for in the
`ConversionReport` (`report.py`); the folder appears only when complete (`staging.py`).

    >>> from qilin_med_vl.conversion import convert_original
    >>> report = convert_original("Qilin-Med-VL", "Qilin-Med-VL-hf")  # doctest: +SKIP
    >>> print(report.summary())  # doctest: +SKIP
"""

import os
from pathlib import Path

import torch

from ..modeling.configuration_qilin_med_vl import QilinMedVLConfig
from ..processing.processing_qilin import IMAGE_TOKEN
from .assets import load_llama_tokenizer, prepare_tokenizer, save_qilin_assets
from .checkpoint_io import (
    DEFAULT_MAX_SHARD_SIZE,
    LazyCheckpoint,
    ShardWriter,
    find_weight_files,
    ignored_weight_files,
    iter_tensors,
    output_dtype,
    read_json,
    resolve_checkpoint,
)
from .key_rules import CLIP_RULES, ORIGINAL_LLM_RULES, map_key, map_tensors
from .report import ConversionError, ConversionReport, check_complete, expected_state_dict_shapes
from .staging import staged_output

DEFAULT_CLIP = "openai/clip-vit-large-patch14-336"
# transformers' llava-hf conversions pad the vocabulary to a multiple of 64 rows (32000 + `<image>` -> 32064).
VOCAB_MULTIPLE = 64

ORIGINAL_DOWNLOAD_PATTERNS = [
    "config.json",
    "generation_config.json",
    "model*.safetensors",
    "model.safetensors.index.json",
    "pytorch_model*.bin",
    "pytorch_model.bin.index.json",
    "mm_projector.bin",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
]
CLIP_DOWNLOAD_PATTERNS = ["config.json", "preprocessor_config.json"]


def resolve_clip(name_or_path: str | os.PathLike) -> Path:
    """The CLIP folder, downloading only its configs and one weight format (safetensors if there is one)."""
    if Path(name_or_path).is_dir():
        return Path(name_or_path)
    folder = resolve_checkpoint(name_or_path, CLIP_DOWNLOAD_PATTERNS + ["model*.safetensors*"])
    if not find_weight_files(folder):
        folder = resolve_checkpoint(name_or_path, CLIP_DOWNLOAD_PATTERNS + ["pytorch_model*.bin*"])
    return folder


# --------------------------------------------------------------------------------------------------------------
# The release's config
# --------------------------------------------------------------------------------------------------------------

TEXT_CONFIG_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
    "rms_norm_eps",
    "hidden_act",
    "initializer_range",
    "rope_theta",
    "rope_scaling",
    "attention_bias",
    "bos_token_id",
    "eos_token_id",
)
SELECT_FEATURE_TO_STRATEGY = {"patch": "default", "cls_patch": "full"}
PROJECTOR_TYPES_BY_NAME = {"mlp2x_gelu": "mlp2x_gelu", "linear": "linear"}


def vision_config_from_clip(clip_folder: Path) -> dict:
    """The `clip_vision_model` config of a CLIP checkpoint folder (full `CLIPModel` or vision-only)."""
    config = read_json(clip_folder / "config.json")
    if not config:
        raise ConversionError(f"{clip_folder} has no config.json: not a CLIP checkpoint")
    if config.get("model_type") == "clip":
        from transformers import CLIPConfig

        vision = CLIPConfig(**{k: v for k, v in config.items() if k in ("vision_config", "text_config")}).vision_config
    elif config.get("model_type") == "clip_vision_model":
        from transformers import CLIPVisionConfig

        vision = CLIPVisionConfig(**{k: v for k, v in config.items() if k not in ("architectures", "model_type")})
    else:
        raise ConversionError(f"{clip_folder} holds a {config.get('model_type')!r} model, not CLIP")
    return vision.to_dict()


def qilin_config_from_original(
    original: dict, text_source: dict, vision_config: dict, vocab_size: int, image_token_id: int, pad_token_id: int
) -> QilinMedVLConfig:
    """The `QilinMedVLConfig` of an original LLaVA-fork checkpoint.

    original: the release's config.json (the `mm_*` fields); text_source: the config of the checkpoint holding the
    LLaMA weights (the release itself, or the base model of a projector-only release)."""
    if original.get("mm_use_im_start_end") or original.get("mm_use_im_patch_token"):
        raise ConversionError("mm_use_im_start_end / mm_use_im_patch_token checkpoints are not supported")
    projector_type = original.get("mm_projector_type", "linear")  # the LLaVA builder's default
    if projector_type not in PROJECTOR_TYPES_BY_NAME:
        raise ConversionError(f"mm_projector_type {projector_type!r} is not supported (mlp2x_gelu or linear)")
    select_feature = original.get("mm_vision_select_feature", "patch")
    if select_feature not in SELECT_FEATURE_TO_STRATEGY:
        raise ConversionError(f"mm_vision_select_feature {select_feature!r} is not supported (patch or cls_patch)")
    if original.get("mm_hidden_size") not in (None, vision_config["hidden_size"]):
        raise ConversionError(
            f"mm_hidden_size {original['mm_hidden_size']} does not match the CLIP tower's "
            f"{vision_config['hidden_size']}"
        )
    text_config = {"model_type": "llama", **{k: text_source[k] for k in TEXT_CONFIG_FIELDS if k in text_source}}
    text_config.setdefault("num_key_value_heads", text_config.get("num_attention_heads"))
    text_config.update(vocab_size=vocab_size, pad_token_id=pad_token_id)
    strategy = SELECT_FEATURE_TO_STRATEGY[select_feature]
    patches = (vision_config["image_size"] // vision_config["patch_size"]) ** 2
    return QilinMedVLConfig(
        vision_config=vision_config,
        text_config=text_config,
        projector_type=PROJECTOR_TYPES_BY_NAME[projector_type],
        image_token_id=image_token_id,
        image_seq_length=patches + (strategy == "full"),
        vision_feature_layer=original.get("mm_vision_select_layer", -2),
        vision_feature_select_strategy=strategy,
        tie_word_embeddings=bool(text_source.get("tie_word_embeddings", False)),
    )


# --------------------------------------------------------------------------------------------------------------
# The conversion
# --------------------------------------------------------------------------------------------------------------


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple if multiple > 1 else value


def grow_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """`tensor` `(n, D)` with rows appended up to `rows`, each the mean of the existing rows: a neutral start for
    tokens the model never saw (the `<image>` row is never read, image features replace it)."""
    extra = rows - tensor.shape[0]
    if extra <= 0:
        return tensor
    mean = tensor.float().mean(dim=0, keepdim=True).to(tensor.dtype)
    return torch.cat([tensor, mean.expand(extra, -1)], dim=0)


def _compare(tensor: torch.Tensor, reference: torch.Tensor, dtype: torch.dtype | None = None) -> str:
    """"identical" or how two tensors differ, compared in the output `dtype` (what would be written)."""
    if tensor.shape != reference.shape:
        return f"shape {tuple(tensor.shape)} vs {tuple(reference.shape)}"
    if dtype is not None and tensor.is_floating_point():
        tensor, reference = tensor.to(dtype), reference.to(dtype)
    difference = (tensor.float() - reference.float()).abs().max().item() if tensor.numel() else 0.0
    return "identical" if difference == 0 else f"differs, max |diff| {difference:.3g}"


def _clip_key_for(target: str, clip_weights: LazyCheckpoint) -> str | None:
    """The CLIP checkpoint key that fills `target` (`model.vision_tower.X`): `vision_model.X` or plain `X`."""
    suffix = target.removeprefix("model.vision_tower.")
    return next((key for key in (f"vision_model.{suffix}", suffix) if key in clip_weights), None)


def _language_model(source, source_folder: Path, base_model) -> tuple[Path, str, list[Path]]:
    """`(folder, origin, weight files)` of the language model: the release's own shards, or for a
    projector-only release (no shards) those of `base_model`."""
    files = find_weight_files(source_folder)
    if files and base_model is not None:
        raise ConversionError(
            f"{source} already holds language-model weights; base_model is only for projector-only releases"
        )
    if files:
        return source_folder, "model", files
    if base_model is None:
        raise ConversionError(
            f"{source} holds no language-model weights (a projector-only release): pass base_model, the LLaMA "
            "checkpoint it was trained on"
        )
    folder = resolve_checkpoint(base_model, ORIGINAL_DOWNLOAD_PATTERNS)
    files = find_weight_files(folder)
    if not files:
        raise ConversionError(f"{base_model} holds no weights")
    return folder, "base", files


def _read_projector(path: Path, report: ConversionReport) -> dict[str, tuple[str, torch.Tensor]]:
    """Target -> (source key, tensor) of every tensor of `mm_projector.bin`; anything but the projector is an
    error."""
    projector = {}
    for key, tensor in iter_tensors(path):
        matched, target, _ = map_key(ORIGINAL_LLM_RULES, key)
        if not matched or target is None or not target.startswith("model.multi_modal_projector."):
            raise ConversionError(f"Unexpected tensor in {path.name}: {key}", report)
        projector[target] = (f"projector:{key}", tensor)
    return projector


def convert_original(
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    clip: str | os.PathLike = DEFAULT_CLIP,
    base_model: str | os.PathLike | None = None,
    dtype: str | torch.dtype | None = "auto",
    force: bool = False,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    vocab_multiple: int = VOCAB_MULTIPLE,
    progress: bool = True,
) -> ConversionReport:
    """Converts an original Qilin-Med-VL release into an HF-native folder.

    Args:
        source: the release (folder or Hub repo id): `pytorch_model-*.bin` shards (or safetensors) and/or
            `mm_projector.bin`, a config with `mm_*` fields, the SentencePiece tokenizer.
        output: the folder to create: safetensors shards, `QilinMedVLConfig`, `QilinProcessor` with the v1 chat
            template, the remote-code files and `generation_config.json`.
        clip: the CLIP ViT-L/14-336 checkpoint (folder or repo id) the vision tower comes from, in place of the
            private `mm_vision_tower` path of the release.
        base_model: the LLaMA checkpoint for a projector-only release (`mm_projector.bin` without LLM weights).
        dtype: output dtype of floating-point tensors; "auto" keeps the release's `torch_dtype` (bf16).
        force: replace an existing `output`.
        max_shard_size: output shard size limit: a byte count or "5GB", "500MB" (decimal units).
        vocab_multiple: `embed_tokens` / `lm_head` grow to a multiple of this many rows after `<image>` is added.
        progress: show a progress bar.

    Returns:
        The `ConversionReport`: every source tensor mapped or dropped with a reason. A source tensor no rule
        knows, or a model tensor without a source, raises `ConversionError` and writes nothing.
    """
    report = ConversionReport()
    source_folder = resolve_checkpoint(source, ORIGINAL_DOWNLOAD_PATTERNS)
    original = read_json(source_folder / "config.json")
    if "text_config" in original:
        raise ConversionError(f"{source} is a transformers llava-hf checkpoint: use convert_llava_hf")
    llm_folder, llm_origin, llm_files = _language_model(source, source_folder, base_model)
    projector_file = source_folder / "mm_projector.bin"
    projector_file = projector_file if projector_file.is_file() else None
    # LLaVA pads to a square only for "pad"; "square" (or none) is CLIP's plain resize + centre crop.
    if original.get("image_aspect_ratio") not in (None, "pad", "square"):
        raise ConversionError(
            f"image_aspect_ratio {original['image_aspect_ratio']!r} is not supported (pad or square)"
        )
    do_pad = original.get("image_aspect_ratio") == "pad" or not original
    text_source = read_json(llm_folder / "config.json") if llm_origin == "base" else original
    if "hidden_size" not in text_source:
        raise ConversionError(f"{llm_folder / 'config.json'} does not describe the language model")

    clip_folder = resolve_clip(clip)
    vision_config = vision_config_from_clip(clip_folder)
    clip_files = find_weight_files(clip_folder)
    if not clip_files:
        raise ConversionError(f"{clip_folder} holds no CLIP weights")
    clip_weights = LazyCheckpoint(clip_files)

    tokenizer_folder = source_folder if any(
        (source_folder / name).is_file() for name in ("tokenizer.model", "tokenizer.json")
    ) else llm_folder
    tokenizer = load_llama_tokenizer(tokenizer_folder)
    # Training truncated at tokenizer_model_max_length (LLaVA's --model_max_length, 2048 for Qilin-Med-VL).
    max_length = original.get("tokenizer_model_max_length")
    if not max_length and tokenizer.model_max_length > 10**8:  # transformers' "no limit"
        max_length = text_source.get("max_position_embeddings")
    tokenizer = prepare_tokenizer(tokenizer, max_length)
    source_rows = int(text_source.get("vocab_size", 32000))
    rows = round_up(max(source_rows, len(tokenizer)), vocab_multiple)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    projector_pending = _read_projector(projector_file, report) if projector_file is not None else {}
    if "mm_projector_type" not in original and "model.multi_modal_projector.linear_2.weight" in projector_pending:
        original = {**original, "mm_projector_type": "mlp2x_gelu"}  # a release without config.json
    config = qilin_config_from_original(
        original, text_source, vision_config, rows, image_token_id, tokenizer.pad_token_id
    )
    target_dtype = output_dtype(dtype, original, text_source)
    grown = {"model.language_model.embed_tokens.weight", "lm_head.weight"}
    writer = ShardWriter(max_shard_size)

    def add(source_key: str, target: str, tensor: torch.Tensor) -> None:
        nonlocal target_dtype
        if target_dtype is None and tensor.is_floating_point():
            target_dtype = tensor.dtype  # no torch_dtype in the config: keep the weights' own
        if target in grown:
            if tensor.shape[0] != source_rows:
                raise ConversionError(
                    f"{source_key} has {tensor.shape[0]} rows, the config says {source_rows}", report
                )
            if rows > tensor.shape[0]:
                report.created[target] = f"rows {tensor.shape[0]} -> {rows}, new rows = mean of the existing rows"
            tensor = grow_rows(tensor, rows)
        writer.add(target, tensor, target_dtype)
        report.mapped[source_key] = target

    inputs = [source, clip, base_model, source_folder, clip_folder, llm_folder]
    with staged_output(output, force, protect=inputs) as staging:
        # 1. Language model (and whatever else the release's shards carry), one file at a time.
        for source_key, target, tensor in map_tensors(llm_files, ORIGINAL_LLM_RULES, llm_origin, report):
            if target.startswith("model.vision_tower."):
                clip_key = _clip_key_for(target, clip_weights)
                verdict = (
                    _compare(tensor, clip_weights.get(clip_key), target_dtype) if clip_key else "absent from CLIP"
                )
                report.dropped[source_key] = (
                    "embedded CLIP copy, which the original loader ignored; the vision tower comes from the CLIP "
                    f"checkpoint ({verdict})"
                )
                continue
            if target in projector_pending:
                other_key, other = projector_pending.pop(target)
                report.dropped[other_key] = (
                    "mm_projector.bin duplicates the projector in the shards, which win "
                    f"({_compare(other, tensor, target_dtype)})"
                )
            add(source_key, target, tensor)
        # 2. The projector from mm_projector.bin, where the shards did not carry one.
        for target, (source_key, tensor) in projector_pending.items():
            add(source_key, target, tensor)
        # 3. The CLIP vision tower.
        for source_key, target, tensor in map_tensors(clip_files, CLIP_RULES, "clip", report):
            add(source_key, target, tensor)

        if target_dtype is not None:
            config.dtype = target_dtype
        check_complete(writer.keys, expected_state_dict_shapes(config), report)  # before a byte is written
        writer.write(staging, progress, "Converting")
        save_qilin_assets(staging, config, tokenizer, source_folder,
                          image_source=read_json(clip_folder / "preprocessor_config.json"), do_pad=do_pad)
    read_files = [*llm_files, *clip_files, *([projector_file] if projector_file else [])]
    report.ignored_files = ignored_weight_files(source_folder, read_files) + (
        ignored_weight_files(llm_folder, read_files) if llm_folder != source_folder else []
    )
    report.output = str(output)
    return report


__all__ = [
    "ConversionError",
    "ConversionReport",
    "DEFAULT_CLIP",
    "convert_original",
    "qilin_config_from_original",
]
