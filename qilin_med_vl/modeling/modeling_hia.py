# Copyright 2026 The qilin-med-vl Authors. Licensed under the Apache License, Version 2.0.
"""HiA, the High-resolution instruction-aware Adapter, as a PEFT tuner.

The tuner needs no cooperation from the model it wraps: a forward pre-hook on the wrapped model reads the batch
(`input_ids` or `inputs_embeds`, `pixel_values`, `high_res_pixel_values`, `labels`, `attention_mask`) at prefill and
hands what the HiA layers need to them, so HiA attaches to Qilin-Med-VL and to transformers' own
`LlavaForConditionalGeneration` (any model with the LLaVA layout: `config.image_token_id`, a Llama-style decoder
under `language_model.layers`).

Remote code: imports only torch/transformers/peft and flat siblings.
"""

import re
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from .configuration_hia import HiAConfig, HiAPeftType
from .high_resolution_encoder_hia import HighResolutionEncoder


@dataclass
class HiAInputs:
    """What a HiA layer needs about the current prefill, built once per forward by the tuner's pre-hook.

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


def grid_position_codes(grid_size: tuple[int, int], width: int, device=None, dtype=None) -> torch.Tensor:
    """Fixed 2-D sine-cosine codes `(grid_h * grid_w, width)`, row-major like the encoder's grid: the first half of
    the channels codes the row, the second the column. Positions are cell centres as fractions of the grid, so a
    cell on the left half of the image gets the same kind of code whatever the view's resolution. `width` is a
    multiple of 4."""
    quarter = width // 4
    # pi .. 64 pi radians across the grid: the slowest pair tells the halves apart, the fastest neighbouring cells.
    frequencies = torch.pi * 64.0 ** (torch.arange(quarter, device=device, dtype=torch.float32) / quarter)

    def codes(length: int) -> torch.Tensor:  # (length, width / 2)
        angles = ((torch.arange(length, device=device, dtype=torch.float32) + 0.5) / length)[:, None] * frequencies
        return torch.cat([angles.sin(), angles.cos()], dim=-1)

    grid_h, grid_w = grid_size
    rows = codes(grid_h)[:, None].expand(grid_h, grid_w, -1)
    columns = codes(grid_w)[None].expand(grid_h, grid_w, -1)
    return torch.cat([rows, columns], dim=-1).reshape(grid_h * grid_w, width).to(dtype)


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
        if config.feature_positions == "sincos" and width % 4:
            raise ValueError(f"HiA width {width} must be a multiple of 4 for feature_positions='sincos'")
        self.instruction_aware = config.instruction_aware
        self.feature_positions = config.feature_positions
        self.high_res_size = config.high_res_size
        # The shared high-resolution encoder lives in the first block; later blocks reuse its output.
        self.encoder = (
            HighResolutionEncoder(
                output_dim=width,
                depths=tuple(config.encoder_depths),
                width=config.encoder_width,
                stem=config.encoder_stem,
            )
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
        self,
        visual_tokens: torch.Tensor,
        instruction_states: torch.Tensor,
        features: torch.Tensor,
        need_weights: bool,
        grid_size: tuple[int, int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """
        visual_tokens `(N, K, H)`: layer output at each image's positions; instruction_states `(N, H)`: h_last of the
        sample each image belongs to; features `(N, P, D)`, row-major on a `grid_size` `(grid_h, grid_w)` grid
        (needed with `feature_positions="sincos"`). Returns the update for the visual tokens `(N, K, H)` and, when
        asked, the extractor's attention `(N, M, P)` averaged over heads.
        """
        dtype = self.queries.dtype
        visual_tokens, instruction_states = visual_tokens.to(dtype), instruction_states.to(dtype)
        queries = self.queries.unsqueeze(0).expand(visual_tokens.shape[0], -1, -1)
        if self.instruction_aware:
            queries = queries + self.instruction_proj(instruction_states).unsqueeze(1)
        features = self.feature_norm(features.to(dtype))
        if self.feature_positions == "sincos":
            if grid_size is None or grid_size[0] * grid_size[1] != features.shape[1]:
                raise ValueError(
                    f"feature_positions='sincos' needs the grid of the {features.shape[1]} features, got {grid_size}"
                )
            features = features + grid_position_codes(grid_size, features.shape[-1], features.device, dtype)
        keys = self.feature_proj(features)
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

    The layer acts only while the tuner's pre-hook has put `HiAInputs` in `prefill` (a forward with images); decode
    steps and text-only batches pass straight through.
    """

    adapter_layer_names = ("hia",)

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, config: HiAConfig, layer_index: int, prefill: "HiAPrefill"
    ):
        super().__init__()
        self.base_layer = base_layer
        self.layer_index = layer_index
        self.prefill = prefill  # shared with the wrapped model's hooks; holds inputs only during a prefill forward
        self.hia = nn.ModuleDict({})
        self._active_adapter = adapter_name
        self.merged_adapters = []
        self.update_layer(adapter_name, config)

    def update_layer(self, adapter_name: str, config: HiAConfig) -> None:
        owns_encoder = self.layer_index == min(config.layers)
        self.hia[adapter_name] = HiABlock(config, config.base_hidden_size, owns_encoder)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _get_base_layer_device_and_dtype(self, base_layer):
        # PEFT reads a base layer's `weight`; a decoder layer has none. Its first floating-point parameter gives the
        # device and the model's dtype (a quantized layer's packed weights are not floating point and are passed by).
        for parameter in base_layer.parameters():
            if parameter.is_floating_point():
                return parameter.device, parameter.dtype
        return None, None

    @property
    def hia_active(self) -> bool:
        return not self.disable_adapters and any(name in self.hia for name in self.active_adapters)

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        raise NotImplementedError("HiA adds computation at prefill; it cannot be merged into the base weights")

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        output = self.base_layer(hidden_states, *args, **kwargs)
        hia_inputs = self.prefill.inputs
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
        update, attention = block(
            visual_tokens, instruction_states, features, inputs.attentions is not None, inputs.grid_size
        )
        if attention is not None:
            inputs.attentions.append(attention)
        edited = (visual_tokens + update.to(hidden.dtype)).view(num_tokens, -1)
        return hidden.index_put((batch_index, position_index), edited)


