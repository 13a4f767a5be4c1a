# Copyright 2026 The qilin-med-vl Authors. Licensed under the Apache License, Version 2.0.
"""Qilin-Med-VL: CLIP vision tower + projector + Llama, with room for the HiA adapter.

The module tree and weight names are those of transformers' `LlavaForConditionalGeneration`
(`model.vision_tower`, `model.multi_modal_projector`, `model.language_model`, `lm_head`), built from the native
CLIP and Llama classes, so a llava-hf state dict loads unchanged and the attention implementation (eager, sdpa,
flash) is chosen through the config.

This file travels with checkpoints as remote code: it imports only torch/transformers/peft and its flat siblings.
"""

import functools
import os
from dataclasses import dataclass, fields

import torch
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast, BaseModelOutputWithPooling, CausalLMOutputWithPast
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import can_return_tuple, merge_with_config_defaults
from transformers.utils.output_capturing import select_hidden_states

from .configuration_qilin_med_vl import QilinMedVLConfig

# The model never calls the adapter (HiA attaches through hooks of its own). This import makes the adapter's code
# travel with every checkpoint as remote code and registers the "HIA" adapter type with PEFT as soon as the model
# class is loaded, so `model.load_adapter("hia")` and `PeftModel.from_pretrained` work with remote code alone.
from .modeling_hia import register_hia_with_peft  # noqa: F401

# transformers 5.24 renamed the key/value cache from `past_key_values` to `cache`, in `forward` arguments and in model
# outputs. The output classes below inherit the installed release's field, and the language model is called with the
# name it declares, so the same file runs on every release in the supported range.
CACHE_NAME = "cache" if "cache" in {f.name for f in fields(BaseModelOutputWithPast)} else "past_key_values"

# Modules that stay in full precision when bitsandbytes quantizes the model: only the language model's linear
# layers are quantized; the vision tower and the projector are small and sensitive to rounding.
QUANTIZATION_SKIP_MODULES = ["model.vision_tower", "model.multi_modal_projector", "lm_head"]


def accept_legacy_cache_name(forward):
    """Let `forward` be called with `past_key_values=` as well as `cache=`.

    On releases that already use `cache`, the old name goes through transformers' own deprecation (one warning, as
    for its in-tree models); on older ones `past_key_values` is the native name, so it is renamed silently.
    """
    if CACHE_NAME == "cache":
        return deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")(forward)

    @functools.wraps(forward)
    def wrapper(*args, **kwargs):
        if "past_key_values" in kwargs:
            if kwargs.get("cache") is not None:
                raise ValueError("Pass the key/value cache once, as `cache` or as `past_key_values`, not both")
            kwargs["cache"] = kwargs.pop("past_key_values")
        return forward(*args, **kwargs)

    return wrapper


@dataclass
class QilinMedVLModelOutputWithPast(BaseModelOutputWithPast):
    """
    The language model's outputs (`last_hidden_state`, the key/value cache, `hidden_states`, `attentions`) plus:

    image_hidden_states (`torch.FloatTensor` of shape `(num_images, image_seq_length, hidden_size)`, *optional*):
        Projected image features that replaced the `<image>` token embeddings.
    image_outputs (`BaseModelOutputWithPooling`, *optional*):
        The vision tower's outputs for the images (`hidden_states`, `attentions` when asked for), with the projected
        features as `pooler_output`, as transformers' multimodal models return them.
    hia_attentions (`tuple[torch.FloatTensor]`, *optional*):
        One tensor per HiA layer, shape `(num_images, num_queries, grid_h * grid_w)`: where the instruction-aware
        queries attended on the high-resolution grid, averaged over heads. Filled in by a HiA adapter when called
        with `output_hia_attentions=True`.
    hia_grid_size (`tuple[int, int]`, *optional*):
        `(grid_h, grid_w)` of the high-resolution feature grid the attentions refer to.
    """

    image_hidden_states: torch.FloatTensor | None = None
    image_outputs: BaseModelOutputWithPooling | None = None
    hia_attentions: tuple[torch.FloatTensor, ...] | None = None
    hia_grid_size: tuple[int, int] | None = None


