# Copyright 2026 The qilin-med-vl Authors. Licensed under the Apache License, Version 2.0.
"""FLOP and byte arithmetic: exact prefill / decode FLOPs of Qilin-Med-VL and HiA, KV-cache and quantized-footprint
bytes, and a `FlopCounterMode` that also counts CPU sdpa attention. FLOPs count 2 per multiply-accumulate (see the
package docstring)."""

import torch

from .models import with_vision_size


def _linear(tokens: int, in_features: int, out_features: int) -> int:
    return 2 * tokens * in_features * out_features


def _attention(batch_heads: int, q_len: int, kv_len: int, head_dim: int) -> int:
    """QK^T and AV over the full rectangle."""
    return 2 * 2 * batch_heads * q_len * kv_len * head_dim


def clip_vision_flops(vision_config, image_size: int | None = None, num_images: int = 1) -> int:
    """CLIP vision tower at `image_size` px: patch conv + every encoder layer (all layers run, although the
    penultimate layer's output is the one used)."""
    size = image_size or vision_config.image_size
    patch, hidden = vision_config.patch_size, vision_config.hidden_size
    patches = (size // patch) ** 2
    tokens = patches + 1
    heads = vision_config.num_attention_heads
    flops = 2 * patches * 3 * patch * patch * hidden  # patch embedding convolution
    per_layer = 4 * _linear(tokens, hidden, hidden) + _attention(heads, tokens, tokens, hidden // heads)
    per_layer += _linear(tokens, hidden, vision_config.intermediate_size) * 2
    flops += vision_config.num_hidden_layers * per_layer
    return num_images * flops


def projector_flops(config, image_tokens: int) -> int:
    vision_hidden, hidden = config.vision_config.hidden_size, config.text_config.hidden_size
    flops = _linear(image_tokens, vision_hidden, hidden)
    if config.projector_type == "mlp2x_gelu":
        flops += _linear(image_tokens, hidden, hidden)
    return flops


def llama_flops(
    text_config, new_tokens: int, past_tokens: int = 0, logits_tokens: int = 1, batch_size: int = 1
) -> dict:
    """Decoder layers and LM head for `new_tokens` tokens on top of `past_tokens` cached ones."""
    hidden, layers = text_config.hidden_size, text_config.num_hidden_layers
    heads, kv_heads = text_config.num_attention_heads, text_config.num_key_value_heads
    head_dim = getattr(text_config, "head_dim", None) or hidden // heads
    tokens = batch_size * new_tokens
    per_layer = _linear(tokens, hidden, heads * head_dim) + 2 * _linear(tokens, hidden, kv_heads * head_dim)
    per_layer += _linear(tokens, heads * head_dim, hidden) + 3 * _linear(tokens, hidden, text_config.intermediate_size)
    attention = _attention(batch_size * heads, new_tokens, past_tokens + new_tokens, head_dim)
    return {
        "linear": layers * per_layer,
        "attention": layers * attention,
        "lm_head": _linear(batch_size * logits_tokens, hidden, text_config.vocab_size),
    }


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def resnet_flops(size: int, depths=(3, 4, 6, 3), width: int = 64, output_dim: int = 2048, num_images: int = 1) -> int:
    """HiA's high-resolution encoder (ResNet trunk, no pool/fc) + its per-position `Linear(channels, output_dim)`."""
    flops = 0
    side = _conv_out(size, 7, 2, 3)
    flops += 2 * 3 * width * 49 * side * side  # stem conv 7x7/2
    side = _conv_out(side, 3, 2, 1)  # max-pool
    in_channels = width
    for stage, depth in enumerate(depths):
        planes = width * 2**stage
        out_channels = planes * 4
        for block in range(depth):
            stride = 2 if (stage > 0 and block == 0) else 1
            out_side = _conv_out(side, 3, stride, 1)
            flops += 2 * in_channels * planes * side * side  # 1x1
            flops += 2 * planes * planes * 9 * out_side * out_side  # 3x3 (stride here)
            flops += 2 * planes * out_channels * out_side * out_side  # 1x1 expand
            if block == 0 and (stride != 1 or in_channels != out_channels):
                flops += 2 * in_channels * out_channels * out_side * out_side  # projection shortcut
            in_channels, side = out_channels, out_side
    flops += _linear(side * side, in_channels, output_dim)
    return num_images * flops


def resnet_grid(size: int, depths=(3, 4, 6, 3)) -> int:
    """Positions of the encoder's output grid for a `size x size` image (ceil-halving per stride-2 layer)."""
    side = size
    for _ in range(2 + len(depths) - 1):
        side = (side + 1) // 2
    return side * side


def hia_flops(config, hia, num_images: int, high_res_size: int | None = None) -> dict:
    """One HiA adapter (encoder once, one block per HiA layer) on `num_images` images at prefill."""
    hidden, layers = config.text_config.hidden_size, config.text_config.num_hidden_layers
    width = hia.hidden_size or hidden
    size = high_res_size or hia.high_res_size
    queries, image_tokens = hia.num_queries, config.image_seq_length
    heads = hia.num_heads
    hia_layers = hia.layers or sorted({layers // 3, 2 * layers // 3})
    grid = resnet_grid(size, hia.encoder_depths)
    n = num_images
    block = _linear(n, hidden, width) if hia.instruction_aware else 0  # Linear(h_last)
    block += _linear(n * grid, width, width)  # feature_proj
    # Extractor cross-attention: Q on the M queries, K and V on the grid, out projection on M.
    block += _linear(n * queries, width, width) + 2 * _linear(n * grid, width, width)
    block += _attention(n * heads, queries, grid, width // heads) + _linear(n * queries, width, width)
    # Injection: token_proj, cross-attention from the K low-res tokens to the M extracted features, output_proj.
    block += _linear(n * image_tokens, hidden, width)
    block += _linear(n * image_tokens, width, width) + 2 * _linear(n * queries, width, width)
    block += _attention(n * heads, image_tokens, queries, width // heads) + _linear(n * image_tokens, width, width)
    block += _linear(n * image_tokens, width, hidden)
    encoder = resnet_flops(size, hia.encoder_depths, hia.encoder_width, width, num_images=n)
    return {"hia_encoder": encoder, "hia_blocks": len(hia_layers) * block}


def prefill_flops(config, num_images: int, text_tokens: int = 48, vision_size: int | None = None, hia=None,
                  high_res_size: int | None = None, logits_tokens: int = 1) -> dict:
    """Prefill FLOPs by component. `vision_size` feeds the ViT that resolution (the paper's baseline: `(S/14)^2` image
    tokens each); `hia` adds a HiA adapter at `high_res_size`. `logits_tokens=1` as in `generate`."""
    if vision_size:
        config = with_vision_size(config, vision_size)
    image_tokens = num_images * config.image_seq_length
    tokens = text_tokens + image_tokens
    llm = llama_flops(config.text_config, tokens, logits_tokens=logits_tokens)
    result = {
        "vision": clip_vision_flops(config.vision_config, num_images=num_images) if num_images else 0,
        "projector": projector_flops(config, image_tokens),
        "llm_linear": llm["linear"],
        "llm_attention": llm["attention"],
        "lm_head": llm["lm_head"],
        "hia_encoder": 0,
        "hia_blocks": 0,
        "tokens": tokens,
    }
    if hia is not None and num_images:
        result.update(hia_flops(config, hia, num_images, high_res_size))
    result["total"] = sum(v for k, v in result.items() if k != "tokens")
    return result


def decode_flops(config, context_tokens: int, batch_size: int = 1) -> int:
    """One decode step (one new token per sequence) with `context_tokens` already cached. HiA adds nothing here."""
    return sum(llama_flops(config.text_config, 1, context_tokens, 1, batch_size).values())


def kv_cache_bytes(text_config, tokens: int, bytes_per_element: int = 2, batch_size: int = 1) -> int:
    hidden, heads = text_config.hidden_size, text_config.num_attention_heads
    head_dim = getattr(text_config, "head_dim", None) or hidden // heads
    return (
        2 * text_config.num_hidden_layers * batch_size * tokens * text_config.num_key_value_heads * head_dim
        * bytes_per_element
    )


def _sdpa_cpu_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of `aten._scaled_dot_product_flash_attention_for_cpu` (QK^T + AV), which FlopCounterMode does not know:
    without this entry every sdpa attention on CPU counts as zero."""
    batch, heads, q_len, head_dim = query_shape
    return _attention(batch * heads, q_len, key_shape[-2], head_dim)


def flop_counter(**kwargs):
    """`FlopCounterMode` that also counts CPU sdpa attention (see `_sdpa_cpu_flop`)."""
    from torch.utils.flop_counter import FlopCounterMode

    mapping = {}
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None:
        mapping[op] = _sdpa_cpu_flop
    return FlopCounterMode(display=False, custom_mapping=mapping, **kwargs)


def decode_weight_bytes(model) -> int:
    """Parameter bytes read per decode step: everything in the language model but the embedding table (one row is
    read), plus the LM head. Vision tower, projector and HiA do not run at decode."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    language_model = base.model.language_model
    total = sum(p.numel() * p.element_size() for p in language_model.parameters())
    total -= language_model.embed_tokens.weight.numel() * language_model.embed_tokens.weight.element_size()
    return total + sum(p.numel() * p.element_size() for p in base.lm_head.parameters())


def quantized_footprint_bytes(model_or_counts, scheme: str, rest_bytes: int | None = None) -> int:
    """Bytes of the parameters under `scheme` ("fp32", "bf16", "int8", "nf4") when only the language model's decoder
    linears are quantized (the model's default skip list), counted as `get_memory_footprint` counts them: int8 = 1
    byte per weight, nf4 = 0.5 byte per weight (bitsandbytes' scales/absmax live outside parameters and buffers and
    are not counted by it: about 4 bytes per output row for int8, 4 bytes per 64 weights for nf4); everything else
    at `rest_bytes` per element (default: 4 for "fp32", else 2, i.e. bf16)."""
    quantized, other = model_or_counts
    rest = rest_bytes or (4 if scheme == "fp32" else 2)
    per_weight = {"fp32": 4, "bf16": 2, "int8": 1, "nf4": 0.5}[scheme]
    return int(quantized * per_weight + other * rest)


def split_decoder_linear_parameters(model) -> tuple[int, int]:
    """(weights of Linear layers inside the language model's decoder layers, every other parameter element)."""
    quantizable = 0
    for name, module in model.named_modules():
        if ".language_model.layers." in f".{name}." and isinstance(module, torch.nn.Linear):
            quantizable += module.weight.numel()
    total = sum(p.numel() for p in model.parameters())
    return quantizable, total - quantizable
