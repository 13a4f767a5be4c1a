# Copyright 2026 The qilin-med-vl Authors. Licensed under the Apache License, Version 2.0.
"""Everything of a converted folder but the weights: the config with the remote-code files, the tokenizer, the
processor and the generation config, made from what the source checkpoint carries."""

from pathlib import Path

import torch

from ..modeling.configuration_qilin_med_vl import QilinMedVLConfig
from ..modeling.modeling_qilin_med_vl import QilinMedVLForConditionalGeneration
from ..processing.image_processing_qilin import QilinImageProcessor
from ..processing.processing_qilin import IMAGE_TOKEN, QilinProcessor
from .checkpoint_io import read_json
from .report import ConversionError


def load_llama_tokenizer(folder: Path):
    """A checkpoint's LLaMA tokenizer (a slow SentencePiece `tokenizer.model`, or a `tokenizer.json`) as a
    transformers tokenizer. transformers 5 converts `tokenizer.model` to a fast tokenizer, which needs
    `sentencepiece` and `protobuf`."""
    from transformers import AutoTokenizer, LlamaTokenizer

    if not any((folder / name).is_file() for name in ("tokenizer.model", "tokenizer.json")):
        raise ConversionError(f"{folder} has no tokenizer.model or tokenizer.json")
    # Not AutoTokenizer: next to a `model_type: "llava"` config it picks a generic class that, reading
    # `tokenizer.model`, loses SentencePiece's word-start marker.
    tokenizer_class = read_json(folder / "tokenizer_config.json").get("tokenizer_class", "LlamaTokenizer")
    try:
        if tokenizer_class.removesuffix("Fast") == "LlamaTokenizer":
            return LlamaTokenizer.from_pretrained(folder)
        return AutoTokenizer.from_pretrained(folder)
    except ImportError as error:
        raise ImportError(
            f"Converting {folder / 'tokenizer.model'} needs sentencepiece and protobuf: "
            "pip install 'qilin-med-vl[convert]'"
        ) from error


def prepare_tokenizer(tokenizer, model_max_length: int | None = None):
    """Adds `<image>` as a special token (if missing); pad = unk (id 0), as the original trained with; left
    padding, which batched generation needs. Returns the tokenizer."""
    if tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) in (None, tokenizer.unk_token_id):
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token
    tokenizer.padding_side = "left"
    if model_max_length:
        tokenizer.model_max_length = model_max_length
    return tokenizer


def build_processor(tokenizer, config: QilinMedVLConfig, image_source: dict | None = None, do_pad: bool = True):
    """`QilinProcessor` (v1 chat template) for `config`: CLIP normalisation (from `image_source`, a
    preprocessor_config.json, where given), the vision tower's resolution, HiA's high-resolution view at twice it."""
    image_size = config.vision_config.image_size
    image_source = image_source or {}
    kwargs = {key: image_source[key] for key in ("image_mean", "image_std") if key in image_source}
    image_processor = QilinImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        high_res_size=2 * image_size,
        do_pad=do_pad,
        **kwargs,
    )
    return QilinProcessor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_length=config.image_seq_length
    )


def build_generation_config(source: dict, tokenizer):
    """The source's generation settings (a generation_config.json's dict) with the tokenizer's special tokens."""
    from transformers import GenerationConfig

    values = {k: v for k, v in source.items() if k not in ("transformers_version", "_from_model_config")}
    generation_config = GenerationConfig(**values)
    generation_config.bos_token_id = tokenizer.bos_token_id
    generation_config.eos_token_id = tokenizer.eos_token_id
    generation_config.pad_token_id = tokenizer.pad_token_id
    return generation_config


def save_remote_code_and_config(folder: Path, config: QilinMedVLConfig) -> None:
    """`config.json` with `auto_map` plus the flat set of remote-code files, as `save_pretrained` would write them
    for a `QilinMedVLForConditionalGeneration` (which is never materialised here)."""
    from transformers.dynamic_module_utils import custom_object_save

    with torch.device("meta"):
        meta_model = QilinMedVLForConditionalGeneration(config)
    custom_object_save(meta_model, folder)
    entry = f"{QilinMedVLForConditionalGeneration.__module__.split('.')[-1]}.QilinMedVLForConditionalGeneration"
    config.architectures = ["QilinMedVLForConditionalGeneration"]
    config.auto_map = {
        "AutoConfig": f"{QilinMedVLConfig.__module__.split('.')[-1]}.QilinMedVLConfig",
        "AutoModel": entry,
        "AutoModelForImageTextToText": entry,
    }
    config.save_pretrained(folder)


def save_qilin_assets(
    folder: Path, config: QilinMedVLConfig, tokenizer, source: Path, *, image_source: dict, do_pad: bool
) -> None:
    """Writes the config and remote code, the `QilinProcessor` and the generation config (from the `source`
    folder's generation_config.json, if any) of a converted Qilin-Med-VL folder."""
    save_remote_code_and_config(folder, config)
    build_processor(tokenizer, config, image_source, do_pad).save_pretrained(folder)
    build_generation_config(read_json(source / "generation_config.json"), tokenizer).save_pretrained(folder)
