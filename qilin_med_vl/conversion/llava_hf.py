# Copyright 2026 The qilin-med-vl Authors. Licensed under the Apache License, Version 2.0.
"""transformers' llava-hf checkpoints <-> Qilin-Med-VL.

- `convert_llava_hf`: a llava-hf checkpoint (LLaVA-1.5 and its medical variants) -> an HF-native Qilin-Med-VL
  folder, so a HiA adapter can be trained on it (the paper's Table 1 setting).
- `export_llava_hf`: a Qilin-Med-VL folder (base model, no HiA) -> transformers' `LlavaForConditionalGeneration`
  in the llava-hf key layout (`language_model.model.*`, `vision_tower.vision_model.*`), which transformers 4.x and
  5.x, vLLM and SGLang all load.

Both stream the weights one tensor at a time with the machinery of `original.py`.
"""

import os

import torch

from ..modeling.configuration_qilin_med_vl import QilinMedVLConfig
from ..processing.processing_qilin import VICUNA_V1_CHAT_TEMPLATE
from .llava import llava_config_from_qilin, qilin_config_from_llava
from .original import (
    DEFAULT_MAX_SHARD_SIZE,
    IMAGE_TOKEN,
    INV_FREQ_REASON,
    KeyRule,
    ShardWriter,
    _ignored_files,
    _read_json,
    build_generation_config,
    build_processor,
    drop,
    dtype_from_name,
    find_weight_files,
    iter_tensors,
    load_llama_tokenizer,
    map_key,
    parse_size,
    prepare_tokenizer,
    progress_bar,
    resolve_checkpoint,
    save_remote_code_and_config,
)
from .report import ConversionError, ConversionReport, check_complete, expected_state_dict_shapes
from .staging import staged_output

HF_DOWNLOAD_PATTERNS = [
    "*.json",
    "*.jinja",
    "model*.safetensors",
    "pytorch_model*.bin",
    "tokenizer*",
]

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


def _stream(files, rules, origin, writer, report, bar, dtype):
    """Maps every tensor of `files` through `rules` into `writer`; an unknown key is an error."""
    for path in files:
        for key, tensor in iter_tensors(path):
            bar.update(tensor.numel() * tensor.element_size())
            matched, target, reason = map_key(rules, key)
            if not matched:
                raise ConversionError(f"Unexpected tensor {key} in {path.name}: no rule maps it", report)
            if target is None:
                report.dropped[f"{origin}:{key}"] = reason
                continue
            writer.add(target, tensor, dtype)
            report.mapped[f"{origin}:{key}"] = target


def convert_llava_hf(
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = "auto",
    force: bool = False,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    progress: bool = True,
) -> ConversionReport:
    """Converts a transformers llava-hf checkpoint (LLaVA-1.5 and its medical variants) into an HF-native
    Qilin-Med-VL folder: same weights, `QilinMedVLConfig`, `QilinProcessor` with the vicuna v1 template LLaVA-1.5
    was trained with, remote code. Images are padded to a square (LLaVA-1.5's `image_aspect_ratio: pad`) unless
    the source's image processor says `do_pad: false`.

    Args:
        source: llava-hf folder or Hub repo id (e.g. `llava-hf/llava-1.5-7b-hf`).
        output: the folder to create.
        dtype: output dtype of floating-point tensors; "auto" keeps the checkpoint's.
        force, max_shard_size, progress: as for `convert_original`.
    """
    from transformers import LlavaConfig

    report = ConversionReport()
    folder = resolve_checkpoint(source, HF_DOWNLOAD_PATTERNS)
    raw = _read_json(folder / "config.json")
    if raw.get("model_type") != "llava" or "text_config" not in raw:
        raise ConversionError(f"{source} is not a llava-hf checkpoint (model_type 'llava' with a text_config)")
    if raw.get("text_config", {}).get("model_type", "llama") != "llama":
        raise ConversionError(f"Only Llama language models are supported, got {raw['text_config']['model_type']!r}")
    config = qilin_config_from_llava(LlavaConfig.from_pretrained(folder))
    tokenizer = prepare_tokenizer(load_llama_tokenizer(folder))
    if tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) != config.image_token_id:
        raise ConversionError(
            f"The tokenizer's {IMAGE_TOKEN} id {tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)} differs from the "
            f"config's image_token_index {config.image_token_id}"
        )
    config.text_config.pad_token_id = tokenizer.pad_token_id
    target_dtype = dtype_from_name(None if dtype == "auto" else dtype) or dtype_from_name(
        raw.get("dtype") or raw.get("torch_dtype")
    )
    files = find_weight_files(folder)
    if not files:
        raise ConversionError(f"{source} holds no weights")
    expected = expected_state_dict_shapes(config)

    with staged_output(output, force, protect=[source, folder]) as staging, progress_bar(
        sum(path.stat().st_size for path in files), progress, "Converting"
    ) as bar:
        writer = ShardWriter(staging, parse_size(max_shard_size))
        _stream(files, LLAVA_HF_IMPORT_RULES, "llava", writer, report, bar, target_dtype)
        check_complete(writer.keys, expected, report)
        writer.close()
        if target_dtype is not None:
            config.dtype = target_dtype
        save_remote_code_and_config(staging, config)
        image_source = _read_json(folder / "preprocessor_config.json")
        processor = build_processor(tokenizer, config, image_source, do_pad=image_source.get("do_pad", True))
        processor.save_pretrained(staging)
        build_generation_config(_read_json(folder / "generation_config.json"), tokenizer).save_pretrained(staging)
    report.ignored_files = _ignored_files(folder, files)
    report.output = str(output)
    return report


