# Copyright 2026 The qilin-med-vl Authors. Licensed under the Apache License, Version 2.0.
"""Prefill measured stage by stage on any device, including `meta` (no weights).

The model's own forward cannot run on the meta device: it reads data (`int(mask.sum())`, `masked_scatter`,
`nonzero` in HiA), which meta tensors do not have. So the prefill is replayed stage by stage with the model's own
submodules, in the order `QilinMedVLModel.forward` runs them:

1. vision tower (all hidden states kept, as `output_hidden_states=True` does) + projector; the token embedding and
   the merged embedding are empty tensors of the right size (a gather and a scatter: no FLOPs);
2. language model + LM head on the last position (`logits_to_keep=1`, as generate does), KV cache included;
3. HiA (when attached): the high-resolution encoder once, then each block, with the gathers/scatter of
   `HiALayer._apply_block` (a copy of the image tokens, the edited copy, an out-of-place `index_put` of the hidden
   states).

FLOPs are the sum over stages (FlopCounterMode). Peak activation bytes are composed as
  max(stage 1 peak, stage 2 peak + bytes held across it (merged embeddings, image features) + stage 3 peak),
and, with HiA, the larger of that (+ the grid features HiA keeps) and the state at the last HiA layer (KV cache of
layers 0..l, hidden states in and out, bytes held, HiA's own peak). Inputs (pixels) are counted separately.
`suite_table3.validate_stage_composition` checks this against a real full forward on a small CPU model.
"""

import copy
from contextlib import nullcontext

import torch

from qilin_med_vl.modeling.modeling_qilin_med_vl import CACHE_NAME

from .flops import flop_counter
from .memory import LiveTensorBytes, parameter_bytes
from .models import qilin_class


def _fused_attention_stub(module, query, key, value, attention_mask, **kwargs):
    """Stands for a fused attention kernel (flash / memory-efficient sdpa) in memory measurements on the meta device:
    the output of the right shape, `(batch, q_len, heads, head_dim)`, and no materialized score matrix."""
    batch, heads, q_len, _ = query.shape
    return query.new_empty(batch, q_len, heads, value.shape[-1]), None


def register_fused_attention_stub(name: str = "bench_fused") -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, _fused_attention_stub)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name


def build_meta_model(config, hia=None, dtype=torch.bfloat16):
    """The model on the meta device (shapes, no weights), optionally with a HiA adapter via `peft.get_peft_model`."""
    with torch.device("meta"):
        model = qilin_class()(config)
    model = model.to(dtype).eval()
    if hia is not None:
        from peft import get_peft_model

        model = get_peft_model(model, copy.deepcopy(hia)).eval()
        # HiA blocks are created in float32 whatever the base dtype (see benchmarks/RESULTS.md, "findings"): cast
        # them to the model's dtype, as the paper ran its adapter.
        model = model.to(dtype)
    return model


def hia_blocks(model) -> list:
    from qilin_med_vl.modeling.modeling_hia import HiALayer

    blocks = []
    for module in model.modules():
        if isinstance(module, HiALayer) and not module.disable_adapters:
            for name in module.active_adapters:
                if name in module.hia:
                    blocks.append(module.hia[name])
    return blocks


def hia_layer_indices(model) -> list[int]:
    from qilin_med_vl.modeling.modeling_hia import HiALayer

    return [module.layer_index for module in model.modules()
            if isinstance(module, HiALayer) and not module.disable_adapters]


