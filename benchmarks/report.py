# Copyright 2026 The qilin-med-vl Authors. Licensed under the Apache License, Version 2.0.
"""Reports: the suites' results as JSON, a markdown report and a PNG plot."""

import json
import os


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
        lines += ["## 1. Same weights: QilinMedVLForConditionalGeneration vs transformers' "
                  "LlavaForConditionalGeneration",
                  "",
                  f"Config: hidden {c['hidden_size']}, {c['num_hidden_layers']} layers, MLP {c['intermediate_size']}, "
                  f"vocab {c['vocab_size']}, {c['vision']}, {c['attn_implementation']}, {c['dtype']}, "
                  f"{c['parameters'] / 1e6:.1f} M parameters; prompt {c['prompt_tokens']} tokens "
                  f"({c['num_images']} image), {c['new_tokens']} new tokens. Max |logit difference| "
                  f"{r['max_abs_logit_difference']:.2g}; greedy tokens identical: {r['greedy_tokens_identical']}. "
                  f"Rounds: {r['rounds']}.", "",
                  "| metric | Qilin | Llava | ours / theirs: median of per-round ratios (p25-p75) | target <= 1.02 |",
                  "|---|---|---|---|---|"]
        q, lv, ratios = r["models"]["qilin"], r["models"]["llava"], r["ratios_ours_over_theirs"]
        rows = [
            ("prefill latency (ms)", q["prefill_ms"]["median"], lv["prefill_ms"]["median"], ratios["prefill_latency"]),
            ("decode step (ms/token)", q["decode_step_ms"]["median"], lv["decode_step_ms"]["median"],
             ratios["decode_step_time"]),
            ("decode tokens/s", q["decode_tokens_per_s"], lv["decode_tokens_per_s"], None),
            ("prefill inside generate (ms)", q["generate_prefill_ms"]["median"], lv["generate_prefill_ms"]["median"],
             ratios["generate_prefill_latency"]),
            ("peak tensor bytes, prefill (MB)", q["peak_prefill_tensor_bytes"] / 1e6,
             lv["peak_prefill_tensor_bytes"] / 1e6, ratios["peak_prefill_tensor_bytes"]),
            ("peak tensor bytes, generate 8 tokens (MB)", q["peak_generate_tensor_bytes"] / 1e6,
             lv["peak_generate_tensor_bytes"] / 1e6, ratios["peak_generate_tensor_bytes"]),
            ("RSS high-water growth, prefill (MB)", (q["rss_peak_delta_prefill_bytes"] or 0) / 1e6,
             (lv["rss_peak_delta_prefill_bytes"] or 0) / 1e6, ratios["rss_peak_delta_prefill"]),
            ("parameter bytes (MB)", q["parameter_bytes"] / 1e6, lv["parameter_bytes"] / 1e6,
             ratios["parameter_bytes"]),
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
            lines += ["", "Framework overhead on an overhead-bound model (hidden 64, 6 layers; minimum over 1000 "
                      "decode steps / 333 prefills, the two models alternating call by call): decode step "
                      f"{mq['decode_step_us']:.0f} us (ours) vs {ml['decode_step_us']:.0f} us (Llava) = "
                      f"{micro['ratios_ours_over_theirs']['decode_step_us']:.3f}; "
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
                  f"HiA's encoder ran {r['encoder_calls_per_generate']} time(s) in one `generate` call "
                  "(prefill only); "
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
                         f"{'yes' if ratio['median'] <= 1.01 else 'no'} | "
                         f"{_ratio_cell(d['hia_over_base_step_time'])} | "
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
                f"{_fmt(cell.get('baseline_over_base'), 2)} | "
                f"{g['base']:.1f} / {g['hia']:.1f} / {g['baseline']:.1f} |")
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
        ax.plot(sizes, [row["baseline"]["flops_meta_counter"] / 1e12 for row in rows], "o-",
                label="baseline (ViT at S), ours")
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
