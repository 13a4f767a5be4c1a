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
import os
import platform
import statistics
import sys
import tempfile
import time
import weakref
from contextlib import nullcontext

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

    # Rounded to a multiple of 64: bitsandbytes' CPU 4-bit kernels need in-features divisible by the 64 blocksize.
    intermediate_size = intermediate_size or int(round(hidden_size * 13824 / 5120 / 64)) * 64
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


class DispatchedOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the aten operators a call dispatches: a noise-free view of the work two implementations do."""

    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


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


def time_generate(model, inputs, new_tokens: int, synchronize=None, **generate_kwargs) -> dict:
    """Greedy generation of exactly `new_tokens` tokens; returns the prefill time inside `generate` and the list of
    decode-step times."""
    from transformers import LogitsProcessorList

    timer = StepTimer(synchronize)
    with torch.inference_mode():
        start = time.perf_counter()
        model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       pad_token_id=0, logits_processor=LogitsProcessorList([timer]), **generate_kwargs)
    stamps = timer.stamps
    return {"prefill": stamps[0] - start, "steps": [b - a for a, b in zip(stamps, stamps[1:])]}


def summarize(values) -> dict:
    values = sorted(values)
    if not values:
        return {"median": float("nan"), "p25": float("nan"), "p75": float("nan"), "n": 0}
    quartiles = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return {"median": statistics.median(values), "p25": quartiles[0], "p75": quartiles[2], "n": len(values)}


# A run counts as contended when the process got less than this share of its threads' CPU time (the machine is
# shared: another process taking a core halves the speed of a two-thread run).
CONTENTION_THRESHOLD = 0.85


def interleave(runners: dict, repeats: int, warmup: int = 1, max_rounds: int | None = None) -> dict:
    """Runs every callable of `runners` once per round, alternating the order each round, after `warmup` discarded
    rounds. Each run's CPU share (process CPU time / wall time / threads) is recorded; a round is clean when every run
    in it got at least `CONTENTION_THRESHOLD`. Rounds continue until `repeats` clean rounds or `max_rounds` (default
    3 x repeats) rounds. Returns each runner's results from the clean rounds (all rounds if fewer than `repeats` were
    clean), plus `_rounds` bookkeeping."""
    names = list(runners)
    max_rounds = max_rounds or 3 * repeats
    threads = torch.get_num_threads()
    clean, everything = [], []
    for round_index in range(warmup + max_rounds):
        order = names if round_index % 2 == 0 else names[::-1]
        values, shares = {}, []
        for name in order:
            wall, cpu = time.perf_counter(), time.process_time()
            values[name] = runners[name]()
            shares.append((time.process_time() - cpu) / max(time.perf_counter() - wall, 1e-9) / threads)
        if round_index < warmup:
            continue
        everything.append(values)
        if min(shares) >= CONTENTION_THRESHOLD:
            clean.append(values)
        if len(clean) >= repeats:
            break
    used = clean if len(clean) >= repeats else everything
    results = {name: [values[name] for values in used] for name in names}
    results["_rounds"] = {"clean": len(clean), "run": len(everything), "used": "clean" if used is clean else "all"}
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


def _rss_child(config_kwargs, num_images, text_tokens):
    """In a fresh process: RSS high-water-mark growth of one prefill for ours and Llava (median of 5 interleaved)."""
    pinned = pin_malloc_to_mmap()
    config = bench_config(**config_kwargs)
    ours = build_model(config)
    models = {"qilin": ours, "llava": llava_twin(ours)}
    inputs = make_inputs(config, num_images, text_tokens)
    for model in models.values():
        _no_grad_call(model, inputs)
    rss = interleave({name: (lambda m=m: rss_peak_delta(lambda: _no_grad_call(m, inputs))) for name, m in models.items()},
                     5, 1, max_rounds=5)
    result = {"pinned": pinned}
    for name in models:
        values = [v for v in rss[name] if v is not None]
        result[name] = statistics.median(values) if values else None
    return result


def _subprocess_target(queue, fn, args):
    torch.set_num_threads(1)
    try:
        queue.put(("ok", fn(*args)))
    except Exception as error:  # reported to the parent
        queue.put(("error", repr(error)))


def _in_subprocess(fn, *args):
    """Runs `fn(*args)` in a fresh spawned interpreter and returns its (picklable) result, {} on failure."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_subprocess_target, args=(queue, fn, args))
    process.start()
    try:
        status, value = queue.get(timeout=600)
    except Exception as error:
        status, value = "error", repr(error)
    process.join(timeout=60)
    return value if status == "ok" else {"error": value}


def time_models(models: dict, inputs: dict, repeats: int, warmup: int, new_tokens: int = 0, prefill: bool = True,
                synchronize=None, max_rounds: int | None = None) -> dict:
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
    rounds = interleave(runners, repeats, warmup, max_rounds)
    out = {name: {key: [r[key] for r in rounds[name]] for key in rounds[name][0]} for name in models}
    out["_rounds"] = rounds["_rounds"]
    return out


def paired_ratio(numerator: list, denominator: list) -> dict:
    """Median (and quartiles) of the per-round ratios: both runs of a round are adjacent in time, so slow phases of
    a shared machine cancel out better than in a ratio of medians."""
    ratios = [a / b for a, b in zip(numerator, denominator) if b]
    summary = summarize(ratios)
    summary["ratio_of_medians"] = statistics.median(numerator) / statistics.median(denominator)
    return summary


def _ms(values) -> dict:
    return {k: (v * 1e3 if k != "n" else v) for k, v in summarize(values).items()}


def overhead_microbenchmark(calls: int = 500, rounds: int = 2) -> dict:
    """Framework overhead, ours vs Llava, on an overhead-bound model (hidden 64, 6 layers, 56 px): the minimum over
    `rounds` x `calls` decode steps and `rounds` x `calls` / 3 prefills, the two models alternating call by call. The
    minimum is what a shared machine inflates least."""
    config = bench_config(hidden_size=64, num_hidden_layers=6, num_attention_heads=4, vision_hidden_size=32,
                          vision_layers=1, vision_heads=2, image_size=56)
    ours = build_model(config)
    models = {"qilin": ours, "llava": llava_twin(ours)}
    inputs = make_inputs(config, 1, 20)
    best = {name: {"decode_step_us": float("inf"), "prefill_us": float("inf")} for name in models}
    with torch.inference_mode():
        caches = {name: m(**inputs, use_cache=True, logits_to_keep=1).past_key_values for name, m in models.items()}

        def step(name):
            start = time.perf_counter()
            models[name](input_ids=torch.tensor([[5]]), past_key_values=caches[name], use_cache=True, logits_to_keep=1)
            elapsed = time.perf_counter() - start
            caches[name].crop(-1)
            return elapsed

        def prefill(name):
            start = time.perf_counter()
            models[name](**inputs, use_cache=True, logits_to_keep=1)
            return time.perf_counter() - start

        # Alternate the two models call by call, so that both see the same machine.
        for _ in range(rounds):
            for _ in range(calls):
                for name in models:
                    best[name]["decode_step_us"] = min(best[name]["decode_step_us"], step(name) * 1e6)
            for _ in range(calls // 3):
                for name in models:
                    best[name]["prefill_us"] = min(best[name]["prefill_us"], prefill(name) * 1e6)
    return {
        "models": best,
        "ratios_ours_over_theirs": {key: best["qilin"][key] / best["llava"][key] for key in best["qilin"]},
    }


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
    operator_counts = {}
    for name, model in models.items():
        with torch.inference_mode():
            with DispatchedOps() as prefill_ops:
                out = model(**inputs, use_cache=True, logits_to_keep=1)
            step = {"input_ids": torch.tensor([[5]]), "past_key_values": out.past_key_values, "use_cache": True,
                    "logits_to_keep": 1}
            with DispatchedOps() as decode_ops:
                model(**step)
        operator_counts[name] = {"prefill": prefill_ops.counts, "decode_step": decode_ops.counts}

    def only_in(a, b, phase):
        first, second = operator_counts[a][phase], operator_counts[b][phase]
        return {op: n - second.get(op, 0) for op, n in first.items() if n > second.get(op, 0)}

    operators = {
        phase: {"qilin_total": sum(operator_counts["qilin"][phase].values()),
                "llava_total": sum(operator_counts["llava"][phase].values()),
                "only_qilin": only_in("qilin", "llava", phase), "only_llava": only_in("llava", "qilin", phase)}
        for phase in ("prefill", "decode_step")
    }
    log(f"[llava] hidden={config.text_config.hidden_size} layers={config.text_config.num_hidden_layers} "
        f"vision {config.vision_config.image_size}px; max |logit difference| = {same:.3g}; "
        f"greedy tokens identical: {generated_equal}")
    times = time_models(models, {name: inputs for name in models}, repeats, warmup, new_tokens,
                        max_rounds=2 * repeats)

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
    # Secondary memory figure, in a fresh process (pinning malloc to mmap would slow later timings down).
    rss = _in_subprocess(_rss_child, config_kwargs or {}, num_images, text_tokens)
    for name in models:
        rows[name]["rss_peak_delta_prefill_bytes"] = rss.get(name)
    pinned = rss.get("pinned")

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
        "rounds": times["_rounds"],
        "threads": torch.get_num_threads(),
        "max_abs_logit_difference": same,
        "greedy_tokens_identical": generated_equal,
        "dispatched_operators": operators,
        "overhead_microbenchmark": overhead_microbenchmark(),
        "models": rows,
        "ratios_ours_over_theirs": ratios,
    }


