"""The demo-model experiment's measuring tools: a split rendered in part must equal the same records of the full
split, and a difference between two variants comes with an interval that says how much the records allow."""

import json
import subprocess
import sys
from pathlib import Path

from experiments.synthetic_hia.analyze import difference_from_base

DATA_CACHE = Path(__file__).resolve().parents[1] / "experiments" / "synthetic_hia" / "data_cache.py"


def render(output, *extra):
    subprocess.run([sys.executable, str(DATA_CACHE), "--output", str(output), "--seed", "5", "--train", "0",
                    "--validation", "0", "--test", "24", "--workers", "1", *extra], check=True, capture_output=True)
    return output.joinpath("test.jsonl").read_text(encoding="utf-8").splitlines()


def test_only_task_and_kind_render_exactly_the_full_splits_records(tmp_path):
    full = render(tmp_path / "full")
    part = render(tmp_path / "part", "--only-task", "comparative", "--only-kind", "flake")
    by_id = {json.loads(line)["id"]: line for line in full}
    assert len(full) == 24
    # 24 records hold 6 comparative ones, the first 4 of the comparative labels' cycle being the flake's 4 changes
    assert len(part) == 4 and all('"task": "comparative"' in line and '"kind": "flake"' in line for line in part)
    for line in part:
        assert by_id[json.loads(line)["id"]] == line
    images = sorted(path.relative_to(tmp_path / "part") for path in (tmp_path / "part" / "images").rglob("*.png"))
    assert len(images) == 8
    for image in images:
        assert (tmp_path / "part" / image).read_bytes() == (tmp_path / "full" / image).read_bytes()


def test_difference_from_base_is_paired_and_bounded():
    ids = [f"r{i}" for i in range(40)]
    base = {i: n % 2 == 0 for n, i in enumerate(ids)}
    right = {"base": base, "same": dict(base), "all": dict.fromkeys(ids, True),
             "flipped": {i: not value for i, value in base.items()}}
    # The same answers differ by nothing, whatever the resampling: the interval is paired, not two independent ones.
    assert difference_from_base(right, "same", ids) == "+0 [+0, +0] (40)"
    assert difference_from_base(right, "all", ids).startswith("+50 [")
    low, high = (int(v) for v in difference_from_base(right, "flipped", ids).split("[")[1].split("]")[0].split(","))
    assert low < 0 < high  # half the records gained, half lost: no difference either way
    assert difference_from_base(right, "same", ["missing"]) == "-"
