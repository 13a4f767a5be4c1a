"""Regenerate the synthetic HiA results end to end with the package's own commands:

    python experiments/synthetic_hia/reproduce.py --output runs/synthetic

1. `qilin-med-vl synth-data`: train / validation / test splits of synthetic radiographs (seeded);
2. an untrained small Qilin-Med-VL (`demo_builder.build_demo_base_model`, beside this script);
3. `qilin-med-vl train --stage align` (projector, description captions, `plain` template);
4. `qilin-med-vl train --stage instruct` (projector + LLM + vision tower, at low resolution only);
5. `qilin-med-vl train --stage hia` three times: the full adapter, "w/o IA" (`--no-instruction-aware`) and
   "w/o HR" (`--high-res-size` equal to the low resolution);
6. `qilin-med-vl evaluate` of the base and the three adapters on the held-out test split;
7. a table shaped like the HiA paper's Tables 1 and 2 (`results.md`, `results.json`) with seeds and wall times.

Hyper-parameters were fixed before looking at test scores; nothing is tuned on the test split.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = {  # name -> extra `train --stage hia` flags
    "+HiA": [],
    "+HiA w/o IA": ["--no-instruction-aware"],
    "+HiA w/o HR": ["--high-res-size", "112"],
}
TASK_ORDER = ["description", "disease", "location", "comparative"]


def finished(output_dir) -> bool:
    """A stage whose output already holds trained weights is not run again (rerunning the script resumes)."""
    return any((Path(output_dir) / name).is_file() for name in ("model.safetensors", "adapter_model.safetensors"))


def run(command, log_path):
    """Run one CLI command, writing its output to a log file; returns the wall time in seconds."""
    print("$", " ".join(map(str, command)), flush=True)
    start = time.time()
    with open(log_path, "w", encoding="utf-8") as log:
        process = subprocess.run([str(c) for c in command], stdout=log, stderr=subprocess.STDOUT)
    if process.returncode:
        sys.exit(f"command failed ({process.returncode}); see {log_path}")
    return round(time.time() - start, 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="runs/synthetic")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=3000)
    parser.add_argument("--validation", type=int, default=200)
    parser.add_argument("--test", type=int, default=400)
    parser.add_argument("--align-steps", type=int, default=200)
    parser.add_argument("--instruct-steps", type=int, default=400)
    parser.add_argument("--hia-steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--skip-data", action="store_true", help="reuse an existing data folder")
    parser.add_argument("--install-demo", action="store_true",
                        help="copy the trained base + HiA into qilin_med_vl/demo_model (the embedded demo)")
    args = parser.parse_args()

    out = Path(args.output)
    data, logs = out / "data", out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    cli = [sys.executable, "-m", "qilin_med_vl.cli"]
    times = {}
    common = ["--image-root", data, "--per-device-train-batch-size", args.batch_size, "--seed", args.seed,
              "--logging-steps", 25, "--save-steps", 100000, "--dataloader-num-workers", 1, "--report-to", "none"]

    if not args.skip_data:
        times["synth-data"] = run(cli + ["synth-data", "--output", data, "--seed", args.seed, "--train", args.train,
                                         "--validation", args.validation, "--test", args.test,
                                         "--workers", args.workers], logs / "synth-data.log")
    # Alignment uses the single-image description records as captions.
    with open(data / "train.jsonl", encoding="utf-8") as source, open(out / "align.jsonl", "w", encoding="utf-8") as target:
        for line in source:
            if json.loads(line)["task"] == "description":
                target.write(line)
    characters = "".join(sorted({c for name in ("train.jsonl",) for c in (data / name).read_text(encoding="utf-8")}))
    from demo_builder import build_demo_base_model

    if not (out / "init" / "model.safetensors").is_file():
        build_demo_base_model(out / "init", characters=characters, seed=args.seed)

    if not finished(out / "align"):
        times["align"] = run(cli + ["train", "--stage", "align", "--model", out / "init", "--data", out / "align.jsonl",
                                "--output-dir", out / "align", "--max-steps", args.align_steps] + common,
                             logs / "align.log")
    if not finished(out / "base"):
        times["instruct"] = run(cli + ["train", "--stage", "instruct", "--model", out / "align", "--data",
                                       data / "train.jsonl", "--output-dir", out / "base", "--max-steps",
                                       args.instruct_steps, "--learning-rate", "5e-4", "--train-vision"] + common,
                                logs / "instruct.log")
    hia_common = ["--num-queries", 32, "--num-heads", 4, "--hidden-size", 128, "--encoder-depths", 1, 1, 1, 1,
                  "--encoder-width", 16, "--learning-rate", "1e-3", "--high-res-size", 448]
    results = {}
    for name, flags in [("base", None), *VARIANTS.items()]:
        slug = name.replace("+", "").replace(" ", "_").replace("/", "")
        if flags is not None and not finished(out / slug):
            times[name] = run(cli + ["train", "--stage", "hia", "--model", out / "base", "--data",
                                     data / "train.jsonl", "--output-dir", out / slug, "--max-steps", args.hia_steps]
                              + hia_common + flags + common, logs / f"{slug}.log")
        command = cli + ["evaluate", "--model", out / "base", "--data", data / "test.jsonl", "--image-root", data,
                         "--output-dir", out / "eval" / slug, "--batch-size", 16, "--max-new-tokens", 96,
                         "--name", name]
        if flags is not None:
            command += ["--adapter", out / slug]
        if not (out / "eval" / slug / "scores.json").is_file():
            times[f"evaluate {name}"] = run(command, logs / f"evaluate-{slug}.log")
        results[name] = json.loads((out / "eval" / slug / "scores.json").read_text(encoding="utf-8"))

    from qilin_med_vl.evaluation import format_markdown_table

    table = format_markdown_table(results, task_order=TASK_ORDER)
    record = {"seed": args.seed, "splits": {"train": args.train, "validation": args.validation, "test": args.test},
              "steps": {"align": args.align_steps, "instruct": args.instruct_steps, "hia": args.hia_steps},
              "batch_size": args.batch_size, "wall_time_s": times, "machine": platform.platform(),
              "cpus": os.cpu_count(), "results": results}
    (out / "results.json").write_text(json.dumps(record, ensure_ascii=False, indent=2), encoding="utf-8")
    (out / "results.md").write_text(table + "\n", encoding="utf-8")
    print(table)
    print(json.dumps(times, indent=2))

    if args.install_demo:
        from demo_builder import DEMO_MODEL_DIR, install_demo_model

        install_demo_model(out / "base", out / "HiA", DEMO_MODEL_DIR)


if __name__ == "__main__":
    main()