# ---------------------------------------------------------------------------------------------------------------------
# Prefill measured stage by stage on any device, including `meta` (no weights)
# ---------------------------------------------------------------------------------------------------------------------
#
# The model's own forward cannot run on the meta device: it reads data (`int(mask.sum())`, `masked_scatter`,
# `nonzero` in HiA), which meta tensors do not have. So the prefill is replayed stage by stage with the model's own
# submodules, in the order `QilinMedVLModel.forward` runs them:
#   1. vision tower (all hidden states kept, as `output_hidden_states=True` does) + projector; the token embedding and
#      the merged embedding are empty tensors of the right size (a gather and a scatter: no FLOPs);
#   2. language model + LM head on the last position (`logits_to_keep=1`, as generate does), KV cache included;
#   3. HiA (when attached): the high-resolution encoder once, then each block, with the gathers/scatter of
#      `HiALayer._apply_block` (a copy of the image tokens, the edited copy, an out-of-place `index_put` of the hidden
#      states).
# FLOPs are the sum over stages (FlopCounterMode). Peak activation bytes are composed as
#   max(stage 1 peak, stage 2 peak + bytes held across it (merged embeddings, image features) + stage 3 peak),
# and, with HiA, the larger of that (+ the grid features HiA keeps) and the state at the last HiA layer (KV cache of
# layers 0..l, hidden states in and out, bytes held, HiA's own peak). Inputs (pixels) are counted separately.
# `validate_stage_composition` checks this against a real full forward on a small CPU model.


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
        model = _qilin_class()(config)
    model = model.to(dtype).eval()
    if hia is not None:
        from peft import get_peft_model

        model = get_peft_model(model, copy.deepcopy(hia)).eval()
        # HiA blocks are created in float32 whatever the base dtype (see benchmarks/RESULTS.md, "findings"): cast
        # them to the model's dtype, as the paper ran its adapter.
        model = model.to(dtype)
    return model


def _hia_blocks(model) -> list:
    from .modeling.modeling_hia import HiALayer

    blocks = []
    for module in model.modules():
        if isinstance(module, HiALayer) and not module.disable_adapters:
            for name in module.active_adapters:
                if name in module.hia:
                    blocks.append(module.hia[name])
    return blocks


def _hia_layer_indices(model) -> list[int]:
    from .modeling.modeling_hia import HiALayer

    return [module.layer_index for module in model.modules()
            if isinstance(module, HiALayer) and not module.disable_adapters]


