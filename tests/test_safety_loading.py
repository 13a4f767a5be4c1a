"""Loads that would be silently wrong (weights missing or renamed), model locations that are typos, and the web app,
whose model is chosen by whoever starts the server."""

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from qilin_med_vl.cli import main as cli
from qilin_med_vl.loading import IncompleteCheckpointError, load_model_and_processor
from qilin_med_vl.testing import random_image


@pytest.fixture
def more_layers(saved, tmp_path):
    """config.json says two more language-model layers than the weights hold."""
    folder = tmp_path / "five-layers"
    shutil.copytree(saved, folder)
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["num_hidden_layers"] += 2
    (folder / "config.json").write_text(json.dumps(config))
    return folder, config["text_config"]["num_hidden_layers"] - 2  # the first layer without weights


@pytest.fixture
def renamed(saved, tmp_path):
    folder = tmp_path / "renamed"
    shutil.copytree(saved, folder)
    weights = load_file(folder / "model.safetensors")
    weights["model.multi_modal_projector.linear_9.weight"] = weights.pop("model.multi_modal_projector.linear_1.weight")
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_a_complete_checkpoint_loads(saved):
    model, processor = load_model_and_processor(str(saved))
    assert not model.training


def test_config_with_more_layers_than_the_weights_is_refused_by_name(more_layers):
    folder, first_missing = more_layers
    with pytest.raises(IncompleteCheckpointError, match=rf"missing .*layers\.{first_missing}\."):
        load_model_and_processor(str(folder))
    model, _ = load_model_and_processor(str(folder), allow_missing_weights=True)  # the explicit opt-in
    assert model.config.text_config.num_hidden_layers == first_missing + 2


def test_a_renamed_weight_is_refused_naming_both_keys(renamed):
    with pytest.raises(IncompleteCheckpointError) as error:
        load_model_and_processor(str(renamed))
    assert "linear_1.weight" in str(error.value) and "linear_9.weight" in str(error.value)


def test_chat_refuses_in_one_line_and_allows_with_the_flag(renamed, tmp_path, capsys):
    image = tmp_path / "a.png"
    random_image(0).save(image)
    assert cli(["chat", "--model", str(renamed), "--image", str(image), "--max-new-tokens", "1",
                "描述"]) == 2
    err = capsys.readouterr().err
    assert "linear_9.weight" in err and "--allow-missing-weights" in err and "Traceback" not in err
    assert cli(["chat", "--model", str(renamed), "--image", str(image), "--max-new-tokens", "1",
                "--allow-missing-weights", "描述"]) == 0


def test_evaluate_refuses_an_incomplete_checkpoint(more_layers, tmp_path, capsys):
    folder, _ = more_layers
    data = tmp_path / "test.jsonl"
    data.write_text(json.dumps({"id": "1", "conversations": [{"from": "human", "value": "q"},
                                                              {"from": "gpt", "value": "a"}]}) + "\n")
    assert cli(["evaluate", "--model", str(folder), "--data", str(data), "--output-dir", str(tmp_path / "o")]) == 2
    assert "missing" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_a_missing_local_folder_is_named_not_called_a_bad_repo_id(tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no-such-model: the local folder does not exist"):
        load_model_and_processor(str(missing))
    assert cli(["chat", "--model", str(missing), "describe"]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Repo id must be" not in err
    assert cli(["chat", "--model", "./relative/typo", "describe"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_missing_adapter_folder_is_named(saved, tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter .*does not exist"):
        load_model_and_processor(str(saved), adapter=str(tmp_path / "run" / "checkpoint-9"))


# The web app: visitors cannot load models unless the server allows it.


def test_visitors_cannot_switch_the_model_by_default(saved, tmp_path):
    from qilin_med_vl.app.model import ModelManager, ModelSpec
    from qilin_med_vl.app.server import on_load_model

    manager = ModelManager(ModelSpec.create(str(saved)))
    status, _ = on_load_model(manager, "/etc", "", "none")
    assert "--allow-model-switching" in status and manager.spec.model == str(saved) and manager.loaded is None
    status, _ = on_load_model(manager, "someone/huge-model", "", "none")
    assert manager.spec.model == str(saved) and manager.loaded is None


def test_switching_is_an_explicit_server_option(saved):
    from qilin_med_vl.app.model import ModelManager, ModelSpec
    from qilin_med_vl.app.server import on_load_model
    from qilin_med_vl.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["app"]).allow_model_switching is False
    assert parser.parse_args(["app", "--allow-model-switching"]).allow_model_switching is True
    manager = ModelManager(ModelSpec.create(str(saved)), allow_model_switching=True)
    status, _ = on_load_model(manager, str(saved), "", "none")
    assert manager.loaded is not None and "allow-model-switching" not in status
