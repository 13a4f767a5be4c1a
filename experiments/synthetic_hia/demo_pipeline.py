"""Train the embedded demo model on CPU: vision warm-up first, then the language stages, then HiA and its ablations.

    python experiments/synthetic_hia/demo_pipeline.py STAGE --run runs/demo [options]

Stages, in order (each writes into `--run` and is skipped when its output exists, so a killed run resumes; the
long loops also checkpoint every `--save-every` steps):

    vision      the CLIP tower alone at 112 px: a dense lesion map (per patch token and finding kind, BCE with
                pos_weight 20) plus image-level finding kinds (max over tokens), flips and exposure jitter; with
                `--column-aux`, every token also learns its own column (the two knees are mirror images: without
                it the tokens barely tell the image's halves apart, and no answer can name the side);
    hr-encoder  HiA's high-resolution encoder alone at 672 px (with `--stem-warmup`, its full-resolution stem
                first tells flake windows from the same windows of normal knees), on 320-px crops placed on its
                stride grid, the same dense + image-level loss, batches of 1/3 flake images, 1/3 normal images
                (hard negatives), 1/3 others, half the finding images' crops random (often finding-free), flakes
                large-to-small; with `--amount-aux`, a second head also regresses each finding's log severity on
                its cells (run H: 400 more steps from the first encoder, `--encoder-from`, flakes only);
    controls    vision-only accuracy by finding and lesion size on validation and test, low vs high resolution;
    controls-auc  the same without a threshold: AUC of each finding against normal images (validation);
    tower-columns  how much horizontal position the tower's tokens keep (a linear probe of the image half);
    controls-pairs  vision-only control of the comparative row: how a flake changed, told from the probes' flake
                maps of a pair's two images (a logistic regression fitted on training pairs);
    features    the warmed encoder's grid features at 672 px and at 112 px (the "w/o HR" input) of the first
                `--feature-records` training records (default all), cached: the encoder stays frozen in the HiA
                stage, which trains on the records the cache holds;
    base        instruction tuning of projector + language model on all four tasks, the warmed tower frozen
                (`--side-aux`: every projected token also tells the side of a finding in its cell);
    hia         the HiA blocks (encoder frozen and warmed), three variants: HiA, HiA_wo_IA, HiA_wo_HR
                (`--feature-positions sincos`: HiA's own position codes on the high-resolution grid;
                `--flake-pair-weight`: small-flake comparative records drawn more often);
    pointing    the pointing game: HiA's extractor attention inside the finding's box on the high-res grid;
    examples    the shipped single-image examples (normal, post-operative, osteophyte) and `gallery.jsonl`.

Data come from `data_cache.py` (uint8 arrays of the image processor's own views, so no image is decoded or
resized during training). The package's `evaluate` command scores the result on the PNG test split end to end
(`reproduce_demo.sh`). Hyper-parameters were fixed on the validation split.
"""

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

torch.set_num_threads(1)

KINDS = ("none", "flake", "fracture", "osteophyte", "narrowing", "implant")
NUM_KINDS = len(KINDS) - 1  # channels of the lesion map: one per finding kind
REFERENCE = 1024
CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
HIA_KWARGS = dict(num_queries=32, num_heads=4, hidden_size=128, encoder_depths=[1, 1, 1, 1], encoder_width=16,
                  encoder_stem="full_resolution", layers=[0, 1, 2])  # runs D-F: [1, 2]
HIGH = 672  # side of the high-resolution view
VARIANTS = {"HiA": dict(high_res_size=672, instruction_aware=True),
            "HiA_wo_IA": dict(high_res_size=672, instruction_aware=False),
            "HiA_wo_HR": dict(high_res_size=112, instruction_aware=True)}


def log(*args):
    print(time.strftime("%H:%M:%S"), *args, flush=True)


# --- data ---------------------------------------------------------------------------------------------------------


class Split:
    """One cached split: records and per-image arrays (see data_cache.py)."""

    def __init__(self, data_dir, name, load_high=True):
        self.name = name
        self.records = [json.loads(line) for line in (Path(data_dir) / f"{name}.jsonl").read_text("utf-8").splitlines()]
        cache = np.load(Path(data_dir) / "cache" / f"{name}.npz")
        self.low = torch.from_numpy(cache["low"])
        self.high = torch.from_numpy(cache["high"]) if load_high else None
        self.record, self.view = cache["record"], cache["view"]
        self.boxes, self.kinds = cache["boxes"].astype(np.float32), cache["kinds"].astype(np.int64)
        # images of record i, in order
        self.images_of = [[] for _ in self.records]
        for image, record in enumerate(self.record):
            self.images_of[record].append(image)

    def extend(self, other):
        """Append another cached split's records and images (image and record indices of `other` shift by this
        split's counts)."""
        first_image, first_record = len(self.record), len(self.records)
        self.records = self.records + other.records
        self.low = torch.cat([self.low, other.low])
        self.high = None if self.high is None or other.high is None else torch.cat([self.high, other.high])
        self.record = np.concatenate([self.record, other.record + first_record])
        self.view = np.concatenate([self.view, other.view])
        self.boxes, self.kinds = np.concatenate([self.boxes, other.boxes]), np.concatenate([self.kinds, other.kinds])
        self.images_of = self.images_of + [[first_image + i for i in images] for images in other.images_of]

    def finding_key(self, image):
        """normal / flake (small|large) / fracture / ... / implant+X, for the controls table."""
        found = self.records[self.record[image]]["meta"]["findings"][self.view[image]]
        if not found:
            return "normal"
        keys = []
        for f in found:
            keys.append(f"flake ({f.get('size_class', 'small')})" if f["kind"] == "flake" else f["kind"])
        return "+".join(sorted(keys))


def normalise(uint8_images, gain=None, offset=None):
    """(N, S, S) uint8 -> (N, 3, S, S) CLIP-normalised float, optionally with exposure jitter."""
    x = uint8_images.float().div(255.0).unsqueeze(1)
    if gain is not None:
        x = (x * gain.view(-1, 1, 1, 1) + offset.view(-1, 1, 1, 1)).clamp(0, 1)
    return ((x - CLIP_MEAN) / CLIP_STD).contiguous()


def lesion_map(boxes, kinds, grid, origin=(0.0, 0.0), extent=float(REFERENCE), flip=False, values=None):
    """(NUM_KINDS, grid, grid) float target: 1 (or the box's entry of `values`) where the cell overlaps a box of that
    kind. `origin`/`extent` give the window (in 1024-px coordinates) that the grid covers."""
    target = torch.zeros(NUM_KINDS, grid, grid)
    cell = extent / grid
    for slot, (box, kind) in enumerate(zip(boxes, kinds)):
        if kind <= 0:
            continue
        x0, y0, x1, y1 = box
        if flip:
            x0, x1 = REFERENCE - x1, REFERENCE - x0
        c0 = math.floor((x0 - origin[0]) / cell)
        c1 = math.ceil((x1 - origin[0]) / cell)
        r0 = math.floor((y0 - origin[1]) / cell)
        r1 = math.ceil((y1 - origin[1]) / cell)
        c0, r0, c1, r1 = max(c0, 0), max(r0, 0), min(c1, grid), min(r1, grid)
        if c1 > c0 and r1 > r0:
            target[kind - 1, r0:r1, c0:c1] = 1.0 if values is None else float(values[slot])
    return target


def finding_amounts(split):
    """(images, 3) log severity (`SEVERITY`) of each image's findings in the cache's box slots; 0 where a slot is
    empty or its kind has no scale (implants)."""
    amounts = np.zeros(split.kinds.shape, np.float32)
    for image in range(len(split.kinds)):
        findings = split.records[split.record[image]]["meta"]["findings"][split.view[image]]
        for slot, finding in enumerate(findings[:3]):
            if finding["kind"] in SEVERITY:
                amounts[image, slot] = math.log(SEVERITY[finding["kind"]](finding))
    return amounts


def flake_windows(split, size_classes=("small", "large"), offset=0.0, rng=None):
    """(image, centre x, centre y) at 672 px for each image whose only finding is one flake of `size_classes`;
    `offset` moves each centre that many px in a random direction drawn from `rng` (a control: off the flake)."""
    out, scale = [], HIGH / REFERENCE
    keys = {f"flake ({size})" for size in size_classes}
    for i in range(len(split.high)):
        if split.finding_key(i) not in keys:
            continue
        boxes = [b for b, k in zip(split.boxes[i], split.kinds[i]) if k == 1]
        x0, y0, x1, y1 = np.array(boxes[0]) * scale
        angle = rng.uniform(0, 2 * np.pi) if rng is not None else 0.0
        out.append((i, (x0 + x1) / 2 + offset * np.cos(angle), (y0 + y1) / 2 + offset * np.sin(angle)))
    return out


def cut(images, i, cx, cy, patch):
    """The `patch`-px window of 672-px image `i` centred on (cx, cy), moved inside the image."""
    x = int(np.clip(round(cx - patch / 2), 0, HIGH - patch))
    y = int(np.clip(round(cy - patch / 2), 0, HIGH - patch))
    return images[i, y : y + patch, x : x + patch]


