# Copyright 2026 The qilin-med-vl Authors. Licensed under the Apache License, Version 2.0.
"""Benchmarks of Qilin-Med-VL and the HiA adapter: FLOP and memory arithmetic, measurement helpers and suites.

Five suites (each writes a JSON record; `report.write_reports` turns them into markdown and a PNG):

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

Run from the repository root of a checkout (the benchmarks are not part of the installed package):
`python -m benchmarks` for the CPU suites, `python -m benchmarks --gpu` for the GPU suite.
"""