def export_llava_hf(
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    force: bool = False,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    progress: bool = True,
) -> ConversionReport:
    """Exports a Qilin-Med-VL folder (the base model; a `hia/` adapter is not part of it) to transformers'
    `LlavaForConditionalGeneration`, so that vLLM and SGLang, which serve that architecture, can serve it.

    Writes the llava-hf key layout, a `LlavaConfig`, and a `LlavaProcessor` (`LlavaImageProcessor` with the same
    pad-to-square, the vicuna v1 chat template). One difference remains: `LlavaProcessor` tokenizes the prompt
    as a whole, while `QilinProcessor` (like the original code) tokenizes the text between images separately, so
    the token after an image can differ; the weights and the image features are identical.
    """
    from transformers import LlavaProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    from ..processing.processing_qilin import QilinProcessor

    report = ConversionReport()
    folder = resolve_checkpoint(source, HF_DOWNLOAD_PATTERNS + ["*.py"])
    config = QilinMedVLConfig.from_pretrained(folder)
    llava_config = llava_config_from_qilin(config)
    llava_config.architectures = ["LlavaForConditionalGeneration"]
    if getattr(config, "dtype", None) is not None:
        llava_config.dtype = config.dtype
    files = find_weight_files(folder)
    if not files:
        raise ConversionError(f"{source} holds no weights")
    expected = {}
    for key, shape in expected_state_dict_shapes(config).items():
        expected[map_key(LLAVA_HF_EXPORT_RULES, key)[1]] = shape

    qilin_processor = QilinProcessor.from_pretrained(folder)
    tokenizer, qilin_image_processor = qilin_processor.tokenizer, qilin_processor.image_processor
    image_processor = LlavaImageProcessorPil(
        do_pad=qilin_image_processor.do_pad,
        size=dict(qilin_image_processor.size),
        crop_size=dict(qilin_image_processor.crop_size),
        image_mean=qilin_image_processor.image_mean,
        image_std=qilin_image_processor.image_std,
        resample=qilin_image_processor.resample,
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        chat_template=VICUNA_V1_CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped again by the "default" strategy
    )

    with staged_output(output, force, protect=[source, folder]) as staging, progress_bar(
        sum(path.stat().st_size for path in files), progress, "Exporting"
    ) as bar:
        writer = ShardWriter(staging, parse_size(max_shard_size))
        _stream(files, LLAVA_HF_EXPORT_RULES, "qilin", writer, report, bar, None)
        check_complete(writer.keys, expected, report)
        writer.close()
        llava_config.save_pretrained(staging)
        processor.save_pretrained(staging)
        build_generation_config(_read_json(folder / "generation_config.json"), tokenizer).save_pretrained(staging)
        write_transformers4_compatible_files(staging)
    report.ignored_files = _ignored_files(folder, files)
    if (folder / "hia").is_dir():
        report.ignored_files.append("hia/ (the HiA adapter: vLLM and SGLang serve the base model only)")
    report.output = str(output)
    return report


def write_transformers4_compatible_files(folder) -> None:
    """Rewrites the configs transformers 5 saved in `folder` so that transformers 4.x, which the vLLM and SGLang
    releases of its time pin, reads them too (5.x reads both forms):

    - `config.json`: `torch_dtype` next to `dtype`; `rope_theta` / `rope_scaling` next to `rope_parameters`;
    - `preprocessor_config.json`: the image processor, out of `processor_config.json`;
    - `tokenizer_config.json`: `additional_special_tokens` for the list form of `extra_special_tokens` (4.x wants a
      dict there), without transformers 5's own keys and the Qilin processor's `auto_map`.
    """
    import json
    from pathlib import Path

    folder = Path(folder)

    def rewrite(name, update):
        path = folder / name
        data = json.loads(path.read_text())
        path.write_text(json.dumps(update(data), indent=2, ensure_ascii=False, sort_keys=True) + "\n")

    def config(data):
        if data.get("dtype"):
            data["torch_dtype"] = data["dtype"]
        text = data.get("text_config", {})
        rope = dict(text.get("rope_parameters") or {})
        if rope:
            text["rope_theta"] = rope.pop("rope_theta", 10000.0)
            if rope.get("rope_type", "default") != "default":
                text["rope_scaling"] = rope
        return data

    def tokenizer(data):
        for key in ("auto_map", "backend", "is_local", "local_files_only"):
            data.pop(key, None)
        extra = data.get("extra_special_tokens")
        if isinstance(extra, list):
            data.pop("extra_special_tokens")
            data["additional_special_tokens"] = list(dict.fromkeys(data.get("additional_special_tokens", []) + extra))
        return data

    def processor(data):
        image_processor = data.pop("image_processor", None)
        if image_processor is not None:
            image_processor["processor_class"] = data.get("processor_class", "LlavaProcessor")
            text = json.dumps(image_processor, indent=2, sort_keys=True) + "\n"
            (folder / "preprocessor_config.json").write_text(text)
        return data

    rewrite("config.json", config)
    rewrite("tokenizer_config.json", tokenizer)
    rewrite("processor_config.json", processor)



__all__ = ["convert_llava_hf", "export_llava_hf", "write_transformers4_compatible_files"]