def measure_prefill_stages(model, num_images: int, text_tokens: int = 64, vision_size: int | None = None,
                           high_res_size: int | None = None, attention: str | None = None,
                           count_flops: bool = True) -> dict:
    """Replays one batch-1 prefill stage by stage (see the comment above) on the model's device and dtype; returns
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
        result["stage1_vision"] = {"flops": flops.get_total_flops() if count_flops else None, "peak_bytes": memory.peak}
        held = merged.nbytes + (features.nbytes if features is not None else 0)

        flops, memory = counters()
        with flops, memory:
            outputs = inner.language_model(inputs_embeds=merged, use_cache=True)
            logits = base.lm_head(outputs.last_hidden_state[:, -1:])
            kv = sum(layer.keys.nbytes + layer.values.nbytes for layer in outputs.past_key_values.layers)
        result["stage2_language_model"] = {"flops": flops.get_total_flops() if count_flops else None,
                                           "peak_bytes": memory.peak, "kv_cache_bytes": kv}
        del outputs, logits

        blocks = _hia_blocks(model) if num_images else []
        stage3 = {"flops": 0, "peak_bytes": 0, "blocks": len(blocks)}
        if blocks:
            high = high_res_size or blocks[0].high_res_size
            high_pixels = empty(num_images, 3, high, high)
            image_tokens = num_images * config.image_seq_length
            flops, memory = counters()
            with flops, memory:
                grid_features = blocks[0].encoder(high_pixels.to(blocks[0].queries.dtype))
                hidden_states = merged
                for block in blocks:
                    index = torch.empty(2, image_tokens, device=device, dtype=torch.long)  # nonzero()
                    visual = empty(num_images, config.image_seq_length, hidden)  # hidden[batch, position]
                    instruction = empty(num_images, hidden)
                    update, _ = block(visual, instruction, grid_features, False)
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
        last = max(block_layer for block_layer in _hia_layer_indices(model))
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


def validate_stage_composition(num_images: int = 2, high_res_size: int = 224, text_tokens: int = 48, log=print) -> dict:
    """Small real CPU model: the stage-by-stage replay against the real full forward (tracked peak bytes and
    FlopCounterMode FLOPs), with and without HiA."""
    config = bench_config(hidden_size=256, num_hidden_layers=4, vision_hidden_size=192, vision_layers=2,
                          vision_heads=3, image_size=224)
    hia = hia_config_for(high_res_size, encoder_width=16)
    out = {}
    for label, with_hia in (("base", False), ("hia", True)):
        model = build_model(config)
        if with_hia:
            from peft import get_peft_model

            model = get_peft_model(model, copy.deepcopy(hia)).eval()
        inputs = make_inputs(config, num_images, text_tokens, high_res_size if with_hia else None)
        _no_grad_call(model, inputs)
        real_peak = _peak_live_bytes(lambda m=model, i=inputs: m(**i, use_cache=True, logits_to_keep=1))
        with torch.inference_mode(), flop_counter() as counter:
            model(**inputs, use_cache=True, logits_to_keep=1)
        staged = measure_prefill_stages(model, num_images, text_tokens, high_res_size=high_res_size if with_hia else None)
        analytic = prefill_flops(config, num_images, text_tokens, hia=hia if with_hia else None,
                                 high_res_size=high_res_size)["total"]
        out[label] = {
            "real_forward_peak_bytes": real_peak,
            "staged_peak_bytes": staged["activation_peak_bytes"],
            "peak_ratio_staged_over_real": staged["activation_peak_bytes"] / real_peak,
            "real_forward_flops": counter.get_total_flops(),
            "staged_flops": staged["flops"],
            "analytic_flops": analytic,
        }
        log(f"[validate] {label}: peak staged/real {out[label]['peak_ratio_staged_over_real']:.3f}; FLOPs real "
            f"{out[label]['real_forward_flops'] / 1e9:.3f} G, staged {staged['flops'] / 1e9:.3f} G, analytic "
            f"{analytic / 1e9:.3f} G")
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Suite 3: the paper's Table 3 at the real 13B configuration, without weights
# ---------------------------------------------------------------------------------------------------------------------


def run_table3(sizes=(448, 560, 672, 784, 896), num_images: int = 2, text_tokens: int = 64, log=print) -> dict:
    """Baseline (ViT fed S px, interpolated position embeddings, (S/14)^2 tokens per image) against HiA at S px, at
    the 13B configuration (`QilinMedVLConfig()`, `HiAConfig()`), batch 1, bf16, on the meta device."""
    from .modeling.configuration_qilin_med_vl import QilinMedVLConfig

    started = time.perf_counter()
    config = QilinMedVLConfig()
    hia = hia_config_for(672)
    fused = register_fused_attention_stub()
    base = build_meta_model(config)
    adapted = build_meta_model(config, hia)
    hia_resolved = adapted.peft_config["default"]
    log(f"[table3] 13B on meta: {sum(p.numel() for p in base.parameters()) / 1e9:.3f} B parameters; with HiA "
        f"{sum(p.numel() for p in adapted.parameters()) / 1e9:.3f} B (layers {hia_resolved.layers})")

    def measure(model, **kwargs):
        counted = measure_prefill_stages(model, num_images, text_tokens, attention="sdpa", **kwargs)
        memory_fused = measure_prefill_stages(model, num_images, text_tokens, attention=fused, count_flops=False,
                                              **kwargs)
        memory_eager = measure_prefill_stages(model, num_images, text_tokens, attention="eager", count_flops=False,
                                              **kwargs)
        return {
            "tokens": counted["tokens"],
            "flops_meta_counter": counted["flops"],
            "stage_flops": {k: counted[k]["flops"] for k in ("stage1_vision", "stage2_language_model", "stage3_hia")},
            "parameter_bytes": counted["parameter_bytes"],
            "kv_cache_bytes": counted["stage2_language_model"]["kv_cache_bytes"],
            "input_bytes": memory_fused["input_bytes"],
            "activation_peak_bytes_fused_attention": memory_fused["activation_peak_bytes"],
            "activation_peak_bytes_eager_attention": memory_eager["activation_peak_bytes"],
            "total_bytes_fused_attention": memory_fused["total_bytes"],
            "total_bytes_eager_attention": memory_eager["total_bytes"],
        }

    rows = {}
    reference = measure(base)
    reference["flops_analytic"] = prefill_flops(config, num_images, text_tokens)["total"]
    for size in sizes:
        baseline = measure(base, vision_size=size)
        baseline["flops_analytic"] = prefill_flops(config, num_images, text_tokens, vision_size=size)["total"]
        ours = measure(adapted, high_res_size=size)
        ours["flops_analytic"] = prefill_flops(config, num_images, text_tokens, hia=hia_resolved,
                                               high_res_size=size)["total"]
        rows[size] = {"baseline": baseline, "hia": ours, "paper": PAPER_TABLE3.get(size)}
        log(f"[table3] {size}px: FLOPs baseline {baseline['flops_meta_counter'] / 1e12:.1f} T / HiA "
            f"{ours['flops_meta_counter'] / 1e12:.2f} T; memory (fused attention) "
            f"{baseline['total_bytes_fused_attention'] / 2**30:.1f} / {ours['total_bytes_fused_attention'] / 2**30:.1f} GiB, "
            f"(eager) {baseline['total_bytes_eager_attention'] / 2**30:.1f} / "
            f"{ours['total_bytes_eager_attention'] / 2**30:.1f} GiB")
    mismatch = max(
        abs(entry[kind]["flops_meta_counter"] / entry[kind]["flops_analytic"] - 1)
        for entry in rows.values() for kind in ("baseline", "hia")
    )
    return {
        "config": "QilinMedVLConfig() (CLIP ViT-L/14-336 + 40-layer 5120-wide Llama, vocab 32064) + HiAConfig() "
                  f"(layers {hia_resolved.layers}, M={hia_resolved.num_queries}, width 5120, ResNet-50), bf16, batch 1",
        "num_images": num_images,
        "text_tokens": text_tokens,
        "method": (
            "Meta device, no weights. FLOPs: FlopCounterMode over a stage-by-stage replay of the prefill "
            "(`measure_prefill_stages`; the model's own forward reads data and cannot run on meta) and, "
            "independently, exact arithmetic (`prefill_flops`); largest relative difference "
            f"{mismatch:.2e}. Memory: parameters (bf16) + inputs + peak live activation bytes tracked through the "
            "dispatcher during the replay (KV cache included), with a fused attention kernel (flash / memory-"
            "efficient sdpa: no score matrix) and with transformers' eager attention (bf16 scores + fp32 softmax, "
            "as the original LLaVA code under transformers 4.31 did). The baseline uses CLIP's "
            "interpolate_pos_encoding at S px; logits of the last position only, as in generate."
        ),
        "reference_base_336": reference,
        "rows": {str(k): v for k, v in rows.items()},
        "flops_counter_vs_arithmetic_max_relative_difference": mismatch,
        "seconds": time.perf_counter() - started,
    }


# ---------------------------------------------------------------------------------------------------------------------
# Suite 2: HiA's cost (with / without HiA, and the paper's baseline of feeding the ViT a higher resolution)
# ---------------------------------------------------------------------------------------------------------------------


def hia_grid_13b(sizes=HIGH_RES_SIZES, image_counts=(1, 2, 3, 4), text_tokens: int = 64) -> dict:
    """Exact prefill FLOPs at the 13B configuration for every (high-res size, image count): base model (336 px),
    base + HiA at S px, and the baseline with the ViT at S px. Decode FLOPs per token: HiA adds none."""
    from .modeling.configuration_qilin_med_vl import QilinMedVLConfig

    config = QilinMedVLConfig()
    hia = hia_config_for(672)
    layers = config.text_config.num_hidden_layers
    hia.layers = sorted({layers // 3, 2 * layers // 3})
    cells = []
    for size in sizes:
        for count in image_counts:
            base = prefill_flops(config, count, text_tokens)
            adapted = prefill_flops(config, count, text_tokens, hia=hia, high_res_size=size)
            baseline = prefill_flops(config, count, text_tokens, vision_size=size)
            cells.append({
                "high_res_size": size,
                "num_images": count,
                "base_tflops": base["total"] / 1e12,
                "hia_tflops": adapted["total"] / 1e12,
                "hia_encoder_tflops": adapted["hia_encoder"] / 1e12,
                "hia_blocks_tflops": adapted["hia_blocks"] / 1e12,
                "baseline_tflops": baseline["total"] / 1e12,
                "hia_over_base": adapted["total"] / base["total"],
                "baseline_over_base": baseline["total"] / base["total"],
                "base_tokens": base["tokens"],
                "baseline_tokens": baseline["tokens"],
                "decode_gflops_per_token_base_and_hia": decode_flops(config, base["tokens"]) / 1e9,
                "decode_gflops_per_token_baseline": decode_flops(config, baseline["tokens"]) / 1e9,
                "kv_cache_gib_base_and_hia": kv_cache_bytes(config.text_config, base["tokens"]) / 2**30,
                "kv_cache_gib_baseline": kv_cache_bytes(config.text_config, baseline["tokens"]) / 2**30,
            })
    target_base = prefill_flops(config, 2, text_tokens)["total"]
    target_hia = prefill_flops(config, 2, text_tokens, hia=hia, high_res_size=672)["total"]
    return {
        "config": "QilinMedVLConfig() + HiAConfig() (layers 13, 26; M=256; width 5120; ResNet-50), batch 1",
        "text_tokens": text_tokens,
        "cells": cells,
        "target_672px_2_images": {"base_tflops": target_base / 1e12, "hia_tflops": target_hia / 1e12,
                                  "hia_over_base": target_hia / target_base, "target": 1.10,
                                  "met": target_hia / target_base <= 1.10},
    }


def hia_decode_overhead_microbenchmark(steps: int = 200) -> dict:
    """Per-decode-step cost of having HiA attached, resolved below the noise of whole `generate` runs: the minimum
    over `steps` single decode steps, models alternating step by step, of the plain model ("base"), a deep copy of
    it ("clone", the control) and the same weights with a HiA adapter attached ("hia"; called as `generate` calls it,
    through the wrapped base model). On an overhead-bound tiny config and on the bench config."""
    from peft import get_peft_model

    out = {}
    for label, kwargs in (("tiny (hidden 64)", dict(hidden_size=64, num_hidden_layers=6, num_attention_heads=4,
                                                     vision_hidden_size=32, vision_layers=1, vision_heads=2,
                                                     image_size=56)),
                          ("bench (hidden 512)", {})):
        config = bench_config(**kwargs)
        base = build_model(config)
        clone = copy.deepcopy(base)
        adapted = get_peft_model(copy.deepcopy(base), hia_config_for(112, num_queries=16, encoder_width=8)).eval()
        models = {"base": (base, make_inputs(config, 2, 48)), "clone": (clone, make_inputs(config, 2, 48)),
                  "hia": (adapted.get_base_model(), make_inputs(config, 2, 48, 112))}
        best = {name: float("inf") for name in models}
        with torch.inference_mode():
            caches = {name: m(**i, use_cache=True, logits_to_keep=1).past_key_values for name, (m, i) in models.items()}
            for _ in range(steps if label.startswith("bench") else 3 * steps):
                for name, (model, _) in models.items():
                    start = time.perf_counter()
                    model(input_ids=torch.tensor([[5]]), past_key_values=caches[name], use_cache=True,
                          logits_to_keep=1)
                    best[name] = min(best[name], time.perf_counter() - start)
                    caches[name].crop(-1)
        out[label] = {"step_us": {name: v * 1e6 for name, v in best.items()},
                      "hia_over_base": best["hia"] / best["base"], "clone_over_base": best["clone"] / best["base"],
                      "hia_minus_base_us": (best["hia"] - best["base"]) * 1e6}
    return out


class _AdapterDisabled:
    """The same PEFT model called with its adapter disabled (`disable_adapter()`), for side-by-side timing."""

    def __init__(self, model):
        self.model = model

    def __call__(self, *args, **kwargs):
        with self.model.disable_adapter():
            return self.model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        with self.model.disable_adapter():
            return self.model.generate(*args, **kwargs)


def run_hia_cost(sizes=HIGH_RES_SIZES, image_counts=(1, 2, 3, 4), repeats: int = 2, decode_repeats: int = 5,
                 new_tokens: int = 32, decode_images=(1, 2, 4), decode_size: int = 672, max_baseline_tokens: int = 2400,
                 text_tokens: int = 48, encoder_width: int = 32, log=print) -> dict:
    """CPU measurements on the small bench configuration (224 px low-res view, 256 tokens per image) with HiA's
    defaults (M=256, 8 heads, width = hidden, ResNet-50 trunk unless `encoder_width` says otherwise), plus the exact
    13B grid. Baseline cells whose language-model input exceeds `max_baseline_tokens` are counted, not timed."""
    from peft import get_peft_model

    from .modeling.modeling_hia import HiABlock

    started = time.perf_counter()
    config = bench_config()
    base = build_model(config)
    measured, memory, hia_for_decode = [], [], None
    for size in sizes:
        hia_config = hia_config_for(size, encoder_width=encoder_width)
        adapted = get_peft_model(copy.deepcopy(base), hia_config).eval()
        baseline_config = with_vision_size(config, size)
        needs_baseline = any(text_tokens + n * baseline_config.image_seq_length <= max_baseline_tokens
                             for n in image_counts)
        baseline = build_model(baseline_config, seed=1) if needs_baseline else None
        # Warm-up at this size (oneDNN primitives for new shapes).
        for model, inputs in ((adapted, make_inputs(config, 1, text_tokens, size)),
                              (baseline, make_inputs(baseline_config, 1, text_tokens))):
            if model is not None:
                _no_grad_call(model, inputs)
        for count in image_counts:
            models = {"base": base, "hia": adapted}
            inputs = {"base": make_inputs(config, count, text_tokens),
                      "hia": make_inputs(config, count, text_tokens, size)}
            baseline_tokens = text_tokens + count * baseline_config.image_seq_length
            if baseline is not None and baseline_tokens <= max_baseline_tokens:
                models["baseline"] = baseline
                inputs["baseline"] = make_inputs(baseline_config, count, text_tokens)
            times = time_models(models, inputs, repeats, warmup=0, max_rounds=repeats)
            cell = {
                "high_res_size": size,
                "num_images": count,
                "prefill_ms": {name: statistics.median(times[name]["prefill"]) * 1e3 for name in models},
                "hia_over_base": paired_ratio(times["hia"]["prefill"], times["base"]["prefill"])["median"],
                "gflops": {
                    "base": prefill_flops(config, count, text_tokens)["total"] / 1e9,
                    "hia": prefill_flops(config, count, text_tokens, hia=adapted.peft_config["default"],
                                         high_res_size=size)["total"] / 1e9,
                    "baseline": prefill_flops(config, count, text_tokens, vision_size=size)["total"] / 1e9,
                },
                "baseline_tokens": baseline_tokens,
                "rounds": times["_rounds"],
            }
            if "baseline" in models:
                cell["baseline_over_base"] = paired_ratio(times["baseline"]["prefill"], times["base"]["prefill"])["median"]
            measured.append(cell)
            log(f"[hia] {size}px x{count}: prefill base {cell['prefill_ms']['base']:.0f} ms, HiA "
                f"{cell['prefill_ms']['hia']:.0f} ms" + (f", baseline {cell['prefill_ms']['baseline']:.0f} ms"
                                                         if "baseline" in models else ", baseline not timed"))
            if count == 2:
                row = {"high_res_size": size, "num_images": 2}
                for name, model in models.items():
                    row[f"{name}_peak_tensor_bytes"] = _peak_live_bytes(
                        lambda m=model, i=inputs[name]: m(**i, use_cache=True, logits_to_keep=1))
                memory.append(row)
        if size == decode_size:
            hia_for_decode = adapted
        else:
            del adapted
        del baseline
        gc.collect()

    decode = []
    if hia_for_decode is not None:
        encoder = next(m.encoder for m in hia_for_decode.modules() if isinstance(m, HiABlock) and m.encoder is not None)
        calls = []
        handle = encoder.register_forward_hook(lambda *args: calls.append(1))
        with torch.inference_mode():
            hia_for_decode.generate(**make_inputs(config, 2, text_tokens, decode_size), max_new_tokens=4,
                                    min_new_tokens=4, do_sample=False, pad_token_id=0)
        handle.remove()
        decode_operators = {}
        for name, model, model_inputs in (("base", base, make_inputs(config, 2, text_tokens)),
                                          ("hia", hia_for_decode, make_inputs(config, 2, text_tokens, decode_size))):
            with torch.inference_mode():
                out = model(**model_inputs, use_cache=True, logits_to_keep=1)
                with DispatchedOps() as ops:
                    model(input_ids=torch.tensor([[5]]), past_key_values=out.past_key_values, use_cache=True,
                          logits_to_keep=1)
            decode_operators[name] = sum(ops.counts.values())
        # Same weights with the adapter on and off is the fair "with / without HiA": two models doing identical work
        # from different memory (the plain base model and a deep copy of it, "clone") differ by a few % on this CPU,
        # which the clone/base control measures.
        clone = copy.deepcopy(base)
        disabled = _AdapterDisabled(hia_for_decode)
        for count in decode_images:
            models = {"hia": hia_for_decode, "hia_off": disabled, "base": base, "clone": clone}
            inputs = {"hia": make_inputs(config, count, text_tokens, decode_size),
                      "hia_off": make_inputs(config, count, text_tokens),
                      "base": make_inputs(config, count, text_tokens), "clone": make_inputs(config, count, text_tokens)}
            times = time_models(models, inputs, decode_repeats, warmup=1, new_tokens=new_tokens, prefill=False,
                                max_rounds=2 * decode_repeats)
            steps = {name: times[name]["decode_step"] for name in models}
            ratio = paired_ratio(steps["hia"], steps["hia_off"])
            decode.append({
                "high_res_size": decode_size,
                "num_images": count,
                "decode_step_ms": {name: statistics.median(v) * 1e3 for name, v in steps.items()},
                "tokens_per_s": {name: 1 / statistics.median(v) for name, v in steps.items()},
                "hia_over_hia_off_step_time": ratio,
                "hia_over_base_step_time": paired_ratio(steps["hia"], steps["base"]),
                "control_clone_over_base_step_time": paired_ratio(steps["clone"], steps["base"]),
                "rounds": times["_rounds"],
            })
            log(f"[hia] decode x{count}: HiA on {decode[-1]['decode_step_ms']['hia']:.2f}, off "
                f"{decode[-1]['decode_step_ms']['hia_off']:.2f}, base {decode[-1]['decode_step_ms']['base']:.2f} "
                f"ms/token; on/off {ratio['median']:.3f} (p25 {ratio['p25']:.3f}, p75 {ratio['p75']:.3f}); "
                f"control clone/base {decode[-1]['control_clone_over_base_step_time']['median']:.3f}")
        del clone
        decode_encoder_calls = len(calls)
    else:
        decode_encoder_calls, decode_operators = None, None
    grid = hia_grid_13b(sizes, image_counts)
    return {
        "cpu_config": {
            "model": f"bench_config(): hidden {config.text_config.hidden_size}, {config.text_config.num_hidden_layers} "
                     f"layers, CLIP {config.vision_config.num_hidden_layers}x{config.vision_config.hidden_size} at "
                     f"{config.vision_config.image_size}px ({config.image_seq_length} tokens/image), fp32",
            "hia": f"M=256, 8 heads, width {config.text_config.hidden_size}, layers L/3 and 2L/3, encoder "
                   f"[3,4,6,3] width {encoder_width}" + (" (ResNet-50)" if encoder_width == 64 else ""),
            "baseline": "the same model with CLIP fed S px ((S/14)^2 tokens per image), random weights",
            "text_tokens": text_tokens,
            "max_baseline_tokens": max_baseline_tokens,
            "threads": torch.get_num_threads(),
        },
        "prefill": measured,
        "peak_memory_2_images": memory,
        "decode": decode,
        "encoder_calls_per_generate": decode_encoder_calls,
        "decode_step_dispatched_operators": decode_operators,
        "decode_overhead_microbenchmark": hia_decode_overhead_microbenchmark(),
        "decode_target": {"target": 1.01, "worst_median": max((d["hia_over_hia_off_step_time"]["median"]
                                                                for d in decode), default=None)},
        "grid_13b": grid,
        "seconds": time.perf_counter() - started,
    }


# ---------------------------------------------------------------------------------------------------------------------
# Suite 4: bitsandbytes 8-bit / 4-bit against bf16 / fp32 on CPU
# ---------------------------------------------------------------------------------------------------------------------


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


def run_quantization(repeats: int = 5, new_tokens: int = 16, num_images: int = 1, text_tokens: int = 48,
                     log=print) -> dict:
    import warnings

    from transformers import BitsAndBytesConfig

    warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")

    started = time.perf_counter()
    config = bench_config()
    reference = build_model(config)
    inputs = make_inputs(config, num_images, text_tokens)
    with torch.inference_mode():
        reference_logits = reference(**inputs).logits.float()
    counts = split_decoder_linear_parameters(reference)
    variants = {
        "fp32": {"dtype": torch.float32},
        "bf16": {"dtype": torch.bfloat16},
        "int8": {"quantization_config": BitsAndBytesConfig(load_in_8bit=True), "device_map": "cpu",
                 "dtype": torch.bfloat16},
        "nf4": {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                          bnb_4bit_compute_dtype=torch.bfloat16),
                "device_map": "cpu", "dtype": torch.bfloat16},
    }
    models, rows = {}, {}
    with tempfile.TemporaryDirectory() as folder:
        reference.save_pretrained(folder)
        del reference
        for name, kwargs in variants.items():
            try:
                model = _qilin_class().from_pretrained(folder, **kwargs).eval()
            except Exception as error:  # reported, not fatal
                rows[name] = {"error": repr(error)}
                log(f"[quant] {name}: failed to load: {error!r}")
                continue
            model.generation_config.pad_token_id = 0
            with torch.inference_mode():
                logits = model(**inputs).logits.float()
            models[name] = model
            rows[name] = {
                "memory_footprint_bytes": model.get_memory_footprint(),
                "expected_footprint_bytes": quantized_footprint_bytes(counts, name),
                "logit_cosine_vs_fp32": torch.nn.functional.cosine_similarity(
                    logits.flatten(), reference_logits.flatten(), dim=0).item(),
            }
    times = time_models(models, {name: inputs for name in models}, repeats, warmup=1, new_tokens=new_tokens,
                        max_rounds=repeats + 2)
    for name in models:
        rows[name]["prefill_ms"] = statistics.median(times[name]["prefill"]) * 1e3
        rows[name]["decode_step_ms"] = statistics.median(times[name]["decode_step"]) * 1e3
        rows[name]["decode_tokens_per_s"] = 1e3 / rows[name]["decode_step_ms"]
        log(f"[quant] {name}: footprint {rows[name]['memory_footprint_bytes'] / 1e6:.1f} MB, prefill "
            f"{rows[name]['prefill_ms']:.0f} ms, decode {rows[name]['decode_tokens_per_s']:.1f} tok/s, cosine vs fp32 "
            f"{rows[name]['logit_cosine_vs_fp32']:.4f}")
    from .modeling.configuration_qilin_med_vl import QilinMedVLConfig

    meta = build_meta_model(QilinMedVLConfig())
    counts_13b = split_decoder_linear_parameters(meta)
    return {
        "config": f"bench_config() ({sum(counts) / 1e6:.1f} M parameters, {counts[0] / 1e6:.1f} M of them in decoder "
                  "linears, the only quantized part by default)",
        "method": "from_pretrained of one saved fp32 checkpoint per variant; 8-bit = LLM.int8 (threshold 6.0), "
                  "4-bit = nf4 with bf16 compute; in both the unquantized rest (vision tower, projector, embeddings, "
                  "norms, LM head) is loaded in bf16 (dtype=torch.bfloat16); prefill = 1 image + "
                  f"{text_tokens} text tokens; decode = {new_tokens} tokens; interleaved rounds, medians. The "
                  "expected footprint is the arithmetic of `quantized_footprint_bytes`, also used for the 13B column",
        "rounds": times.get("_rounds"),
        "variants": rows,
        "footprint_13b_gib": {scheme: quantized_footprint_bytes(counts_13b, scheme) / 2**30
                              for scheme in ("fp32", "bf16", "int8", "nf4")},
        "seconds": time.perf_counter() - started,
    }


# ---------------------------------------------------------------------------------------------------------------------
# Suite 5: the 13B configuration with random weights on a CUDA device
# ---------------------------------------------------------------------------------------------------------------------


def _random_model(config, precision: str, device, seed: int = 0):
    """Random-weight model built directly on `device` in bf16; for "int8" / "nf4" the language model's decoder linears
    are then replaced one by one by bitsandbytes layers (what `from_pretrained` with a `BitsAndBytesConfig` and the
    model's default skip list produces), so no checkpoint has to be written."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = _qilin_class()._from_config(config, dtype=torch.bfloat16)
    model.eval()
    model.generation_config.pad_token_id = 0
    if precision in ("int8", "nf4"):
        import bitsandbytes as bnb

        for layer in model.model.language_model.layers:
            for parent in list(layer.modules()):
                for name, child in list(parent.named_children()):
                    if type(child) is not torch.nn.Linear:
                        continue
                    weight = child.weight.data
                    bias = child.bias is not None
                    if precision == "int8":
                        new = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=bias,
                                                  has_fp16_weights=False, threshold=6.0, device=device)
                        new.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
                        new.weight._quantize(device)
                    else:
                        new = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=bias,
                                                compute_dtype=torch.bfloat16, quant_type="nf4", device=device)
                        new.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", module=new)
                        new.weight = new.weight.to(device)
                    if bias:
                        new.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
                    setattr(parent, name, new)
                    del child, weight
    return model