def measure_prefill_stages(model, num_images: int, text_tokens: int = 64, vision_size: int | None = None,
                           high_res_size: int | None = None, attention: str | None = None,
                           count_flops: bool = True) -> dict:
    """Replays one batch-1 prefill stage by stage (see the module docstring) on the model's device and dtype; returns
    FLOPs and peak tracked bytes per stage and the composed totals. `vision_size` feeds the ViT that resolution with
    interpolated position embeddings (the paper's baseline); HiA runs when `model` has an active HiA adapter."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if attention:
        base.set_attn_implementation(attention)
    config, inner = base.config, base.model
    parameter = next(base.parameters())
    device, dtype = parameter.device, parameter.dtype
    vision = config.vision_config
    size = vision_size or vision.image_size
    per_image = (size // vision.patch_size) ** 2
    tokens = text_tokens + num_images * per_image
    hidden = config.text_config.hidden_size

    def empty(*shape):
        return torch.empty(*shape, device=device, dtype=dtype)

    def counters():
        return (flop_counter() if count_flops else nullcontext()), LiveTensorBytes()

    result = {"tokens": tokens, "image_tokens_per_image": per_image}
    with torch.inference_mode():
        pixels = empty(num_images, 3, size, size) if num_images else None
        flops, memory = counters()
        with flops, memory:
            embeds = empty(1, tokens, hidden)  # embed_tokens(input_ids): a gather
            features = None
            if num_images:
                outputs = inner.vision_tower(pixels, output_hidden_states=True,
                                             interpolate_pos_encoding=size != vision.image_size)
                selected = outputs.hidden_states[config.vision_feature_layer]
                if config.vision_feature_select_strategy == "default":
                    selected = selected[:, 1:]
                features = inner.multi_modal_projector(selected)
                del outputs, selected
            merged = torch.empty_like(embeds)  # masked_scatter
            del embeds
        result["stage1_vision"] = {
            "flops": flops.get_total_flops() if count_flops else None,
            "peak_bytes": memory.peak,
        }
        held = merged.nbytes + (features.nbytes if features is not None else 0)

        flops, memory = counters()
        with flops, memory:
            outputs = inner.language_model(inputs_embeds=merged, use_cache=True)
            logits = base.lm_head(outputs.last_hidden_state[:, -1:])
            kv = sum(layer.keys.nbytes + layer.values.nbytes for layer in getattr(outputs, CACHE_NAME).layers)
        result["stage2_language_model"] = {"flops": flops.get_total_flops() if count_flops else None,
                                           "peak_bytes": memory.peak, "kv_cache_bytes": kv}
        del outputs, logits

        blocks = hia_blocks(model) if num_images else []
        stage3 = {"flops": 0, "peak_bytes": 0, "blocks": len(blocks)}
        if blocks:
            high = high_res_size or blocks[0].high_res_size
            high_pixels = empty(num_images, 3, high, high)
            image_tokens = num_images * config.image_seq_length
            flops, memory = counters()
            with flops, memory:
                grid_features, grid_size = blocks[0].encoder(high_pixels.to(blocks[0].queries.dtype),
                                                             return_grid_size=True)
                hidden_states = merged
                for block in blocks:
                    index = torch.empty(2, image_tokens, device=device, dtype=torch.long)  # nonzero()
                    visual = empty(num_images, config.image_seq_length, hidden)  # hidden[batch, position]
                    instruction = empty(num_images, hidden)
                    update, _ = block(visual, instruction, grid_features, False, grid_size)
                    edited = visual + update
                    hidden_states = torch.empty_like(hidden_states)  # out-of-place index_put
                    del index, visual, instruction, update, edited
                del hidden_states
            stage3 = {"flops": flops.get_total_flops() if count_flops else None, "peak_bytes": memory.peak,
                      "blocks": len(blocks), "grid_positions": grid_features.shape[1], "high_res_size": high}
            del grid_features
        result["stage3_hia"] = stage3
    element = parameter.element_size()
    input_bytes = (pixels.nbytes if pixels is not None else 0)
    if blocks:
        input_bytes += num_images * 3 * stage3["high_res_size"] ** 2 * element
    language_model = result["stage2_language_model"]
    lm_peak = language_model["peak_bytes"] + held
    if blocks:
        # HiA acts after decoder layer l: the KV cache then holds layers 0..l; the hidden states (input and output of
        # the layer) are live; the grid features stay live until the end of the forward.
        layers = config.text_config.num_hidden_layers
        last = max(block_layer for block_layer in hia_layer_indices(model))
        kv_then = language_model["kv_cache_bytes"] * (last + 1) // layers
        at_hia = held + kv_then + 2 * tokens * hidden * element + stage3["peak_bytes"]
        grid_bytes = num_images * stage3["grid_positions"] * blocks[0].queries.shape[-1] * element
        lm_peak = max(lm_peak + grid_bytes, at_hia)
    result["held_across_language_model_bytes"] = held
    result["input_bytes"] = input_bytes
    result["activation_peak_bytes"] = max(result["stage1_vision"]["peak_bytes"], lm_peak)
    if count_flops:
        result["flops"] = (result["stage1_vision"]["flops"] + result["stage2_language_model"]["flops"]
                           + stage3["flops"])
    result["parameter_bytes"] = parameter_bytes(model)
    result["total_bytes"] = result["parameter_bytes"] + input_bytes + result["activation_peak_bytes"]
    return result
