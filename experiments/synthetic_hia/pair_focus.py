"""Diagnostic: can the frozen language model be made to say 加重 for a small flake that grew?

    python experiments/synthetic_hia/pair_focus.py --run runs/demo --steps 300
    python -m qilin_med_vl.cli evaluate --model runs/demo/base --adapter runs/demo/pair_focus \
        --data runs/demo/pair_focus_train_pairs.jsonl --image-root runs/demo/data \
        --output-dir runs/demo/eval_pair_focus
    python experiments/synthetic_hia/pair_focus.py --tally runs/demo/pair_focus_train_pairs.jsonl \
        runs/demo/eval_pair_focus/predictions.jsonl

Starts from the trained HiA adapter (`<run>/HiA.ckpt`), language model frozen as in the HiA stage, and trains it on
the comparative flake pairs of the training split only (small and large, post-operative ones left out: improved /
worsened / unchanged) for `--steps` batches, from a fresh optimiser with a 20-step warm-up and a cosine decay. Saves
the adapter to `<run>/<name>/` and writes the training split's small-flake pairs to `<run>/<name>_train_pairs.jsonl`,
so that `qilin-med-vl evaluate` can score them as it scores any split. `--tally DATA PREDICTIONS` prints, per true
change, which changes the answers name. Nothing downstream reads these outputs.
"""

import argparse
import json
from collections import Counter
from pathlib import Path

import demo_pipeline as dp
import numpy as np
import torch

from qilin_med_vl.synthetic.findings import CHANGE_NAMES


def tally(data_path, predictions_path):
    """Rows: the true change; columns: the changes an answer names (none, one, or several)."""
    records = {r["id"]: r for r in map(json.loads, Path(data_path).read_text("utf-8").splitlines())}
    counts = Counter()
    for prediction in map(json.loads, Path(predictions_path).read_text("utf-8").splitlines()):
        named = [c for c, word in CHANGE_NAMES.items() if word in prediction["prediction"]]
        counts[records[prediction["id"]]["meta"]["change"], "+".join(named) or "none"] += 1
    for (truth, named), count in sorted(counts.items()):
        print(f"{truth:>10} -> {named:<10} {count}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/demo")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=12)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--name", default="pair_focus")
    parser.add_argument("--tally", nargs=2, metavar=("DATA", "PREDICTIONS"))
    args = parser.parse_args()
    if args.tally:
        tally(*args.tally)
        return
    args.save_every = args.steps + 1  # run_steps' checkpoints: none, this is a few minutes
    run = Path(args.run)
    train = dp.Split(run / "data", "train", load_high=False)
    features = torch.load(run / "features_train.pt")["672"]
    grid = int(features.shape[1] ** 0.5)
    model, owner = dp.hia_model(run, "HiA", "sincos")
    trained = [p for p in model.parameters() if p.requires_grad]
    dp.load_checkpoint(run / "HiA.ckpt", {"model": model}, torch.optim.AdamW(trained))  # the adapter's weights
    optimizer = torch.optim.AdamW(trained, lr=args.lr, weight_decay=0.0)
    pairs = dp.flake_pairs(train.records)
    cached = [i for i in pairs if train.images_of[i][-1] < len(features)]
    dp.log(f"{len(cached)} flake pairs with cached features of {len(pairs)}")
    batcher = dp.Batcher(dp.load_processor(run), train)
    current = {}
    owner.encode = lambda pixels: (current["features"], (grid, grid))  # the frozen encoder's cached output
    rng = np.random.default_rng(7)
    model.train()
    owner.encoder.eval()

    def compute_loss():
        batch, images = batcher(rng.choice(cached, args.batch_size))
        current["features"] = features[images].float()
        batch["high_res_pixel_values"] = torch.zeros(len(images), 3, 1, 1)
        return model(**batch).loss

    dp.run_steps(args.name, args, 0, optimizer, trained, run / f"{args.name}.ckpt", {"model": model}, compute_loss,
                 warmup=20)
    del owner.encode
    model.eval()
    model.save_pretrained(run / args.name)
    dp.write_small_flake_pairs(train.records, run / f"{args.name}_train_pairs.jsonl")


if __name__ == "__main__":
    main()
