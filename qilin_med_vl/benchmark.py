# Copyright 2026 The qilin-med-vl Authors. Licensed under the Apache License, Version 2.0.
"""Benchmarks of Qilin-Med-VL and the HiA adapter: FLOP and memory arithmetic, measurement helpers and suites.

Five suites (each writes a JSON record; `write_reports` turns them into markdown and a PNG):

1. `llava`: the same weights in `QilinMedVLForConditionalGeneration` and transformers' `LlavaForConditionalGeneration`,
   timed side by side (interleaved runs, medians): prefill latency, decode tokens/s, peak activation memory.
2. `hia`: HiA's cost against the plain model and against the paper's baseline (the ViT fed a higher resolution,
   `(S/14)^2` image tokens), measured on a small CPU configuration and counted at the 13B configuration.
3. `table3`: the HiA paper's Table 3 (memory and FLOPs vs resolution) at the real 13B configuration without weights:
   parameters counted on the meta device, FLOPs by exact arithmetic cross-checked against `FlopCounterMode` on the
   meta device, memory = parameters + KV cache + peak activations tracked on the meta device.
4. `quant`: bitsandbytes 8-bit / 4-bit against bf16 / fp32 on CPU: memory footprint and speed.
5. `gpu`: the 13B configuration with random weights on a CUDA device (skipped, and says so, without one).

Conventions. FLOPs count 2 per multiply-accumulate of matrix products and convolutions (what
`torch.utils.flop_counter.FlopCounterMode` counts); element-wise work (norms, activations, softmax, rotary) is not
counted. Attention scores are counted over the full `q_len x kv_len` rectangle, causal masking ignored, as
FlopCounterMode does. MACs = FLOPs / 2. Sizes in GB are 1e9 bytes, GiB are 2**30 bytes.

The CPU suite runs as `qilin-med-vl bench` or `python benchmarks/run_cpu_suite.py`; the GPU suite as
`python benchmarks/bench_gpu.py`.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import weakref
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch

BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}

# The HiA paper (Ding et al., MICCAI 2024), Table 3 as printed: "baseline / HiA" memory (GB), FLOPs (T) and AVG
# score; None where the paper prints "x" (out of memory).
PAPER_TABLE3 = {
    448: {"memory": (30.8, 29.6), "tflops": (46.8, 15.8), "avg": (37.7, 39.6)},
    560: {"memory": (31.3, 29.9), "tflops": (85.5, 16.2), "avg": (38.0, 40.8)},
    672: {"memory": (None, 30.1), "tflops": (105.0, 16.5), "avg": (None, 41.4)},
    784: {"memory": (None, 30.3), "tflops": (162.0, 16.7), "avg": (None, 41.5)},
    896: {"memory": (None, 30.4), "tflops": (208.0, 16.8), "avg": (None, 41.5)},
}
HIGH_RES_SIZES = (336, 448, 560, 672, 784, 896)


# ---------------------------------------------------------------------------------------------------------------------
# Configurations
# ---------------------------------------------------------------------------------------------------------------------


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
    from .modeling.configuration_qilin_med_vl import QilinMedVLConfig

    intermediate_size = intermediate_size or int(round(hidden_size * 13824 / 5120 / 16)) * 16
    text_config = {
        "model_type": "llama",
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": num_key_value_heads or num_attention_heads,
        "max_position_embeddings": 8192,
        "vocab_size": vocab_size,
        "rms_norm_eps": 1e-5,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    vision_config = {
        "model_type": "clip_vision_model",
        "hidden_size": vision_hidden_size,
        "intermediate_size": 4 * vision_hidden_size,
        "num_hidden_layers": vision_layers,
        "num_attention_heads": vision_heads,
        "image_size": image_size,
        "patch_size": patch_size,
        "projection_dim": vision_hidden_size,
        "hidden_act": "quick_gelu",
    }
    config = QilinMedVLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=32000,
        image_seq_length=(image_size // patch_size) ** 2,
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
    from .modeling.configuration_hia import HiAConfig

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


# ---------------------------------------------------------------------------------------------------------------------
# FLOP arithmetic (2 FLOPs per multiply-accumulate; see the module docstring)
# ---------------------------------------------------------------------------------------------------------------------


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


def llama_flops(text_config, new_tokens: int, past_tokens: int = 0, logits_tokens: int = 1, batch_size: int = 1) -> dict:
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
    return 2 * text_config.num_hidden_layers * batch_size * tokens * text_config.num_key_value_heads * head_dim * bytes_per_element


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


# ---------------------------------------------------------------------------------------------------------------------
# Memory: live tensor bytes through the dispatcher, RSS high-water mark, footprints
# ---------------------------------------------------------------------------------------------------------------------


class LiveTensorBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Peak bytes of tensor storage allocated while the mode is active and still alive, on any device including
    `meta` (shapes only). Storage that existed before (parameters, inputs) and views of it are not counted; an
    allocation is freed when its storage is garbage collected. Timing runs must not use it (dispatch overhead)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _release(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = set()
        for tensor in torch.utils._pytree.tree_leaves((args, kwargs)):
            if isinstance(tensor, torch.Tensor):
                inputs.add(tensor.untyped_storage()._cdata)
        for tensor in torch.utils._pytree.tree_leaves(out):
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = storage._cdata
            if key in self.live or key in inputs:
                continue
            self.live[key] = storage.nbytes()
            self.current += self.live[key]
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._release, key)
        return out


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def pin_malloc_to_mmap(threshold: int = 64 * 1024) -> bool:
    """glibc only: serve every allocation of `threshold` bytes or more with mmap, returned to the kernel on free
    (a fixed threshold also turns off glibc's adaptive threshold). Then the RSS high-water mark follows the live
    large tensors instead of heap pages glibc keeps. Slows allocation down: call it after the timing runs."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_mmap_threshold = -3
        ok = libc.mallopt(m_mmap_threshold, int(threshold)) == 1
        libc.malloc_trim(0)
        return ok
    except (OSError, AttributeError):
        return False


def rss_peak_delta(fn) -> int | None:
    """Peak resident-set growth (bytes) while `fn()` runs: resets the kernel's high-water mark (VmHWM) through
    /proc/self/clear_refs, then reads it. None where that is not possible. Counts everything the process touches
    (allocator slack, thread stacks, buffers outside torch); see `pin_malloc_to_mmap`."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        return None
    before = _status_kib("VmRSS")
    fn()
    peak = _status_kib("VmHWM")
    if before is None or peak is None:
        return None
    return max(0, (peak - before) * 1024)


def parameter_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


# ---------------------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------------------


class StepTimer:
    """A logits processor that stamps the clock at every generation step: the first stamp comes right after the
    prefill forward, each later gap is one decode step (forward + sampling bookkeeping)."""

    def __init__(self, synchronize=None):
        self.stamps: list[float] = []
        self.synchronize = synchronize

    def __call__(self, input_ids, scores):
        if self.synchronize:
            self.synchronize()
        self.stamps.append(time.perf_counter())
        return scores


def time_prefill(model, inputs, synchronize=None) -> float:
    """Seconds for one prefill forward (KV cache built, logits of the last position only, as in `generate`)."""
    with torch.inference_mode():
        start = time.perf_counter()
        model(**inputs, use_cache=True, logits_to_keep=1)
        if synchronize:
            synchronize()
        return time.perf_counter() - start


def time_generate(model, inputs, new_tokens: int, synchronize=None) -> dict:
    """Greedy generation of exactly `new_tokens` tokens; returns the prefill time inside `generate` and the list of
    decode-step times."""
    from transformers import LogitsProcessorList

    timer = StepTimer(synchronize)
    with torch.inference_mode():
        start = time.perf_counter()
        model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       pad_token_id=0, logits_processor=LogitsProcessorList([timer]))
    stamps = timer.stamps
    return {"prefill": stamps[0] - start, "steps": [b - a for a, b in zip(stamps, stamps[1:])]}


def summarize(values) -> dict:
    values = sorted(values)
    if not values:
        return {"median": float("nan"), "p25": float("nan"), "p75": float("nan"), "n": 0}
    quartiles = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return {"median": statistics.median(values), "p25": quartiles[0], "p75": quartiles[2], "n": len(values)}


def interleave(runners: dict, repeats: int, warmup: int = 1) -> dict:
    """Runs every callable of `runners` once per round, alternating the order each round, `warmup` discarded rounds
    first; returns each runner's list of results."""
    names = list(runners)
    results = {name: [] for name in names}
    for round_index in range(warmup + repeats):
        order = names if round_index % 2 == 0 else names[::-1]
        for name in order:
            value = runners[name]()
            if round_index >= warmup:
                results[name].append(value)
    return results


def machine_description() -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "os_cpus": os.cpu_count(),
        "platform": platform.platform(),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
        import peft

        info["peft"] = peft.__version__
    except ImportError:
        pass
    try:
        with open("/proc/cpuinfo") as handle:
            names = [line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")]
        info["cpu"] = names[0] if names else platform.processor()
    except OSError:
        info["cpu"] = platform.processor()
    try:
        with open("/proc/loadavg") as handle:
            info["loadavg_at_start"] = handle.read().split()[:3]
    except OSError:
        pass
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    return info


# ---------------------------------------------------------------------------------------------------------------------
# Suite 1: the same weights in QilinMedVLForConditionalGeneration and transformers' LlavaForConditionalGeneration
# ---------------------------------------------------------------------------------------------------------------------


def _qilin_class():
    from .modeling.modeling_qilin_med_vl import QilinMedVLForConditionalGeneration

    return QilinMedVLForConditionalGeneration


def build_model(config, seed: int = 0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = _qilin_class()(config).to(dtype).eval()
    model.generation_config.pad_token_id = 0
    return model


def llava_twin(model):
    """transformers' `LlavaForConditionalGeneration` holding the same weights (strict load), same attention."""
    from transformers import LlavaForConditionalGeneration

    from .conversion.llava import llava_config_from_qilin

    llava_config = llava_config_from_qilin(model.config)
    llava_config._attn_implementation = model.config._attn_implementation
    twin = LlavaForConditionalGeneration(llava_config).to(model.dtype).eval()
    twin.load_state_dict(model.state_dict(), strict=True)
    twin.generation_config.pad_token_id = 0
    return twin


def _peak_live_bytes(fn) -> int:
    gc.collect()
    with torch.inference_mode(), LiveTensorBytes() as tracker:
        fn()
    return tracker.peak


def _no_grad_call(model, inputs):
    with torch.inference_mode():
        model(**inputs, use_cache=True, logits_to_keep=1)


def time_models(models: dict, inputs: dict, repeats: int, warmup: int, new_tokens: int = 0, prefill: bool = True,
                synchronize=None) -> dict:
    """Interleaved timing of several models. `inputs` maps each model name to its inputs. Per round and model: one
    prefill forward and/or one `generate` of `new_tokens` tokens. Returns per model the lists (one entry per round)
    of prefill seconds and of the median decode-step seconds of that round."""
    runners = {}
    for name, model in models.items():
        def run(model=model, name=name):
            out = {}
            if prefill:
                out["prefill"] = time_prefill(model, inputs[name], synchronize)
            if new_tokens:
                generation = time_generate(model, inputs[name], new_tokens, synchronize)
                out["decode_step"] = statistics.median(generation["steps"])
                out["generate_prefill"] = generation["prefill"]
            return out
        runners[name] = run
    rounds = interleave(runners, repeats, warmup)
    return {name: {key: [r[key] for r in results] for key in results[0]} for name, results in rounds.items()}


def paired_ratio(numerator: list, denominator: list) -> dict:
    """Median (and quartiles) of the per-round ratios: both runs of a round are adjacent in time, so slow phases of
    a shared machine cancel out better than in a ratio of medians."""
    ratios = [a / b for a, b in zip(numerator, denominator) if b]
    summary = summarize(ratios)
    summary["ratio_of_medians"] = statistics.median(numerator) / statistics.median(denominator)
    return summary


def _ms(values) -> dict:
    return {k: (v * 1e3 if k != "n" else v) for k, v in summarize(values).items()}


def run_llava_comparison(repeats: int = 15, warmup: int = 2, new_tokens: int = 32, num_images: int = 1,
                         text_tokens: int = 48, config_kwargs: dict | None = None, log=print) -> dict:
    config = bench_config(**(config_kwargs or {}))
    ours = build_model(config)
    theirs = llava_twin(ours)
    inputs = make_inputs(config, num_images, text_tokens)
    with torch.inference_mode():
        same = (ours(**inputs).logits - theirs(**inputs).logits).abs().max().item()
        generated_equal = torch.equal(
            ours.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=0),
            theirs.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=0),
        )
    models = {"qilin": ours, "llava": theirs}
    log(f"[llava] hidden={config.text_config.hidden_size} layers={config.text_config.num_hidden_layers} "
        f"vision {config.vision_config.image_size}px; max |logit difference| = {same:.3g}; "
        f"greedy tokens identical: {generated_equal}")
    times = time_models(models, {name: inputs for name in models}, repeats, warmup, new_tokens)

    rows = {}
    for name, model in models.items():
        rows[name] = {
            "prefill_ms": _ms(times[name]["prefill"]),
            "generate_prefill_ms": _ms(times[name]["generate_prefill"]),
            "decode_step_ms": _ms(times[name]["decode_step"]),
            "decode_tokens_per_s": 1.0 / statistics.median(times[name]["decode_step"]),
            "parameter_bytes": parameter_bytes(model),
            "peak_prefill_tensor_bytes": _peak_live_bytes(
                lambda m=model: m(**inputs, use_cache=True, logits_to_keep=1)
            ),
            "peak_generate_tensor_bytes": _peak_live_bytes(
                lambda m=model: m.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                                           pad_token_id=0)
            ),
        }
    # Secondary memory figure: the RSS high-water-mark growth of a prefill, with large allocations pinned to mmap.
    pinned = pin_malloc_to_mmap()
    rss = interleave({name: (lambda m=m: rss_peak_delta(lambda: _no_grad_call(m, inputs))) for name, m in models.items()},
                     5, 1)
    for name in models:
        values = [v for v in rss[name] if v is not None]
        rows[name]["rss_peak_delta_prefill_bytes"] = statistics.median(values) if values else None

    def plain_ratio(key):
        a, b = rows["qilin"][key], rows["llava"][key]
        return a / b if a is not None and b else None

    ratios = {
        "prefill_latency": paired_ratio(times["qilin"]["prefill"], times["llava"]["prefill"]),
        "decode_step_time": paired_ratio(times["qilin"]["decode_step"], times["llava"]["decode_step"]),
        "generate_prefill_latency": paired_ratio(times["qilin"]["generate_prefill"], times["llava"]["generate_prefill"]),
        "peak_prefill_tensor_bytes": plain_ratio("peak_prefill_tensor_bytes"),
        "peak_generate_tensor_bytes": plain_ratio("peak_generate_tensor_bytes"),
        "rss_peak_delta_prefill": plain_ratio("rss_peak_delta_prefill_bytes"),
        "parameter_bytes": plain_ratio("parameter_bytes"),
    }
    for name in models:
        log(f"[llava] {name}: prefill {rows[name]['prefill_ms']['median']:.1f} ms, decode "
            f"{rows[name]['decode_tokens_per_s']:.1f} tok/s, peak prefill tensors "
            f"{rows[name]['peak_prefill_tensor_bytes'] / 1e6:.2f} MB")
    log("[llava] ours/theirs: " + ", ".join(
        f"{k} {(v['median'] if isinstance(v, dict) else v):.3f}" for k, v in ratios.items() if v is not None))
    return {
        "config": {
            "hidden_size": config.text_config.hidden_size,
            "num_hidden_layers": config.text_config.num_hidden_layers,
            "intermediate_size": config.text_config.intermediate_size,
            "num_attention_heads": config.text_config.num_attention_heads,
            "vocab_size": config.text_config.vocab_size,
            "vision": f"CLIP {config.vision_config.num_hidden_layers} layers x {config.vision_config.hidden_size}, "
                      f"{config.vision_config.image_size}px / {config.vision_config.patch_size}",
            "attn_implementation": config._attn_implementation,
            "dtype": "float32",
            "parameters": sum(p.numel() for p in ours.parameters()),
            "prompt_tokens": int(inputs["input_ids"].shape[1]),
            "num_images": num_images,
            "new_tokens": new_tokens,
        },
        "method": (
            f"{warmup} warm-up rounds then {repeats} interleaved rounds (order alternates each round). Prefill = one "
            "forward with use_cache and logits_to_keep=1; decode = median per-step time inside generate (a logits "
            "processor stamps the clock), tokens/s = 1 / that. Ratios = median of per-round ratios (each round's two "
            "runs are adjacent in time). Peak memory = peak bytes of live torch tensors allocated during the call "
            "(dispatch-mode tracker; parameters excluded, reported separately); secondary: process RSS high-water-mark "
            f"growth during one prefill (median of 5; large allocations pinned to mmap: {pinned})."
        ),
        "max_abs_logit_difference": same,
        "greedy_tokens_identical": generated_equal,
        "models": rows,
        "ratios_ours_over_theirs": ratios,
    }
