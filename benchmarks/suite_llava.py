# Copyright 2026 The qilin-med-vl Authors. Licensed under the Apache License, Version 2.0.
"""Suite 1 (`llava`): the same weights in QilinMedVLForConditionalGeneration and transformers'
LlavaForConditionalGeneration, timed side by side, with peak memory, dispatched operators and framework overhead."""

import statistics
import time

import torch

from qilin_med_vl.modeling.modeling_qilin_med_vl import CACHE_NAME

from .memory import DispatchedOps, in_subprocess, parameter_bytes, peak_live_bytes, pin_malloc_to_mmap, rss_peak_delta
from .models import bench_config, build_model, llava_twin, make_inputs, prefill_once
from .timing import interleave, paired_ratio, summarize_ms, time_models


def _rss_child(config_kwargs, num_images, text_tokens):
    """In a fresh process: RSS high-water-mark growth of one prefill for ours and Llava (median of 5 interleaved)."""
    pinned = pin_malloc_to_mmap()
    config = bench_config(**config_kwargs)
    ours = build_model(config)
    models = {"qilin": ours, "llava": llava_twin(ours)}
    inputs = make_inputs(config, num_images, text_tokens)
    for model in models.values():
        prefill_once(model, inputs)
    rss = interleave(
        {name: (lambda m=m: rss_peak_delta(lambda: prefill_once(m, inputs))) for name, m in models.items()},
        5, 1, max_rounds=5,
    )
    result = {"pinned": pinned}
    for name in models:
        values = [v for v in rss[name] if v is not None]
        result[name] = statistics.median(values) if values else None
    return result


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
        caches = {
            name: getattr(m(**inputs, use_cache=True, logits_to_keep=1), CACHE_NAME) for name, m in models.items()
        }

        def step(name):
            start = time.perf_counter()
            models[name](input_ids=torch.tensor([[5]]), **{CACHE_NAME: caches[name]}, use_cache=True, logits_to_keep=1)
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
            step = {"input_ids": torch.tensor([[5]]), CACHE_NAME: getattr(out, CACHE_NAME), "use_cache": True,
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
            "prefill_ms": summarize_ms(times[name]["prefill"]),
            "generate_prefill_ms": summarize_ms(times[name]["generate_prefill"]),
            "decode_step_ms": summarize_ms(times[name]["decode_step"]),
            "decode_tokens_per_s": 1.0 / statistics.median(times[name]["decode_step"]),
            "parameter_bytes": parameter_bytes(model),
            "peak_prefill_tensor_bytes": peak_live_bytes(
                lambda m=model: m(**inputs, use_cache=True, logits_to_keep=1)
            ),
            "peak_generate_tensor_bytes": peak_live_bytes(
                lambda m=model: m.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                                           pad_token_id=0)
            ),
        }
    # Secondary memory figure, in a fresh process (pinning malloc to mmap would slow later timings down).
    rss = in_subprocess(_rss_child, config_kwargs or {}, num_images, text_tokens)
    for name in models:
        rows[name]["rss_peak_delta_prefill_bytes"] = rss.get(name)
    pinned = rss.get("pinned")

    def plain_ratio(key):
        a, b = rows["qilin"][key], rows["llava"][key]
        return a / b if a is not None and b else None

    ratios = {
        "prefill_latency": paired_ratio(times["qilin"]["prefill"], times["llava"]["prefill"]),
        "decode_step_time": paired_ratio(times["qilin"]["decode_step"], times["llava"]["decode_step"]),
        "generate_prefill_latency": paired_ratio(
            times["qilin"]["generate_prefill"], times["llava"]["generate_prefill"]
        ),
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
            "(dispatch-mode tracker; parameters excluded, reported separately); secondary: process RSS "
            f"high-water-mark growth during one prefill (median of 5; large allocations pinned to mmap: {pinned})."
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
