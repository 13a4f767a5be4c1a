"""Diagnostic: is a small flake's change readable from what HiA extracts, whatever the language model answers?

    python experiments/synthetic_hia/pair_probe.py --run runs/demo --second-validation runs/val2/data
    python experiments/synthetic_hia/pair_probe.py --run runs/demo --train-pairs --folds 5
    python experiments/synthetic_hia/pair_probe.py --held-out runs/held_out_pairs --encoders A.pt B.pt
    python experiments/synthetic_hia/pair_probe.py --run runs/demo --write-train-pairs runs/demo/train_pairs.jsonl
    python -m qilin_med_vl.cli evaluate --model runs/demo/base --adapter runs/demo/HiA \
        --data runs/demo/train_pairs.jsonl --image-root runs/demo/data --output-dir runs/demo/eval_train_pairs
    python experiments/synthetic_hia/pair_focus.py --tally runs/demo/train_pairs.jsonl \
        runs/demo/eval_train_pairs/predictions.jsonl

Runs the adapter (`--adapter`, default `<run>/HiA`) on the small-flake pairs (improved / worsened / unchanged; the
post-operative ones left out) of the training split and of a second validation set (`data_cache.py --seed 2`, see
`results/run_g/run_g_choices_validation.md`), with the real encoder on the 672 px views, and keeps each HiA block's
extracted values (the extractor's output before the injection, averaged over the queries). Per block, a multinomial
logistic regression on a pair's (before, after, after - before) is fitted on the training pairs and scored on the
second set's, as `demo_pipeline.py controls-pairs` does with the vision probes' flake maps. A high score here next to
a low one for the answers says the change reaches the extracted values and the language model does not read it
(29 pairs are few: `--folds` gives the tighter figure).
`--folds K` also scores the training pairs out of fold (K-fold cross-validation: hundreds of held-out pairs instead
of 29) from three reads of each pair, to locate where a change is lost: the high-resolution vision probe's flake map
(what the encoder's own heads read), the encoder's grid features at the flake's box (its location given), and HiA's
extracted values; then, along the same chain, the extractor's attention (its un-normalised mass and its entropy,
which a softmax-weighted average leaves out), the decoder's last hidden states at the characters where the answer
decides the change, and the model's own decision there (teacher-forced, no probe). `--train-pairs` fits on the
extra flake pairs of `data_cache.py --train-pairs` too (546 small-flake pairs instead of 83). `--held-out DIR
--encoders ...` compares encoders (their flake maps and their features at the box) on pairs that none of them trained
on (`data_cache.py --pairs-start`). `--write-train-pairs` writes the training split's small-flake pairs for
`qilin-med-vl evaluate`, so the answers on the very pairs the adapter trained on can be tallied too.
"""

import argparse
import json
from pathlib import Path

import demo_pipeline as dp
import torch


def attention_mass(module, query, key):
    """What the extractor's softmax leaves out: per image, head and query, the log of its un-normalised attention
    mass (logsumexp of the scores over the P grid cells, which grows with the number of cells that match) and the
    entropy of its attention (how many cells it spreads over): `(N, 2 * heads * M)`. A flake that grows covers more
    cells; a softmax-weighted average of their features need not change."""
    width, heads = module.embed_dim, module.num_heads
    weight, bias = module.in_proj_weight, module.in_proj_bias
    q = (query @ weight[:width].T + bias[:width]).unflatten(-1, (heads, -1)).transpose(1, 2)  # (N, heads, M, d)
    k = (key @ weight[width : 2 * width].T + bias[width : 2 * width]).unflatten(-1, (heads, -1)).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5  # (N, heads, M, P)
    entropy = -(scores.softmax(-1) * scores.log_softmax(-1)).sum(-1)
    return torch.cat([scores.logsumexp(-1).flatten(1), entropy.flatten(1)], -1)


