"""Never lose a user's files: conversion outputs, push's assembled folder, training records, evaluation predictions,
converted datasets, interrupted conversions. Each test fails on the behaviour it was written against."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
from test_conversion import build_clip, build_original_release  # noqa: E402  (tests/ is on sys.path)

from qilin_med_vl.cli import main as cli
from qilin_med_vl.conversion import convert_original
from qilin_med_vl.conversion.staging import staged_output
from qilin_med_vl.hub import push_to_hub
from qilin_med_vl.testing import random_image, tiny_model, tiny_processor
from qilin_med_vl.training import ConversationDataset, DataValidationError


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("release")
    clip = build_clip(root / "clip")
    build_original_release(root / "release", clip, shards=1)
    return root / "release", clip


def tree(folder):
    return sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*"))


# 1. convert --force where the output is the source, or a folder containing it


def test_convert_force_into_the_source_folder_is_refused_and_deletes_nothing(release, tmp_path):
    source, clip = release
    before = tree(source)
    with pytest.raises(ValueError, match="would delete the input"):
        convert_original(source, source, clip=clip, force=True, progress=False)
    assert tree(source) == before


def test_convert_force_into_a_parent_of_the_source_is_refused(release, tmp_path):
    source, clip = release
    parent = source.parent
    (parent / "notes.txt").write_text("unrelated")
    with pytest.raises(ValueError, match="is or contains the input"):
        convert_original(source, parent, clip=clip, force=True, progress=False)
    assert (parent / "notes.txt").read_text() == "unrelated" and (source / "config.json").is_file()


def test_convert_command_line_says_so_in_one_line(release, capsys):
    source, clip = release
    assert cli(["convert", "original", str(source), str(source), "--clip", str(clip), "--force",
                "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err and (source / "config.json").is_file()


def test_convert_force_replaces_only_a_model_folder(release, tmp_path):
    source, clip = release
    documents = tmp_path / "Documents"
    documents.mkdir()
    (documents / "thesis.tex").write_text("mine")
    with pytest.raises(FileExistsError, match="thesis.tex"):
        convert_original(source, documents, clip=clip, force=True, progress=False)
    assert (documents / "thesis.tex").read_text() == "mine"
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(FileExistsError, match="not a folder"):
        convert_original(source, tmp_path / "file", clip=clip, force=True, progress=False)
    assert (tmp_path / "file").read_text() == "not a folder"


# 2. push --dry-run --assembled DIR replaced an existing DIR


def test_dry_run_never_writes_the_assembled_folder(saved, tmp_path):
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "thesis.tex").write_text("four years of work")
    with pytest.raises(ValueError, match="dry run writes nothing"):
        push_to_hub(saved, "me/x", dry_run=True, assembled=keep)
    assert (keep / "thesis.tex").read_text() == "four years of work"
    assert not (tmp_path / "new").exists()
    with pytest.raises(ValueError):
        push_to_hub(saved, "me/x", dry_run=True, assembled=tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_assembled_folder_is_never_replaced(saved, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("must fail before contacting the Hub")

    monkeypatch.setattr("huggingface_hub.HfApi", refuse)
    keep = tmp_path / "run"
    keep.mkdir()
    (keep / "adapter_model.safetensors").write_bytes(b"trained for a week")
    with pytest.raises(FileExistsError, match="never replaced"):
        push_to_hub(saved, "me/x", assembled=keep)
    assert (keep / "adapter_model.safetensors").read_bytes() == b"trained for a week"


def test_cli_dry_run_with_assembled_keeps_the_folder(saved, tmp_path, capsys):
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "thesis.tex").write_text("mine")
    assert cli(["push", str(saved), "me/x", "--dry-run", "--assembled", str(keep)]) == 2
    assert "Traceback" not in capsys.readouterr().err and (keep / "thesis.tex").read_text() == "mine"


# 3. train dropped over-long records by id: duplicates and 1 vs "1" vanished


def test_over_long_records_are_dropped_by_position_not_by_id(tmp_path):
    short = [{"from": "human", "value": "描述"}, {"from": "gpt", "value": "好"}]
    long = [{"from": "human", "value": "描述" * 80}, {"from": "gpt", "value": "好"}]
    records = [{"id": 1, "conversations": short}, {"id": "1", "conversations": long},
               {"id": 1, "conversations": short}, {"id": "dup", "conversations": long},
               {"id": "dup", "conversations": long}]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    dataset = ConversationDataset(str(path), tiny_processor(), str(tmp_path), max_length=250)
    assert len(dataset) == 2 and all(record["conversations"] == short for record in dataset)


# 4. evaluate lost every prediction when a later record failed


@pytest.fixture(scope="module")
def eval_workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    random_image(0).save(root / "a.png")
    tiny_model().save_pretrained(root / "model")
    tiny_processor().save_pretrained(root / "model")
    return root


def eval_records(count, bad=None):
    records = []
    for index in range(count):
        image = "missing.png" if index == bad else "a.png"
        records.append({"id": f"r{index}", "image": image, "task": "t", "conversations": [
            {"from": "human", "value": "<image>\n描述"}, {"from": "gpt", "value": f"答{index}"}]})
    return records


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def test_evaluate_validates_the_whole_file_before_generating(eval_workspace, tmp_path, capsys):
    data = tmp_path / "test.jsonl"
    write_jsonl(data, eval_records(5, bad=4))
    code = cli(["evaluate", "--model", str(eval_workspace / "model"), "--data", str(data), "--image-root",
                str(eval_workspace), "--output-dir", str(tmp_path / "out"), "--max-new-tokens", "2",
                "--batch-size", "2"])
    err = capsys.readouterr().err
    assert code == 1 and "record 'r4'" in err and "missing.png" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "predictions.jsonl").exists()  # failed before generating anything


def test_evaluate_keeps_predictions_of_an_interrupted_run_and_resumes(eval_workspace, tmp_path):
    from qilin_med_vl.evaluation.run import evaluate_file
    from qilin_med_vl.loading import load_model_and_processor

    data = tmp_path / "test.jsonl"
    write_jsonl(data, eval_records(5))
    model, processor = load_model_and_processor(str(eval_workspace / "model"))
    real_generate, calls = model.generate, []

    def interrupted_generate(**kwargs):  # Ctrl-C during the third batch
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_generate(**kwargs)

    model.generate = interrupted_generate
    output = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        evaluate_file(model, processor, data, output, str(eval_workspace), batch_size=2, max_new_tokens=2)
    lines = (output / "predictions.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["r0", "r1", "r2", "r3"]
    # A crash in the middle of a write leaves a cut line: dropped and generated again.
    marked = [json.loads(line) for line in lines]
    marked[0]["prediction"] = "kept from the first run"
    (output / "predictions.jsonl").write_text(
        "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in marked) + '{"id": "r4", "pred', encoding="utf-8")
    model.generate, calls = real_generate, []
    scores = evaluate_file(model, processor, data, output, str(eval_workspace), batch_size=2, max_new_tokens=2)
    rows = [json.loads(line) for line in (output / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [row["id"] for row in rows] == ["r0", "r1", "r2", "r3", "r4"]
    assert rows[0]["prediction"] == "kept from the first run" and "per_task" in scores


def test_evaluate_refuses_predictions_of_other_data(eval_workspace, tmp_path):
    from qilin_med_vl.evaluation.run import evaluate_file

    data = tmp_path / "test.jsonl"
    write_jsonl(data, eval_records(2))
    output = tmp_path / "out"
    output.mkdir()
    (output / "predictions.jsonl").write_text('{"id": "other", "prediction": "x", "references": ["y"]}\n')
    with pytest.raises(DataValidationError, match="belongs to other data"):
        evaluate_file(None, tiny_processor(), data, output, str(eval_workspace))
    assert "other" in (output / "predictions.jsonl").read_text()


# 5. convert-chimed-vl with a corrupted image left a partial clean.jsonl and no report


def bomb_png(path, side=20000):
    """A valid PNG header announcing side x side pixels, with no pixel data: PIL's decompression-bomb check
    fires on opening it."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b""))
                     + chunk(b"IEND", b""))


