"""Finding-level accuracy of the synthetic evaluation, next to BLEU/METEOR: does an answer name the right disease,
the right location, the right change? Broken down by finding (small flakes are the lesions the low-resolution path
cannot see).

    python experiments/synthetic_hia/analyze.py runs/synthetic

Reads `data/test.jsonl` (its `meta` labels) and `eval/<variant>/predictions.jsonl`; writes `analysis.md`.
"""

import json
import sys
from collections import defaultdict
from pathlib import Path

from qilin_med_vl.synthetic.findings import CHANGE_NAMES, DISEASE_NAMES

VARIANTS = ["base", "HiA", "HiA_wo_IA", "HiA_wo_HR"]


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


def main(run_dir: str) -> None:
    run = Path(run_dir)
    records = {r["id"]: r for r in map(json.loads, (run / "data" / "test.jsonl").read_text(encoding="utf-8").splitlines())}
    table = defaultdict(dict)
    for variant in VARIANTS:
        path = run / "eval" / variant / "predictions.jsonl"
        if not path.exists():
            continue
        counts = defaultdict(lambda: [0, 0])
        for row in map(json.loads, path.read_text(encoding="utf-8").splitlines()):
            record = records[row["id"]]
            key = (record["task"], finding_key(record["meta"]))
            counts[key][0] += correct(record, row["prediction"])
            counts[key][1] += 1
        for key, (right, total) in counts.items():
            table[key][variant] = f"{100 * right / total:.0f} ({total})"
    variants = [v for v in VARIANTS if any(v in row for row in table.values())]
    lines = ["| task | finding | " + " | ".join(variants) + " |", "|---|---|" + "---|" * len(variants)]
    for (task, finding) in sorted(table):
        lines.append(f"| {task} | {finding} | " + " | ".join(table[(task, finding)].get(v, "-") for v in variants) + " |")
    text = "Finding-level accuracy, % (count)\n\n" + "\n".join(lines) + "\n"
    (run / "analysis.md").write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/synthetic")
