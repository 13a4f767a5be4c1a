"""Finding-level accuracy of the synthetic evaluation, next to BLEU/METEOR: does an answer name the right disease,
the right location, the right change? Broken down by finding (small flakes are the lesions the low-resolution path
cannot see), summarised in the rows the demo model is held to, with the vision-only controls and the pointing game
when the run has them (`demo_pipeline.py controls` / `pointing`).

    python experiments/synthetic_hia/analyze.py runs/demo                 # test split: eval/
    python experiments/synthetic_hia/analyze.py runs/demo validation      # validation split: eval_validation/

Reads `data/<split>.jsonl` (its `meta` labels) and `eval/<variant>/predictions.jsonl` (`eval_<split>/` for a split
other than test; + `scores.json`, `controls.md`, `pointing.json`); writes `analysis.md` and `results.md`
(`analysis_<split>.md`, `results_<split>.md`). Variants: base, HiA and its ablations, then any other folder there
(e.g. `shipped_base`, `shipped_HiA`: the model shipped before, for the choice on validation).

Each summary row also gets every variant's difference from the base in points with a 95 % paired bootstrap interval
(the same records resampled for both), so that a row of 22 records is not read as if it were 400.
"""

import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from qilin_med_vl.synthetic.findings import CHANGE_NAMES, DISEASE_NAMES

VARIANTS = ["base", "HiA", "HiA_wo_IA", "HiA_wo_HR"]
# The two rows that tell seeing a small flake from a default answer: how often the flake is named for small-flake
# knees against normal knees (a blind model names it as often for both).
FLAKE_FINDING = "片状低密度影"  # the report's flake finding


def finding_key(meta: dict) -> str:
    """The finding an answer is about: the disease (for comparisons, the kind that changed), with flakes split into
    small and large."""
    label = meta.get("kind", meta["label"])
    if label == "flake":
        findings = [f for image in meta["findings"] for f in image if f["kind"] == "flake"]
        if findings:
            return f"flake ({findings[0].get('size_class', 'small')})"
    return label


def correct(record: dict, prediction: str) -> bool:
    meta, task = record["meta"], record["task"]
    if task == "disease":
        return DISEASE_NAMES[meta["label"]] in prediction and all(
            name not in prediction for key, name in DISEASE_NAMES.items() if key != meta["label"]
        )
    if task == "location":
        locations = {f["location"] for image in meta["findings"] for f in image}
        if not locations:
            return "未见" in prediction
        return all(location in prediction for location in locations)
    if task == "comparative":
        return CHANGE_NAMES[meta["change"]] in prediction
    reference = record["conversations"][-1]["value"]
    return reference.replace("影像所见：", "") in prediction or prediction in reference  # description: exact report


# Summary rows: (name, task, findings it pools; None = all).
SUMMARY_ROWS = [
    ("disease, coarse findings (osteophyte, narrowing, postop, normal)", "disease",
     {"osteophyte", "narrowing", "postop", "normal"}),
    ("disease, small flakes", "disease", {"flake (small)"}),
    # the other side of the small-flake row: a model that calls every unclear knee 骨质破坏 scores high above
    ("disease, normal knees", "disease", {"normal"}),
    ("disease, large flakes", "disease", {"flake (large)"}),
    ("disease, fracture lines", "disease", {"fracture"}),
    ("location, all findings", "location", None),
    ("comparative, small-flake pairs", "comparative", {"flake (small)"}),
    ("comparative, all pairs", "comparative", None),
    ("description, exact report", "description", None),
]


def difference_from_base(right: dict, variant: str, ids: list, resamples: int = 2000) -> str:
    """`variant`'s accuracy minus the base's on the records `ids`, in points, with a 95 % paired bootstrap interval:
    both variants' answers to one record stay together when the records are resampled."""
    pairs = [(right[variant][i], right["base"][i]) for i in ids if i in right[variant] and i in right["base"]]
    if not pairs:
        return "-"
    difference = np.array([float(v) - float(b) for v, b in pairs])
    draws = np.random.default_rng(0).integers(0, len(difference), size=(resamples, len(difference)))
    low, high = np.percentile(difference[draws].mean(axis=1), [2.5, 97.5])
    return f"{100 * difference.mean():+.0f} [{100 * low:+.0f}, {100 * high:+.0f}] ({len(pairs)})"