def test_convert_chimed_vl_with_a_corrupted_image_writes_everything_or_nothing(tmp_path, capsys):
    random_image(0).save(tmp_path / "a.png")
    random_image(1).save(tmp_path / "c.png")
    bomb_png(tmp_path / "b.png")
    records = [{"id": str(i), "image": name, "conversations": [{"from": "human", "value": "<image>\n描述"},
                                                              {"from": "gpt", "value": "好"}]}
               for i, name in enumerate(["a.png", "b.png", "c.png"])]
    write_jsonl(tmp_path / "in.jsonl", records)
    output = tmp_path / "clean.jsonl"
    assert cli(["convert-chimed-vl", str(tmp_path / "in.jsonl"), "--output", str(output), "--image-root",
                str(tmp_path), "--check-images", "decode"]) == 0
    kept = [json.loads(line)["id"] for line in output.read_text().splitlines()]
    assert kept == ["0", "2"]
    report = json.loads((tmp_path / "clean.jsonl.report.json").read_text())
    assert report["rejected"] == {"unreadable_image": 1} and "b.png" in json.dumps(report["examples"])
    assert sorted(p.name for p in tmp_path.iterdir() if "partial" in p.name) == []


def test_convert_chimed_vl_failure_leaves_the_previous_output(tmp_path):
    from qilin_med_vl.data.chimed_vl import convert_chimed_vl

    output = tmp_path / "clean.jsonl"
    output.write_text('{"id": "from the last good run"}\n')

    def records():
        turns = [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]
        yield "in.jsonl:1", {"id": "1", "conversations": turns}
        raise OSError("the disk went away")

    with pytest.raises(OSError):
        convert_chimed_vl([], output, check_images="none", records=records())
    assert output.read_text() == '{"id": "from the last good run"}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clean.jsonl"]


# 6. SIGTERM during a conversion left a hidden .OUT.partial-* folder


def test_sigterm_removes_the_staging_folder(tmp_path):
    script = textwrap.dedent(f"""
        import sys, time
        from qilin_med_vl.conversion.staging import staged_output
        with staged_output({str(tmp_path / "out")!r}) as staging:
            (staging / "model-partial-00001.safetensors").write_bytes(b"x" * 1000)
            print("writing", flush=True)
            time.sleep(60)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert process.stdout.readline().strip() == "writing"
        assert any(".out.partial-" in path.name for path in tmp_path.iterdir())
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    finally:
        process.kill()
    assert process.returncode != 0
    assert list(tmp_path.iterdir()) == []


def test_staging_left_by_a_killed_process_is_removed_by_the_next_run(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".out.partial-{int(dead.stdout)}-abcd1234"
    stale.mkdir()
    (stale / "model-partial-00001.safetensors").write_bytes(b"x" * 1000)
    alive = tmp_path / f".out.partial-{os.getpid()}-inuse000"  # a concurrent run of this process: kept
    alive.mkdir()
    with staged_output(tmp_path / "out") as staging:
        (staging / "config.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == [alive.name, "out"]
