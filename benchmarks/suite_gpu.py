# Copyright 2026 The qilin-med-vl Authors. Licensed under the Apache License, Version 2.0.
"""Suite 5: the 13B configuration (`QilinMedVLConfig()`) with random weights in bf16, 8-bit and 4-bit on CUDA.

    python -m benchmarks --gpu                     # prints "SKIPPED" and exits 0 without CUDA
    python -m benchmarks --gpu --gpu-smoke-test    # runs the same code on CPU with a small config (plumbing only)

Measures prefill ms, decode tokens/s at batch 1 and 8, peak GPU memory, HiA on and off, and batch-1 bf16 decode as a
fraction of the memory-bandwidth bound (weight + KV bytes per token over the measured copy bandwidth) with a dynamic
cache, a static cache, and a static cache + torch.compile(mode="reduce-overhead"). Writes
benchmarks/results/gpu.{json,md}; copy the figures with their date and device into benchmarks/RESULTS.md.
Needs about 27 GiB of GPU memory for bf16 (H100 80 GB or larger recommended).
"""

import copy
import datetime
import functools
import gc
import statistics
import time
from contextlib import nullcontext

import torch

from qilin_med_vl.modeling.modeling_qilin_med_vl import CACHE_NAME

from .flops import decode_weight_bytes, kv_cache_bytes
from .memory import parameter_bytes
from .models import bench_config, hia_config_for, make_inputs, qilin_class
from .stage_replay import hia_blocks
from .timing import machine_description, time_generate, time_prefill


def _random_model(config, precision: str, device, seed: int = 0):
    """Random-weight model built directly on `device` in bf16; for "int8" / "nf4" the language model's decoder linears
    are then replaced one by one by bitsandbytes layers (what `from_pretrained` with a `BitsAndBytesConfig` and the
    model's default skip list produces), so no checkpoint has to be written."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = qilin_class()._from_config(config, dtype=torch.bfloat16)
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


def synchronizer(device):
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def copy_bandwidth(device, nbytes: int = 2**30, repeats: int = 10) -> float:
    """Device memory bandwidth in bytes/s measured with `copy_` (bytes read + bytes written over time)."""
    source = torch.empty(nbytes, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    sync = synchronizer(device)
    for _ in range(3):
        target.copy_(source)
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        target.copy_(source)
    sync()
    return 2 * nbytes * repeats / (time.perf_counter() - start)


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
        out = model(**inputs, **{CACHE_NAME: past}, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        synchronize()
        prefill = time.perf_counter() - start
        for index in range(new_tokens):
            position = torch.full((1,), prompt + index, device=device, dtype=torch.long)
            mark = getattr(torch.compiler, "cudagraph_mark_step_begin", None)
            if compiled is not None and mark is not None and device.type == "cuda":
                mark()
            begin = time.perf_counter()
            out = step(input_ids=token, **{CACHE_NAME: past}, cache_position=position,
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

    from qilin_med_vl.modeling.configuration_qilin_med_vl import QilinMedVLConfig

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    synchronize = synchronizer(device)
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
        "device": (
            torch.cuda.get_device_name(0) if device.type == "cuda"
            else f"CPU smoke test ({machine_description()['cpu']})"
        ),
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
                for block in hia_blocks(model):
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

            def measure(label, timed_runs):
                """Median decode step of `timed_runs()` (a list of timed runs) against the bound, or its error."""
                try:
                    step = statistics.median(statistics.median(run["steps"]) for run in timed_runs())
                    variants[label] = {"decode_step_ms": step * 1e3, "tokens_per_s": 1 / step,
                                       "fraction_of_bound": (1 / step) / bound}
                except Exception as error:
                    variants[label] = {"error": repr(error)}
                log(f"[gpu] bf16 batch 1 {label}: {variants[label]}")

            def manual_runs(base, cache, compile_it):
                compiled = None
                if compile_it:
                    mode = "reduce-overhead" if device.type == "cuda" else "default"
                    compiled = torch.compile(base.forward, mode=mode, fullgraph=False)
                    manual_decode(base, inputs, 8, "static", compiled, synchronize)  # compile + warm-up
                manual_decode(base, inputs, 4, cache, compiled, synchronize)
                return [manual_decode(base, inputs, new_tokens, cache, compiled, synchronize) for _ in range(repeats)]

            def generate_runs(base):
                # generate() itself: a static cache makes transformers compile the decode step on CUDA.
                extra = {"cache_implementation": "static"}
                if device.type != "cuda":
                    from transformers import CompileConfig

                    extra["compile_config"] = CompileConfig()
                    extra["compile_config"]._compile_all_devices = True
                time_generate(base, inputs, 8, synchronize, **extra)  # compile + warm-up
                return [time_generate(base, inputs, new_tokens, synchronize, **extra) for _ in range(repeats)]

            with getattr(model, "disable_adapter", nullcontext)():
                for label, cache, compile_it in (("dynamic cache, eager", "dynamic", False),
                                                 ("static cache, eager", "static", False),
                                                 ("static cache, torch.compile", "static", True)):
                    if compile_it and not compile_decode:
                        continue
                    measure(label, functools.partial(manual_runs, base, cache, compile_it))
                if compile_decode:
                    label = "generate, static cache (transformers auto-compile)"
                    measure(label, functools.partial(generate_runs, base))
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
