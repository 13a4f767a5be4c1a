# Copyright 2026 The qilin-med-vl Authors. Licensed under the Apache License, Version 2.0.
"""Timing: per-step timers inside `generate`, interleaved rounds with a CPU-contention check, summaries and paired
ratios, and the machine description recorded with every result."""

import os
import platform
import statistics
import time

import torch


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


def summarize_ms(values) -> dict:
    return {k: (v * 1e3 if k != "n" else v) for k, v in summarize(values).items()}


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