def extracted_values(model, processor, split, pairs, batch_size=8):
    """Per pair and HiA block, (before, after, after - before) of the queries' mean extracted value
    `(pairs, blocks, 3 * D)`, and of the extractor's `attention_mass` `(pairs, blocks, 3 * 2 * heads * M)`."""
    from qilin_med_vl.modeling.modeling_hia import HiABlock

    blocks = [module for module in model.modules() if isinstance(module, HiABlock)]
    captured, masses = {}, {}
    hooks = [block.extract_attn.register_forward_hook(
        lambda module, inputs, output, index=index: captured.__setitem__(index, output[0]))
        for index, block in enumerate(blocks)]
    hooks += [block.extract_attn.register_forward_pre_hook(
        lambda module, inputs, index=index: masses.__setitem__(index, attention_mass(module, *inputs[:2])))
        for index, block in enumerate(blocks)]

    def pair_rows(per_image, count):  # (2 * count, F) -> (count, 3 * F)
        both = per_image.view(count, 2, -1)
        return dp.pair_change_features(both[:, 0], both[:, 1])

    batcher, rows, mass_rows = dp.Batcher(processor, split), [], []
    for start in range(0, len(pairs), batch_size):
        chosen = pairs[start : start + batch_size]
        batch, images = batcher(chosen, generation=True)
        batch["high_res_pixel_values"] = dp.normalise(split.high[images])
        model(**batch)
        rows.append(torch.stack([pair_rows(captured[i].mean(1), len(chosen)) for i in range(len(blocks))], 1))
        mass_rows.append(torch.stack([pair_rows(masses[i], len(chosen)) for i in range(len(blocks))], 1))
    for hook in hooks:
        hook.remove()
    return torch.cat(rows), torch.cat(mass_rows).float()


# What a flake answer says after 第二张 when the flake changed; then 缩 (improved) or 增 (worsened).
CHANGED = "低密度影范围"


def decision_reads(model, processor, split, pairs, batch_size=8):
    """Where the answer decides: each pair teacher-forced to the two characters that decide a flake pair's change,
    on the same text whatever the change (so no answer leaks in). The first is the character after 第二张 (or after
    第二张相比第一张，): the flake's location (unchanged) or 低 (changed); the second the one after 低密度影范围: 缩
    (improved) or 增 (worsened). Returns the decoder's last hidden states at both `(pairs, 2 * H)` and the model's own
    decision there, as a change index `(pairs,)` (unchanged when location beats 低, else 缩 against 增)."""
    vocabulary = processor.tokenizer.convert_tokens_to_ids
    side, low, shrink, grow = vocabulary(["右", "左"]), vocabulary("低"), vocabulary("缩"), vocabulary("增")
    batcher, states, decisions = dp.Batcher(processor, split), [], []
    for start in range(0, len(pairs), batch_size):
        chosen = pairs[start : start + batch_size]
        answers, cuts = [], []
        for r in chosen:
            answer = split.records[r]["conversations"][-1]["value"]
            cut = answer.index("第二张") + len("第二张")
            cut += len("相比第一张，") if answer.startswith("相比第一张，", cut) else 0
            answers.append(answer[:cut] + CHANGED + "增大、密度减低，提示病变较前加重。")
            cuts.append(cut)
        batch, images = batcher(chosen, answers=answers)
        labels = batch["labels"]  # HiA's instruction then ends before the answer, as in training
        batch["high_res_pixel_values"] = dp.normalise(split.high[images])
        output = model(**batch, output_hidden_states=True)
        hidden = output.hidden_states[-1]
        for row, cut in enumerate(cuts):
            answer_tokens = (labels[row] != -100).nonzero().flatten()
            text = processor.tokenizer.convert_ids_to_tokens(batch["input_ids"][row, answer_tokens].tolist())
            first = text.index("第")  # the answer's first character (a tokenizer may put a word-start mark before it)
            at = answer_tokens[first + cut - 1], answer_tokens[first + cut + len(CHANGED) - 1]
            assert text[first + cut] == "低" and text[first + cut + len(CHANGED)] == "增", text
            states.append(torch.cat([hidden[row, at[0]], hidden[row, at[1]]]))
            logits = output.logits[row]
            if logits[at[0], side].max() > logits[at[0], low]:
                decisions.append(dp.FLAKE_CHANGES.index("unchanged"))
            else:
                decisions.append(dp.FLAKE_CHANGES.index("improved" if logits[at[1], shrink] > logits[at[1], grow]
                                                        else "worsened"))
    return torch.stack(states).float(), torch.tensor(decisions)


