# Copyright 2026 The qilin-med-vl Authors. Licensed under the Apache License, Version 2.0.
"""Command line: `python -m benchmarks` runs the CPU suites, `python -m benchmarks --gpu` the GPU suite; both write
their JSON / markdown / PNG reports to `benchmarks/results/` and print the markdown."""

import argparse
import datetime
import os
import sys
import time

import torch

import benchmarks

from .report import markdown_report, write_reports
from .suite_gpu import run_gpu_suite
from .suite_hia import run_hia_cost
from .suite_llava import run_llava_comparison
from .suite_quantization import run_quantization
from .suite_table3 import run_table3, validate_stage_composition
from .timing import machine_description

CPU_SUITES = ("llava", "hia", "table3", "validate", "quant")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=benchmarks.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
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
    return parser


def run(args, command: str) -> int:
    """Runs the suites `args` asks for; `command` is recorded in the reports as the command that produced them."""
    import warnings

    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    date = args.date or datetime.date.today().isoformat()
    results = {"date": date, "machine": machine_description(), "threads": torch.get_num_threads(), "command": command}
    started = time.perf_counter()
    if args.gpu:
        smoke_overrides = {"new_tokens": 8, "repeats": 1, "batch_sizes": (1, 2)} if args.gpu_smoke_test else {}
        record = run_gpu_suite(allow_cpu=args.gpu_smoke_test, small=args.gpu_smoke_test, **smoke_overrides)
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


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    return run(args, " ".join(["python -m benchmarks", *argv]))
