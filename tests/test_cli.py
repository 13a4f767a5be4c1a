"""The `qilin-med-vl chat` command on a tiny model folder."""

import pytest
from peft import get_peft_model

from qilin_med_vl.cli import main as cli
from qilin_med_vl.modeling.configuration_hia import HiAConfig
from qilin_med_vl.testing import random_image, tiny_model, tiny_processor


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat")
    model, processor = tiny_model(), tiny_processor()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    adapted = get_peft_model(tiny_model(), HiAConfig(num_queries=8, num_heads=4, encoder_depths=[1, 1],
                                                     encoder_width=8, high_res_size=56))
    adapted.save_pretrained(folder / "hia")
    random_image(0).save(folder / "before.png")
    random_image(1).save(folder / "after.png")
    return folder


def _expected_answer(folder, question, adapter=None):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    if adapter:
        model.load_adapter(adapter)
    processor = AutoProcessor.from_pretrained(folder)
    messages = [{"role": "user", "content": [{"type": "image", "path": str(folder / "before.png")},
                                             {"type": "image", "path": str(folder / "after.png")},
                                             {"type": "text", "text": question}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    ids = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    return processor.tokenizer.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


@pytest.mark.parametrize("adapter", [None, "hia"])
def test_chat_streams_the_greedy_answer(model_folder, capsys, adapter):
    question = "请对比两张图片。"
    argv = ["chat", "--model", str(model_folder), "--image", str(model_folder / "before.png"),
            "--image", str(model_folder / "after.png"), "--max-new-tokens", "6", question]
    if adapter:
        argv[1:1] = ["--adapter", adapter]
    assert cli(argv) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == _expected_answer(model_folder, question, adapter)


def test_chat_multi_turn_reads_questions_until_an_empty_line(model_folder, capsys, monkeypatch):
    answers = iter(["描述第一张。", "第二张呢？", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(answers))
    assert cli(["chat", "--model", str(model_folder), "--image", str(model_folder / "before.png"),
                "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.count("ASSISTANT:") == 2


def test_chat_names_a_missing_image(model_folder, capsys):
    # One line and exit status 2, before the model is loaded (not an exception after the load).
    assert cli(["chat", "--model", str(model_folder), "--image", str(model_folder / "missing.png"), "描述"]) == 2
    assert "missing.png" in capsys.readouterr().err
