"""Secrets and training artefacts never reach the Hub, and a checkpoint never makes us read outside itself."""

import json
import shutil

import pytest
import torch

from qilin_med_vl.conversion import ConversionError
from qilin_med_vl.conversion.checkpoint_io import find_weight_files
from qilin_med_vl.hub import assemble_repo, check_repo_folder, push_to_hub
from qilin_med_vl.testing import tiny_model


@pytest.fixture
def run_folder(saved, tmp_path):
    """A training run folder: the model plus what Trainer and DeepSpeed leave next to it."""
    folder = tmp_path / "run"
    shutil.copytree(saved, folder)
    (folder / "checkpoint-500").mkdir()
    (folder / "checkpoint-500" / "optimizer.pt").write_bytes(b"o" * 100)
    (folder / "checkpoint-500" / "model.safetensors").write_bytes(b"m" * 100)
    (folder / "global_step500").mkdir()
    (folder / "global_step500" / "mp_rank_00_model_states.pt").write_bytes(b"s" * 100)
    (folder / "training_args.bin").write_bytes(b"a" * 10)
    (folder / "optimizer.pt").write_bytes(b"o" * 10)
    (folder / "notes.txt").write_text("private notes")
    return folder


def uploaded(result):
    return {path for path, _ in result.files}


def test_a_link_to_the_token_is_refused_by_name(run_folder, tmp_path):
    secret = tmp_path / "home" / ".cache" / "huggingface" / "token"
    secret.parent.mkdir(parents=True)
    secret.write_text("hf_SECRET")
    (run_folder / "tokenizer.model").symlink_to(secret)  # a name on the allow-list, pointing outside
    with pytest.raises(ValueError, match="tokenizer.model .*symbolic link"):
        push_to_hub(run_folder, "me/x", dry_run=True)


def test_a_link_under_any_name_never_uploads_the_token(run_folder, tmp_path):
    secret = tmp_path / "token"
    secret.write_text("hf_SECRET")
    (run_folder / "token").symlink_to(secret)
    result = push_to_hub(run_folder, "me/x", dry_run=True)
    assert "token" not in uploaded(result) and "token" in result.left_out
    with pytest.raises(ValueError, match="symbolic link"):
        push_to_hub(run_folder, "me/x", dry_run=True, include=["token"])


def test_links_inside_the_folder_are_fine(run_folder):
    (run_folder / "generation_config.json").unlink()
    (run_folder / "gen.json").write_text(json.dumps({"bos_token_id": 1}))
    (run_folder / "generation_config.json").symlink_to(run_folder / "gen.json")
    result = push_to_hub(run_folder, "me/x", dry_run=True)
    assert "generation_config.json" in uploaded(result)


def test_training_leftovers_stay_home_unless_asked_for(run_folder, tmp_path):
    result = push_to_hub(run_folder, "me/x", dry_run=True)
    files = uploaded(result)
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json", "README.md",
            "modeling_qilin_med_vl.py"} <= files
    assert not any(name.startswith(("checkpoint-", "global_step")) for name in files)
    assert not {"training_args.bin", "optimizer.pt", "notes.txt"} & files
    assert {"checkpoint-500/optimizer.pt", "training_args.bin", "notes.txt"} <= set(result.left_out)
    summary = result.summary()
    assert "not uploaded" in summary and "checkpoint-500/optimizer.pt" in summary and "MiB" in summary
    asked = push_to_hub(run_folder, "me/x", dry_run=True, include=["checkpoint-500/*", "notes.txt"])
    assert {"checkpoint-500/optimizer.pt", "checkpoint-500/model.safetensors", "notes.txt"} <= uploaded(asked)
    assert "training_args.bin" not in uploaded(asked)


def test_the_list_and_size_are_shown_before_uploading(run_folder, monkeypatch):
    events = []

    class Api:
        def __init__(self, token=None):
            pass

        def create_repo(self, *args, **kwargs):
            events.append("create_repo")

        def upload_folder(self, **kwargs):
            events.append("upload_folder")
            return type("Commit", (), {"commit_url": "https://example.invalid/c"})()

    monkeypatch.setattr("huggingface_hub.HfApi", Api)
    push_to_hub(run_folder, "me/x", announce=lambda result: events.append(("announce", len(result.files))))
    assert events[0][0] == "announce" and events[0][1] > 5 and events[1:] == ["create_repo", "upload_folder"]


def test_an_adapter_run_folder_gives_only_its_adapter_files(saved, tmp_path):
    from peft import get_peft_model

    from qilin_med_vl.modeling.configuration_hia import HiAConfig

    adapter = tmp_path / "hia-run"
    get_peft_model(tiny_model(), HiAConfig(num_queries=8, num_heads=4, encoder_depths=[1, 1], encoder_width=8,
                                           high_res_size=56)).save_pretrained(adapter)
    (adapter / "optimizer.pt").write_bytes(b"o")
    (adapter / "training_args.bin").write_bytes(b"a")
    result = push_to_hub(saved, "me/x", dry_run=True, adapter=adapter)
    assert {name for name in uploaded(result) if name.startswith("hia/")} == {"hia/adapter_config.json",
                                                                              "hia/adapter_model.safetensors"}


def test_a_shard_index_pointing_outside_is_refused(saved, tmp_path):
    outside = tmp_path / "outside.bin"
    torch.save({"w": torch.zeros(1)}, outside)
    folder = tmp_path / "release" / "deep"
    folder.mkdir(parents=True)
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"w": "../../outside.bin"}}))
    with pytest.raises(ConversionError, match=r"outside.bin.*refusing"):
        find_weight_files(folder)
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"w": str(outside)}}))
    with pytest.raises(ConversionError, match="outside"):
        find_weight_files(folder)
    model = tmp_path / "model"
    shutil.copytree(saved, model)
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "../outside.bin"}}))
    assert any("outside" in problem for problem in check_repo_folder(model))
    with pytest.raises(ValueError, match="outside.bin.*refusing"):
        assemble_repo(model, tmp_path / "assembled")
