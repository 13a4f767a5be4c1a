# Copyright 2026 The qilin-med-vl Authors. Licensed under the Apache License, Version 2.0.
"""Configuration of HiA, the High-resolution instruction-aware Adapter (Ding et al., MICCAI 2024), as a PEFT config.

Remote code: imports only peft/stdlib.
"""

import enum
from dataclasses import dataclass, field
from typing import Literal, get_args

from peft import PeftConfig


class HiAPeftType(str, enum.Enum):
    """PEFT's `PeftType` enum is closed; a str-enum member compares and hashes equal to "HIA" (so JSON round-trips)
    and has `.value`, which is all PEFT and transformers read."""

    HIA = "HIA"


@dataclass
class HiAConfig(PeftConfig):
    """
    HiA adds, after chosen decoder layers of the language model, a block that (1) extracts from a high-resolution
    CNN feature grid of each image what the instruction asks about (M learnable queries plus a projection of the
    instruction's last token h_last) and (2) injects it into that image's low-resolution tokens by cross-attention.
    The shared high-resolution encoder lives in the block of the first chosen layer. A new adapter is the identity
    (zero-initialised output projection). Only the encoder and the blocks train; the base model stays frozen.
    """

    layers: list[int] | None = field(
        default=None,
        metadata={"help": "Decoder layers (0-based) after which HiA acts, never the last one (no later layer would "
                          "read what it changes). Default: [L // 3, 2 * L // 3], kept below L - 1."},
    )
    num_queries: int = field(default=256, metadata={"help": "Learnable instruction-aware queries M per image."})
    num_heads: int = field(default=8, metadata={"help": "Attention heads of the extractor and injection blocks."})
    hidden_size: int | None = field(
        default=None, metadata={"help": "Adapter width D. Default: the language model's hidden size, as in the paper."}
    )
    high_res_size: int = field(
        default=672,
        metadata={
            "help": "Side of the high-resolution view the adapter expects; 336 reproduces the 'w/o HR' ablation."
        },
    )
    instruction_aware: bool = field(
        default=True,
        metadata={"help": "Add Linear(h_last) to the queries; False reproduces the paper's 'w/o IA' ablation."},
    )
    encoder_depths: list[int] = field(
        default_factory=lambda: [3, 4, 6, 3],
        metadata={"help": "Bottleneck blocks per stage of the ResNet-style encoder ([3, 4, 6, 3] = ResNet-50)."},
    )
    encoder_width: int = field(
        default=64, metadata={"help": "Channels of the encoder's first stage (64 = ResNet-50)."}
    )
    encoder_stem: Literal["resnet", "full_resolution"] = field(
        default="resnet",
        metadata={
            "help": "The encoder's stem: 'resnet' (7x7 stride-2 conv + max-pool, ResNet-50's; ImageNet weights load) "
            "or 'full_resolution' (3x3 convs at the view's own resolution before any down-sampling, for lesions "
            "of a few pixels; 1.8x the stem's multiply-adds at width 16, 6x at width 64)."
        },
    )
    feature_positions: Literal["none", "sincos"] = field(
        default="none",
        metadata={
            "help": "Where each high-resolution feature sits, as the extractor sees it: 'none' (the paper's; a "
            "feature carries only what its receptive field shows, so the adapter cannot say which side a small lesion "
            "is on) or 'sincos' (fixed 2-D sine-cosine codes of the cell's row and column, as fractions of the grid, "
            "added to the normalised features before the extractor's key projection; no parameters)."
        },
    )
    base_hidden_size: int | None = field(
        default=None,
        metadata={"help": "Hidden size of the language model the adapter was built for (set on creation)."},
    )
    base_num_layers: int | None = field(
        default=None,
        metadata={"help": "Layer count of the language model the adapter was built for (set on creation)."},
    )
    modules_to_save: list[str] | None = field(
        default=None,
        metadata={
            "help": "Modules of the base model that train with the adapter and are saved in it (PEFT's "
            "`modules_to_save`; the base keeps its own copy, used again when the adapter is disabled). For example "
            "the decoder layers after HiA's last block and `lm_head`, which read what HiA injects. A module inside "
            "a layer HiA wraps cannot be one of them."
        },
    )
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Derived from `layers`; not meant to be set by hand."}
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = HiAPeftType.HIA
        if self.layers is not None:
            self.layers = sorted(set(int(layer) for layer in self.layers))
            if not self.layers or self.layers[0] < 0:
                raise ValueError(f"HiAConfig.layers must be non-negative decoder layer indices, got {self.layers}")
        self.encoder_depths = [int(depth) for depth in self.encoder_depths]
        if self.encoder_stem not in get_args(HiAConfig.__annotations__["encoder_stem"]):
            raise ValueError(
                f"HiAConfig.encoder_stem must be 'resnet' or 'full_resolution', got {self.encoder_stem!r}"
            )
        if self.feature_positions not in get_args(HiAConfig.__annotations__["feature_positions"]):
            raise ValueError(
                f"HiAConfig.feature_positions must be 'none' or 'sincos', got {self.feature_positions!r}"
            )
        if self.num_queries < 1 or self.num_heads < 1 or self.high_res_size < 32:
            raise ValueError("HiAConfig needs num_queries >= 1, num_heads >= 1 and high_res_size >= 32")
