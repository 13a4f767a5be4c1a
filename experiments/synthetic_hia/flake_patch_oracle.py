"""Diagnostic: is a small flake in the 672-px data at all, for a model with no stride before it looks?

    python experiments/synthetic_hia/flake_patch_oracle.py --run runs/demo --steps 800

A patch test that takes HiA's encoder out of the question. Positives: `--patch`-px windows of the cached 672-px
images, centred on a flake's box (images whose only finding is one flake of `--size`), jittered by up to
`--jitter` px in training. Negatives: the same window coordinates in a random normal image, so both classes come
from the same places on the knee. The classifier is a small all-stride-1 CNN (3x3 convs, two 2x2 max-pools, a
global max-pool). `--offset` moves every window (positive and negative) that many px away from the flake: the
control for anything but the flake itself that tells flake images from normal ones (it should stay near 0.5).
Reports the validation AUC (every positive against every negative). Writes `<name>.json` under `--out`.
"""

import argparse
import json
import time
from pathlib import Path

import demo_pipeline as dp
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

torch.set_num_threads(1)


def batch(split, wins, normals, patch, jitter, rng, count):
    """`dp.window_pairs` as (2 count, 1, P, P) float, normalised for this one-channel classifier."""
    crops, labels = dp.window_pairs(split, wins, normals, patch, jitter, rng, count)
    return (crops.float().div(255.0).unsqueeze(1) - 0.5) / 0.25, labels


def classifier(width):
    def block(i, o):
        return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]

    return nn.Sequential(*block(1, width), *block(width, width), nn.MaxPool2d(2), *block(width, 2 * width),
                         nn.MaxPool2d(2), *block(2 * width, 2 * width), nn.AdaptiveMaxPool2d(1), nn.Flatten(),
                         nn.Linear(2 * width, 1))


@torch.no_grad()
def evaluate(model, split, wins, normals, patch):
    """Every positive window against the same window in every normal image (no jitter, no flips)."""
    model.eval()
    positives, negatives = [], []
    for i, cx, cy in wins:
        positives.append(model(batch_of(split, [i], cx, cy, patch)).item())
        negatives += model(batch_of(split, normals, cx, cy, patch)).flatten().tolist()
    model.train()
    return dp.auc_score(np.array(positives), np.array(negatives)), len(positives), len(negatives)


def batch_of(split, images, cx, cy, patch):
    x = torch.stack([dp.cut(split.high, i, cx, cy, patch) for i in images]).float().div(255.0).unsqueeze(1)
    return (x - 0.5) / 0.25


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/demo")
    parser.add_argument("--out", default=None, help="folder for the outputs (default: --run)")
    parser.add_argument("--size", choices=("small", "large"), default="small")
    parser.add_argument("--patch", type=int, default=32)
    parser.add_argument("--jitter", type=float, default=6.0)
    parser.add_argument("--offset", type=float, default=0.0)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch-size", type=int, default=32, help="positives per step (as many negatives)")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--eval-every", type=int, default=200)
    parser.add_argument("--full-images", action="store_true",
                        help="also score whole 672-px validation images (the CNN is convolutional up to its global "
                             "max-pool): AUC of `--size` flake images against normal ones, the task HiA's probe has")
    parser.add_argument("--name", default="flake_patch_oracle")
    args = parser.parse_args()
    torch.manual_seed(0)
    rng = np.random.default_rng(7000)
    run = Path(args.run)
    out = Path(args.out) if args.out else run
    out.mkdir(parents=True, exist_ok=True)
    train, validation = dp.Split(run / "data", "train"), dp.Split(run / "data", "validation")
    wins = {s.name: dp.flake_windows(s, (args.size,), args.offset, rng) for s in (train, validation)}
    normals = {s.name: np.flatnonzero([s.finding_key(i) == "normal" for i in range(len(s.high))])
               for s in (train, validation)}
    dp.log("config", vars(args), {k: (len(wins[k]), len(normals[k])) for k in wins})
    model = classifier(args.width)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    history, start = [], time.time()
    for step in range(1, args.steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = dp.cosine_lr(step - 1, args.steps, args.lr, 50)
        x, y = batch(train, wins["train"], normals["train"], args.patch, args.jitter, rng, args.batch_size)
        flip = torch.from_numpy(rng.uniform(size=len(x)) < 0.5)
        x[flip] = x[flip].flip(-1)
        loss = F.binary_cross_entropy_with_logits(model(x).flatten(), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0:
            dp.log(f"oracle step {step}/{args.steps} loss {loss.item():.4f} {(time.time() - start) / 50:.3f} s/step")
            start = time.time()
        if step % args.eval_every == 0 or step == args.steps:
            auc, n_pos, n_neg = evaluate(model, validation, wins["validation"], normals["validation"], args.patch)
            history.append({"step": step, "auc": auc, "positives": n_pos, "negatives": n_neg})
            dp.log(history[-1])
    result = {"config": vars(args), "history": history}
    if args.full_images:
        model.eval()
        with torch.no_grad():
            score = {i: model(batch_of(validation, [i], dp.HIGH / 2, dp.HIGH / 2, dp.HIGH)).item()
                     for i in [w[0] for w in wins["validation"]] + list(normals["validation"])}
        positive = np.array([score[w[0]] for w in wins["validation"]])
        result["full_image_auc"] = dp.auc_score(positive, np.array([score[i] for i in normals["validation"]]))
        dp.log("full-image AUC", result["full_image_auc"])
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
