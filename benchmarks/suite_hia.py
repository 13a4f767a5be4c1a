# Copyright 2026 The qilin-med-vl Authors. Licensed under the Apache License, Version 2.0.
"""Suite 2 (`hia`): HiA's cost with and without the adapter, and against the paper's baseline of feeding the ViT a
higher resolution; measured on a small CPU configuration and counted exactly at the 13B configuration."""

import copy
import gc
import statistics
import time

import torch

from qilin_med_vl.modeling.modeling_qilin_med_vl import CACHE_NAME

from .flops import decode_flops, kv_cache_bytes, prefill_flops
from .memory import DispatchedOps, peak_live_bytes
from .models import bench_config, build_model, hia_config_for, make_inputs, prefill_once, with_vision_size
from .timing import paired_ratio, time_models

HIGH_RES_SIZES = (336, 448, 560, 672, 784, 896)


def hia_grid_13b(sizes=HIGH_RES_SIZES, image_counts=(1, 2, 3, 4), text_tokens: int = 64) -> dict:
    """Exact prefill FLOPs at the 13B configuration for every (high-res size, image count): base model (336 px),
    base + HiA at S px, and the baseline with the ViT at S px. Decode FLOPs per token: HiA adds none."""
    from qilin_med_vl.modeling.configuration_qilin_med_vl import QilinMedVLConfig

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
            caches = {
                name: getattr(m(**i, use_cache=True, logits_to_keep=1), CACHE_NAME) for name, (m, i) in models.items()
            }
            for _ in range(steps if label.startswith("bench") else 3 * steps):
                for name, (model, _) in models.items():
                    start = time.perf_counter()
                    model(input_ids=torch.tensor([[5]]), **{CACHE_NAME: caches[name]}, use_cache=True,
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
                 new_tokens: int = 32, decode_images=(1, 2, 4), decode_size: int = 672,
                 max_baseline_tokens: int = 2400, text_tokens: int = 48, encoder_width: int = 32, log=print) -> dict:
    """CPU measurements on the small bench configuration (224 px low-res view, 256 tokens per image) with HiA's
    defaults (M=256, 8 heads, width = hidden, ResNet-50 trunk unless `encoder_width` says otherwise), plus the exact
    13B grid. Baseline cells whose language-model input exceeds `max_baseline_tokens` are counted, not timed."""
    from peft import get_peft_model

    from qilin_med_vl.modeling.modeling_hia import HiABlock

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
                prefill_once(model, inputs)
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
                cell["baseline_over_base"] = paired_ratio(
                    times["baseline"]["prefill"], times["base"]["prefill"]
                )["median"]
            measured.append(cell)
            log(f"[hia] {size}px x{count}: prefill base {cell['prefill_ms']['base']:.0f} ms, HiA "
                f"{cell['prefill_ms']['hia']:.0f} ms" + (f", baseline {cell['prefill_ms']['baseline']:.0f} ms"
                                                         if "baseline" in models else ", baseline not timed"))
            if count == 2:
                row = {"high_res_size": size, "num_images": 2}
                for name, model in models.items():
                    row[f"{name}_peak_tensor_bytes"] = peak_live_bytes(
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
        encoder = next(
            m.encoder for m in hia_for_decode.modules() if isinstance(m, HiABlock) and m.encoder is not None
        )
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
                    model(input_ids=torch.tensor([[5]]), **{CACHE_NAME: getattr(out, CACHE_NAME)}, use_cache=True,
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
                      "base": make_inputs(config, count, text_tokens),
                      "clone": make_inputs(config, count, text_tokens)}
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
            "model": f"bench_config(): hidden {config.text_config.hidden_size}, "
                     f"{config.text_config.num_hidden_layers} layers, "
                     f"CLIP {config.vision_config.num_hidden_layers}x{config.vision_config.hidden_size} at "
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
