"""Render the synthetic splits once and cache what training needs as uint8 arrays.

    python experiments/synthetic_hia/data_cache.py --output runs/demo/data --seed 1 --train 2400 --validation 200 \
        --test 400 --workers 2

Writes the usual `synth-data` layout (`<split>.jsonl`, `images/<split>/*.png`, `manifest.json`) so the package's
`evaluate` command and the shipped examples work on it, plus `cache/<split>.npz` with, per image (in record order):
`low` (N, 112, 112) and `high` (N, 672, 672): the image processor's own resized views, un-normalised to uint8 (one
channel: the images are grayscale); `record` and `view` (which record and which of its images); `boxes`
(N, 3, 4) lesion boxes in 1024-px coordinates (-1 padded) and `kinds` (N, 3) finding-kind codes (0 = none).
The processor is called once per image, so training never decodes or resizes an image again.

`--train-pairs N` also writes `train_pairs.jsonl` and `cache/train_pairs.npz`: N more comparative flake records
(improved / worsened / unchanged in turn, sides and bones balanced) drawn as training records `--train`,
`--train` + 1, ... of the same seed, i.e. the records a longer training split would have held, from the same
generator at the same difficulty. 2,400 records hold only about 110 such pairs (83 of small flakes); the HiA stage
can add these (`demo_pipeline.py hia --train-pairs`) without changing what the base trained on. `--pairs-start`
draws them from another record index on: `--train 0 --validation 0 --test 0 --train-pairs 600 --pairs-start 3000`
renders only 600 pairs that no stage trains on (`pair_probe.py --held-out`).

`--only-task` and `--only-kind` keep, of each split's plan, only the records of these tasks and finding kinds (a
comparative record's kind is the finding that changes), each rendered exactly as the full split would render it:
a second test set large enough for one row, e.g. `--train 0 --validation 0 --test 8000 --only-task comparative
--only-kind flake --seed 3` renders the 500 flake pairs of a test split of 8,000 records.
"""

import argparse
import json
import multiprocessing
import os
from pathlib import Path

import numpy as np

KINDS = ("none", "flake", "fracture", "osteophyte", "narrowing", "implant")
LOW_SIZE, HIGH_SIZE = 112, 672

_processor = None


def _image_processor():
    global _processor
    if _processor is None:
        from qilin_med_vl.processing.image_processing_qilin import QilinImageProcessor

        _processor = QilinImageProcessor(size={"shortest_edge": LOW_SIZE},
                                         crop_size={"height": LOW_SIZE, "width": LOW_SIZE}, high_res_size=HIGH_SIZE)
    return _processor


def _to_uint8(normalised, processor):
    """(3, S, S) CLIP-normalised tensor of a grayscale image -> (S, S) uint8 (channel 0, un-normalised)."""
    value = normalised[0].numpy() * processor.image_std[0] + processor.image_mean[0]
    return np.clip(np.round(value * 255.0), 0, 255).astype(np.uint8)


def _job(job):
    import torch
    from PIL import Image

    from qilin_med_vl.synthetic.dataset import _save_png, generate_record

    torch.set_num_threads(1)
    plan, config, output_dir = job
    record, images = generate_record(plan, config)
    processor = _image_processor()
    lows, highs = [], []
    for relative, image in zip(record["images"], images):
        _save_png(os.path.join(output_dir, relative), image)
        out = processor([Image.fromarray(image).convert("RGB")], return_tensors="pt")
        lows.append(_to_uint8(out["pixel_values"][0], processor))
        highs.append(_to_uint8(out["high_res_pixel_values"][0], processor))
    return json.dumps(record, ensure_ascii=False), lows, highs


