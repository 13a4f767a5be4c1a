# Copyright 2026 The qilin-med-vl Authors. Licensed under the Apache License, Version 2.0.
"""Benchmark configurations, synthetic inputs and model builders shared by the suites and the tests."""

import copy

import torch

from qilin_med_vl.testing import tiny_config


def bench_config(
    hidden_size: int = 512,
    num_hidden_layers: int = 6,
    intermediate_size: int | None = None,
    num_attention_heads: int = 8,
    num_key_value_heads: int | None = None,
    vocab_size: int = 32064,
    vision_hidden_size: int = 384,
    vision_layers: int = 4,
    vision_heads: int = 6,
    image_size: int = 224,
    patch_size: int = 14,
    attn_implementation: str = "sdpa",
):
    """A small-but-not-tiny Qilin-Med-VL config with the 13B model's proportions: MHA (kv heads = heads), MLP width
    2.7 x hidden (13824 / 5120), CLIP MLP 4 x, the real 32064-row vocabulary, `<image>` = 32000."""
    # Rounded to a multiple of 64: bitsandbytes' CPU 4-bit kernels need in-features divisible by the 64 blocksize.
    intermediate_size = intermediate_size or int(round(hidden_size * 13824 / 5120 / 64)) * 64
    config = tiny_config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        vision_hidden_size=vision_hidden_size,
        image_size=image_size,
        patch_size=patch_size,
        image_token_id=32000,
        vision_kwargs={
            "intermediate_size": 4 * vision_hidden_size,
            "num_hidden_layers": vision_layers,
            "num_attention_heads": vision_heads,
            "hidden_act": "quick_gelu",
        },
        intermediate_size=intermediate_size,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads or num_attention_heads,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
    )
    config._attn_implementation = attn_implementation
    return config


def with_vision_size(config, image_size: int):
    """The paper's baseline at a higher resolution: the same model with the ViT fed `image_size` px, i.e.
    `(image_size / patch)^2` image tokens. Built as a config whose CLIP position table has that many rows; the compute
    is that of CLIP with interpolated position embeddings (the interpolation itself is not counted)."""
    config = copy.deepcopy(config)
    config.vision_config.image_size = image_size
    config.image_seq_length = (image_size // config.vision_config.patch_size) ** 2
    return config


def hia_config_for(high_res_size: int = 672, **overrides):
    """`HiAConfig` with the paper's defaults (M=256, 8 heads, width = LLM hidden, layers L/3 and 2L/3, ResNet-50)."""
    from qilin_med_vl.modeling.configuration_hia import HiAConfig

    return HiAConfig(high_res_size=high_res_size, **overrides)


def make_inputs(config, num_images: int, text_tokens: int = 48, high_res_size: int | None = None, seed: int = 0,
                batch_size: int = 1, dtype=torch.float32, device="cpu") -> dict:
    """Synthetic processor-like inputs: `<s>` + 7 text tokens, then per image `image_seq_length` `<image>` tokens and a
    newline, then the rest of the text (`text_tokens` non-image tokens in all). Random pixels."""
    generator = torch.Generator().manual_seed(seed)
    image_length = config.image_seq_length
    rows = []
    for _ in range(batch_size):
        text = torch.randint(3, 31999, (text_tokens,), generator=generator)
        text[0] = 1
        pieces, used = [text[:8]], 8
        for _ in range(num_images):
            pieces.append(torch.full((image_length,), config.image_token_id))
            pieces.append(text[used : used + 1])
            used += 1
        pieces.append(text[used:])
        rows.append(torch.cat(pieces))
    input_ids = torch.stack(rows)
    inputs = {"input_ids": input_ids.to(device), "attention_mask": torch.ones_like(input_ids).to(device)}
    if num_images:
        size = config.vision_config.image_size
        pixels = torch.randn(batch_size * num_images, 3, size, size, generator=generator)
        inputs["pixel_values"] = pixels.to(device=device, dtype=dtype)
        if high_res_size:
            high = torch.randn(batch_size * num_images, 3, high_res_size, high_res_size, generator=generator)
            inputs["high_res_pixel_values"] = high.to(device=device, dtype=dtype)
    return inputs


def qilin_class():
    from qilin_med_vl.modeling.modeling_qilin_med_vl import QilinMedVLForConditionalGeneration

    return QilinMedVLForConditionalGeneration


def build_model(config, seed: int = 0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = qilin_class()(config).to(dtype).eval()
    model.generation_config.pad_token_id = 0
    return model


def llava_twin(model):
    """transformers' `LlavaForConditionalGeneration` holding the same weights (strict load), same attention."""
    from transformers import LlavaForConditionalGeneration

    from qilin_med_vl.conversion.llava import llava_config_from_qilin

    llava_config = llava_config_from_qilin(model.config)
    llava_config._attn_implementation = model.config._attn_implementation
    twin = LlavaForConditionalGeneration(llava_config).to(model.dtype).eval()
    twin.load_state_dict(model.state_dict(), strict=True)
    twin.generation_config.pad_token_id = 0
    return twin


def prefill_once(model, inputs):
    with torch.inference_mode():
        model(**inputs, use_cache=True, logits_to_keep=1)