def box_features(split, features, pairs):
    """Per pair, (before, after, after - before) of the encoder's grid features averaged over the cells of the
    flake's box (the generator's box: where the flake is, known exactly; a vanished flake's cells are those of its
    box in the image before): `(pairs, 3 * D)`. `features` `(images, P, D)` on a square grid over the 1024-px
    reference image."""
    grid = int(features.shape[1] ** 0.5)
    cell = dp.REFERENCE / grid

    def cells(image):
        x0, y0, x1, y1 = (int(v // cell) for v in split.boxes[image][0])
        return [y * grid + x for y in range(y0, y1 + 1) for x in range(x0, x1 + 1)]

    rows = []
    for record in pairs:
        before, after = split.images_of[record]
        at_before = cells(before)
        at_after = cells(after) if split.boxes[after][0][0] >= 0 else at_before
        first, second = features[before][at_before].mean(0), features[after][at_after].mean(0)
        rows.append(dp.pair_change_features(first, second))
    return torch.stack(rows)


def cross_validated(x, y, folds, seed=0):
    """Out-of-fold predictions of `fit_change_classifier` on `x` `(pairs, F)`: each pair predicted by the classifier
    fitted on the other folds (pairs shuffled into `folds` folds)."""
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    predicted = torch.empty_like(y)
    for fold in range(folds):
        held = order[fold::folds]
        kept = torch.ones(len(y), dtype=torch.bool)
        kept[held] = False
        torch.manual_seed(0)
        predicted[held] = dp.fit_change_classifier(x[kept], y[kept], steps=400, lr=0.02, l2=1e-2)(x[held])
    return predicted


def tally(predicted, y):
    """"N of M right (improved / worsened / unchanged)"."""
    right = predicted == y
    by_change = " / ".join(f"{int(right[y == c].sum())} of {int((y == c).sum())}"
                           for c in range(len(dp.FLAKE_CHANGES)))
    return f"{int(right.sum())} of {len(y)} right ({by_change})"


def encoder_reads(encoder_files, data_dir, folds):
    """For each saved high-resolution probe (encoder + heads), the out-of-fold change of the small-flake pairs of
    `<data_dir>/train_pairs` (pairs none of them trained on) from its flake map and from its encoder's features at
    the flake's box."""
    split = dp.Split(data_dir, "train_pairs")
    pairs = dp.flake_pairs(split.records, small_only=True)
    labels = torch.tensor([dp.FLAKE_CHANGES.index(split.records[r]["meta"]["change"]) for r in pairs])
    images = [split.images_of[r] for r in pairs]
    print(f"held-out small-flake pairs: {len(pairs)}, {folds}-fold cross-validation")
    for path in encoder_files:
        probe = dp.load_high_probe(path).eval()
        predicted = cross_validated(dp.probe_pair_features(probe, split.high, images, 16), labels, folds)
        print(f"  {path}: vision probe at 672 px (flake logit, extent, amount): {tally(predicted, labels)}")
        features = torch.cat([probe.encoder(dp.normalise(split.high[i : i + 8]))
                              for i in range(0, len(split.high), 8)])
        predicted = cross_validated(box_features(split, features.float(), pairs), labels, folds)
        print(f"  {path}: encoder features at the flake's box: {tally(predicted, labels)}")


@torch.no_grad()
def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/demo")
    parser.add_argument("--adapter", default=None, help="default: <run>/HiA")
    parser.add_argument("--second-validation", default="runs/val2/data",
                        help="data folder of the second validation set (its validation split is scored)")
    parser.add_argument("--folds", type=int, default=0,
                        help="also score the training pairs out of fold (K-fold cross-validation)")
    parser.add_argument("--train-pairs", action="store_true",
                        help="fit on the extra flake pairs of data_cache.py --train-pairs as well")
    parser.add_argument("--write-train-pairs", default=None, metavar="FILE",
                        help="only write the training split's small-flake pairs as JSON lines, then stop")
    parser.add_argument("--held-out", default=None, metavar="DATA_DIR",
                        help="only compare --encoders on the pairs of DATA_DIR/train_pairs (data_cache.py "
                             "--pairs-start: pairs no encoder trained on), then stop")
    parser.add_argument("--encoders", nargs="+", default=None, help="with --held-out: saved high-resolution probes "
                        "(default <run>/vision_high.pt)")
    args = parser.parse_args()
    run = Path(args.run)
    if args.held_out:
        encoder_reads(args.encoders or [run / "vision_high.pt"], args.held_out, args.folds or 5)
        return
    if args.write_train_pairs:
        records = [json.loads(line) for line in (run / "data" / "train.jsonl").read_text("utf-8").splitlines()]
        print(f"{dp.write_small_flake_pairs(records, args.write_train_pairs)} pairs -> {args.write_train_pairs}")
        return
    from peft import PeftModel

    import qilin_med_vl  # noqa: F401
    from qilin_med_vl.modeling.modeling_qilin_med_vl import QilinMedVLForConditionalGeneration

    base = QilinMedVLForConditionalGeneration.from_pretrained(run / "base")
    model = PeftModel.from_pretrained(base, args.adapter or run / "HiA").eval()
    processor = dp.load_processor(run)
    data, train_pairs = {}, None
    for name, folder, split_name in (("train", run / "data", "train"),
                                     ("second validation", Path(args.second_validation), "validation")):
        split = dp.Split(folder, split_name)
        if name == "train" and args.train_pairs:
            split.extend(dp.Split(folder, "train_pairs"))
        pairs = dp.flake_pairs(split.records, small_only=True)
        labels = torch.tensor([dp.FLAKE_CHANGES.index(split.records[r]["meta"]["change"]) for r in pairs])
        values, mass = extracted_values(model, processor, split, pairs)
        data[name] = (values, labels)
        if name == "train":
            train_pairs, train_mass = (split, pairs), mass
    (x_train, y_train), (x_test, y_test) = data["train"], data["second validation"]
    width = x_train.shape[-1] // 3
    # Each block's extracted values are read twice: from their change alone and from the whole pair.
    value_reads = (("after - before", slice(2 * width, 3 * width)),
                   ("before, after, after - before", slice(0, 3 * width)))
    if args.folds:
        # The same training pairs, each predicted out of fold: many more held-out pairs than the second set's 29,
        # for the vision probe's read of the flake (what the encoder sees) and for HiA's extracted values.
        split, pairs = train_pairs
        high_probe = dp.load_probes(run)[1]
        vision = dp.probe_pair_features(high_probe, split.high, [split.images_of[r] for r in pairs], 16)
        print(f"{args.folds}-fold cross-validation on the {len(y_train)} training pairs:")
        predicted = cross_validated(vision, y_train, args.folds)
        print(f"  vision probe at 672 px (flake logit, extent, amount): {tally(predicted, y_train)}")
        cached = [run / "features_train.pt"] + ([run / "features_train_pairs.pt"] if args.train_pairs else [])
        features = torch.cat([torch.load(path)["672"] for path in cached]).float()
        predicted = cross_validated(box_features(split, features, pairs), y_train, args.folds)
        print(f"  encoder features at the flake's box (its location known): {tally(predicted, y_train)}")
        for block in range(x_train.shape[1]):
            for name, columns in value_reads:
                predicted = cross_validated(x_train[:, block, columns], y_train, args.folds)
                print(f"  HiA block {block}, {name}: {tally(predicted, y_train)}")
        for block in range(x_train.shape[1]):
            predicted = cross_validated(train_mass[:, block], y_train, args.folds)
            print(f"  HiA block {block}, its attention's mass and entropy (before, after, after - before): "
                  f"{tally(predicted, y_train)}")
        states, decisions = decision_reads(model, processor, split, pairs)
        predicted = cross_validated(states, y_train, args.folds)
        print(f"  the decoder's last hidden states at the two deciding characters: {tally(predicted, y_train)}")
        print(f"  the model's own decision there (no probe): {tally(decisions, y_train)}")
    print(f"small-flake pairs: {len(y_train)} training, {len(y_test)} second validation; "
          f"changes {dp.FLAKE_CHANGES}")
    for block in range(x_train.shape[1]):
        for name, columns in value_reads:
            torch.manual_seed(0)
            predicted = dp.fit_change_classifier(x_train[:, block, columns], y_train, steps=400, lr=0.02,
                                                 l2=1e-2)(x_test[:, block, columns])
            print(f"HiA block {block}, {name}: {tally(predicted, y_test)}")


if __name__ == "__main__":
    main()
