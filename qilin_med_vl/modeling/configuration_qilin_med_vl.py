# Copyright 2026 The qilin-med-vl Authors. Licensed under the Apache License, Version 2.0.
"""Qilin-Med-VL configuration.

This file travels with checkpoints as remote code: it imports only torch/transformers and its flat
siblings (single-dot imports).
"""

from typing import Literal

import transformers
from packaging import version

# Checked before anything else is imported from transformers, so that a Hub user on an older release gets this
# message rather than an ImportError or a traceback deep inside `forward`.
MINIMUM_TRANSFORMERS_VERSION = "5.23.0"
if version.parse(transformers.__version__) < version.parse(MINIMUM_TRANSFORMERS_VERSION):
    raise ImportError(
        f"Qilin-Med-VL needs transformers>={MINIMUM_TRANSFORMERS_VERSION}, but transformers "
        f"{transformers.__version__} is installed: pip install -U 'transformers>={MINIMUM_TRANSFORMERS_VERSION}'"
    )

from transformers import AutoConfig, PreTrainedConfig  # noqa: E402
from transformers.configuration_utils import SubConfigSpec  # noqa: E402

# The released Qilin-Med-VL: CLIP ViT-L/14-336 + Chinese-LLaMA-2-13B-Chat (LLaVA v1.1-era layout).
# The vocabulary grows from 32000 to 32064 rows so that `<image>` (id 32000) has a token, padded to a
# multiple of 64 as transformers' llava-hf conversions do; rows past 32000 are never read for images.
QILIN_VISION_DEFAULTS = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "patch_size": 14,
    "image_size": 336,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}
QILIN_TEXT_DEFAULTS = {
    "hidden_size": 5120,
    "intermediate_size": 13824,
    "num_hidden_layers": 40,
    "num_attention_heads": 40,
    "num_key_value_heads": 40,
    "max_position_embeddings": 4096,
    "vocab_size": 32064,
    "rms_norm_eps": 1e-5,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}
PROJECTOR_TYPES = ("mlp2x_gelu", "linear")


class QilinMedVLConfig(PreTrainedConfig):
    r"""
    Configuration of a Qilin-Med-VL model: a CLIP vision tower, a projector and a Llama language model, laid out
    exactly as transformers' `LlavaConfig` so that weights move between the two unchanged.

    A config built with no arguments describes the released 13B Qilin-Med-VL.

    Args:
        vision_config (`dict` or `CLIPVisionConfig`, *optional*):
            The vision tower (CLIP ViT-L/14 at 336 px by default).
        text_config (`dict` or `LlamaConfig`, *optional*):
            The language model (Chinese-LLaMA-2-13B sizes by default).
        projector_type (`str`, *optional*, defaults to `"mlp2x_gelu"`):
            `"mlp2x_gelu"` (Linear, GELU, Linear: the original's and llava-1.5's) or `"linear"` (one Linear).
        image_token_id (`int`, *optional*, defaults to 32000):
            Id of the `<image>` token whose embeddings are replaced by projected image features.
        image_seq_length (`int`, *optional*, defaults to 576):
            Image tokens per image: (336 / 14)^2 patches with the CLS token dropped.
        vision_feature_layer (`int`, *optional*, defaults to -2):
            Hidden-state index of the vision tower whose features are projected (the penultimate layer).
        vision_feature_select_strategy (`str`, *optional*, defaults to `"default"`):
            `"default"` drops the CLS token, `"full"` keeps it.
        projector_hidden_act (`str`, *optional*, defaults to `"gelu"`):
            Activation inside the `mlp2x_gelu` projector.
        multimodal_projector_bias (`bool`, *optional*, defaults to `True`):
            Whether the projector's linear layers have biases.
    """

    model_type = "qilin_med_vl"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(
            config_class=AutoConfig, model_type="clip_vision_model", init_kwargs=QILIN_VISION_DEFAULTS
        ),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama", init_kwargs=QILIN_TEXT_DEFAULTS),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    projector_type: Literal["mlp2x_gelu", "linear"] = "mlp2x_gelu"
    image_token_id: int = 32000
    image_seq_length: int = 576
    vision_feature_layer: int = -2
    vision_feature_select_strategy: Literal["default", "full"] = "default"
    projector_hidden_act: str = "gelu"
    multimodal_projector_bias: bool = True
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.projector_type not in PROJECTOR_TYPES:
            raise ValueError(f"projector_type must be one of {PROJECTOR_TYPES}, got {self.projector_type!r}")
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise ValueError(
                "vision_feature_select_strategy must be 'default' or 'full', "
                f"got {self.vision_feature_select_strategy!r}"
            )
        patches = (self.vision_config.image_size // self.vision_config.patch_size) ** 2
        expected = patches if self.vision_feature_select_strategy == "default" else patches + 1
        if self.image_seq_length != expected:
            raise ValueError(
                f"image_seq_length={self.image_seq_length} does not match the vision tower: "
                f"{self.vision_config.image_size} px / patch {self.vision_config.patch_size} gives {expected} tokens "
                f"with strategy {self.vision_feature_select_strategy!r}"
            )
        if not 0 <= self.image_token_id < self.text_config.vocab_size:
            raise ValueError(
                f"image_token_id={self.image_token_id} is outside the vocabulary ({self.text_config.vocab_size} rows)"
            )


__all__ = ["QilinMedVLConfig"]