def main(run_dir: str, split: str = "test") -> None:
    run = Path(run_dir)
    lines_of_split = (run / "data" / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
    records = {r["id"]: r for r in map(json.loads, lines_of_split)}
    evaluations = run / ("eval" if split == "test" else f"eval_{split}")
    suffix = "" if split == "test" else f"_{split}"
    extra = sorted(p.name for p in evaluations.iterdir() if p.is_dir() and p.name not in VARIANTS) \
        if evaluations.is_dir() else []
    table = defaultdict(dict)
    summary = defaultdict(dict)
    side_right = {}  # variant -> % of location and description answers naming the finding's side (and not the other)
    flake_answers = {}  # variant -> % of disease answers naming the flake disease, small-flake knees / normal knees
    answered_right = defaultdict(dict)  # variant -> record id -> answer right
    # variant -> change -> [right, total] of the small-flake pairs: tells growth read from a guess that is right for
    # one change (a blind model that always says 好转 gets every improved pair)
    pairs_by_change = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    # variant -> change -> [answers saying 加重, total]: a growth read says it for grown flakes, not unchanged ones
    worsened_said = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    row_ids = defaultdict(list)  # summary row -> its record ids
    for record in records.values():
        for name, task, findings in SUMMARY_ROWS:
            if record["task"] == task and (findings is None or finding_key(record["meta"]) in findings):
                row_ids[name].append(record["id"])
    for variant in VARIANTS + extra:
        path = evaluations / variant / "predictions.jsonl"
        if not path.exists():
            continue
        counts = defaultdict(lambda: [0, 0])
        named = defaultdict(list)
        sides = []  # location and description answers about one finding: is its side (右侧 / 左侧) the one named?
        for row in map(json.loads, path.read_text(encoding="utf-8").splitlines()):
            record = records[row["id"]]
            found = [f for image in record["meta"]["findings"] for f in image]
            if record["task"] in ("location", "description") and len(found) == 1:
                other = "左侧" if found[0]["side"] == "右侧" else "右侧"
                sides.append(found[0]["side"] in row["prediction"] and other not in row["prediction"])
            key = (record["task"], finding_key(record["meta"]))
            answered_right[variant][row["id"]] = correct(record, row["prediction"])
            counts[key][0] += answered_right[variant][row["id"]]
            counts[key][1] += 1
            if key == ("comparative", "flake (small)"):
                pairs_by_change[variant][record["meta"]["change"]][0] += answered_right[variant][row["id"]]
                pairs_by_change[variant][record["meta"]["change"]][1] += 1
                worsened_said[variant][record["meta"]["change"]][0] += CHANGE_NAMES["worsened"] in row["prediction"]
                worsened_said[variant][record["meta"]["change"]][1] += 1
            if key[0] in ("disease", "description"):
                sign = DISEASE_NAMES["flake"] if key[0] == "disease" else FLAKE_FINDING
                named[key].append(sign in row["prediction"])
        side_right[variant] = f"{100 * sum(sides) / len(sides):.0f} ({len(sides)})" if sides else "-"
        flake_answers[variant] = [f"{100 * sum(named[task, k]) / len(named[task, k]):.0f}" if named[task, k] else "-"
                                  for task in ("disease", "description") for k in ("flake (small)", "normal")]
        for key, (right, total) in counts.items():
            table[key][variant] = f"{100 * right / total:.0f} ({total})"
        for name, task, findings in SUMMARY_ROWS:
            chosen = [c for (t, f), c in counts.items() if t == task and (findings is None or f in findings)]
            if chosen:
                right, total = sum(c[0] for c in chosen), sum(c[1] for c in chosen)
                summary[name][variant] = f"{100 * right / total:.0f} ({total})"
    variants = [v for v in VARIANTS + extra if any(v in row for row in table.values())]
    lines = ["| task | finding | " + " | ".join(variants) + " |", "|---|---|" + "---|" * len(variants)]
    for (task, finding) in sorted(table):
        lines.append(f"| {task} | {finding} | " + " | ".join(table[(task, finding)].get(v, "-") for v in variants) + " |")
    rows = ["| row | " + " | ".join(variants) + " |", "|---|" + "---|" * len(variants)]
    for name, _, _ in SUMMARY_ROWS:
        if name in summary:
            rows.append(f"| {name} | " + " | ".join(summary[name].get(v, "-") for v in variants) + " |")
    rows.append("| location and description: the finding's side named (右侧 / 左侧) | " + " | ".join(
        side_right[v] for v in variants) + " |")
    rows.append("| comparative, small-flake pairs right: " + " / ".join(CHANGE_NAMES.values()) + " | " + " | ".join(
        " / ".join(f"{pairs_by_change[v][c][0]} of {pairs_by_change[v][c][1]}" for c in CHANGE_NAMES)
        for v in variants) + " |")
    rows.append(f"| comparative, small-flake pairs: {CHANGE_NAMES['worsened']} said for grown / unchanged flakes, % | "
                + " | ".join(" / ".join(f"{100 * worsened_said[v][c][0] / worsened_said[v][c][1]:.0f}"
                                        if worsened_said[v][c][1] else "-" for c in ("worsened", "unchanged"))
                             for v in variants) + " |")
    rows.append("| disease: small-flake / normal knees answered 骨质破坏, % | " + " | ".join(
        " / ".join(flake_answers[v][:2]) for v in variants) + " |")
    rows.append(f"| description: small-flake / normal knees reported with {FLAKE_FINDING}, % | " + " | ".join(
        " / ".join(flake_answers[v][2:]) for v in variants) + " |")
    others = [v for v in variants if v != "base"]
    if "base" in variants and others:
        rows += ["", "Difference from the base, points [95 % paired bootstrap interval] (records):", "",
                 "| row | " + " | ".join(others) + " |", "|---|" + "---|" * len(others)]
        rows += [f"| {name} | " + " | ".join(difference_from_base(answered_right, v, row_ids[name])
                                              for v in others) + " |"
                 for name, _, _ in SUMMARY_ROWS if row_ids[name]]
    text = (f"## Summary: finding-level accuracy on the {split} split, % (count)\n\n" + "\n".join(rows) + "\n\n"
            "## Finding-level accuracy by task and finding, % (count)\n\n" + "\n".join(lines) + "\n")
    if (run / "controls.md").is_file():
        text += "\n## Vision-only controls\n" + (run / "controls.md").read_text(encoding="utf-8")
    if (run / "controls_pairs.json").is_file():
        pairs = json.loads((run / "controls_pairs.json").read_text(encoding="utf-8"))
        text += ("\nVision-only control of the comparative row: a flake pair's change (improved / worsened / unchanged;"
                 " post-operative pairs left out) told from the probes' flake maps of its two images by a logistic "
                 "regression fitted on the training pairs; % (count), chance about 33\n\n"
                 "| path | validation, small flakes | validation, all flakes | test, small flakes | test, all flakes | "
                 "test, small: improved / worsened / unchanged |\n|---|---|---|---|---|---|\n")
        for name, row in pairs.items():
            cells = [row[part][k] for part in ("validation", "test") for k in ("small flakes", "all flakes")]
            by_change = " / ".join(f"{r} of {n}" for r, n in (row["test"][f"small, {c}"]
                                                                for c in ("improved", "worsened", "unchanged")))
            text += f"| {name} | " + " | ".join(f"{100 * r / max(n, 1):.0f} ({n})" for r, n in cells) + f" | {by_change} |\n"
    if (run / "pointing.json").is_file():
        pointing = json.loads((run / "pointing.json").read_text(encoding="utf-8"))
        text += ("\n## Pointing game (HiA extractor attention on the high-resolution grid, test images with one finding)"
                 "\n\n| finding | images | attention mass in box | box share of grid | ratio | argmax cell in box |"
                 "\n|---|---|---|---|---|---|\n")
        for key, row in pointing.items():
            ratio = row["attention_in_box"] / max(row["box_share_of_grid"], 1e-9)
            text += (f"| {key} | {row['images']} | {row['attention_in_box']:.3f} | {row['box_share_of_grid']:.3f} | "
                     f"{ratio:.1f}x | {100 * row['argmax_in_box']:.0f} % |\n")
    (run / f"analysis{suffix}.md").write_text(text, encoding="utf-8")
    scores = {v.replace("_", " ").replace("HiA", "+HiA").replace("wo", "w/o"): json.loads(
        (evaluations / v / "scores.json").read_text(encoding="utf-8")) for v in variants
        if (evaluations / v / "scores.json").is_file()}
    if scores:
        from qilin_med_vl.evaluation import format_markdown_table

        (run / f"results{suffix}.md").write_text(format_markdown_table(
            scores, task_order=["description", "disease", "location", "comparative"]) + "\n", encoding="utf-8")
        print((run / f"results{suffix}.md").read_text(encoding="utf-8"))
    print(text)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/synthetic", sys.argv[2] if len(sys.argv) > 2 else "test")
