# Copyright 2026 The qilin-med-vl Authors. Licensed under the Apache License, Version 2.0.
"""Suite 3 (`table3`): the HiA paper's Table 3 at the real 13B configuration, without weights, and the `validate`
suite that checks the stage-by-stage replay it relies on against a real forward on a small CPU model."""

import copy
import time

import torch

from .flops import flop_counter, prefill_flops
from .memory import peak_live_bytes
from .models import bench_config, build_model, hia_config_for, make_inputs, prefill_once
from .stage_replay import build_meta_model, measure_prefill_stages, register_fused_attention_stub

# The HiA paper (Ding et al., MICCAI 2024), Table 3 as printed: "baseline / HiA" memory (GB), FLOPs (T) and AVG
# score; None where the paper prints "x" (out of memory).
PAPER_TABLE3 = {
    448: {"memory": (30.8, 29.6), "tflops": (46.8, 15.8), "avg": (37.7, 39.6)},
    560: {"memory": (31.3, 29.9), "tflops": (85.5, 16.2), "avg": (38.0, 40.8)},
    672: {"memory": (None, 30.1), "tflops": (105.0, 16.5), "avg": (None, 41.4)},
    784: {"memory": (None, 30.3), "tflops": (162.0, 16.7), "avg": (None, 41.5)},
    896: {"memory": (None, 30.4), "tflops": (208.0, 16.8), "avg": (None, 41.5)},
}


def run_table3(sizes=(448, 560, 672, 784, 896), num_images: int = 2, text_tokens: int = 64, log=print) -> dict:
    """Baseline (ViT fed S px, interpolated position embeddings, (S/14)^2 tokens per image) against HiA at S px, at
    the 13B configuration (`QilinMedVLConfig()`, `HiAConfig()`), batch 1, bf16, on the meta device."""
    from qilin_med_vl.modeling.configuration_qilin_med_vl import QilinMedVLConfig

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
            f"{baseline['total_bytes_fused_attention'] / 2**30:.1f} / "
            f"{ours['total_bytes_fused_attention'] / 2**30:.1f} GiB, "
            f"(eager) {baseline['total_bytes_eager_attention'] / 2**30:.1f} / "
            f"{ours['total_bytes_eager_attention'] / 2**30:.1f} GiB")
    mismatch = max(
        abs(entry[kind]["flops_meta_counter"] / entry[kind]["flops_analytic"] - 1)
        for entry in rows.values() for kind in ("baseline", "hia")
    )
    return {
        "config": "QilinMedVLConfig() (CLIP ViT-L/14-336 + 40-layer 5120-wide Llama, vocab 32064) + HiAConfig() "
                  f"(layers {hia_resolved.layers}, M={hia_resolved.num_queries}, width 5120, ResNet-50), "
                  "bf16, batch 1",
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


def validate_stage_composition(
    num_images: int = 2, high_res_size: int = 224, text_tokens: int = 48, log=print
) -> dict:
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
        prefill_once(model, inputs)
        real_peak = peak_live_bytes(lambda m=model, i=inputs: m(**i, use_cache=True, logits_to_keep=1))
        with torch.inference_mode(), flop_counter() as counter:
            model(**inputs, use_cache=True, logits_to_keep=1)
        staged = measure_prefill_stages(
            model, num_images, text_tokens, high_res_size=high_res_size if with_hia else None
        )
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
