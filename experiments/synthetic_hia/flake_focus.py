"""Diagnostic: can HiA's 672-px encoder learn flakes when they are all it is asked about?

    python experiments/synthetic_hia/flake_focus.py --run runs/demo --steps 400

Starts from the warmed encoder (`vision_high.pt`), fine-tunes it on the flake channel only (dense BCE with
`--pos-weight` + BCE on the max over cells), batches of half flake images (a crop around the flake with probability
0.9) and half normal images, 320-px crops on the stride grid, and logs the validation AUC (max-pooled flake score,
small / large flakes against normal images) every `--eval-every` steps. Writes `flake_focus.pt` and
`flake_focus.json` (`--name`, under `--out`); nothing downstream reads them.

Encoder variants for the small-flake diagnostic (`results/flake_diagnostic.md`): `--init scratch` starts from random
weights; `--stem resnet` is ResNet's stem, `s2|s1` removes its max-pool (and, for s1, its stride; see
`build_variant`); `--width` sets the trunk width (scratch only). The defaults are the demo's encoder as the pipeline
builds it (`--stem pipeline`: the full-resolution stem since the flake diagnostic), warmed, as above.
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


def build_variant(stem, width):
    if stem == "pipeline":
        return dp.build_encoder()
    return build_resnet_variant(stem, width)


def build_resnet_variant(stem, width):
    """The HiA encoder with its stem changed (built here, the package is untouched). `resnet`: the package's
    7x7 stride-2 conv + 3x3 stride-2 max-pool (stride 4); `s2`: the same conv, no max-pool (stride 2); `s1`: a 3x3
    stride-1 conv, no max-pool (stride 1). The lost stride is given back by a max-pool after the last stage, so the
    output grid (overall stride 32: 21 x 21 cells at 672 px, 10 x 10 on a 320-px crop) and the head are unchanged."""
    from qilin_med_vl.modeling.high_resolution_encoder_hia import HighResolutionEncoder

    class Variant(HighResolutionEncoder):
        def __init__(self, stem, **kwargs):
            super().__init__(stem="resnet", **kwargs)
            self.tail = nn.Identity()
            if stem != "resnet":
                self.maxpool = nn.Identity()
                self.tail = nn.MaxPool2d(2 if stem == "s2" else 4, ceil_mode=True)
            if stem == "s1":
                self.conv1 = nn.Conv2d(3, self.width, kernel_size=3, stride=1, padding=1, bias=False)
                nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")

        def forward_features(self, pixel_values):
            return self.tail(super().forward_features(pixel_values))

    torch.manual_seed(0)
    return Variant(stem, output_dim=dp.HIA_KWARGS["hidden_size"], depths=dp.HIA_KWARGS["encoder_depths"],
                   width=width)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/demo")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--crop", type=int, default=320)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--pos-weight", type=float, default=10.0)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--name", default="flake_focus", help="output files: <name>.pt, <name>.json")
    parser.add_argument("--out", default=None, help="folder for the outputs (default: --run)")
    parser.add_argument("--init", choices=("warm", "scratch"), default="warm",
                        help="warm: start from <run>/vision_high.pt (same weights; with --stem s2 the trunk then "
                             "runs at twice the resolution it was trained at); scratch: random")
    parser.add_argument("--stem", choices=("pipeline", "resnet", "s2", "s1"), default="pipeline",
                        help="see build_variant")
    parser.add_argument("--width", type=int, default=dp.HIA_KWARGS["encoder_width"])
    args = parser.parse_args()
    torch.manual_seed(0)
    run = Path(args.run)
    train, validation = dp.Split(run / "data", "train"), dp.Split(run / "data", "validation")
    out = Path(args.out) if args.out else run
    out.mkdir(parents=True, exist_ok=True)
    if args.stem == "pipeline" and args.width != dp.HIA_KWARGS["encoder_width"]:
        parser.error("--width applies to the ResNet-stem variants (--stem resnet|s2|s1); the pipeline's is fixed")
    if args.init == "warm" and (args.stem == "s1" or args.width != dp.HIA_KWARGS["encoder_width"]):
        # resnet / s2 fit a vision_high.pt from the pipeline before its full-resolution stem (the diagnostic's runs)
        parser.error("--init warm needs the parameter shapes of <run>/vision_high.pt (not s1, the default width)")
    probe = dp.HighResProbe(build_variant(args.stem, args.width), dp.HIA_KWARGS["hidden_size"], channels_last=True)
    if args.init == "warm":
        probe.load_state_dict(torch.load(run / "vision_high.pt"))
    dp.log("config", vars(args), "parameters", sum(p.numel() for p in probe.parameters()))
    optimizer = torch.optim.AdamW(probe.parameters(), lr=args.lr, weight_decay=0.05)
    rng = np.random.default_rng(5000)
    flakes = np.flatnonzero([(k == 1).any() for k in train.kinds])
    normals = np.flatnonzero((train.kinds == 0).all(1))
    size, crop, stride = 672, args.crop, 32
    scale, slots = size / dp.REFERENCE, (size - crop) // stride
    history = [{"step": 0, **dp.flake_auc(probe, validation)}]
    dp.log("start", history[-1])
    probe.train()
    start = time.time()
    for step in range(1, args.steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = dp.cosine_lr(step - 1, args.steps, args.lr, 30)
        index = [rng.choice(flakes if i % 2 == 0 else normals) for i in range(args.batch_size)]
        crops, dense = [], []
        for i in index:
            boxes = [b for b, k in zip(train.boxes[i], train.kinds[i]) if k == 1]
            if boxes and rng.uniform() < 0.9:
                x0, y0, x1, y1 = np.array(boxes[rng.integers(len(boxes))]) * scale
                ox = rng.uniform(x0, x1) - rng.uniform(0.1, 0.9) * crop
                oy = rng.uniform(y0, y1) - rng.uniform(0.1, 0.9) * crop
                ox, oy = (int(np.clip(round(v / stride), 0, slots)) * stride for v in (ox, oy))
            else:
                ox, oy = (int(v) * stride for v in rng.integers(0, slots + 1, 2))
            crops.append(train.high[i, oy : oy + crop, ox : ox + crop])
            dense.append(dp.lesion_map(train.boxes[i], train.kinds[i], crop // stride, origin=(ox / scale, oy / scale),
                                       extent=crop / scale)[0])
        flip = torch.from_numpy(rng.uniform(size=args.batch_size) < 0.5)
        crops, dense = torch.stack(crops), torch.stack(dense)
        crops[flip], dense[flip] = crops[flip].flip(-1), dense[flip].flip(-1)
        gain = torch.from_numpy(rng.uniform(0.9, 1.1, args.batch_size)).float()
        offset = torch.from_numpy(rng.uniform(-0.05, 0.05, args.batch_size)).float()
        logits = probe(dp.normalise(crops, gain, offset))[:, 0]  # the flake channel
        loss = F.binary_cross_entropy_with_logits(logits, dense, pos_weight=torch.tensor(args.pos_weight))
        loss = loss + F.binary_cross_entropy_with_logits(logits.flatten(1).amax(-1), dense.flatten(1).amax(-1))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(probe.parameters(), 1.0)
        optimizer.step()
        if step % 25 == 0:
            seconds = (time.time() - start) / 25
            dp.log(f"flake-focus step {step}/{args.steps} loss {loss.item():.4f} {seconds:.2f} s/step")
            start = time.time()
        if step % args.eval_every == 0:
            history.append({"step": step, **dp.flake_auc(probe, validation)})
            dp.log(history[-1])
            probe.train()
    torch.save(probe.state_dict(), out / f"{args.name}.pt")
    (out / f"{args.name}.json").write_text(json.dumps(history, indent=2) + "\n")


if __name__ == "__main__":
    main()