def window_pairs(split, windows, normals, patch, jitter, rng, count):
    """`count` flake windows (a random entry of `windows`, jittered by up to `jitter` px) each followed by the same
    window of a random normal image: (2 count, P, P) uint8 crops and their 1/0 labels."""
    crops, labels = [], []
    for _ in range(count):
        i, cx, cy = windows[rng.integers(len(windows))]
        cx, cy = cx + rng.uniform(-jitter, jitter), cy + rng.uniform(-jitter, jitter)
        crops += [cut(split.high, i, cx, cy, patch), cut(split.high, rng.choice(normals), cx, cy, patch)]
        labels += [1.0, 0.0]
    return torch.stack(crops), torch.tensor(labels)


SEGMENTS = ("股骨", "胫骨", "间隙")  # femur, tibia, joint space: the bone part a location names
SIDES = ("右侧", "左侧")
# One scale per kind for "how much finding" (None: no severity), so that a pair's change is a difference of numbers
SEVERITY = {"flake": lambda f: f["diameter_px"] * f["strength"] / 10, "fracture": lambda f: f["line_width_px"] / 3,
            "osteophyte": lambda f: f["spur_length_px"] / 15, "narrowing": lambda f: f["medial_gap_px"] / 15}


def finding_answer(findings):
    """An image's findings as the answers read them: a `(NUM_KINDS * 2 * 3,)` multi-hot of (kind, side, segment)
    and `(NUM_KINDS,)` severities with their `(NUM_KINDS,)` mask (1 where the kind is present and has a scale)."""
    present = torch.zeros(NUM_KINDS, len(SIDES), len(SEGMENTS))
    severity, mask = torch.zeros(NUM_KINDS), torch.zeros(NUM_KINDS)
    for finding in findings:
        kind = KINDS.index(finding["kind"]) - 1
        segment = next(i for i, name in enumerate(SEGMENTS) if name in finding["location"])
        present[kind, SIDES.index(finding["side"]), segment] = 1.0
        if finding["kind"] in SEVERITY:
            severity[kind], mask[kind] = SEVERITY[finding["kind"]](finding), 1.0
    return present.flatten(), severity, mask


def image_kinds(kinds):
    target = torch.zeros(NUM_KINDS)
    for kind in kinds:
        if kind > 0:
            target[kind - 1] = 1.0
    return target


