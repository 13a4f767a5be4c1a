# Copyright 2026 The qilin-med-vl Authors. Licensed under the Apache License, Version 2.0.
"""Tiny, offline building blocks for tests, benchmarks and docs: a Llama-style tokenizer built locally with the
`tokenizers` library and tiny Qilin-Med-VL configs. Nothing here touches the network.

    >>> from qilin_med_vl.testing import tiny_processor, tiny_model
    >>> processor = tiny_processor()
    >>> model = tiny_model(vocab_size=len(processor.tokenizer))
"""

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, normalizers, processors
from transformers import PreTrainedTokenizerFast

from .modeling.configuration_qilin_med_vl import QilinMedVLConfig
from .processing.image_processing_qilin import QilinImageProcessor
from .processing.processing_qilin import IMAGE_TOKEN, QilinProcessor

# Characters of Chinese radiology reports (and of the prompts in the docs) get their own tokens; anything else
# falls back to UTF-8 byte tokens, as in Llama's tokenizer.
CHINESE_CHARACTERS = (
    "的一是不了在人有我他这个们中来上大为和国地到以说时要就出会可也你对生能而子那得于着下自之年过发后作里"
    "用道行所然家种事成方多经么去法学如都同现当没动面起看定天分还进好小部其些主样理心她本前开但因只从想实"
    "图片张第二三四五六七八九十左右侧上下段骨关节膝髋肩肘腕踝股胫腓髌尺桡肱椎腰颈胸肺心脏肝肾脑部位位置"
    "可见未明显异常正常片状低高密度影灶病变骨折脱位增生硬化狭窄变窄间隙软组织肿胀积液钙化囊性结节炎症"
    "术后改变治疗前对比比较两相较好转加重无变化稳定恢复愈合内固定植入物请描述分析诊断判断是否有哪里什么"
    "患者检查报告结果提示考虑建议随访复查影像学表现清晰完整连续骨质骨小梁边缘毛糙模糊均匀轻度中度重度"
    "类风湿关节炎退行性痛风结核肿瘤转移缺血坏死感染血管神经肌肉韧带半月板滑膜积液这图像中显示区域面积"
    "大小形态密度信号减弱增强程度范围约毫米厘米个处多发单发周围邻近投影区髁间隆起变尖第一次经过手术分别"
    "，。、；：？！（）“”《》…—"
)
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]


def tiny_tokenizer(model_max_length: int = 2048, extra_characters: str = "") -> PreTrainedTokenizerFast:
    """A character-level Llama-style tokenizer (SentencePiece conventions: "▁" word marker, byte fallback,
    `<s>` prepended) with `<image>` as a special token. Padding uses `<unk>` (id 0), as Qilin-Med-VL did.
    `extra_characters` get their own tokens too (for example every character of a training set)."""
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for character in "▁" + "".join(chr(c) for c in range(33, 127)) + CHINESE_CHARACTERS + extra_characters:
        if character.isspace():
            continue
        vocab.setdefault(character, len(vocab))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<unk>",
        model_max_length=model_max_length,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return tokenizer


def tiny_processor(
    image_size: int = 28, patch_size: int = 14, high_res_size: int = 56, model_max_length: int = 2048
) -> QilinProcessor:
    """A `QilinProcessor` for `tiny_config(image_size, patch_size)`: `(image_size/patch_size)^2` tokens per image."""
    image_processor = QilinImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        high_res_size=high_res_size,
    )
    return QilinProcessor(
        image_processor=image_processor,
        tokenizer=tiny_tokenizer(model_max_length),
        image_seq_length=(image_size // patch_size) ** 2,
    )


def tiny_config(
    vocab_size: int | None = None,
    hidden_size: int = 64,
    num_hidden_layers: int = 4,
    vision_hidden_size: int = 32,
    image_size: int = 28,
    patch_size: int = 14,
    projector_type: str = "mlp2x_gelu",
    image_token_id: int | None = None,
    vision_kwargs: dict | None = None,
    **text_kwargs,
) -> QilinMedVLConfig:
    """A tiny Qilin-Med-VL config. Hidden sizes of 64 or more keep bitsandbytes 4-bit usable on CPU. `text_kwargs` and
    `vision_kwargs` override entries of the text and vision configs; `vocab_size` and `image_token_id` default to those
    of `tiny_tokenizer()`."""
    if not vocab_size or image_token_id is None:
        tokenizer = tiny_tokenizer()
        vocab_size = vocab_size or len(tokenizer)
        image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) if image_token_id is None else image_token_id
    text_config = {
        "model_type": "llama",
        "hidden_size": hidden_size,
        "intermediate_size": hidden_size * 2,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 2048,
        "vocab_size": vocab_size,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        **text_kwargs,
    }
    vision_config = {
        "model_type": "clip_vision_model",
        "hidden_size": vision_hidden_size,
        "intermediate_size": vision_hidden_size * 2,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": image_size,
        "patch_size": patch_size,
        "projection_dim": vision_hidden_size,
        **(vision_kwargs or {}),
    }
    return QilinMedVLConfig(
        text_config=text_config,
        vision_config=vision_config,
        projector_type=projector_type,
        image_token_id=image_token_id,
        image_seq_length=(image_size // patch_size) ** 2,
    )


def tiny_model(seed: int = 0, **config_kwargs):
    """A randomly initialised tiny `QilinMedVLForConditionalGeneration` in eval mode, fp32."""
    from .modeling.modeling_qilin_med_vl import QilinMedVLForConditionalGeneration

    torch.manual_seed(seed)
    model = QilinMedVLForConditionalGeneration(tiny_config(**config_kwargs))
    model.generation_config.pad_token_id = 0
    return model.eval()


def random_image(seed: int, size: tuple[int, int] = (40, 30)) -> Image.Image:
    """A random RGB image of `size` (width, height); not square by default, so that padding to a square matters."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))