@dataclass
class QilinMedVLCausalLMOutputWithPast(CausalLMOutputWithPast):
    """
    loss (`torch.FloatTensor` of shape `(1,)`, *optional*): next-token loss over positions whose label is not -100.
    logits (`torch.FloatTensor` of shape `(batch_size, sequence_length, vocab_size)`).
    Other fields as in `QilinMedVLModelOutputWithPast`.
    """

    image_hidden_states: torch.FloatTensor | None = None
    image_outputs: BaseModelOutputWithPooling | None = None
    hia_attentions: tuple[torch.FloatTensor, ...] | None = None
    hia_grid_size: tuple[int, int] | None = None


class QilinMedVLMultiModalProjector(nn.Module):
    """Maps vision features `(num_images, image_seq_length, vision_hidden)` to `(..., text_hidden)`.

    `mlp2x_gelu` has the same parameter names as transformers' `LlavaMultiModalProjector`.
    """

    def __init__(self, config: QilinMedVLConfig):
        super().__init__()
        vision_hidden, text_hidden = config.vision_config.hidden_size, config.text_config.hidden_size
        bias = config.multimodal_projector_bias
        self.linear_1 = nn.Linear(vision_hidden, text_hidden, bias=bias)
        if config.projector_type == "mlp2x_gelu":
            self.act = ACT2FN[config.projector_hidden_act]
            self.linear_2 = nn.Linear(text_hidden, text_hidden, bias=bias)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        hidden_states = self.linear_1(image_features)
        if hasattr(self, "linear_2"):
            hidden_states = self.linear_2(self.act(hidden_states))
        return hidden_states


class QilinMedVLPreTrainedModel(PreTrainedModel):
    config_class = QilinMedVLConfig
    config: QilinMedVLConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = [CACHE_NAME]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # The model itself has no data-dependent control flow (HiA, when attached, adds its own at prefill only).
    _can_compile_fullgraph = True

    @classmethod
    def is_custom_code(cls) -> bool:
        # transformers treats out-of-tree classes as custom code and then skips, when initialising weights missing
        # from a checkpoint (meta-device loading), every module that holds no parameter of its own, such as CLIP's
        # attention blocks, whose `_init_weights` sets their projections' scale. Every `_init_weights` this model
        # runs is transformers' own (CLIP, Llama, the generic Linear rule) and leaves loaded weights alone, so it is
        # initialised like an in-tree model (measured: transformers' `test_can_init_all_missing_weights`).
        return False