def copy_bandwidth(device, nbytes: int = 2**30, repeats: int = 10) -> float:
    """Device memory bandwidth in bytes/s measured with `copy_` (bytes read + bytes written over time)."""
    source = torch.empty(nbytes, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    sync = _synchronizer(device)
    for _ in range(3):
        target.copy_(source)
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        target.copy_(source)
    sync()
    return 2 * nbytes * repeats / (time.perf_counter() - start)


def _synchronizer(device):
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def decode_weight_bytes(model) -> int:
    """Parameter bytes read per decode step: everything in the language model but the embedding table (one row is
    read), plus the LM head. Vision tower, projector and HiA do not run at decode."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    language_model = base.model.language_model
    total = sum(p.numel() * p.element_size() for p in language_model.parameters())
    total -= language_model.embed_tokens.weight.numel() * language_model.embed_tokens.weight.element_size()
    return total + sum(p.numel() * p.element_size() for p in base.lm_head.parameters())


def manual_decode(model, inputs, new_tokens: int, cache: str = "dynamic", compiled=None, synchronize=None) -> dict:
    """Greedy decoding written out (prefill, then one forward per token) with a dynamic or static KV cache and an
    optional compiled step function. Returns prefill seconds and per-step seconds."""
    from transformers import DynamicCache, StaticCache

    synchronize = synchronize or (lambda: None)
    batch, prompt = inputs["input_ids"].shape
    device = inputs["input_ids"].device
    if cache == "static":
        past = StaticCache(config=model.config, max_cache_len=prompt + new_tokens + 1)
    else:
        past = DynamicCache(config=model.config)
    step = compiled or model
    steps = []
    with torch.inference_mode():
        start = time.perf_counter()
        out = model(**inputs, past_key_values=past, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        synchronize()
        prefill = time.perf_counter() - start
        for index in range(new_tokens):
            position = torch.full((1,), prompt + index, device=device, dtype=torch.long)
            mark = getattr(torch.compiler, "cudagraph_mark_step_begin", None)
            if compiled is not None and mark is not None and device.type == "cuda":
                mark()
            begin = time.perf_counter()
            out = step(input_ids=token, past_key_values=past, cache_position=position,
                       position_ids=position.unsqueeze(0).expand(batch, 1), use_cache=True, logits_to_keep=1)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            synchronize()
            steps.append(time.perf_counter() - begin)
    return {"prefill": prefill, "steps": steps}


def run_gpu_suite(precisions=("bf16", "int8", "nf4"), batch_sizes=(1, 8), num_images: int = 1, text_tokens: int = 64,
                  new_tokens: int = 64, repeats: int = 3, high_res_size: int = 672, allow_cpu: bool = False,
                  small: bool = False, compile_decode: bool = True, log=print) -> dict:
    """The 13B configuration (`QilinMedVLConfig()`) with random weights on CUDA. Skipped, and says so, without CUDA
    unless `allow_cpu` (a plumbing smoke test, normally with `small`: not a GPU figure)."""
    date = datetime.date.today().isoformat()
    if not torch.cuda.is_available() and not allow_cpu:
        message = ("GPU benchmark SKIPPED: torch.cuda.is_available() is False on this machine "
                   f"(torch {torch.__version__}); no GPU figure was measured.")
        log(message)
        return {"skipped": True, "reason": message, "date": date, "machine": machine_description()}
    from peft import get_peft_model

    from .modeling.configuration_qilin_med_vl import QilinMedVLConfig

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    synchronize = _synchronizer(device)
    if small:
        config = bench_config(hidden_size=256, num_hidden_layers=4, vision_hidden_size=192, vision_layers=2,
                              vision_heads=3, image_size=224)
        hia = hia_config_for(high_res_size, encoder_width=16)
    else:
        config = QilinMedVLConfig()
        hia = hia_config_for(high_res_size)
    record = {
        "skipped": False,
        "date": date,
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else f"CPU smoke test ({machine_description()['cpu']})",
        "smoke_test": device.type != "cuda" or small,
        "config": "QilinMedVLConfig() (13B)" if not small else "small bench config (plumbing test only)",
        "machine": machine_description(),
        "rows": [],
    }
    bandwidth = copy_bandwidth(device) if device.type == "cuda" else copy_bandwidth(device, 2**26, 3)
    record["copy_bandwidth_gb_s"] = bandwidth / 1e9
    log(f"[gpu] {record['device']}: copy bandwidth {bandwidth / 1e9:.0f} GB/s")

    def peak_reset():
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak_read():
        return torch.cuda.max_memory_allocated() if device.type == "cuda" else None

    for precision in precisions:
        try:
            model = _random_model(config, precision, device)
        except Exception as error:
            record["rows"].append({"precision": precision, "error": repr(error)})
            log(f"[gpu] {precision}: could not build: {error!r}")
            continue
        record.setdefault("model_memory_bytes", {})[precision] = (
            torch.cuda.memory_allocated() if device.type == "cuda" else parameter_bytes(model))
        for with_hia in (False, True):
            if with_hia:
                model = get_peft_model(model, copy.deepcopy(hia)).eval()
                for block in _hia_blocks(model):
                    block.to(device=device, dtype=torch.bfloat16)
            for batch in batch_sizes:
                inputs = make_inputs(config, num_images, text_tokens, high_res_size if with_hia else None,
                                     batch_size=batch, dtype=torch.bfloat16, device=device)
                row = {"precision": precision, "hia": with_hia, "batch_size": batch,
                       "prompt_tokens": int(inputs["input_ids"].shape[1])}
                try:
                    time_prefill(model, inputs, synchronize)  # warm-up
                    row["prefill_ms"] = statistics.median(
                        time_prefill(model, inputs, synchronize) for _ in range(repeats)) * 1e3
                    peak_reset()
                    runs = [time_generate(model, inputs, new_tokens, synchronize) for _ in range(repeats)]
                    row["peak_memory_bytes"] = peak_read()
                    step = statistics.median(statistics.median(run["steps"]) for run in runs)
                    row["decode_step_ms"] = step * 1e3
                    row["decode_tokens_per_s"] = batch / step
                except Exception as error:
                    row["error"] = repr(error)
                record["rows"].append(row)
                log(f"[gpu] {precision} HiA={with_hia} batch {batch}: " + ", ".join(
                    f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()
                    if k not in ("precision", "hia", "batch_size")))
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        if precision == "bf16":
            # Batch-1 decode against the memory-bandwidth bound, with generate, a static cache, and torch.compile.
            inputs = make_inputs(config, num_images, text_tokens, dtype=torch.bfloat16, device=device)
            weights = decode_weight_bytes(base)
            context = int(inputs["input_ids"].shape[1]) + new_tokens // 2
            kv = kv_cache_bytes(config.text_config, context)
            bound = bandwidth / (weights + kv)
            variants = {}
            with getattr(model, "disable_adapter", nullcontext)():
                for label, cache, compile_it in (("dynamic cache, eager", "dynamic", False),
                                                 ("static cache, eager", "static", False),
                                                 ("static cache, torch.compile", "static", True)):
                    if compile_it and not compile_decode:
                        continue
                    try:
                        compiled = None
                        if compile_it:
                            mode = "reduce-overhead" if device.type == "cuda" else "default"
                            compiled = torch.compile(base.forward, mode=mode, fullgraph=False)
                            manual_decode(base, inputs, 8, "static", compiled, synchronize)  # compile + warm-up
                        manual_decode(base, inputs, 4, cache, compiled, synchronize)
                        runs = [manual_decode(base, inputs, new_tokens, cache, compiled, synchronize)
                                for _ in range(repeats)]
                        step = statistics.median(statistics.median(run["steps"]) for run in runs)
                        variants[label] = {"decode_step_ms": step * 1e3, "tokens_per_s": 1 / step,
                                           "fraction_of_bound": (1 / step) / bound}
                    except Exception as error:
                        variants[label] = {"error": repr(error)}
                    log(f"[gpu] bf16 batch 1 {label}: {variants[label]}")
                if compile_decode:
                    # generate() itself: a static cache makes transformers compile the decode step on CUDA.
                    label = "generate, static cache (transformers auto-compile)"
                    try:
                        extra = {"cache_implementation": "static"}
                        if device.type != "cuda":
                            from transformers import CompileConfig

                            extra["compile_config"] = CompileConfig()
                            extra["compile_config"]._compile_all_devices = True
                        time_generate(base, inputs, 8, synchronize, **extra)  # compile + warm-up
                        runs = [time_generate(base, inputs, new_tokens, synchronize, **extra) for _ in range(repeats)]
                        step = statistics.median(statistics.median(run["steps"]) for run in runs)
                        variants[label] = {"decode_step_ms": step * 1e3, "tokens_per_s": 1 / step,
                                           "fraction_of_bound": (1 / step) / bound}
                    except Exception as error:
                        variants[label] = {"error": repr(error)}
                    log(f"[gpu] bf16 batch 1 {label}: {variants[label]}")
            record["bandwidth_bound"] = {
                "weight_bytes_per_token": weights,
                "kv_bytes_per_token_at_mid_generation": kv,
                "bound_tokens_per_s": bound,
                "variants": variants,
                "target_fraction": 0.70,
            }
        del model, base
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return record


# ---------------------------------------------------------------------------------------------------------------------
# Reports: markdown, JSON, PNG
# ---------------------------------------------------------------------------------------------------------------------


def _fmt(value, digits=3):
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _ratio_cell(summary) -> str:
    if summary is None:
        return "-"
    if isinstance(summary, dict):
        return f"{summary['median']:.3f} ({summary['p25']:.3f}-{summary['p75']:.3f})"
    return f"{summary:.3f}"


def markdown_report(results: dict) -> str:
    lines = [f"# Qilin-Med-VL / HiA benchmarks ({results.get('date')})", ""]
    machine = results.get("machine", {})
    lines += [f"Machine: {machine.get('cpu')} ({machine.get('os_cpus')} CPUs, shared with other processes), "
              f"torch {machine.get('torch')}, transformers {machine.get('transformers')}, peft {machine.get('peft')}; "
              f"{results.get('threads')} torch thread(s). Command: `{results.get('command')}`", ""]

    if "llava" in results:
        r = results["llava"]
        c = r["config"]
        lines += ["## 1. Same weights: QilinMedVLForConditionalGeneration vs transformers' LlavaForConditionalGeneration",
                  "",
                  f"Config: hidden {c['hidden_size']}, {c['num_hidden_layers']} layers, MLP {c['intermediate_size']}, "
                  f"vocab {c['vocab_size']}, {c['vision']}, {c['attn_implementation']}, {c['dtype']}, "
                  f"{c['parameters'] / 1e6:.1f} M parameters; prompt {c['prompt_tokens']} tokens "
                  f"({c['num_images']} image), {c['new_tokens']} new tokens. Max |logit difference| "
                  f"{r['max_abs_logit_difference']:.2g}; greedy tokens identical: {r['greedy_tokens_identical']}. "
                  f"Rounds: {r['rounds']}.", "",
                  "| metric | Qilin | Llava | ours / theirs: median of per-round ratios (p25-p75) | target <= 1.02 |",
                  "|---|---|---|---|---|"]
        q, l, ratios = r["models"]["qilin"], r["models"]["llava"], r["ratios_ours_over_theirs"]
        rows = [
            ("prefill latency (ms)", q["prefill_ms"]["median"], l["prefill_ms"]["median"], ratios["prefill_latency"]),
            ("decode step (ms/token)", q["decode_step_ms"]["median"], l["decode_step_ms"]["median"],
             ratios["decode_step_time"]),
            ("decode tokens/s", q["decode_tokens_per_s"], l["decode_tokens_per_s"], None),
            ("prefill inside generate (ms)", q["generate_prefill_ms"]["median"], l["generate_prefill_ms"]["median"],
             ratios["generate_prefill_latency"]),
            ("peak tensor bytes, prefill (MB)", q["peak_prefill_tensor_bytes"] / 1e6,
             l["peak_prefill_tensor_bytes"] / 1e6, ratios["peak_prefill_tensor_bytes"]),
            ("peak tensor bytes, generate 8 tokens (MB)", q["peak_generate_tensor_bytes"] / 1e6,
             l["peak_generate_tensor_bytes"] / 1e6, ratios["peak_generate_tensor_bytes"]),
            ("RSS high-water growth, prefill (MB)", (q["rss_peak_delta_prefill_bytes"] or 0) / 1e6,
             (l["rss_peak_delta_prefill_bytes"] or 0) / 1e6, ratios["rss_peak_delta_prefill"]),
            ("parameter bytes (MB)", q["parameter_bytes"] / 1e6, l["parameter_bytes"] / 1e6, ratios["parameter_bytes"]),
        ]
        for name, a, b, ratio in rows:
            if ratio is None and name == "decode tokens/s":
                ratio_text, met = f"{b / a:.3f} (theirs/ours tokens/s)", "yes" if b / a <= 1.02 else "no"
            else:
                ratio_text = _ratio_cell(ratio)
                value = ratio["median"] if isinstance(ratio, dict) else ratio
                met = "-" if value is None else ("yes" if value <= 1.02 else "no")
            lines.append(f"| {name} | {a:.2f} | {b:.2f} | {ratio_text} | {met} |")
        micro = r.get("overhead_microbenchmark")
        if micro:
            mq, ml = micro["models"]["qilin"], micro["models"]["llava"]
            lines += ["", "Framework overhead on an overhead-bound model (hidden 64, 6 layers; minimum over 1000 decode "
                      f"steps / 333 prefills, the two models alternating call by call): decode step {mq['decode_step_us']:.0f} us (ours) vs "
                      f"{ml['decode_step_us']:.0f} us (Llava) = {micro['ratios_ours_over_theirs']['decode_step_us']:.3f}; "
                      f"prefill {mq['prefill_us']:.0f} us vs {ml['prefill_us']:.0f} us = "
                      f"{micro['ratios_ours_over_theirs']['prefill_us']:.3f}."]
        ops = r.get("dispatched_operators")
        if ops:
            lines += ["", "Dispatched aten operators (deterministic): prefill "
                      f"{ops['prefill']['qilin_total']} (ours) vs {ops['prefill']['llava_total']} (Llava), "
                      f"only in ours {ops['prefill']['only_qilin']}, only in Llava {ops['prefill']['only_llava']}; "
                      f"decode step {ops['decode_step']['qilin_total']} vs {ops['decode_step']['llava_total']}, "
                      f"only in ours {ops['decode_step']['only_qilin']}, only in Llava "
                      f"{ops['decode_step']['only_llava']}."]
        lines += ["", r["method"], ""]

    if "hia" in results:
        r = results["hia"]
        lines += ["## 2. HiA's cost", "", f"CPU: {r['cpu_config']['model']}; HiA {r['cpu_config']['hia']}; "
                  f"baseline: {r['cpu_config']['baseline']}; {r['cpu_config']['text_tokens']} text tokens.", "",
                  "### Decode step with and without HiA (CPU, measured)", "",
                  f"HiA's encoder ran {r['encoder_calls_per_generate']} time(s) in one `generate` call (prefill only); "
                  f"aten operators dispatched by one decode step: {r.get('decode_step_dispatched_operators')}.",
                  "", "Ratios are medians of per-round ratios (p25-p75). \"HiA off\" = the same model object with "
                  "`disable_adapter()` (same weights in memory); \"base\" = the plain model without PEFT; \"clone\" = "
                  "a deep copy of the plain model: clone/base is the noise floor between two models doing identical "
                  "work from different memory.", "",
                  "| high-res | images | ms/token: HiA on / off / base / clone | HiA on / off | target <= 1.01 | "
                  "HiA on / base | control: clone / base |", "|---|---|---|---|---|---|---|"]
        for d in r["decode"]:
            ratio = d["hia_over_hia_off_step_time"]
            ms = d["decode_step_ms"]
            lines.append(f"| {d['high_res_size']} | {d['num_images']} | {ms['hia']:.2f} / {ms['hia_off']:.2f} / "
                         f"{ms['base']:.2f} / {ms['clone']:.2f} | {_ratio_cell(ratio)} | "
                         f"{'yes' if ratio['median'] <= 1.01 else 'no'} | {_ratio_cell(d['hia_over_base_step_time'])} | "
                         f"{_ratio_cell(d['control_clone_over_base_step_time'])} |")
        micro = r.get("decode_overhead_microbenchmark")
        if micro:
            lines += ["", "Decode-step overhead of an attached HiA, resolved below that noise (minimum over single "
                      "decode steps, models alternating step by step): " + "; ".join(
                          f"{label}: base {m['step_us']['base']:.0f} us, clone {m['step_us']['clone']:.0f} us, "
                          f"HiA attached {m['step_us']['hia']:.0f} us -> HiA/base {m['hia_over_base']:.4f} "
                          f"({m['hia_minus_base_us']:+.0f} us), control clone/base {m['clone_over_base']:.4f}"
                          for label, m in micro.items()) + "."]
        lines += ["", "### Prefill (CPU, measured; GFLOPs of the same small config beside)", "",
                  "| high-res S | images | base ms | HiA ms | HiA / base | baseline (ViT at S) ms | baseline / base | "
                  "GFLOPs base / HiA / baseline |", "|---|---|---|---|---|---|---|---|"]
        for cell in r["prefill"]:
            ms = cell["prefill_ms"]
            g = cell["gflops"]
            lines.append(
                f"| {cell['high_res_size']} | {cell['num_images']} | {ms['base']:.0f} | {ms['hia']:.0f} | "
                f"{cell['hia_over_base']:.2f} | {_fmt(ms.get('baseline'), 0) if 'baseline' in ms else 'not timed'} | "
                f"{_fmt(cell.get('baseline_over_base'), 2)} | {g['base']:.1f} / {g['hia']:.1f} / {g['baseline']:.1f} |")
        grid = r["grid_13b"]
        target = grid["target_672px_2_images"]
        lines += ["", f"### 13B configuration (exact arithmetic; {grid['text_tokens']} text tokens)", "",
                  f"Target: HiA prefill FLOPs at 672 px with two images within 10% of the base model's: "
                  f"{target['hia_tflops']:.2f} T vs {target['base_tflops']:.2f} T = **{target['hia_over_base']:.3f}** "
                  f"({'met' if target['met'] else 'not met'}). Decode FLOPs per token are identical with and without "
                  "HiA (it does not run after prefill).", "",
                  "| S | images | base TFLOPs | HiA TFLOPs (encoder + blocks) | HiA / base | baseline TFLOPs | "
                  "baseline / base | KV cache GiB base = HiA / baseline |", "|---|---|---|---|---|---|---|---|"]
        for c in grid["cells"]:
            lines.append(
                f"| {c['high_res_size']} | {c['num_images']} | {c['base_tflops']:.2f} | {c['hia_tflops']:.2f} "
                f"({c['hia_encoder_tflops']:.2f} + {c['hia_blocks_tflops']:.2f}) | {c['hia_over_base']:.3f} | "
                f"{c['baseline_tflops']:.1f} | {c['baseline_over_base']:.2f} | "
                f"{c['kv_cache_gib_base_and_hia']:.2f} / {c['kv_cache_gib_baseline']:.2f} |")
        if r.get("peak_memory_2_images"):
            lines += ["", "Peak tensor bytes of a 2-image prefill on CPU (MB): " + "; ".join(
                f"{m['high_res_size']} px: base {m['base_peak_tensor_bytes'] / 1e6:.0f}, HiA "
                f"{m['hia_peak_tensor_bytes'] / 1e6:.0f}" + (f", baseline {m['baseline_peak_tensor_bytes'] / 1e6:.0f}"
                                                              if "baseline_peak_tensor_bytes" in m else "")
                for m in r["peak_memory_2_images"])]
        lines.append("")

    if "table3" in results:
        r = results["table3"]
        ref = r["reference_base_336"]
        lines += ["## 3. The HiA paper's Table 3 at the 13B configuration (meta device, no weights)", "",
                  f"{r['config']}; {r['num_images']} images, {r['text_tokens']} text tokens.", "",
                  f"Base model at 336 px for reference: {ref['flops_meta_counter'] / 1e12:.2f} TFLOPs, "
                  f"{ref['total_bytes_fused_attention'] / 2**30:.2f} GiB (fused attention).", "",
                  "| Res. | FLOPs T, ours: baseline / HiA | MACs T, ours | paper \"FLOPs\" T | memory GiB ours, fused "
                  "attention | memory GiB ours, eager attention | paper memory GB | paper AVG |",
                  "|---|---|---|---|---|---|---|---|"]
        for size, row in r["rows"].items():
            b, h, p = row["baseline"], row["hia"], row["paper"] or {}

            def pair(values, digits=1):
                if not values:
                    return "-"
                return " / ".join("x" if v is None else f"{v:.{digits}f}" for v in values)

            lines.append(
                f"| {size} | {b['flops_meta_counter'] / 1e12:.1f} / {h['flops_meta_counter'] / 1e12:.2f} | "
                f"{b['flops_meta_counter'] / 2e12:.1f} / {h['flops_meta_counter'] / 2e12:.2f} | "
                f"{pair(p.get('tflops'))} | "
                f"{b['total_bytes_fused_attention'] / 2**30:.1f} / {h['total_bytes_fused_attention'] / 2**30:.1f} | "
                f"{b['total_bytes_eager_attention'] / 2**30:.1f} / {h['total_bytes_eager_attention'] / 2**30:.1f} | "
                f"{pair(p.get('memory'))} | {pair(p.get('avg'))} |")
        lines += ["", r["method"], ""]

    if "validation" in results:
        v = results["validation"]
        lines += ["## Cross-checks on a small real CPU model", "",
                  "| model | FLOPs: FlopCounterMode on the real forward / stage replay / arithmetic (G) | "
                  "peak tensor bytes: stage replay / real forward |", "|---|---|---|"]
        for label, row in v.items():
            lines.append(f"| {label} | {row['real_forward_flops'] / 1e9:.4f} / {row['staged_flops'] / 1e9:.4f} / "
                         f"{row['analytic_flops'] / 1e9:.4f} | {row['peak_ratio_staged_over_real']:.3f} |")
        lines.append("")

    if "quant" in results:
        r = results["quant"]
        lines += ["## 4. bitsandbytes 8-bit / 4-bit vs bf16 / fp32 (CPU)", "", f"{r['config']}. {r['method']}.", "",
                  "| variant | get_memory_footprint (MB) | arithmetic (MB) | prefill ms | decode tokens/s | "
                  "logit cosine vs fp32 | 13B footprint, same arithmetic (GiB) |", "|---|---|---|---|---|---|---|"]
        for name, row in r["variants"].items():
            if "error" in row:
                lines.append(f"| {name} | failed: {row['error']} | | | | | |")
                continue
            lines.append(f"| {name} | {row['memory_footprint_bytes'] / 1e6:.1f} | "
                         f"{row['expected_footprint_bytes'] / 1e6:.1f} | {row['prefill_ms']:.0f} | "
                         f"{row['decode_tokens_per_s']:.1f} | {min(row['logit_cosine_vs_fp32'], 1.0):.4f} | "
                         f"{r['footprint_13b_gib'][name]:.2f} |")
        lines.append("")

    if "gpu" in results:
        g = results["gpu"]
        lines += ["## 5. GPU (13B, random weights)", ""]
        if g.get("skipped"):
            lines += [g["reason"], ""]
        else:
            lines += [f"{g['date']}, {g['device']}, copy bandwidth {g['copy_bandwidth_gb_s']:.0f} GB/s"
                      + (" (SMOKE TEST, not a GPU figure)" if g.get("smoke_test") else ""), "",
                      "| precision | HiA | batch | prefill ms | decode tokens/s | peak GPU memory GiB |",
                      "|---|---|---|---|---|---|"]
            for row in g["rows"]:
                if "error" in row:
                    lines.append(f"| {row['precision']} | {row.get('hia')} | {row.get('batch_size')} | "
                                 f"error: {row['error']} | | |")
                    continue
                peak = row.get("peak_memory_bytes")
                lines.append(f"| {row['precision']} | {row['hia']} | {row['batch_size']} | {row['prefill_ms']:.1f} | "
                             f"{row['decode_tokens_per_s']:.1f} | {_fmt(peak / 2**30 if peak else None, 2)} |")
            bound = g.get("bandwidth_bound")
            if bound:
                lines += ["", f"bf16 batch-1 decode bound: {bound['weight_bytes_per_token'] / 1e9:.2f} GB weights + "
                          f"{bound['kv_bytes_per_token_at_mid_generation'] / 1e9:.3f} GB KV per token -> "
                          f"{bound['bound_tokens_per_s']:.1f} tokens/s (target 70%)", ""]
                for label, v in bound["variants"].items():
                    lines.append(f"- {label}: " + (f"{v['tokens_per_s']:.1f} tokens/s = "
                                                   f"{100 * v['fraction_of_bound']:.0f}% of bound"
                                                   if "error" not in v else f"error {v['error']}"))
            lines.append("")
    return "\n".join(lines)


def plot_report(results: dict, path: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    panels = [k for k in ("table3", "hia") if k in results]
    if not panels:
        return None
    figure, axes = plt.subplots(1, 3 if "hia" in results and "table3" in results else 2, figsize=(16, 4.6))
    axes = list(axes)
    if "table3" in results:
        r = results["table3"]
        sizes = [int(s) for s in r["rows"]]
        rows = list(r["rows"].values())
        ax = axes.pop(0)
        ax.plot(sizes, [row["baseline"]["flops_meta_counter"] / 1e12 for row in rows], "o-", label="baseline (ViT at S), ours")
        ax.plot(sizes, [row["hia"]["flops_meta_counter"] / 1e12 for row in rows], "s-", label="HiA at S, ours")
        ax.plot(sizes, [row["baseline"]["flops_meta_counter"] / 2e12 for row in rows], "o:", color="C0", alpha=0.5,
                label="baseline, ours in MACs")
        ax.plot(sizes, [row["hia"]["flops_meta_counter"] / 2e12 for row in rows], "s:", color="C1", alpha=0.5,
                label="HiA, ours in MACs")
        ax.plot(sizes, [(row["paper"] or {}).get("tflops", (None,))[0] for row in rows], "x--", color="C0",
                label="baseline, paper")
        ax.plot(sizes, [(row["paper"] or {}).get("tflops", (None, None))[1] for row in rows], "+--", color="C1",
                label="HiA, paper")
        ax.set_xlabel("resolution S (px)")
        ax.set_ylabel("prefill TFLOPs (2 images)")
        ax.set_title("13B: prefill compute vs resolution")
        ax.legend(fontsize=7)
        ax = axes.pop(0)
        ax.plot(sizes, [row["baseline"]["total_bytes_fused_attention"] / 2**30 for row in rows], "o-",
                label="baseline, fused attention")
        ax.plot(sizes, [row["baseline"]["total_bytes_eager_attention"] / 2**30 for row in rows], "o:",
                label="baseline, eager attention")
        ax.plot(sizes, [row["hia"]["total_bytes_fused_attention"] / 2**30 for row in rows], "s-", label="HiA, fused")
        ax.plot(sizes, [(row["paper"] or {}).get("memory", (None,))[0] for row in rows], "x--", color="C0",
                label="baseline, paper (GB)")
        ax.plot(sizes, [(row["paper"] or {}).get("memory", (None, None))[1] for row in rows], "+--", color="C2",
                label="HiA, paper (GB)")
        ax.set_xlabel("resolution S (px)")
        ax.set_ylabel("GiB (parameters + inputs + activations)")
        ax.set_title("13B bf16: inference memory vs resolution")
        ax.legend(fontsize=7)
    if "hia" in results and axes:
        r = results["hia"]
        ax = axes.pop(0)
        two = [c for c in r["prefill"] if c["num_images"] == 2]
        if two:
            sizes = [c["high_res_size"] for c in two]
            ax.plot(sizes, [c["prefill_ms"]["base"] for c in two], "^-", label="base (no HiA)")
            ax.plot(sizes, [c["prefill_ms"]["hia"] for c in two], "s-", label="HiA")
            timed = [c for c in two if "baseline" in c["prefill_ms"]]
            ax.plot([c["high_res_size"] for c in timed], [c["prefill_ms"]["baseline"] for c in timed], "o-",
                    label="baseline (ViT at S)")
        ax.set_xlabel("resolution S (px)")
        ax.set_ylabel("prefill ms, 2 images (CPU, small config)")
        ax.set_title("CPU measured prefill")
        ax.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def write_reports(results: dict, out_dir: str, stem: str = "cpu_suite") -> dict:
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, f"{stem}.json"), "markdown": os.path.join(out_dir, f"{stem}.md")}
    with open(paths["json"], "w") as handle:
        json.dump(results, handle, indent=1, default=str)
    with open(paths["markdown"], "w") as handle:
        handle.write(markdown_report(results) + "\n")
    png = plot_report(results, os.path.join(out_dir, f"{stem}.png"))
    if png:
        paths["png"] = png
    return paths


# ---------------------------------------------------------------------------------------------------------------------
# Command line: `qilin-med-vl bench`, `python benchmarks/run_cpu_suite.py`, `python benchmarks/bench_gpu.py`
# ---------------------------------------------------------------------------------------------------------------------

CPU_SUITES = ("llava", "hia", "table3", "validate", "quant")


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--suites", default=",".join(CPU_SUITES),
                        help=f"comma-separated CPU suites to run, of {', '.join(CPU_SUITES)} (default: all)")
    parser.add_argument("--gpu", action="store_true", help="run the GPU suite instead (skipped without CUDA)")
    parser.add_argument("--gpu-smoke-test", action="store_true",
                        help="with --gpu: run the GPU suite's code on CPU with a small config (plumbing only)")
    parser.add_argument("--out", default=os.path.join("benchmarks", "results"), help="output folder")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: steadier on a shared machine)")
    parser.add_argument("--quick", action="store_true", help="fewer rounds and cells (a smoke run, not for numbers)")
    parser.add_argument("--date", default=None, help="date to record (default: today)")
    parser.add_argument("--hia-encoder-width", type=int, default=32,
                        help="stem width of HiA's ResNet trunk in the CPU HiA suite (64 = ResNet-50; default 32 keeps "
                             "the suite within minutes)")


def bench_command(args) -> int:
    import warnings

    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    date = args.date or datetime.date.today().isoformat()
    command = getattr(args, "command_line", None) or (
        "qilin-med-vl bench " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["bench"] else sys.argv[1:]))
    results = {"date": date, "machine": machine_description(), "threads": torch.get_num_threads(), "command": command}
    started = time.perf_counter()
    if args.gpu:
        record = run_gpu_suite(allow_cpu=args.gpu_smoke_test, small=args.gpu_smoke_test,
                               **({"new_tokens": 8, "repeats": 1, "batch_sizes": (1, 2)} if args.gpu_smoke_test else {}))
        record["date"] = date if record.get("skipped") or not args.date else args.date
        results["gpu"] = record
        stem = "gpu_smoke_test" if args.gpu_smoke_test else "gpu"
    else:
        suites = [s.strip() for s in args.suites.split(",") if s.strip()]
        unknown = set(suites) - set(CPU_SUITES)
        if unknown:
            print(f"unknown suites: {sorted(unknown)}", file=sys.stderr)
            return 2
        quick = args.quick
        for suite in suites:
            t = time.perf_counter()
            if suite == "llava":
                results["llava"] = run_llava_comparison(**({"repeats": 4, "new_tokens": 16} if quick else {}))
            elif suite == "hia":
                results["hia"] = run_hia_cost(encoder_width=args.hia_encoder_width,
                                              **({"sizes": (336, 672), "image_counts": (1, 2), "repeats": 1,
                                                  "decode_repeats": 2, "decode_images": (1,)} if quick else {}))
            elif suite == "table3":
                results["table3"] = run_table3()
            elif suite == "validate":
                results["validation"] = validate_stage_composition()
            elif suite == "quant":
                results["quant"] = run_quantization(**({"repeats": 2, "new_tokens": 8} if quick else {}))
            results.setdefault("seconds", {})[suite] = time.perf_counter() - t
        stem = "cpu_suite"
    results["total_seconds"] = time.perf_counter() - started
    paths = write_reports(results, args.out, stem)
    print(markdown_report(results))
    print("\nwrote " + ", ".join(paths.values()))
    return 0


def add_cli(subparsers) -> None:
    """`qilin-med-vl bench`: the CPU benchmark suite (or `--gpu`)."""
    parser = subparsers.add_parser(
        "bench", help="benchmarks: vs transformers' Llava, HiA's cost, the HiA paper's Table 3 at 13B, quantization",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(parser)
    parser.set_defaults(handler=bench_command)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="qilin-med-vl bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(parser)
    args = parser.parse_args(argv)
    script = sys.argv[0] if sys.argv[0].endswith(".py") else None
    if script:
        shown = sys.argv[1:]
        args.command_line = f"python {os.path.relpath(script)} " + " ".join(shown)
    else:
        args.command_line = "qilin-med-vl bench " + " ".join(argv if argv is not None else sys.argv[1:])
    return bench_command(args)


if __name__ == "__main__":
    sys.exit(main())
