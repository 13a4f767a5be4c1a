# Copyright 2026 The qilin-med-vl Authors. Licensed under the Apache License, Version 2.0.
"""transformers' llava-hf checkpoints <-> Qilin-Med-VL.

- `convert_llava_hf`: a llava-hf checkpoint (LLaVA-1.5 and its medical variants) -> an HF-native Qilin-Med-VL
  folder, so a HiA adapter can be trained on it (the paper's Table 1 setting).
- `export_llava_hf`: a Qilin-Med-VL folder (base model, no HiA) -> transformers' `LlavaForConditionalGeneration`
  in the llava-hf key layout (`language_model.model.*`, `vision_tower.vision_model.*`), which transformers 4.x and
  5.x, vLLM and SGLang all load.

Both stream the weights one tensor at a time (`checkpoint_io.py`) through the key rules of `key_rules.py`.
"""

import json
import os
from pathlib import Path

import torch

from ..modeling.configuration_qilin_med_vl import QilinMedVLConfig
from ..processing.processing_qilin import IMAGE_TOKEN, VICUNA_V1_CHAT_TEMPLATE
from .assets import build_generation_config, load_llama_tokenizer, prepare_tokenizer, save_qilin_assets
from .checkpoint_io import (
    DEFAULT_MAX_SHARD_SIZE,
    ShardWriter,
    find_weight_files,
    ignored_weight_files,
    output_dtype,
    read_json,
    resolve_checkpoint,
)
from .key_rules import LLAVA_HF_EXPORT_RULES, LLAVA_HF_IMPORT_RULES, map_key, map_tensors
from .llava import llava_config_from_qilin, qilin_config_from_llava
from .report import ConversionError, ConversionReport, check_complete, expected_state_dict_shapes
from .staging import staged_output

HF_DOWNLOAD_PATTERNS = [
    "*.json",
    "*.jinja",
    "model*.safetensors",
    "pytorch_model*.bin",
    "tokenizer*",
]


def _write_weights(staging, files, rules, origin, report, *, expected, dtype, max_shard_size, progress, description):
    """Maps every tensor of `files` through `rules` (`origin` names them in the report), checks them against
    `expected` (name -> shape) and writes them into `staging` as shards."""
    writer = ShardWriter(max_shard_size)
    for source_key, target, tensor in map_tensors(files, rules, origin, report):
        writer.add(target, tensor, dtype)
        report.mapped[source_key] = target
    check_complete(writer.keys, expected, report)
    writer.write(staging, progress, description)


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
    raw = read_json(folder / "config.json")
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
    target_dtype = output_dtype(dtype, raw)
    if target_dtype is not None:
        config.dtype = target_dtype
    files = find_weight_files(folder)
    if not files:
        raise ConversionError(f"{source} holds no weights")
    expected = expected_state_dict_shapes(config)
    image_source = read_json(folder / "preprocessor_config.json")

    with staged_output(output, force, protect=[source, folder]) as staging:
        _write_weights(staging, files, LLAVA_HF_IMPORT_RULES, "llava", report, expected=expected, dtype=target_dtype,
                       max_shard_size=max_shard_size, progress=progress, description="Converting")
        save_qilin_assets(staging, config, tokenizer, folder, image_source=image_source,
                          do_pad=image_source.get("do_pad", True))
    report.ignored_files = ignored_weight_files(folder, files)
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

    with staged_output(output, force, protect=[source, folder]) as staging:
        _write_weights(staging, files, LLAVA_HF_EXPORT_RULES, "qilin", report, expected=expected, dtype=None,
                       max_shard_size=max_shard_size, progress=progress, description="Exporting")
        llava_config.save_pretrained(staging)
        processor.save_pretrained(staging)
        build_generation_config(read_json(folder / "generation_config.json"), tokenizer).save_pretrained(staging)
        write_transformers4_compatible_files(staging)
    report.ignored_files = ignored_weight_files(folder, files)
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
