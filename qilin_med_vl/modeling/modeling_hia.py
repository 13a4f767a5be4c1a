# Copyright 2026 The qilin-med-vl Authors. Licensed under the Apache License, Version 2.0.
"""HiA, the High-resolution instruction-aware Adapter, as a PEFT tuner.

Remote code: imports only torch/transformers/peft and flat siblings.
"""

import re
from dataclasses import dataclass, field

import torch
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from .configuration_hia import HiAConfig, HiAPeftType
from .high_resolution_encoder_hia import HighResolutionEncoder

# True on decoder-layer wrappers with an enabled HiA adapter, so the model knows to build `HiAInputs`.
HIA_LAYER_ATTRIBUTE = "hia_active"


@dataclass
class HiAInputs:
    """What a HiA layer needs about the current prefill, built once per forward by `QilinMedVLModel`.

    image_batch_index, image_position_index: long `(num_images * image_seq_length,)`, where the `<image>` tokens
        are, row-major (so image n's tokens are entries n*K .. n*K+K-1); found once per prefill, used by every layer.
    instruction_end_index: long `(batch_size,)`, the position of each sample's last instruction token (h_last).
    high_res_pixel_values: float `(num_images, 3, H, W)`, one per image in order of appearance.
    image_seq_length: low-resolution tokens per image (K).
    attentions: a list that HiA layers append their extractor attentions to, or None when not requested.
    high_res_features: per adapter name, the encoded high-resolution grid `(num_images, grid_h * grid_w, D)`,
        computed by the first HiA layer and reused by the later ones.
    """

    image_batch_index: torch.Tensor
    image_position_index: torch.Tensor
    instruction_end_index: torch.Tensor
    high_res_pixel_values: torch.Tensor
    image_seq_length: int
    attentions: list | None = None
    high_res_features: dict = field(default_factory=dict)
    grid_size: tuple[int, int] | None = None


def find_instruction_end_index(
    labels: torch.LongTensor | None,
    attention_mask: torch.Tensor | None,
    batch_and_length: tuple[int, int],
    device: torch.device,
) -> torch.LongTensor:
    """Index of the last instruction token of each sample, `(batch_size,)`.

    With labels (training): the token just before the first supervised token (first label != -100), so answer
    tokens never leak into what HiA injects. Without labels (inference): the last non-padding token, for left or
    right padding. A labelled sample with no supervised token falls back to its last non-padding token.
    """
    batch_size, sequence_length = batch_and_length
    positions = torch.arange(sequence_length, device=device).expand(batch_size, sequence_length)
    if attention_mask is not None and attention_mask.dim() == 2:
        last_real = torch.where(attention_mask.to(device).bool(), positions, -1).amax(dim=1)
    else:
        last_real = torch.full((batch_size,), sequence_length - 1, device=device)
    if labels is None:
        return last_real
    supervised = labels.to(device) != -100
    first_supervised = torch.where(supervised, positions, sequence_length).amin(dim=1)
    return torch.where(supervised.any(dim=1), (first_supervised - 1).clamp(min=0), last_real)