class QilinMedVLModel(QilinMedVLPreTrainedModel):
    """Vision tower + projector + language model (no LM head). Merges image features into the token sequence."""

    def __init__(self, config: QilinMedVLConfig):
        super().__init__(config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = QilinMedVLMultiModalProjector(config)
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    @merge_with_config_defaults
    @can_return_tuple
    @select_hidden_states("vision_feature_layer")
    def get_image_features(
        self,
        pixel_values: torch.FloatTensor,
        vision_feature_layer: int | None = None,
        vision_feature_select_strategy: str | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPooling:
        """`pixel_values` `(num_images, 3, image_size, image_size)` -> the vision tower's outputs, with
        `pooler_output` holding the projected features `(num_images, image_seq_length, text_hidden_size)`.

        As transformers' Llava: `return_dict=False` gives a tuple, `output_hidden_states` / `output_attentions`
        are passed to the vision tower (which records only the projected layer unless all hidden states are asked
        for), and the feature layer and strategy default to the config's.
        """
        image_outputs = self.vision_tower(pixel_values.to(self.vision_tower.dtype), return_dict=True, **kwargs)
        selected = image_outputs.hidden_states[vision_feature_layer]
        if vision_feature_select_strategy == "default":
            selected = selected[:, 1:]  # drop CLS
        image_outputs.pooler_output = self.multi_modal_projector(selected)
        return image_outputs

    def get_image_token_mask(self, input_ids: torch.LongTensor | None, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """Boolean `(batch_size, sequence_length)`, True at `<image>` positions."""
        if input_ids is not None:
            return input_ids == self.config.image_token_id
        image_embedding = self.get_input_embeddings()(
            torch.tensor(self.config.image_token_id, dtype=torch.long, device=inputs_embeds.device)
        )
        return (inputs_embeds == image_embedding).all(-1)

    @can_return_tuple
    @accept_legacy_cache_name
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        high_res_pixel_values: torch.FloatTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> QilinMedVLModelOutputWithPast:
        """
        input_ids: `(batch_size, sequence_length)`; every image contributes `image_seq_length` `<image>` tokens.
        pixel_values: `(num_images, 3, image_size, image_size)`, images of all samples in order of appearance.
        cache: the key/value cache (`past_key_values` on transformers < 5.24, still accepted).
        high_res_pixel_values: `(num_images, 3, high_res_size, high_res_size)` from `QilinProcessor`; read by a HiA
            adapter (its hook consumes them before this method runs) and ignored by the model itself.
        Other keyword arguments go to the language model (attention implementation kwargs, `output_attentions`...).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)

        image_features = image_outputs = None
        if pixel_values is not None:
            image_outputs = self.get_image_features(pixel_values, return_dict=True, **kwargs)
            image_features = image_outputs.pooler_output
            image_token_mask = self.get_image_token_mask(input_ids, inputs_embeds)
            num_images, image_seq_length = image_features.shape[:2]
            if not torch.compiler.is_compiling():  # a data-dependent check; compiled graphs skip it, as Llava's do
                num_image_tokens = int(image_token_mask.sum())
                if num_image_tokens != num_images * image_seq_length:
                    raise ValueError(
                        f"The text holds {num_image_tokens} image tokens but {num_images} images were given "
                        f"({num_images * image_seq_length} tokens at {image_seq_length} each)"
                    )
            inputs_embeds = inputs_embeds.masked_scatter(
                image_token_mask.unsqueeze(-1).to(inputs_embeds.device),
                image_features.to(inputs_embeds.device, inputs_embeds.dtype),
            )

        outputs = self.language_model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            return_dict=True,
            **{CACHE_NAME: cache},
            **kwargs,
        )
        return QilinMedVLModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=image_features,
            image_outputs=image_outputs,
            **{CACHE_NAME: getattr(outputs, CACHE_NAME)},
        )


class QilinMedVLForConditionalGeneration(QilinMedVLPreTrainedModel, GenerationMixin):
    """Qilin-Med-VL with its language-modelling head: the class `AutoModel`, `AutoModelForImageTextToText` and
    `pipeline("image-text-to-text")` return."""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}
    # With `tp_plan="auto"` the language model's own plan shards its layers; the head is split by vocabulary rows
    # and gathered, as in transformers' Llava.
    _tp_plan = {"lm_head": "colwise_gather_output"}

    def __init__(self, config: QilinMedVLConfig):
        super().__init__(config)
        self.model = QilinMedVLModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """`PreTrainedModel.from_pretrained`, with bitsandbytes quantizing only the language model.

        `load_in_8bit=True` / `load_in_4bit=True` are accepted as shortcuts for a `BitsAndBytesConfig`. Unless the
        config names its own `llm_int8_skip_modules`, the vision tower, projector and LM head stay unquantized. The
        caller's config object is not modified.
        """
        load_in_8bit, load_in_4bit = kwargs.pop("load_in_8bit", False), kwargs.pop("load_in_4bit", False)
        quantization_config = kwargs.get("quantization_config")
        if (load_in_8bit or load_in_4bit) and quantization_config is None:
            quantization_config = {"quant_method": "bitsandbytes", "load_in_8bit": load_in_8bit,
                                   "load_in_4bit": load_in_4bit}
        is_bitsandbytes = (
            quantization_config.get("quant_method") if isinstance(quantization_config, dict)
            else getattr(quantization_config, "quant_method", None)
        ) == "bitsandbytes"
        if is_bitsandbytes:
            from transformers import BitsAndBytesConfig  # only when quantization is asked for

            settings = quantization_config if isinstance(quantization_config, dict) else quantization_config.to_dict()
            quantization_config = BitsAndBytesConfig.from_dict(dict(settings))
            if quantization_config.llm_int8_skip_modules is None:
                quantization_config.llm_int8_skip_modules = list(QUANTIZATION_SKIP_MODULES)
            kwargs["quantization_config"] = quantization_config
        return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs):
        if self._auto_class is not None:
            # One register_for_auto_class call records one auto class; AutoModel must return this class as well.
            entry = f"{type(self).__module__.split('.')[-1]}.{type(self).__name__}"
            auto_map = dict(getattr(self.config, "auto_map", None) or {})
            auto_map.update({"AutoModel": entry, "AutoModelForImageTextToText": entry})
            self.config.auto_map = auto_map
        return super().save_pretrained(save_directory, *args, **kwargs)

    def load_adapter(self, peft_model_id=None, adapter_name=None, *args, adapter_kwargs=None, **kwargs):
        """transformers' `load_adapter`, where a bare name such as `"hia"` that is not a local folder means that
        subfolder of the repo or folder this model was loaded from: `model.load_adapter("hia")`."""
        adapter_kwargs = dict(adapter_kwargs or {})
        if (
            isinstance(peft_model_id, str)
            and "/" not in peft_model_id
            and not os.path.isdir(peft_model_id)
            and self.name_or_path
        ):
            adapter_kwargs.setdefault("subfolder", peft_model_id)
            adapter_name = adapter_name or peft_model_id
            peft_model_id = self.name_or_path
        local_folder = os.path.join(peft_model_id, adapter_kwargs.get("subfolder", "")) if peft_model_id else None
        if local_folder and os.path.isdir(local_folder):
            if not os.path.isfile(os.path.join(local_folder, "adapter_config.json")):
                raise ValueError(f"{local_folder} is not an adapter folder: it has no adapter_config.json")
        return super().load_adapter(peft_model_id, adapter_name, *args, adapter_kwargs=adapter_kwargs, **kwargs)

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def get_image_features(self, pixel_values: torch.FloatTensor, **kwargs) -> BaseModelOutputWithPooling:
        """See `QilinMedVLModel.get_image_features`."""
        return self.model.get_image_features(pixel_values, **kwargs)

    @can_return_tuple
    @accept_legacy_cache_name
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        high_res_pixel_values: torch.FloatTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> QilinMedVLCausalLMOutputWithPast:
        """Shapes as in `QilinMedVLModel.forward`; `labels` `(batch_size, sequence_length)` with -100 where no
        loss is taken (the prompt, images, padding); they are shifted inside the loss."""
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            return_dict=True,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])

        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
            )
        return QilinMedVLCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=outputs.image_hidden_states,
            image_outputs=outputs.image_outputs,
            **{CACHE_NAME: getattr(outputs, CACHE_NAME)},
        )

    def prepare_inputs_for_generation(self, input_ids, *args, inputs_embeds=None, is_first_iteration=False, **kwargs):
        model_inputs = super().prepare_inputs_for_generation(
            input_ids, *args, inputs_embeds=inputs_embeds, is_first_iteration=is_first_iteration, **kwargs
        )
        # Like pixel_values (dropped by transformers), the high-resolution view is read only at prefill; keeping it
        # would re-run the HiA encoder on every decode step.
        if not is_first_iteration and kwargs.get("use_cache", True):
            model_inputs.pop("high_res_pixel_values", None)
        return model_inputs


__all__ = ["QilinMedVLModel", "QilinMedVLForConditionalGeneration", "QilinMedVLPreTrainedModel"]
