# Copyright 2026 The qilin-med-vl Authors. Licensed under the Apache License, Version 2.0.
"""Suite 4 (`quant`): bitsandbytes 8-bit / 4-bit against bf16 / fp32 on CPU: memory footprint, speed, and logits
against fp32."""

import statistics
import tempfile
import time

import torch

from .flops import quantized_footprint_bytes, split_decoder_linear_parameters
from .models import bench_config, build_model, make_inputs, qilin_class
from .stage_replay import build_meta_model
from .timing import time_models


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
                model = qilin_class().from_pretrained(folder, **kwargs).eval()
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
    from qilin_med_vl.modeling.configuration_qilin_med_vl import QilinMedVLConfig

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