class HiAPrefill:
    """The one mutable link between a wrapped model's hooks and its HiA layers: `inputs` is a `HiAInputs` during a
    forward with images and `None` otherwise."""

    def __init__(self):
        self.inputs: HiAInputs | None = None
        self.output_attentions = False  # put the attentions on the output of the current forward
        self.recordings: list | None = None  # set by `record_hia_attentions`


def _image_token_id(config) -> int:
    image_token_id = getattr(config, "image_token_id", None)
    return config.image_token_index if image_token_id is None else image_token_id


def _prepare_prefill(model: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook of the wrapped model: take HiA's own arguments out of the call and, at a prefill with
    images and an active adapter, give the HiA layers their `HiAInputs`."""
    high_res_pixel_values = kwargs.pop("high_res_pixel_values", None)
    output_attentions = kwargs.pop("output_hia_attentions", False)
    pixel_values = kwargs.get("pixel_values")
    prefill = model._hia_prefill
    prefill.inputs, prefill.output_attentions = None, output_attentions
    if pixel_values is None or not hia_is_active(model):
        return args, kwargs
    num_images = pixel_values.shape[0]
    if high_res_pixel_values is None:
        raise ValueError(
            "A HiA adapter is loaded but no high_res_pixel_values were given with the images; "
            "use QilinProcessor, which returns them, or disable the adapter"
        )
    if high_res_pixel_values.shape[0] != num_images:
        raise ValueError(
            f"Got {num_images} low-resolution and {high_res_pixel_values.shape[0]} high-resolution images; "
            "they must pair up one to one"
        )
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    if input_ids is not None:
        image_token_mask = input_ids == _image_token_id(model.config)
    else:
        inputs_embeds = kwargs["inputs_embeds"]
        image_embedding = model.get_input_embeddings()(
            torch.tensor(_image_token_id(model.config), device=inputs_embeds.device)
        )
        image_token_mask = (inputs_embeds == image_embedding).all(-1)
    # Found once per prefill and used by every HiA layer; after prefill the edited tokens live in the KV cache.
    image_batch_index, image_position_index = image_token_mask.nonzero(as_tuple=True)
    prefill.inputs = HiAInputs(
        image_batch_index=image_batch_index,
        image_position_index=image_position_index,
        instruction_end_index=find_instruction_end_index(
            kwargs.get("labels"), kwargs.get("attention_mask"), image_token_mask.shape, image_token_mask.device
        ),
        high_res_pixel_values=high_res_pixel_values,
        image_seq_length=image_batch_index.numel() // num_images,
        attentions=[] if output_attentions or prefill.recordings is not None else None,
    )
    return args, kwargs


def _finish_prefill(model: nn.Module, args: tuple, kwargs: dict, output):
    """Forward hook (also run when the forward raises): report the extractor attentions if asked, then clear."""
    prefill = model._hia_prefill
    inputs, prefill.inputs = prefill.inputs, None
    if inputs is None or inputs.attentions is None:
        return output
    if prefill.recordings is not None:
        prefill.recordings.append((tuple(inputs.attentions), inputs.grid_size))
    if prefill.output_attentions and not isinstance(output, tuple):
        output["hia_attentions"] = tuple(inputs.attentions)
        output["hia_grid_size"] = inputs.grid_size
    return output


def attach_hia_hooks(model: nn.Module) -> HiAPrefill:
    """Install HiA's hooks on `model` once (several adapters share them) and return their shared state."""
    if getattr(model, "_hia_prefill", None) is None:
        model._hia_prefill = HiAPrefill()
        model.register_forward_pre_hook(_prepare_prefill, with_kwargs=True)
        model.register_forward_hook(_finish_prefill, with_kwargs=True, always_call=True)
    return model._hia_prefill


@contextmanager
def record_hia_attentions(model: nn.Module):
    """Within the block, every forward of `model` (a model with HiA attached, or its `PeftModel`) that runs HiA
    appends `(attentions, grid_size)` to the yielded list: one `(num_images, num_queries, grid_h * grid_w)` tensor
    per HiA layer. Works through `generate`, where the first entry is the prompt's prefill.

        with record_hia_attentions(model) as recorded:
            model.generate(**inputs)
        attentions, grid_size = recorded[0]
    """
    layer = next((module for module in model.modules() if isinstance(module, HiALayer)), None)
    if layer is None:
        raise ValueError("This model has no HiA adapter; there are no HiA attentions to record")
    prefill = layer.prefill
    prefill.recordings = recorded = []
    try:
        yield recorded
    finally:
        prefill.recordings = None


def hia_is_active(model: nn.Module) -> bool:
    """Whether any HiA adapter inside `model` is enabled and active."""
    return any(isinstance(module, HiALayer) and module.hia_active for module in model.modules())


class HiAModel(BaseTuner):
    """Injects `HiALayer`s into a Qilin-Med-VL (or any LLaVA-layout) model: `peft.get_peft_model(model, HiAConfig())`.

    Calls through the tuner go through the wrapped model's `__call__`, so that its hooks run (PEFT's default calls
    `forward` directly).
    """

    prefix: str = "hia"
    tuner_layer_cls = HiALayer
    target_module_mapping: dict = {}

    def __init__(self, model, *args, **kwargs):
        self._prefill = attach_hia_hooks(model)
        super().__init__(model, *args, **kwargs)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

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
        if num_layers < 2:
            raise ValueError("HiA needs a language model of at least 2 layers: a block acts on the layers after it")
        if peft_config.layers is None:
            # The paper's L/3 and 2L/3, kept off the last layer in very shallow models (see below).
            paper_layers = (num_layers // 3, 2 * num_layers // 3)
            peft_config.layers = sorted({min(layer, num_layers - 2) for layer in paper_layers})
        if peft_config.layers[-1] >= num_layers:
            raise ValueError(f"HiA layers {peft_config.layers} do not exist in a {num_layers}-layer language model")
        if peft_config.layers[-1] == num_layers - 1:
            # A block edits the image tokens' hidden states; after the last layer nothing reads them again (only the
            # answer tokens' logits are used), so it would train to nothing and change nothing.
            raise ValueError(f"HiA layer {num_layers - 1} is the last of the {num_layers} decoder layers: a block "
                             "there changes nothing (no later layer reads the image tokens); choose earlier layers")
        indices = "|".join(str(layer) for layer in peft_config.layers)
        peft_config.target_modules = rf"^(.*\.)?language_model\.layers\.({indices})$"
        return peft_config

    def _prepare_model(self, config: HiAConfig, model: nn.Module) -> None:
        # PEFT calls this with the prepared config (`layers`, `target_modules` set), before it wraps anything.
        # `modules_to_save` entries match module names by suffix, as PEFT matches them. Check them against the real
        # model here: PEFT's own errors speak of adapter names, and an entry that matches nothing would train nothing
        # without a word.
        if not config.modules_to_save:
            return
        modules = dict(model.named_modules())
        wrapped = [name for name in modules if re.fullmatch(config.target_modules, name)]
        for entry in config.modules_to_save:
            matches = [name for name in modules if name == entry or name.endswith("." + entry)]
            if not matches:
                raise ValueError(f"HiA modules_to_save entry {entry!r} matches no module of the model")
            for name in matches:
                inside = next((layer for layer in wrapped if name == layer or name.startswith(layer + ".")), None)
                if inside is not None:
                    raise ValueError(
                        f"HiA modules_to_save entry {entry!r} matches {name!r}, which lies in decoder layer "
                        f"{inside.rsplit('.', 1)[-1]}, which HiA wraps (layers {config.layers}); choose a layer HiA "
                        "does not wrap, or lm_head"
                    )
                if any(type(module).__module__.startswith("bitsandbytes") for module in modules[name].modules()):
                    raise ValueError(
                        f"HiA modules_to_save entry {entry!r} matches {name!r}, which is quantized (bitsandbytes) in "
                        "this model: the adapter's own float copy of it cannot be trained or loaded there. Load the "
                        f"base with BitsAndBytesConfig(llm_int8_skip_modules=[..., {name!r}]); "
                        "qilin_med_vl.loading.load_model_and_processor(model, adapter, load_in_4bit=True) does that"
                    )

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        if isinstance(target, HiALayer):
            target.update_layer(adapter_name, peft_config)
            return
        new_module = HiALayer(
            target, adapter_name, peft_config, layer_index=int(current_key.rsplit(".", 1)[-1]), prefill=self._prefill
        )
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        # New blocks take the base model's dtype (see `HiALayer._get_base_layer_device_and_dtype`). For training,
        # PEFT's rule applies as for LoRA: `autocast_adapter_dtype=True` (the default) upcasts bf16/fp16 adapter
        # weights to float32. An adapter loaded for inference stays in the base model's dtype: float32 blocks on a
        # bf16 13B model would cost 1.3 GB more and run the prefill's HiA matmuls in float32.
        if self.peft_config[adapter_name].inference_mode:
            return
        super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)

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