def flake_pair_plans(first_index, count):
    """`count` comparative flake plans of the training split from record `first_index` on: the changes a flake
    can show without an implant in turn, sides alternating, bones swapping every second pair of changes."""
    from qilin_med_vl.synthetic.dataset import RecordPlan
    from qilin_med_vl.synthetic.findings import CHANGES

    changes = [c for c in CHANGES if c != "postop"]
    return [RecordPlan("train", first_index + i, "comparative", changes[i % len(changes)], "flake",
                       (i // len(changes)) % 2, ("femur", "tibia")[(i // (2 * len(changes))) % 2])
            for i in range(count)]


def cache_split(out, name, plans, config, pool):
    """Render `plans`, write `<name>.jsonl`, their PNGs and `cache/<name>.npz` under `out`."""
    jobs = [(plan, config, str(out)) for plan in plans]
    results = pool.imap(_job, jobs, chunksize=4) if pool else map(_job, jobs)
    lines, low, high, record_index, view_index, boxes, kinds = [], [], [], [], [], [], []
    for index, (line, lows, highs) in enumerate(results):
        lines.append(line)
        record = json.loads(line)
        for view, (lo, hi) in enumerate(zip(lows, highs)):
            low.append(lo)
            high.append(hi)
            record_index.append(index)
            view_index.append(view)
            found = record["meta"]["findings"][view]
            box = np.full((3, 4), -1, np.int16)
            kind = np.zeros(3, np.int8)
            for slot, finding in enumerate(found[:3]):
                box[slot] = finding["box"]
                kind[slot] = KINDS.index(finding["kind"])
            boxes.append(box)
            kinds.append(kind)
        if (index + 1) % 200 == 0:
            print(f"{name}: {index + 1}/{len(plans)}", flush=True)
    (out / f"{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    np.savez(out / "cache" / f"{name}.npz", low=np.stack(low), high=np.stack(high),
             record=np.array(record_index), view=np.array(view_index), boxes=np.stack(boxes),
             kinds=np.stack(kinds))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="runs/demo/data")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--train", type=int, default=2400)
    parser.add_argument("--validation", type=int, default=200)
    parser.add_argument("--test", type=int, default=400)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--train-pairs", type=int, default=0,
                        help="also write N more comparative flake training records (train_pairs.jsonl)")
    parser.add_argument("--pairs-start", type=int, default=None,
                        help="the first of them (default --train); with --train 0 --validation 0 --test 0, a set "
                             "of pairs apart from every training record, such as a held-out set for pair_probe.py")
    parser.add_argument("--only-task", nargs="+", default=None, help="render only the records of these tasks")
    parser.add_argument("--only-kind", nargs="+", default=None,
                        help="render only the records of these finding kinds (disease labels, e.g. flake normal)")
    args = parser.parse_args()

    from qilin_med_vl.synthetic.dataset import GENERATOR_VERSION, SynthConfig, plan_split

    out = Path(args.output)
    (out / "cache").mkdir(parents=True, exist_ok=True)
    counts = {"train": args.train, "validation": args.validation, "test": args.test}
    config = SynthConfig(seed=args.seed, counts=counts)
    pool = multiprocessing.get_context("fork").Pool(args.workers) if args.workers > 1 else None
    for split, count in counts.items():
        if count and not (out / "cache" / f"{split}.npz").is_file():
            plans = [p for p in plan_split(split, count, args.seed)
                     if (args.only_task is None or p.task in args.only_task)
                     and (args.only_kind is None or p.kind in args.only_kind)]
            cache_split(out, split, plans, config, pool)
    first = args.train if args.pairs_start is None else args.pairs_start
    if args.train_pairs and not (out / "cache" / "train_pairs.npz").is_file():
        cache_split(out, "train_pairs", flake_pair_plans(first, args.train_pairs), config, pool)
    if pool:
        pool.close()
        pool.join()
    manifest = {"generator": "qilin_med_vl.synthetic", "generator_version": GENERATOR_VERSION, "seed": args.seed,
                "counts": counts, "cache_sizes": {"low": LOW_SIZE, "high": HIGH_SIZE}}
    if args.only_task or args.only_kind:
        manifest["only"] = {"tasks": args.only_task, "kinds": args.only_kind}
    if args.train_pairs:
        manifest["train_pairs"] = {"records": args.train_pairs, "first_index": first}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