class HiABlock(nn.Module):
    """One HiA block for one adapter at one decoder layer: instruction-aware extractor + injection module.

    Shapes: N images, K low-resolution tokens per image, P high-resolution grid positions, M queries,
    H the language model's hidden size, D the adapter width.
    """

    def __init__(self, config: HiAConfig, base_hidden_size: int, owns_encoder: bool):
        super().__init__()
        width = config.hidden_size or base_hidden_size
        if width % config.num_heads:
            raise ValueError(f"HiA width {width} is not divisible by num_heads={config.num_heads}")
        self.instruction_aware = config.instruction_aware
        self.high_res_size = config.high_res_size
        # The shared high-resolution encoder lives in the first block; later blocks reuse its output.
        self.encoder = (
            HighResolutionEncoder(output_dim=width, depths=tuple(config.encoder_depths), width=config.encoder_width)
            if owns_encoder
            else None
        )
        # Instruction-aware extractor: Q = queries + Linear(h_last); Zbar = CrossAttn(Q, Linear(Z)).
        self.queries = nn.Parameter(torch.randn(config.num_queries, width) * 0.02)
        self.instruction_proj = nn.Linear(base_hidden_size, width) if config.instruction_aware else None
        self.query_norm = nn.LayerNorm(width)
        self.feature_norm = nn.LayerNorm(width)
        self.feature_proj = nn.Linear(width, width)
        self.extract_attn = nn.MultiheadAttention(width, config.num_heads, batch_first=True)
        # Injection: Vbar = CrossAttn(V, Zbar); V + Vbar feeds the next layer.
        self.token_norm = nn.LayerNorm(base_hidden_size)
        self.token_proj = nn.Linear(base_hidden_size, width)
        self.extracted_norm = nn.LayerNorm(width)
        self.inject_attn = nn.MultiheadAttention(width, config.num_heads, batch_first=True)
        self.output_proj = nn.Linear(width, base_hidden_size)
        # Zero output projection: a new adapter leaves the frozen model's outputs exactly unchanged.
        nn.init.zeros_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def encode(self, high_res_pixel_values: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """`(N, 3, S, S)` -> features `(N, P, D)` and the grid size."""
        size = tuple(high_res_pixel_values.shape[-2:])
        if size != (self.high_res_size, self.high_res_size):
            raise ValueError(
                f"This HiA adapter was built for {self.high_res_size}x{self.high_res_size} high-resolution images but "
                f"got {size[0]}x{size[1]}; call the processor with high_res_size={self.high_res_size}"
            )
        parameter = self.queries
        return self.encoder(high_res_pixel_values.to(parameter.device, parameter.dtype), return_grid_size=True)

    def forward(
        self, visual_tokens: torch.Tensor, instruction_states: torch.Tensor, features: torch.Tensor, need_weights: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """
        visual_tokens `(N, K, H)`: layer output at each image's positions; instruction_states `(N, H)`: h_last of the
        sample each image belongs to; features `(N, P, D)`. Returns the update for the visual tokens `(N, K, H)` and,
        when asked, the extractor's attention `(N, M, P)` averaged over heads.
        """
        dtype = self.queries.dtype
        visual_tokens, instruction_states = visual_tokens.to(dtype), instruction_states.to(dtype)
        queries = self.queries.unsqueeze(0).expand(visual_tokens.shape[0], -1, -1)
        if self.instruction_aware:
            queries = queries + self.instruction_proj(instruction_states).unsqueeze(1)
        keys = self.feature_proj(self.feature_norm(features.to(dtype)))
        extracted, attention = self.extract_attn(
            self.query_norm(queries), keys, keys, need_weights=need_weights, average_attn_weights=True
        )
        extracted = self.extracted_norm(extracted)
        injected, _ = self.inject_attn(
            self.token_proj(self.token_norm(visual_tokens)), extracted, extracted, need_weights=False
        )
        return self.output_proj(injected), attention


class HiALayer(nn.Module, BaseTunerLayer):
    """Wraps one decoder layer: runs it, then lets each active HiA adapter edit the image positions of its output.

    The layer acts only when the model passes `hia_inputs` (at prefill with images); decode steps and text-only
    batches pass straight through.
    """

    adapter_layer_names = ("hia",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: HiAConfig, layer_index: int):
        super().__init__()
        self.base_layer = base_layer
        self.layer_index = layer_index
        self.hia = nn.ModuleDict({})
        self._active_adapter = adapter_name
        self.merged_adapters = []
        self.update_layer(adapter_name, config)

    def update_layer(self, adapter_name: str, config: HiAConfig) -> None:
        owns_encoder = self.layer_index == min(config.layers)
        self.hia[adapter_name] = HiABlock(config, config.base_hidden_size, owns_encoder)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    @property
    def hia_active(self) -> bool:
        return not self.disable_adapters and any(name in self.hia for name in self.active_adapters)

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        raise NotImplementedError("HiA adds computation at prefill; it cannot be merged into the base weights")

    def forward(self, hidden_states: torch.Tensor, *args, hia_inputs: HiAInputs | None = None, **kwargs):
        output = self.base_layer(hidden_states, *args, **kwargs)
        if self.disable_adapters or hia_inputs is None:
            return output
        hidden = output[0] if isinstance(output, tuple) else output
        for adapter_name in self.active_adapters:
            if adapter_name in self.hia:
                hidden = self._apply_block(self.hia[adapter_name], adapter_name, hidden, hia_inputs)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    def _apply_block(self, block: HiABlock, adapter_name: str, hidden: torch.Tensor, inputs: HiAInputs):
        device = hidden.device
        batch_index, position_index = inputs.image_batch_index.to(device), inputs.image_position_index.to(device)
        num_tokens = batch_index.numel()
        if num_tokens == 0:
            return hidden
        if block.encoder is not None:
            inputs.high_res_features[adapter_name], inputs.grid_size = block.encode(inputs.high_res_pixel_values)
        elif adapter_name not in inputs.high_res_features:
            raise RuntimeError(f"HiA adapter {adapter_name!r}: the layer holding its encoder did not run first")
        features = inputs.high_res_features[adapter_name].to(device)

        image_length = inputs.image_seq_length
        num_images = num_tokens // image_length
        visual_tokens = hidden[batch_index, position_index].view(num_images, image_length, -1)
        image_sample = batch_index.view(num_images, image_length)[:, 0]
        instruction_states = hidden[image_sample, inputs.instruction_end_index.to(device)[image_sample]]
        update, attention = block(visual_tokens, instruction_states, features, inputs.attentions is not None)
        if attention is not None:
            inputs.attentions.append(attention)
        edited = (visual_tokens + update.to(hidden.dtype)).view(num_tokens, -1)
        return hidden.index_put((batch_index, position_index), edited)


class HiAModel(BaseTuner):
    """Injects `HiALayer`s into a Qilin-Med-VL (or any LLaVA-layout) model: `peft.get_peft_model(model, HiAConfig())`."""

    prefix: str = "hia"
    tuner_layer_cls = HiALayer
    target_module_mapping: dict = {}

    def _prepare_adapter_config(self, peft_config: HiAConfig, model_config: dict) -> HiAConfig:
        text_config = model_config.get("text_config", model_config)
        hidden_size, num_layers = text_config["hidden_size"], text_config["num_hidden_layers"]
        if peft_config.base_hidden_size is not None and peft_config.base_hidden_size != hidden_size:
            raise ValueError(
                f"This HiA adapter was built for a language model of hidden size {peft_config.base_hidden_size}, "
                f"but the model has {hidden_size}"
            )
        if peft_config.base_num_layers is not None and peft_config.base_num_layers != num_layers:
            raise ValueError(
                f"This HiA adapter was built for a language model of {peft_config.base_num_layers} layers, "
                f"but the model has {num_layers}"
            )
        peft_config.base_hidden_size, peft_config.base_num_layers = hidden_size, num_layers
        if peft_config.layers is None:
            peft_config.layers = sorted({num_layers // 3, 2 * num_layers // 3})
        if peft_config.layers[-1] >= num_layers:
            raise ValueError(f"HiA layers {peft_config.layers} do not exist in a {num_layers}-layer language model")
        indices = "|".join(str(layer) for layer in peft_config.layers)
        peft_config.target_modules = rf"^(.*\.)?language_model\.layers\.({indices})$"
        return peft_config

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        if isinstance(target, HiALayer):
            target.update_layer(adapter_name, peft_config)
            return
        new_module = HiALayer(target, adapter_name, peft_config, layer_index=int(current_key.rsplit(".", 1)[-1]))
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _check_merge_allowed(self):
        raise ValueError("HiA adds computation at prefill; it cannot be merged into the base weights")

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        # HiA parameters sit deep under the adapter name (`...layers.13.hia.default.extract_attn.in_proj_weight`),
        # where PEFT's default rule (last or second-to-last component) does not look.
        return re.sub(rf"\.hia\.{re.escape(adapter_name)}(?=\.)", ".hia", key, count=1)


def register_hia_with_peft() -> None:
    """Make `HiAConfig` / `HiAModel` known to PEFT (idempotent): `get_peft_model`, `PeftModel.from_pretrained`,
    `PeftConfig.from_pretrained` and transformers' `load_adapter` then handle peft_type "HIA"."""
    PEFT_TYPE_TO_CONFIG_MAPPING[HiAPeftType.HIA] = HiAConfig
    PEFT_TYPE_TO_TUNER_MAPPING[HiAPeftType.HIA] = HiAModel
    PEFT_TYPE_TO_PREFIX_MAPPING[HiAPeftType.HIA] = HiAModel.prefix


register_hia_with_peft()
