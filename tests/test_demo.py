"""`qilin-med-vl demo` and the embedded demo model."""

import json

import pytest
from peft import get_peft_model

from experiments.synthetic_hia.demo_builder import install_demo_model
from qilin_med_vl.cli import main as cli
from qilin_med_vl.demo import DEMO_EXAMPLES_DIR, DEMO_MODEL_DIR
from qilin_med_vl.modeling.configuration_hia import HiAConfig
from qilin_med_vl.testing import tiny_model, tiny_processor


@pytest.fixture(scope="module")
def trained_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    tiny_model().save_pretrained(root / "base")
    tiny_processor().save_pretrained(root / "base")
    get_peft_model(tiny_model(), HiAConfig(num_queries=8, num_heads=4, encoder_depths=[1, 1], encoder_width=8,
                                           high_res_size=56)).save_pretrained(root / "hia")
    return root


def test_install_demo_model_keeps_weights_and_drops_remote_code(trained_folders, tmp_path):
    target = tmp_path / "demo_model"
    (target / "examples").mkdir(parents=True)
    (target / "examples" / "keep.txt").write_text("x")
    install_demo_model(trained_folders / "base", trained_folders / "hia", target)
    names = {path.name for path in target.iterdir()}
    assert {"config.json", "model.safetensors", "hia", "examples"} <= names
    assert not any(name.endswith(".py") for name in names)
    assert "auto_map" not in json.loads((target / "config.json").read_text())
    assert (target / "examples" / "keep.txt").exists()
    assert sorted(p.name for p in (target / "hia").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_demo_writes_a_report_for_the_shipped_pair(trained_folders, tmp_path, capsys):
    from qilin_med_vl.demo import COMPARATIVE_QUESTION, generate_report
    from qilin_med_vl.loading import load_model_and_processor

    folder = tmp_path / "model"
    install_demo_model(trained_folders / "base", trained_folders / "hia", folder)
    output = tmp_path / "report.md"
    assert cli(["demo", "--model", str(folder), "--output", str(output), "--max-new-tokens", "6"]) == 0
    model, processor = load_model_and_processor(str(folder), "hia")
    images = [str(DEMO_EXAMPLES_DIR / "before.png"), str(DEMO_EXAMPLES_DIR / "after.png")]
    expected = generate_report(model, processor, images, COMPARATIVE_QUESTION, max_new_tokens=6)
    report = output.read_text(encoding="utf-8")
    assert COMPARATIVE_QUESTION in report and expected in report and "不可用于临床" in report
    assert capsys.readouterr().out.strip() == expected


def test_the_embedded_demo_model_ships_with_the_package(capsys):
    assert (DEMO_MODEL_DIR / "config.json").is_file() and (DEMO_MODEL_DIR / "hia" / "adapter_config.json").is_file()
    size = sum(path.stat().st_size for path in DEMO_MODEL_DIR.rglob("*")
               if path.is_file() and "examples" not in path.parts)
    assert size <= 30 * 1024 * 1024  # base 18 MB + HiA with its own decoder layer 3 and lm_head 9 MB, in float32
    assert cli(["demo", "--max-new-tokens", "48"]) == 0
    answer = capsys.readouterr().out
    assert any("\u4e00" <= character <= "\u9fff" for character in answer)  # a Chinese report