def cosine_lr(step, total, base, warmup):
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def save_checkpoint(path, step, modules, optimizer):
    tmp = str(path) + ".tmp"
    torch.save({"step": step, "modules": {k: m.state_dict() for k, m in modules.items()},
                "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state()}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, modules, optimizer):
    if not Path(path).is_file():
        return 0
    state = torch.load(path, weights_only=False)
    for k, m in modules.items():
        m.load_state_dict(state["modules"][k])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    log(f"resumed {path} at step {state['step']}")
    return state["step"]


def run_steps(name, args, step, optimizer, params, checkpoint, modules, compute_loss, warmup=50, log_every=25):
    """The loop every training stage shares, from `step` (resumed from `checkpoint`) to `args.steps`:
    `compute_loss()` builds the next batch and returns its loss; the learning rate follows `cosine_lr` with `warmup`
    steps; gradients are clipped to norm 1; a log line every `log_every` steps and a resumable checkpoint of
    `modules` every `args.save_every` steps."""
    start = time.time()
    while step < args.steps:
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, args.steps, args.lr, warmup) * group.get("lr_scale", 1.0)
        loss = compute_loss()
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        step += 1
        if step % log_every == 0:
            seconds = (time.time() - start) / log_every
            log(f"{name} step {step}/{args.steps} loss {loss.item():.4f} {seconds:.2f} s/step")
            start = time.time()
        if step % args.save_every == 0:
            save_checkpoint(checkpoint, step, modules, optimizer)


# --- vision warm-up -------------------------------------------------------------------------------------------------


class LowResProbe(nn.Module):
    """The CLIP tower's patch tokens (hidden_states[-2], the features the projector reads) -> lesion map logits."""

    def __init__(self, tower, hidden):
        super().__init__()
        self.tower = tower
        self.head = nn.Linear(hidden, NUM_KINDS)

    def tokens(self, pixel_values):
        """(N, 3, 112, 112) -> the patch tokens the projector reads, (N, 64, C)."""
        return self.tower(pixel_values, output_hidden_states=True).hidden_states[-2][:, 1:]

    def forward(self, pixel_values, return_tokens=False):
        """Lesion-map logits (N, NUM_KINDS, 8, 8); with `return_tokens`, also the tokens they were read from."""
        hidden = self.tokens(pixel_values)
        grid = int(hidden.shape[1] ** 0.5)
        logits = self.head(hidden).transpose(1, 2).reshape(len(hidden), NUM_KINDS, grid, grid)
        return (logits, hidden) if return_tokens else logits


class HighResProbe(nn.Module):
    """HiA's encoder -> lesion-map logits (N, NUM_KINDS, gh, gw); with `amounts`, a second linear head reads from the
    same features how much of each kind a cell holds (log severity, `SEVERITY`), so that a pair's change (a flake
    grown 1.5-2x inside one cell) is in the features HiA reads, not only whether a cell holds a finding."""

    def __init__(self, encoder, hidden, channels_last=False, amounts=False):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(hidden, NUM_KINDS)
        self.amount_head = nn.Linear(hidden, NUM_KINDS) if amounts else None
        self.channels_last = channels_last
        if channels_last:  # about 1.4x faster convolutions on CPU; the same weights and state dict
            self.encoder.to(memory_format=torch.channels_last)

    def forward(self, pixel_values, return_amounts=False):
        """Lesion-map logits; with `return_amounts` (needs the amount head), also the amounts, the same shape."""
        if self.channels_last:
            pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
        features, (gh, gw) = self.encoder(pixel_values, return_grid_size=True)
        grid = lambda x: x.transpose(1, 2).reshape(len(features), NUM_KINDS, gh, gw)  # noqa: E731
        logits = grid(self.head(features))
        return (logits, grid(self.amount_head(features))) if return_amounts else logits


def load_high_probe(path, encoder=None, channels_last=True):
    """A saved `HighResProbe` (the amount head built when the file has one) on `encoder` (default a new one)."""
    state = torch.load(path)
    probe = HighResProbe(encoder if encoder is not None else build_encoder(), HIA_KWARGS["hidden_size"],
                         channels_last=channels_last, amounts=any(k.startswith("amount_head.") for k in state))
    probe.load_state_dict(state)
    return probe


def probe_loss(logits, dense_target, kinds_target, pos_weight=20.0):
    """Dense BCE on the lesion map (positive cells weighted `pos_weight`) plus BCE on the image-level kinds from
    the max over cells, the pooling every control and prediction uses."""
    dense = F.binary_cross_entropy_with_logits(logits, dense_target,
                                               pos_weight=torch.full((NUM_KINDS, 1, 1), pos_weight))
    pooled = logits.flatten(2).amax(-1)  # (N, NUM_KINDS): is there a finding of this kind anywhere
    return dense + F.binary_cross_entropy_with_logits(pooled, kinds_target)


def predict_kind(logits):
    """Image-level prediction: the most likely kind if its pooled probability exceeds 0.5, else none (0)."""
    pooled = logits.flatten(2).amax(-1).sigmoid()
    best = pooled.argmax(-1)
    return torch.where(pooled.max(-1).values > 0.5, best + 1, torch.zeros_like(best))


def init_model(run):
    from demo_builder import build_demo_base_model

    init = Path(run) / "init"
    if not (init / "model.safetensors").is_file():
        data = Path(run) / "data"
        characters = "".join(sorted(set((data / "train.jsonl").read_text("utf-8"))))
        build_demo_base_model(init, characters=characters, seed=0)
    from qilin_med_vl.modeling.modeling_qilin_med_vl import QilinMedVLForConditionalGeneration

    return QilinMedVLForConditionalGeneration.from_pretrained(init)


def train_low_vision(args):
    run = Path(args.run)
    out = run / (args.output or "vision_low.pt")
    if out.is_file():
        return
    train = Split(run / "data", "train", load_high=False)
    model = init_model(run)
    probe = LowResProbe(model.model.vision_tower, model.config.vision_config.hidden_size)
    trained = probe.parameters()
    if args.tower_from:
        # A tower this stage already warmed up: from a model that kept it frozen afterwards (the shipped demo model),
        # or this stage's own output (`.pt`). Without --column-aux only the lesion-map head, which the controls read,
        # is fitted here, on the frozen tower.
        if args.tower_from.endswith(".pt"):  # the tower only: the head starts afresh either way
            state = torch.load(args.tower_from)
            tower = {key.removeprefix("tower."): value for key, value in state.items() if key.startswith("tower.")}
            probe.tower.load_state_dict(tower)
        else:
            from qilin_med_vl.modeling.modeling_qilin_med_vl import QilinMedVLForConditionalGeneration

            source = QilinMedVLForConditionalGeneration.from_pretrained(args.tower_from).model.vision_tower
            probe.tower.load_state_dict(source.state_dict())
        if not args.column_aux:
            probe.tower.requires_grad_(False)
            trained = probe.head.parameters()
        log(f"vision-low: tower from {args.tower_from}, " + ("tuned" if args.column_aux else "fitting the head only"))
    modules = {"probe": probe}
    column_head = None
    if args.column_aux:
        # The two knees are mirror images and the lesion map does not need absolute positions, so the warmed tower's
        # tokens barely tell the image's left half from its right (a linear probe: 63 %), and no answer can name
        # the side. Every token also learns its own column (cross-entropy over the grid's columns; the head is
        # dropped): the tower keeps the horizontal position that its position embeddings put in.
        column_head = nn.Linear(model.config.vision_config.hidden_size, 112 // 14)
        modules["column_head"] = column_head
        trained = list(probe.parameters()) + list(column_head.parameters())
    optimizer = torch.optim.AdamW(trained, lr=args.lr, weight_decay=0.05)
    ckpt = out.with_suffix(".ckpt")
    step = load_checkpoint(ckpt, modules, optimizer)
    rng = np.random.default_rng(1000 + step)
    probe.train()
    if args.tower_from and not args.column_aux:
        probe.tower.eval()
    n = len(train.low)
    columns = torch.arange(112 // 14).repeat(112 // 14)  # each token's column, row-major

    def compute_loss():
        index = rng.integers(0, n, args.batch_size)
        flip = rng.uniform(size=args.batch_size) < 0.5
        images = train.low[index].clone()
        images[flip] = images[flip].flip(-1)
        gain = torch.from_numpy(rng.uniform(0.9, 1.1, args.batch_size)).float()
        offset = torch.from_numpy(rng.uniform(-0.05, 0.05, args.batch_size)).float()
        grid = 112 // 14
        dense = torch.stack([lesion_map(train.boxes[i], train.kinds[i], grid, flip=f) for i, f in zip(index, flip)])
        kinds = torch.stack([image_kinds(train.kinds[i]) for i in index])
        pixels = normalise(images, gain, offset)
        if column_head is None:
            return probe_loss(probe(pixels), dense, kinds, args.pos_weight)
        logits, hidden = probe(pixels, return_tokens=True)
        column = F.cross_entropy(column_head(hidden).flatten(0, 1), columns.repeat(len(hidden)))
        return probe_loss(logits, dense, kinds, args.pos_weight) + args.column_aux * column

    params = [p for module in modules.values() for p in module.parameters() if p.requires_grad]
    run_steps("vision-low", args, step, optimizer, params, ckpt, modules, compute_loss, log_every=50)
    torch.save(probe.state_dict(), out)


@torch.no_grad()
def tower_columns(args):
    """How much horizontal position the warmed tower's patch tokens keep: a logistic probe (300 Adam steps on 70 % of
    the validation images' tokens) tells a token's image half from its features; held-out accuracy on the rest
    (0.5 = none). Prints it and writes `tower_columns.json`."""
    run = Path(args.run)
    validation = Split(run / "data", "validation", load_high=False)
    model = init_model(run)
    probe = LowResProbe(model.model.vision_tower, model.config.vision_config.hidden_size)
    probe.load_state_dict(torch.load(run / "vision_low.pt"))
    probe.eval()
    tokens = probe.tokens(normalise(validation.low))
    images, count, width = tokens.shape
    grid = int(count**0.5)
    left = ((torch.arange(count) % grid) < grid // 2).float().repeat(images)
    features = tokens.reshape(-1, width)
    features = (features - features.mean(0)) / (features.std(0) + 1e-6)
    fit = torch.arange(len(features)) < int(0.7 * images) * count  # whole images in each part
    weight, bias = torch.zeros(width, requires_grad=True), torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=0.05)
    with torch.enable_grad():
        for _ in range(300):
            optimizer.zero_grad()
            F.binary_cross_entropy_with_logits(features[fit] @ weight + bias, left[fit]).backward()
            optimizer.step()
    accuracy = float((((features[~fit] @ weight + bias) > 0).float() == left[~fit]).float().mean())
    (run / "tower_columns.json").write_text(json.dumps({"image_half_from_token": accuracy}) + "\n", encoding="utf-8")
    print(f"image half told from a tower token (held-out validation images): {accuracy:.3f}")


def build_encoder():
    from qilin_med_vl.modeling.high_resolution_encoder_hia import HighResolutionEncoder

    torch.manual_seed(0)
    return HighResolutionEncoder(output_dim=HIA_KWARGS["hidden_size"], depths=HIA_KWARGS["encoder_depths"],
                                 width=HIA_KWARGS["encoder_width"], stem=HIA_KWARGS["encoder_stem"])


def warm_up_stem(encoder, train, validation, steps, sizes=("small",), patch=32, jitter=6.0, batch_size=32, lr=2e-3):
    """Teach the encoder's full-resolution stem what a flake looks like before the whole encoder trains: the stem,
    a throwaway 3x3 conv and a global max-pool classify `patch`-px windows centred on a flake of `sizes`
    (jittered) against the same window of a random normal image, so both classes come from the same place on the
    knee (`flake_patch_oracle.py`'s task). About 0.03 s a step. Returns the validation AUC per flake size (every
    window against that window in every normal image; empty without a validation split)."""
    width = encoder.width
    model = nn.Sequential(encoder.stem, nn.Conv2d(width, 2 * width, 3, padding=1, bias=False),
                          nn.BatchNorm2d(2 * width), nn.ReLU(inplace=True), nn.AdaptiveMaxPool2d(1), nn.Flatten(),
                          nn.Linear(2 * width, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    rng = np.random.default_rng(2500)
    windows = flake_windows(train, sizes)
    normals = np.flatnonzero((train.kinds == 0).all(1))
    model.train()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, steps, lr, 30)
        crops, labels = window_pairs(train, windows, normals, patch, jitter, rng, batch_size)
        flip = torch.from_numpy(rng.uniform(size=len(crops)) < 0.5)
        crops[flip] = crops[flip].flip(-1)
        loss = F.binary_cross_entropy_with_logits(model(normalise(crops)).flatten(), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if (step + 1) % 50 == 0:
            log(f"stem warm-up step {step + 1}/{steps} loss {loss.item():.4f}")
    model.eval()
    result = {}
    if validation is None:  # no validation cache: nothing to report
        return result
    validation_normals = np.flatnonzero((validation.kinds == 0).all(1))
    with torch.no_grad():
        for size in ("small", "large"):
            positive, negative = [], []
            for i, cx, cy in flake_windows(validation, (size,)):
                positive.append(model(normalise(cut(validation.high, i, cx, cy, patch)[None])).item())
                crops = torch.stack([cut(validation.high, j, cx, cy, patch) for j in validation_normals])
                negative += model(normalise(crops)).flatten().tolist()
            result[f"flake ({size})"] = auc_score(np.array(positive), np.array(negative))
    return result


def train_high_vision(args):
    """HiA's encoder alone at 672 px on `--crop`-px crops (a multiple of the encoder's stride 32, placed on the
    stride grid, so a crop's cells are the full image's cells). Every batch: 1/3 flake images, 1/3 normal images
    (hard negatives), 1/3 others; a finding image gives a crop around one of its findings with probability
    `--find-prob`, otherwise a random one (often finding-free: more hard negatives, as many cells per image as the
    full 21 x 21 grid has in a 2 x 2 block). Flakes follow a large-to-small curriculum: over the first
    `--curriculum` of the steps the share of large flakes among flake draws falls from 1 to its share in the data.
    With `--eval-every`, the validation AUC (small / large flakes against normal images, max-pooled flake score on
    the full 672-px views, as `controls-auc` computes it) is logged while training."""
    run = Path(args.run)
    out = run / (args.output or "vision_high.pt")
    if out.is_file():
        return
    train = Split(run / "data", "train")
    if args.train_pairs:  # the extra comparative flake records' images too (data_cache.py --train-pairs)
        train.extend(Split(run / "data", "train_pairs"))
    encoder = build_encoder()
    if (args.stem_warmup or args.freeze_stem) and encoder.stem_type != "full_resolution":
        sys.exit("--stem-warmup and --freeze-stem need the full-resolution stem (HIA_KWARGS['encoder_stem'])")
    if args.freeze_stem and not (args.stem_warmup or args.encoder_from):
        sys.exit("--freeze-stem keeps the stem that --stem-warmup trains (or --encoder-from brings): give one")
    validation = None
    if (args.eval_every or args.stem_warmup) and (run / "data" / "cache" / "validation.npz").is_file():
        validation = Split(run / "data", "validation")
    warm_stem = run / "vision_stem.pt"
    if args.stem_warmup:
        if not warm_stem.is_file():
            auc = warm_up_stem(encoder, train, validation, args.stem_warmup, tuple(args.stem_warmup_sizes))
            log("stem warm-up validation window AUC flake vs normal: "
                + ", ".join(f"{k} {v:.3f}" for k, v in auc.items()))
            torch.save(encoder.stem.state_dict(), warm_stem)
        encoder.stem.load_state_dict(torch.load(warm_stem))
    probe = HighResProbe(encoder, HIA_KWARGS["hidden_size"], channels_last=True, amounts=args.amount_aux > 0)
    amounts = finding_amounts(train) if args.amount_aux else None
    # the lesion-map channels whose amounts are regressed: (NUM_KINDS, 1, 1) 0/1
    amount_channels = torch.tensor([float(kind in args.amount_kinds) for kind in KINDS[1:]]).view(-1, 1, 1)
    if args.encoder_from:  # a trained encoder and lesion-map head, tuned further; a new amount head starts afresh
        missing, unexpected = probe.load_state_dict(torch.load(args.encoder_from), strict=False)
        if unexpected or any(not key.startswith("amount_head.") for key in missing):
            sys.exit(f"--encoder-from {args.encoder_from} does not fit: missing {missing}, unexpected {unexpected}")
        log(f"hr-encoder: from {args.encoder_from}")
    if args.freeze_stem:
        encoder.stem.requires_grad_(False)

    def train_mode():
        probe.train()
        if args.freeze_stem:  # keep what the warm-up learnt: BatchNorm on its warm-up statistics too
            encoder.stem.eval()

    train_mode()
    optimizer = torch.optim.AdamW([p for p in probe.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.05)
    ckpt = out.with_suffix(".ckpt")
    step = load_checkpoint(ckpt, {"probe": probe}, optimizer)
    rng = np.random.default_rng(2000 + step)
    has = lambda k: np.array([(kinds == k).any() for kinds in train.kinds])  # noqa: E731
    flakes = np.flatnonzero(has(1))
    large = np.array([any(f["kind"] == "flake" and f.get("size_class") == "large"
                          for f in train.records[train.record[i]]["meta"]["findings"][train.view[i]]) for i in flakes])
    large_flakes, small_flakes = flakes[large], flakes[~large]
    normals = np.flatnonzero((train.kinds == 0).all(1))
    others = np.flatnonzero(~has(1) & ~(train.kinds == 0).all(1))
    size, crop, stride = HIGH, args.crop, 32
    assert crop % stride == 0 and crop <= size, "--crop must be a multiple of 32 and at most 672"
    scale = size / REFERENCE
    slots = (size - crop) // stride  # crop origins on the stride grid: 0, 32, ..., slots * 32
    counter = {"step": step}
    log(f"hr-encoder: {len(small_flakes)} small-flake, {len(large_flakes)} large-flake, {len(normals)} normal, "
        f"{len(others)} other training images; crop {crop}, find-prob {args.find_prob}, "
        f"curriculum {args.curriculum}, pos_weight {args.pos_weight}")

    def flake_image():
        share = len(large_flakes) / max(1, len(flakes))
        if args.curriculum > 0:
            share = max(share, 1.0 - counter["step"] / (args.curriculum * args.steps))
        pool = large_flakes if (rng.uniform() < share and len(large_flakes)) or not len(small_flakes) else small_flakes
        return rng.choice(pool)

    def compute_loss():
        index = []
        for i in range(args.batch_size):
            pool = (None, normals, others)[i % 3]
            if pool is not None and not len(pool):
                pool = np.arange(len(train.kinds))
            index.append(flake_image() if pool is None else rng.choice(pool))
        crops, dense, kinds, amount_maps = [], [], [], []
        for i in index:
            boxes = [b for b, k in zip(train.boxes[i], train.kinds[i]) if k > 0]
            if boxes and rng.uniform() < args.find_prob:  # a crop holding (a part of) a finding
                x0, y0, x1, y1 = np.array(boxes[rng.integers(len(boxes))]) * scale
                cx, cy = rng.uniform(x0, x1), rng.uniform(y0, y1)
                ox = cx - rng.uniform(0.1, 0.9) * crop
                oy = cy - rng.uniform(0.1, 0.9) * crop
                ox, oy = (int(np.clip(round(v / stride), 0, slots)) * stride for v in (ox, oy))
            else:
                ox, oy = (int(v) * stride for v in rng.integers(0, slots + 1, 2))
            crops.append(train.high[i, oy : oy + crop, ox : ox + crop])
            target = lesion_map(train.boxes[i], train.kinds[i], crop // stride, origin=(ox / scale, oy / scale),
                                extent=crop / scale)
            dense.append(target)
            kinds.append(target.flatten(1).amax(-1))
            if amounts is not None:
                amount_maps.append(lesion_map(train.boxes[i], train.kinds[i], crop // stride, values=amounts[i],
                                              origin=(ox / scale, oy / scale), extent=crop / scale))
        counter["step"] += 1
        flip = torch.from_numpy(rng.uniform(size=args.batch_size) < 0.5)
        crops, dense = torch.stack(crops), torch.stack(dense)
        crops[flip], dense[flip] = crops[flip].flip(-1), dense[flip].flip(-1)
        gain = torch.from_numpy(rng.uniform(0.9, 1.1, args.batch_size)).float()
        offset = torch.from_numpy(rng.uniform(-0.05, 0.05, args.batch_size)).float()
        if amounts is None:
            loss = probe_loss(probe(normalise(crops, gain, offset)), dense, torch.stack(kinds), args.pos_weight)
        else:
            # the amount of each finding of --amount-kinds, regressed on the cells it overlaps
            amount_target = torch.stack(amount_maps)  # (N, NUM_KINDS, g, g)
            amount_target[flip] = amount_target[flip].flip(-1)
            mask = dense * amount_channels
            logits, predicted = probe(normalise(crops, gain, offset), return_amounts=True)
            amount_loss = ((predicted - amount_target) ** 2 * mask).sum() / mask.sum().clamp(min=1)
            loss = probe_loss(logits, dense, torch.stack(kinds), args.pos_weight) + args.amount_aux * amount_loss
        if validation is not None and args.eval_every and counter["step"] % args.eval_every == 0:
            auc = flake_auc(probe, validation)
            log(f"vision-high step {counter['step']} validation AUC flake vs normal: "
                + ", ".join(f"{k} {v:.3f}" for k, v in auc.items()))
            train_mode()
        return loss

    run_steps("vision-high", args, step, optimizer, [p for p in probe.parameters() if p.requires_grad], ckpt,
              {"probe": probe}, compute_loss)
    torch.save(probe.state_dict(), out)


def flake_auc(probe, split):
    """Validation AUC of the max-pooled flake score, small / large flake images against normal images."""
    keys = [split.finding_key(i) for i in range(len(split.low))]
    chosen = [i for i, k in enumerate(keys) if k in ("normal", "flake (small)", "flake (large)")]
    pooled = probe_predictions(probe, split.high[chosen], 16).flatten(2).amax(-1)[:, 0].numpy()
    normal = np.array([p for p, i in zip(pooled, chosen) if keys[i] == "normal"])
    result = {}
    for key in ("flake (small)", "flake (large)"):
        positive = np.array([p for p, i in zip(pooled, chosen) if keys[i] == key])
        result[key] = auc_score(positive, normal)
    return result


def auc_score(positive, negative):
    if not len(positive) or not len(negative):
        return float("nan")
    above = (positive[:, None] > negative[None, :]).mean()
    return float(above + 0.5 * (positive[:, None] == negative[None, :]).mean())


# --- controls -------------------------------------------------------------------------------------------------------


@torch.no_grad()
def probe_predictions(probe, images, batch_size=32, return_amounts=False):
    """Lesion-map logits (N, NUM_KINDS, g, g); with `return_amounts` (a `HighResProbe` with its amount head),
    `(logits, amounts)`."""
    probe.eval()
    extra = {"return_amounts": True} if return_amounts else {}
    outputs = [probe(normalise(images[i : i + batch_size]), **extra) for i in range(0, len(images), batch_size)]
    return tuple(torch.cat(parts) for parts in zip(*outputs)) if return_amounts else torch.cat(outputs)


def load_probes(run):
    """The warmed 112 px tower and 672 px encoder, each with its lesion-map head: `(LowResProbe, HighResProbe)`."""
    model = init_model(run)
    low = LowResProbe(model.model.vision_tower, model.config.vision_config.hidden_size)
    low.load_state_dict(torch.load(run / "vision_low.pt"))
    return low, load_high_probe(run / "vision_high.pt")


def controls(args):
    run = Path(args.run)
    low, high = load_probes(run)
    rows, results, validation_logits = {}, {}, {}
    for split_name in ("validation", "test"):
        split = Split(run / "data", split_name)
        # 0 for a normal image, the kind for one finding, -1 (left out) for two (an implant with another finding)
        true = torch.tensor([int(k.max()) if (k > 0).sum() <= 1 else -1 for k in split.kinds])
        keys = [split.finding_key(i) for i in range(len(split.low))]
        for name, probe, images in (("low 112 (CLIP tower)", low, split.low), ("high 672 (HiA encoder)", high, split.high)):
            logits = probe_predictions(probe, images, 16 if "high" in name else 64)
            if split_name == "validation":  # reused by controls-auc
                validation_logits[name] = logits
            predicted = predict_kind(logits)
            table = {}
            for key in sorted(set(keys)):
                chosen = [i for i, k in enumerate(keys) if k == key and true[i] >= 0]
                if chosen:
                    table[key] = (int((predicted[chosen] == true[chosen]).sum()), len(chosen))
            results[(split_name, name)] = table
            rows.setdefault(split_name, {})[name] = table
    lines = []
    for split_name, per_model in rows.items():
        keys = sorted({k for table in per_model.values() for k in table})
        lines += [f"\nVision-only accuracy on {split_name} images with one finding, % (count); a finding counts when "
                  "the probe names its kind and no other (normal: nothing above 0.5)\n",
                  "| model | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        for name, table in per_model.items():
            lines.append(f"| {name} | " + " | ".join(
                f"{100 * table[k][0] / table[k][1]:.0f} ({table[k][1]})" if k in table else "-" for k in keys) + " |")
    text = "\n".join(lines) + "\n"
    (run / "controls.md").write_text(text, encoding="utf-8")
    (run / "controls.json").write_text(json.dumps({f"{s}/{m}": t for (s, m), t in results.items()}, indent=2))
    torch.save(validation_logits, run / "controls_validation_logits.pt")
    print(text)


def controls_auc(args):
    """Threshold-free control on validation: AUC of each kind's pooled score, images of that finding against normal
    images (0.5 = blind). Catches a probe that fires on every image, which the thresholded table counts as right."""
    run = Path(args.run)
    cached = run / "controls_validation_logits.pt"  # written by `controls`: the same probes on the same images
    if cached.is_file():
        logits = torch.load(cached)
    else:
        low, high = load_probes(run)
    split = Split(run / "data", "validation")
    if not cached.is_file():
        logits = {"low 112 (CLIP tower)": probe_predictions(low, split.low, 64),
                  "high 672 (HiA encoder)": probe_predictions(high, split.high, 16)}
    keys = [split.finding_key(i) for i in range(len(split.low))]
    findings = [("flake (small)", 1), ("flake (large)", 1), ("fracture", 2), ("osteophyte", 3), ("narrowing", 4),
                ("implant", 5)]
    lines = ["| model | " + " | ".join(k for k, _ in findings) + " |", "|---" * (len(findings) + 1) + "|"]
    table = {}
    for name in ("low 112 (CLIP tower)", "high 672 (HiA encoder)"):
        pooled = logits[name].flatten(2).amax(-1)
        normal = np.array([pooled[i].numpy() for i, k in enumerate(keys) if k == "normal"])
        row = {}
        for key, kind in findings:
            positive = np.array([float(pooled[i, kind - 1]) for i, k in enumerate(keys) if k == key])
            row[key] = auc_score(positive, normal[:, kind - 1])
        table[name] = row
        lines.append(f"| {name} | " + " | ".join(f"{row[k]:.2f}" for k, _ in findings) + " |")
    text = ("\nVision-only AUC on validation (each finding's images against the normal ones, by that kind's pooled "
            "score; 0.5 = blind)\n\n" + "\n".join(lines) + "\n")
    with open(run / "controls.md", "a", encoding="utf-8") as handle:
        handle.write(text)
    (run / "controls_auc.json").write_text(json.dumps(table, indent=2))
    print(text)


FLAKE_CHANGES = ("improved", "worsened", "unchanged")  # what the pair control reads; "postop" shows an implant


@torch.no_grad()
def flake_pairs(records, small_only=False):
    """Indices of the comparative records whose flake improved, worsened or stayed (`FLAKE_CHANGES`), optionally
    those of small flakes only."""
    return [index for index, record in enumerate(records) if record["task"] == "comparative"
            and record["meta"]["kind"] == "flake" and record["meta"]["change"] in FLAKE_CHANGES
            and (not small_only or record["meta"]["findings"][0][0]["size_class"] == "small")]


def fit_change_classifier(x, y, steps=500, lr=0.05, l2=1e-3):
    """Multinomial logistic regression of a flake pair's change (`FLAKE_CHANGES` index `y`) on standardised features
    `x` `(pairs, F)`; returns the function that predicts the change of new pairs' features."""
    mean, std = x.mean(0), x.std(0) + 1e-6
    classifier = nn.Linear(x.shape[1], len(FLAKE_CHANGES))
    optimizer = torch.optim.Adam(classifier.parameters(), lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad()
            loss = F.cross_entropy(classifier((x - mean) / std), y) + l2 * classifier.weight.pow(2).sum()
            loss.backward()
            optimizer.step()
    return lambda features: classifier((features - mean) / std).argmax(-1)


def write_small_flake_pairs(records, path):
    """The small-flake pairs of `records` (`flake_pairs(..., small_only=True)`) as JSON lines, for
    `qilin-med-vl evaluate`; returns how many."""
    chosen = [records[i] for i in flake_pairs(records, small_only=True)]
    Path(path).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in chosen), encoding="utf-8")
    return len(chosen)


def pair_change_features(before, after):
    """What the change classifiers read of a pair: `(..., F)` before and after -> `(..., 3 * F)`, (before, after,
    after - before)."""
    return torch.cat([before, after, after - before], -1)


@torch.no_grad()
def probe_pair_features(probe, pixels, images, batch_size):
    """A vision probe's read of each pair's flake: per image, the flake channel's strongest cell (max logit), its
    extent (log of 1 + cells above 0) and, for a probe with an amount head, the amount read at the strongest cell;
    returns the pair's (before, after, after - before) of these, `(pairs, 6 or 9)`. `images`: (before, after) image
    indices into `pixels` per pair."""
    chosen = pixels[[i for pair in images for i in pair]]
    with_amounts = getattr(probe, "amount_head", None) is not None
    output = probe_predictions(probe, chosen, batch_size, return_amounts=with_amounts)
    flake = (output[0] if with_amounts else output)[:, 0].flatten(1)
    per_image = [flake.amax(-1), (flake > 0).float().sum(-1).add(1).log()]
    if with_amounts:  # and the amount read at the strongest flake cell
        per_image.append(output[1][:, 0].flatten(1).gather(1, flake.argmax(-1, keepdim=True))[:, 0])
    per_image = torch.stack(per_image, -1).view(len(images), 2, -1)
    return pair_change_features(per_image[:, 0], per_image[:, 1])


def controls_pairs(args):
    """Vision-only control for the comparative row: can the frozen probes tell how a flake changed between a pair's
    two images? Per image, the probe's flake channel gives its strongest cell (max logit) and its extent (cells above
    0); a multinomial logistic regression on the pair's (before, after, after - before) of both is fitted on the
    training split's flake pairs and scored on the validation and test ones (chance: about 1/3). Low and high
    resolution side by side; writes `controls_pairs.json`."""
    run = Path(args.run)
    low, high = load_probes(run)

    def pairs(split):
        chosen = flake_pairs(split.records)
        labels = torch.tensor([FLAKE_CHANGES.index(split.records[r]["meta"]["change"]) for r in chosen])
        small = torch.tensor([split.records[r]["meta"]["findings"][0][0]["size_class"] == "small" for r in chosen])
        images = [split.images_of[r] for r in chosen]  # (before, after) of each pair
        return images, labels, small

    splits = {name: Split(run / "data", name) for name in ("train", "validation", "test")}
    pairs_of = {split_name: pairs(split) for split_name, split in splits.items()}  # (images, labels, small)
    table = {}
    for name, probe, resolution, batch_size in (("low 112 (CLIP tower)", low, "low", 64),
                                                ("high 672 (HiA encoder)", high, "high", 16)):
        data = {}
        for split_name, split in splits.items():
            images, labels, small = pairs_of[split_name]
            features = probe_pair_features(probe, getattr(split, resolution), images, batch_size)
            data[split_name] = (features, labels, small)
        predict = fit_change_classifier(*data["train"][:2])
        row = {}
        for split_name, (x, y, small) in data.items():
            right = predict(x) == y
            row[split_name] = {"small flakes": [int(right[small].sum()), int(small.sum())],
                               "all flakes": [int(right.sum()), len(right)]}
            for index, change in enumerate(FLAKE_CHANGES):  # small flakes by change
                chosen = small & (y == index)
                row[split_name][f"small, {change}"] = [int(right[chosen].sum()), int(chosen.sum())]
        table[name] = row
        log(name, json.dumps(row))
    (run / "controls_pairs.json").write_text(json.dumps(table, indent=2) + "\n", encoding="utf-8")


# --- cached high-resolution features ------------------------------------------------------------------------------

@torch.no_grad()
def cache_features(args):
    run = Path(args.run)
    encoder = load_high_probe(run / "vision_high.pt").encoder
    encoder.eval()
    for split_name in ("train", "train_pairs"):  # train_pairs: data_cache.py --train-pairs, when it was asked for
        out = run / f"features_{split_name}.pt"
        if out.is_file() or not (run / "data" / f"{split_name}.jsonl").is_file():
            continue
        split = Split(run / "data", split_name)
        # The HiA stage sees the records whose images are cached (the first ones: their images come first). Runs
        # A-F cached 1,000 of the 2,400 records; every record (about 6 min more on one core) gives HiA 2.4x as many
        # distinct comparative pairs.
        kept = len(split.records) if split_name != "train" else min(args.feature_records or len(split.records),
                                                                    len(split.records))
        count = split.images_of[kept - 1][-1] + 1
        high, low = [], []
        start = time.time()
        for i in range(0, count, 8):
            high.append(encoder(normalise(split.high[i : min(i + 8, count)])).half())
            if i % 400 == 0:
                log(f"features {split_name} {i}/{count} {time.time() - start:.0f} s")
        for i in range(0, count, 64):
            low.append(encoder(normalise(split.low[i : min(i + 64, count)])).half())
        torch.save({"672": torch.cat(high), "112": torch.cat(low)}, out)


# --- language stages ------------------------------------------------------------------------------------------------


class Batcher:
    """Records -> model inputs: the processor builds the text side (chat template, image-token expansion, labels
    from the assistant mask) from placeholder images; the pixels come from the cache."""

    def __init__(self, processor, split):
        from PIL import Image

        self.processor, self.split = processor, split
        self.placeholder = Image.new("RGB", (112, 112))

    def __call__(self, record_indices, generation=False, answers=None):
        """`answers`, when given, replace the records' own answers (one string per record)."""
        from qilin_med_vl.training.data import record_to_messages

        records = [self.split.records[i] for i in record_indices]
        if answers is not None:
            records = [{**r, "conversations": r["conversations"][:-1] + [{"from": "gpt", "value": a}]}
                       for r, a in zip(records, answers)]
        conversations = [record_to_messages(r) for r in records]
        if generation:
            conversations = [c[:-1] for c in conversations]
        batch = self.processor.apply_chat_template(
            conversations, tokenize=True, return_dict=True, return_tensors="pt",
            add_generation_prompt=generation, return_assistant_tokens_mask=not generation,
            processor_kwargs={"images": [[self.placeholder] * len(r["images"]) for r in records],
                              "padding_side": "left" if generation else "right", "return_high_res": False},
        )
        images = [i for r in record_indices for i in self.split.images_of[r]]
        batch["pixel_values"] = normalise(self.split.low[images])
        if not generation:
            mask = torch.as_tensor(batch.pop("assistant_masks")).bool()
            batch["labels"] = batch["input_ids"].masked_fill(~mask, -100)
        return dict(batch), images


def load_processor(run, high_res_size=672):
    from qilin_med_vl.processing.processing_qilin import QilinProcessor

    processor = QilinProcessor.from_pretrained(Path(run) / "init")
    processor.image_processor.high_res_size = high_res_size
    # The character-level demo tokenizer turns the 170-character English default system prompt into 170 tokens,
    # more than the answer and the image together: the demo model's own template defaults to no system prompt.
    templates = processor.chat_template
    key = "default" if isinstance(templates, dict) else None
    template = templates[key] if key else templates
    default_system = template.split("namespace(system='", 1)[1].split("')", 1)[0]
    template = template.replace(f"namespace(system='{default_system}')", "namespace(system='')")
    if key:
        processor.chat_template = {**templates, key: template}
    else:
        processor.chat_template = template
    return processor


def task_batches(records, batch_size, rng, weights=None, task_weights=None):
    """Record indices of one task per batch (similar lengths: little padding), tasks drawn in proportion to their
    records times `task_weights[task]` (default 1), records within the task in proportion to `weights`."""
    by_task = {}
    for index, record in enumerate(records):
        by_task.setdefault(record["task"], []).append(index)
    tasks = sorted(by_task)
    sizes = np.array([len(by_task[t]) * (task_weights or {}).get(t, 1.0) for t in tasks], float)
    task = tasks[rng.choice(len(tasks), p=sizes / sizes.sum())]
    pool = np.array(by_task[task])
    p = None if weights is None else weights[pool] / weights[pool].sum()
    return rng.choice(pool, batch_size, p=p)


def train_base(args):
    run = Path(args.run)
    out = run / "base"
    if (out / "model.safetensors").is_file():
        return
    import qilin_med_vl  # noqa: F401

    train = Split(run / "data", "train", load_high=False)
    model = init_model(run)
    probe = LowResProbe(model.model.vision_tower, model.config.vision_config.hidden_size)
    probe.load_state_dict(torch.load(run / "vision_low.pt"))  # the warmed tower, in place
    processor = load_processor(run)
    batcher = Batcher(processor, train)
    model.requires_grad_(False)
    for module in (model.model.multi_modal_projector, model.model.language_model, model.lm_head):
        module.requires_grad_(True)
    modules = {"model": model}
    side_head = None
    if args.side_aux:
        # The tower finds lesions but the answers' side (右侧 / 左侧: which half of the image) was at chance: make
        # "a finding in this token's cell, on the image's left / right half" linearly readable from every projected
        # image token, so that any attention over the image tokens carries the side. The head is dropped afterwards.
        # --side-aux-kinds: the same per kind (which finding, on which half).
        # --side-aux-segments: per side and bone segment instead (the segment of a location answer: 股骨 / 胫骨 /
        # 间隙), from the findings' own side and location.
        channels = 2 * (NUM_KINDS if args.side_aux_kinds else 1)
        if args.side_aux_segments:
            channels = len(SIDES) * len(SEGMENTS)
        side_head = nn.Linear(model.config.text_config.hidden_size, channels)
        modules["side_head"] = side_head
        projected = {}
        hook = model.model.multi_modal_projector.register_forward_hook(
            lambda module, inputs, output: projected.update(tokens=output))
    params = [p for p in model.parameters() if p.requires_grad] + (list(side_head.parameters()) if side_head else [])
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    ckpt = run / "base.ckpt"
    step = load_checkpoint(ckpt, modules, optimizer)
    rng = np.random.default_rng(3000 + step)
    model.train()
    model.model.vision_tower.eval()
    # Normal knees `--normal-weight` times as often. The 112-px tower cannot tell a normal knee from one with a flake
    # or a fracture line (AUC about 0.45), and the data hold two such findings per normal: unweighted, the language
    # model learns to guess among them for every knee that looks normal. Weighted, a knee that looks normal is called
    # normal, which is what a low-resolution reader should say and what HiA is there to correct.
    weights = np.array([args.normal_weight if r["meta"]["label"] == "normal" else 1.0 for r in train.records])

    located = {}

    def located_findings(image, grid):
        """(grid * grid, sides * segments) target: 1 where the cell overlaps a finding on that side and segment."""
        if image not in located:
            target = torch.zeros(len(SIDES), len(SEGMENTS), grid, grid)
            findings = train.records[train.record[image]]["meta"]["findings"][train.view[image]]
            for slot, finding in enumerate(findings[:3]):
                cells = lesion_map(train.boxes[image][slot : slot + 1], train.kinds[image][slot : slot + 1], grid)
                segment = next(i for i, name in enumerate(SEGMENTS) if name in finding["location"])
                side = SIDES.index(finding["side"])
                target[side, segment] = torch.maximum(target[side, segment], cells.amax(0))
            located[image] = target.flatten(0, 1).flatten(1).T
        return located[image]

    def compute_loss():
        batch, images = batcher(task_batches(train.records, args.batch_size, rng, weights))
        loss = model(**batch).loss
        if side_head is None:
            return loss
        tokens = projected["tokens"]  # (images, grid * grid, hidden)
        grid = int(tokens.shape[1] ** 0.5)
        if args.side_aux_segments:
            target = torch.stack([located_findings(i, grid) for i in images])  # (images, grid * grid, 6)
            side = F.binary_cross_entropy_with_logits(side_head(tokens), target, pos_weight=torch.tensor(10.0))
            return loss + args.side_aux * side
        found = torch.stack([lesion_map(train.boxes[i], train.kinds[i], grid) for i in images])  # (N, kinds, g, g)
        found = found if args.side_aux_kinds else found.amax(1, keepdim=True)
        left = (torch.arange(grid) < grid // 2).float().view(1, 1, 1, grid)
        target = torch.stack([found * left, found * (1 - left)], -1)  # (images, kinds or 1, grid, grid, 2)
        target = target.permute(0, 2, 3, 1, 4).flatten(1, 2).flatten(2)  # (images, grid * grid, 2 * (kinds or 1))
        side = F.binary_cross_entropy_with_logits(side_head(tokens), target, pos_weight=torch.tensor(10.0))
        return loss + args.side_aux * side

    run_steps("base", args, step, optimizer, params, ckpt, modules, compute_loss)
    if side_head is not None:
        hook.remove()
    model.eval()
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.save_pretrained(out)
    processor.save_pretrained(out)


def hia_model(run, variant, feature_positions="none", seed=0, layers=None, modules_to_save=None):
    from peft import get_peft_model

    import qilin_med_vl  # noqa: F401
    from qilin_med_vl.modeling.configuration_hia import HiAConfig
    from qilin_med_vl.modeling.modeling_hia import HiABlock
    from qilin_med_vl.modeling.modeling_qilin_med_vl import QilinMedVLForConditionalGeneration

    model = QilinMedVLForConditionalGeneration.from_pretrained(Path(run) / "base")
    model.requires_grad_(False)
    torch.manual_seed(seed)
    kwargs = {**HIA_KWARGS, **VARIANTS[variant], "feature_positions": feature_positions}
    if layers:
        kwargs["layers"] = layers
    if modules_to_save:
        kwargs["modules_to_save"] = modules_to_save
    model = get_peft_model(model, HiAConfig(**kwargs))
    owner = next(m for m in model.modules() if isinstance(m, HiABlock) and m.encoder is not None)
    load_high_probe(Path(run) / "vision_high.pt", owner.encoder, channels_last=False)  # the warmed encoder, in place
    owner.encoder.requires_grad_(False)
    return model, owner


def train_hia(args):
    run = Path(args.run)
    if args.tune_language_model and args.modules_to_save:
        raise SystemExit("hia: --tune-language-model trains the whole language model; it cannot be combined with "
                         "--modules-to-save, which trains the adapter's own copies of some of its modules")
    for variant in args.variants:
        out = run / variant
        if (out / "adapter_model.safetensors").is_file():
            continue
        train = Split(run / "data", "train", load_high=False)
        features = torch.load(run / "features_train.pt")[str(VARIANTS[variant]["high_res_size"])]
        grid = int(features.shape[1] ** 0.5)
        model, owner = hia_model(run, variant, args.feature_positions, args.seed, args.hia_layers,
                                 args.modules_to_save)
        processor = load_processor(run, VARIANTS[variant]["high_res_size"])
        cached = sum(1 for images in train.images_of if images[-1] < len(features))
        train.records = train.records[:cached]  # those with cached features (the first ones)
        if args.train_pairs:
            # the extra comparative flake records of data_cache.py --train-pairs, after the training split's
            if len(features) != len(train.low):
                raise SystemExit("hia --train-pairs needs the features of every training record (features stage "
                                 "without --feature-records)")
            train.extend(Split(run / "data", "train_pairs", load_high=False))
            features = torch.cat([features, torch.load(run / "features_train_pairs.pt")[
                str(VARIANTS[variant]["high_res_size"])]])
            log(f"{variant}: {len(train.records)} training records with the extra flake pairs")
        batcher = Batcher(processor, train)
        current = {}
        owner.encode = lambda pixels: (current["features"], (grid, grid))  # the frozen encoder's cached output
        params = [p for p in model.parameters() if p.requires_grad]
        log(f"{variant}: {sum(p.numel() for p in params)} trainable parameters")
        # The base model's copies in modules_to_save start from trained weights: they move at --modules-lr-scale x lr
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        saved = [p for name, p in named if ".modules_to_save." in name]
        optimizer = torch.optim.AdamW([p for name, p in named if ".modules_to_save." not in name], lr=args.lr,
                                      weight_decay=0.0)
        if saved:
            optimizer.add_param_group({"params": saved, "lr_scale": args.modules_lr_scale})
        ckpt = run / f"{variant}.ckpt"
        modules = {"model": model}
        # Flake and normal records `--flake-normal-weight` times as often: the findings only the high-resolution path
        # can separate. Normal ones `--normal-weight` times more again: with flakes and normals drawn equally, an
        # adapter that cannot see a flake (w/o HR) learns to guess it for a knee that looks normal, where the base
        # (normal knees 3x) says normal.
        def draw_weight(meta):
            if meta["label"] == "normal":
                return args.flake_normal_weight * args.normal_weight
            return args.flake_normal_weight if "flake" in (meta["label"], meta.get("kind")) else 1.0

        weights = np.array([draw_weight(r["meta"]) for r in train.records])
        # a small flake's change `--flake-pair-weight` times more often again, within the comparative task
        weights[flake_pairs(train.records, small_only=True)] *= args.flake_pair_weight
        aux_head, hook = None, None
        last_block = [m for m in model.modules() if isinstance(m, type(owner))][-1]  # HiABlock
        if args.finding_aux:
            # The language-model loss alone says little about what the extractor should bring back. Make what it
            # brings back tell the image's findings as the answers name them (kind, side, bone segment) and how much
            # of each there is (a pair's change is then a difference of two images' extracted values).
            # --finding-aux-at extractor: from the mean of the last HiA block's extracted queries (its D-wide output
            # before the injection); tokens: from every image token that block edits. The head is dropped after
            # training.
            answers = {}  # image -> finding_answer, filled as images come
            at_tokens = args.finding_aux_at == "tokens"
            width = model.get_base_model().config.text_config.hidden_size if at_tokens else HIA_KWARGS["hidden_size"]
            aux_head = nn.Linear(width, NUM_KINDS * len(SIDES) * len(SEGMENTS) + NUM_KINDS)
            modules["aux_head"] = aux_head
            params += list(aux_head.parameters())
            optimizer.add_param_group({"params": list(aux_head.parameters())})
            captured = {}
            if at_tokens:
                hook = last_block.register_forward_hook(
                    lambda module, inputs, output: captured.update(values=inputs[0] + output[0]))  # (N, K, H)
            else:
                hook = last_block.extract_attn.register_forward_hook(  # values: (N, 1, D)
                    lambda module, inputs, output: captured.update(values=output[0].mean(1, keepdim=True)))
        pair_head = None
        if args.pair_aux:
            # A pair's change is read from two images' findings, but nothing in the language-model loss asks the
            # extractor for amounts that can be compared across images. On comparative batches, a linear head on
            # the two images' extracted values (mean over queries of the last HiA block: before, after, and their
            # difference) must tell the change. The head is dropped after training.
            from qilin_med_vl.synthetic.findings import CHANGES

            pair_head = nn.Linear(3 * HIA_KWARGS["hidden_size"], len(CHANGES))
            modules["pair_head"] = pair_head
            params += list(pair_head.parameters())
            optimizer.add_param_group({"params": list(pair_head.parameters())})
            extracted = {}
            pair_hook = last_block.extract_attn.register_forward_hook(  # (images, D)
                lambda module, inputs, output: extracted.update(values=output[0].mean(1)))
        tuned = {}
        if args.tune_language_model:
            # Diagnostic, not the paper's recipe: the language model trains with HiA (learning rate scaled by the
            # option), to tell whether the frozen model's comparisons are what stops HiA. Saved as a full model in
            # `<variant>_base/`, to be evaluated with the adapter on it.
            # the language model's own tensors under the names of the unwrapped model (HiA wraps decoder layers)
            tuned = {f"model.language_model.{name.replace('.base_layer.', '.')}": p
                     for name, p in model.get_base_model().model.language_model.named_parameters()
                     if ".hia." not in name}
            for parameter in tuned.values():
                parameter.requires_grad_(True)
            params += list(tuned.values())
            optimizer.add_param_group({"params": list(tuned.values()), "lr_scale": args.tune_language_model})
        step = load_checkpoint(ckpt, modules, optimizer)
        rng = np.random.default_rng(4000 + step + 100_000 * args.seed)  # seed 0: the batches of runs A-G
        model.train()
        owner.encoder.eval()

        def answer(image):
            if image not in answers:
                findings = train.records[train.record[image]]["meta"]["findings"][train.view[image]]
                answers[image] = finding_answer(findings)
            return answers[image]

        def compute_loss():
            records = task_batches(train.records, args.batch_size, rng, weights,
                                   {"comparative": args.comparative_weight})
            batch, images = batcher(records)
            current["features"] = features[images].float()
            batch["high_res_pixel_values"] = torch.zeros(len(images), 3, 1, 1)
            loss = model(**batch).loss
            if pair_head is not None and train.records[records[0]]["task"] == "comparative":
                values = extracted["values"].view(len(records), 2, -1)  # (pairs, before / after, D)
                before, after = values[:, 0], values[:, 1]
                change = torch.tensor([CHANGES.index(train.records[r]["meta"]["change"]) for r in records])
                loss = loss + args.pair_aux * F.cross_entropy(
                    pair_head(pair_change_features(before, after)), change)
            if aux_head is None:
                return loss
            logits = aux_head(captured["values"])  # (images, tokens or 1, kinds * sides * segments + NUM_KINDS)
            present, severity, mask = (torch.stack(x)[:, None].expand(-1, logits.shape[1], -1)
                                       for x in zip(*(answer(i) for i in images)))
            found = F.binary_cross_entropy_with_logits(logits[..., :-NUM_KINDS], present,
                                                       pos_weight=torch.tensor(5.0))
            how_much = ((logits[..., -NUM_KINDS:] - severity) ** 2 * mask).sum() / mask.sum().clamp(min=1)
            return loss + args.finding_aux * (found + how_much)

        run_steps(variant, args, step, optimizer, params, ckpt, modules, compute_loss, warmup=30)
        if hook is not None:
            hook.remove()
        if pair_head is not None:
            pair_hook.remove()
        del owner.encode
        model.eval()
        model.save_pretrained(out)
        config_path = out / "adapter_config.json"
        config = json.loads(config_path.read_text("utf-8"))
        config["base_model_name_or_path"] = None  # no local path in a shipped adapter
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if tuned:
            import shutil

            from qilin_med_vl.modeling.modeling_qilin_med_vl import QilinMedVLForConditionalGeneration

            tuned_base = run / f"{variant}_base"
            shutil.copytree(run / "base", tuned_base, dirs_exist_ok=True)  # processor and tokenizer files
            fresh = QilinMedVLForConditionalGeneration.from_pretrained(run / "base")
            missing, unexpected = fresh.load_state_dict({k: v.detach() for k, v in tuned.items()}, strict=False)
            assert not unexpected and len(missing) < len(fresh.state_dict()), (missing, unexpected)
            fresh.save_pretrained(tuned_base)


# --- pointing game -------------------------------------------------------------------------------------------------


@torch.no_grad()
def pointing(args):
    """Where HiA's extractor looks: on test images with one finding, the share of its attention mass (queries and
    HiA layers averaged) on grid cells that overlap the finding's box, against the share of cells the box covers
    (what uniform attention would give). The real encoder runs on the 672-px views; nothing is cached."""
    run = Path(args.run)
    test = Split(run / "data", "test")
    processor = load_processor(run)
    batcher = Batcher(processor, test)
    from peft import PeftModel

    import qilin_med_vl  # noqa: F401
    from qilin_med_vl.modeling.modeling_qilin_med_vl import QilinMedVLForConditionalGeneration

    base = QilinMedVLForConditionalGeneration.from_pretrained(run / "base")
    model = PeftModel.from_pretrained(base, run / "HiA").eval()
    chosen = [r for r, record in enumerate(test.records)
              if record["task"] != "comparative" and len(record["meta"]["findings"][0]) == 1]
    rows = {}
    for start in range(0, len(chosen), 8):
        records = chosen[start : start + 8]
        batch, images = batcher(records, generation=True)
        batch["high_res_pixel_values"] = normalise(test.high[images])
        out = model(**batch, output_hia_attentions=True)
        gh, gw = out.hia_grid_size
        attention = torch.stack(out.hia_attentions).mean(0).mean(1).view(len(images), gh, gw)  # (N, gh, gw)
        for image, att in zip(images, attention):
            cells = lesion_map(test.boxes[image], test.kinds[image], gh).amax(0)  # (gh, gw) 0/1
            key = test.finding_key(image)
            inside, share = float((att * cells).sum()), float(cells.mean())
            hit = float(cells.flatten()[att.flatten().argmax()])
            rows.setdefault(key, []).append((inside, share, hit))
    table = {key: {"images": len(v), "attention_in_box": float(np.mean([x[0] for x in v])),
                   "box_share_of_grid": float(np.mean([x[1] for x in v])),
                   "argmax_in_box": float(np.mean([x[2] for x in v]))} for key, v in sorted(rows.items())}
    (run / "pointing.json").write_text(json.dumps(table, indent=2), encoding="utf-8")
    print(json.dumps(table, indent=2))


# --- shipped examples ----------------------------------------------------------------------------------------------

GALLERY = (("normal.png", "normal"), ("postop.png", "postop"), ("osteophyte.png", "osteophyte"))


def write_gallery(folder, seed=7):
    """Single-image examples next to the shipped before/after pair (a small flake), drawn like it: their own seeds
    of the generator's "examples" stream, low-noise exposures so each PNG stays under 0.5 MB. Writes the PNGs and
    `gallery.jsonl` (one record per image and single-image task, with the generator's ground truth in `meta`)."""
    from dataclasses import replace

    from qilin_med_vl.synthetic import findings as clinical
    from qilin_med_vl.synthetic.dataset import IMAGE_TOKEN, _finding_meta, _rng, _save_png, anatomy_hash
    from qilin_med_vl.synthetic.render import render_radiograph, sample_anatomy, sample_view, to_uint8

    records = []
    for number, (name, disease) in enumerate(GALLERY, start=1):
        rng = _rng(seed, "examples", number)
        anatomy = sample_anatomy(rng)
        view = replace(sample_view(rng), noise_sigma=0.015, offset=-0.05)
        found = [] if disease == "normal" else [
            clinical.sample_finding(rng, disease, number % 2, ("femur", "tibia")[number % 2], clinical.FlakeSizes())]
        _save_png(os.path.join(folder, name), to_uint8(render_radiograph(anatomy, view, found)))
        meta = {"patient_id": f"example-{number}", "anatomy_hash": anatomy_hash(anatomy), "image_size": REFERENCE,
                "label": disease, "disease": disease, "disease_name": clinical.DISEASE_NAMES[disease],
                "findings": [[_finding_meta(anatomy, view, f, REFERENCE) for f in found]]}
        for task in ("description", "disease", "location"):
            answer = {"description": clinical.description_answer, "disease": clinical.disease_answer,
                      "location": clinical.location_answer}[task](rng, found)
            records.append({"id": f"{name[:-4]}-{task}", "task": task, "images": [name],
                            "conversations": [{"from": "human", "value": f"{IMAGE_TOKEN}\n"
                                               + clinical.QUESTION_TEMPLATES[task][0]},
                                              {"from": "gpt", "value": answer}],
                            "meta": meta})
    with open(os.path.join(folder, "gallery.jsonl"), "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    return records


def examples(args):
    from qilin_med_vl.demo import DEMO_EXAMPLES_DIR

    for record in write_gallery(str(DEMO_EXAMPLES_DIR)):
        print(record["id"], record["conversations"][-1]["value"])


# --- command line ---------------------------------------------------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["vision", "hr-encoder", "controls", "controls-auc", "controls-pairs",
                                          "tower-columns", "features", "base", "hia", "pointing", "examples"])
    parser.add_argument("--run", default="runs/demo")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--crop", type=int, default=320, help="hr-encoder: training crop side at 672 px (x 32)")
    parser.add_argument("--find-prob", type=float, default=0.5,
                        help="hr-encoder: chance that a finding image gives a crop around a finding")
    parser.add_argument("--curriculum", type=float, default=0.3,
                        help="hr-encoder: fraction of the steps over which flakes go from large only to all sizes")
    parser.add_argument("--pos-weight", type=float, default=20.0, help="vision stages: dense BCE positive weight")
    parser.add_argument("--eval-every", type=int, default=0, help="hr-encoder: log validation flake AUC every N steps")
    parser.add_argument("--stem-warmup", type=int, default=0,
                        help="hr-encoder: first train the full-resolution stem this many steps on flake windows")
    parser.add_argument("--stem-warmup-sizes", nargs="+", choices=("small", "large"), default=["small"],
                        help="hr-encoder: the flake sizes of the stem warm-up's windows")
    parser.add_argument("--side-aux", type=float, default=0.0,
                        help="base: weight of the auxiliary loss that makes each image token tell a finding's side")
    parser.add_argument("--normal-weight", type=float, default=1.0,
                        help="base, hia: how much more often records of normal knees are drawn (hia: on top of "
                             "--flake-normal-weight)")
    parser.add_argument("--side-aux-kinds", action="store_true",
                        help="base: the side auxiliary per finding kind (which finding, on which half)")
    parser.add_argument("--side-aux-segments", action="store_true",
                        help="base: the side auxiliary per side and bone segment of each finding (which bone, "
                             "which knee)")
    parser.add_argument("--column-aux", type=float, default=0.0,
                        help="vision: weight of the auxiliary loss that makes each tower token tell its own column "
                             "(with --tower-from: the tower is tuned, not frozen)")
    parser.add_argument("--amount-aux", type=float, default=0.0,
                        help="hr-encoder: weight of a second head regressing each finding's log severity (flake "
                             "diameter x strength, fracture width, spur length, joint gap) on the cells it overlaps")
    parser.add_argument("--encoder-from", default=None,
                        help="hr-encoder: start from this vision_high.pt (stem, encoder and lesion-map head) instead "
                             "of a stem warm-up and a new encoder")
    parser.add_argument("--amount-kinds", nargs="+", choices=tuple(SEVERITY), default=list(SEVERITY),
                        help="hr-encoder: the finding kinds whose severity --amount-aux regresses")
    parser.add_argument("--freeze-stem", action="store_true",
                        help="hr-encoder: keep the warmed stem as it is while the rest of the encoder trains")
    parser.add_argument("--save-every", type=int, default=100)
    parser.add_argument("--output", default=None,
                        help="vision / hr-encoder: file of the warmed tower or encoder and its heads (default "
                             "vision_low.pt / vision_high.pt; the stages after them read those)")
    parser.add_argument("--tower-from", default=None,
                        help="vision: take the CLIP tower from this saved model or this stage's .pt output (frozen, "
                             "the head fitted only, unless --column-aux)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--hia-layers", type=int, nargs="+", default=None,
                        help="hia: the decoder layers HiA follows (default: HIA_KWARGS['layers'])")
    parser.add_argument("--seed", type=int, default=0,
                        help="hia: seed of the adapter's initialisation and of its batches (0: runs A-J; 1: run K)")
    parser.add_argument("--feature-records", type=int, default=0,
                        help="features: cache the high-resolution features of this many training records (0: all)")
    parser.add_argument("--flake-normal-weight", type=float, default=2.0,
                        help="hia: how much more often flake and normal records are drawn")
    parser.add_argument("--finding-aux", type=float, default=0.0,
                        help="hia: weight of the auxiliary loss that makes what HiA extracts tell the image's "
                             "findings (kind, side, segment) and their severity")
    parser.add_argument("--feature-positions", choices=("none", "sincos"), default="none",
                        help="hia: HiAConfig.feature_positions (where each high-resolution feature sits)")
    parser.add_argument("--tune-language-model", type=float, default=0.0,
                        help="hia (diagnostic): train the language model too, at this fraction of --lr; the tuned "
                             "model is saved in <run>/<variant>_base")
    parser.add_argument("--modules-to-save", nargs="+", default=None,
                        help="hia: HiAConfig.modules_to_save, base-model modules that train with the adapter and are "
                             "saved in it (for example language_model.layers.3 language_model.norm lm_head: what "
                             "reads HiA's last injection)")
    parser.add_argument("--modules-lr-scale", type=float, default=0.1,
                        help="hia: learning rate of the --modules-to-save copies, as a fraction of --lr")
    parser.add_argument("--flake-pair-weight", type=float, default=1.0,
                        help="hia: comparative records of a small flake that improved, worsened or stayed drawn this "
                             "many times more often within the comparative task (on top of --flake-normal-weight)")
    parser.add_argument("--train-pairs", action="store_true",
                        help="hia, hr-encoder: also train on the extra comparative flake records of data_cache.py "
                             "--train-pairs (hia: their features come from the features stage)")
    parser.add_argument("--comparative-weight", type=float, default=1.0,
                        help="hia: how much more often a batch of the comparative task is drawn")
    parser.add_argument("--pair-aux", type=float, default=0.0,
                        help="hia: weight of the auxiliary loss that makes the change of a comparative pair readable "
                             "from its two images' extracted values")
    parser.add_argument("--finding-aux-at", choices=("extractor", "tokens"), default="extractor",
                        help="hia: what the finding auxiliary reads (see train_hia)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    random.seed(0)
    {"vision": train_low_vision, "hr-encoder": train_high_vision, "controls": controls, "features": cache_features,
     "base": train_base, "hia": train_hia, "pointing": pointing, "examples": examples, "controls-auc": controls_auc,
     "tower-columns": tower_columns, "controls-pairs": controls_pairs}[args.stage](args)


if __name__ == "__main__":
    sys.exit(main())
