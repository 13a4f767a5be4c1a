"""GPU benchmark: the 13B configuration (`QilinMedVLConfig()`) with random weights in bf16, 8-bit and 4-bit on CUDA.

    python benchmarks/bench_gpu.py                     # prints "SKIPPED" and exits 0 without CUDA
    python benchmarks/bench_gpu.py --gpu-smoke-test    # runs the same code on CPU with a small config (plumbing only)

Measures prefill ms, decode tokens/s at batch 1 and 8, peak GPU memory, HiA on and off, and batch-1 bf16 decode as a
fraction of the memory-bandwidth bound (weight + KV bytes per token over the measured copy bandwidth) with a dynamic
cache, a static cache, and a static cache + torch.compile(mode="reduce-overhead"). Writes
benchmarks/results/gpu.{json,md}; copy the figures with their date and device into benchmarks/RESULTS.md.
Needs about 27 GiB of GPU memory for bf16 (H100 80 GB or larger recommended).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qilin_med_vl.benchmark import main

if __name__ == "__main__":
    sys.exit(main(["--gpu", *sys.argv[1:]]))
