"""A saved folder must load with only transformers (+ peft) installed: no `qilin_med_vl` import possible."""

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from qilin_med_vl.testing import random_image, tiny_model, tiny_processor

MESSAGES_TEXT = "第一张和第二张分别是治疗前后的图片，请对比两张图片。"


@pytest.fixture(scope="module")
def saved_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("checkpoint")
    model, processor = tiny_model(), tiny_processor()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    for seed in range(2):
        random_image(seed).save(folder / f"image{seed}.png")
    messages = [{"role": "user", "content": [
        {"type": "image", "path": str(folder / "image0.png")}, {"type": "image", "path": str(folder / "image1.png")},
        {"type": "text", "text": MESSAGES_TEXT}]}]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    with torch.no_grad():
        logits = model(**inputs).logits
    ids = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    torch.save({"logits": logits, "ids": ids}, folder / "expected.pt")
    (folder / "messages.json").write_text(json.dumps(messages, ensure_ascii=False))
    return folder


def test_saved_folder_holds_remote_code_and_auto_map(saved_folder):
    files = set(os.listdir(saved_folder))
    assert {"model.safetensors", "config.json", "processor_config.json", "chat_template.jinja"} <= files
    assert {"configuration_qilin_med_vl.py", "modeling_qilin_med_vl.py", "modeling_hia.py", "processing_qilin.py",
            "image_processing_qilin.py", "image_loading_qilin.py", "dicom_qilin.py",
            "image_checks_qilin.py"} <= files
    config = json.loads((saved_folder / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_qilin_med_vl.QilinMedVLConfig",
        "AutoModel": "modeling_qilin_med_vl.QilinMedVLForConditionalGeneration",
        "AutoModelForImageTextToText": "modeling_qilin_med_vl.QilinMedVLForConditionalGeneration",
    }
    for name in files:
        if name.endswith(".py"):
            source = (saved_folder / name).read_text()
            assert not re.search(r"^\s*(from|import)\s+qilin_med_vl", source, re.MULTILINE), name
            assert not re.search(r"^\s*from\s+\.\.|^\s*from\s+\.\w+\.\w+\s+import", source, re.MULTILINE), name


FRESH_PROCESS = textwrap.dedent(
    """
    import json, sys, torch
    sys.modules["qilin_med_vl"] = None  # any `import qilin_med_vl` now raises ImportError
    from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor, pipeline
    folder = sys.argv[1]
    expected = torch.load(folder + "/expected.pt")
    messages = json.loads(open(folder + "/messages.json").read())
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    for auto_class in (AutoModel, AutoModelForImageTextToText):
        model = auto_class.from_pretrained(folder, trust_remote_code=True).eval()
        assert type(model).__name__ == "QilinMedVLForConditionalGeneration", type(model)
        with torch.no_grad():
            torch.testing.assert_close(model(**inputs).logits, expected["logits"], atol=1e-6, rtol=0)
        assert torch.equal(model.generate(**inputs, max_new_tokens=6, do_sample=False), expected["ids"])
    pipe = pipeline("image-text-to-text", model=folder, trust_remote_code=True)
    out = pipe(text=messages, generate_kwargs={"max_new_tokens": 6, "do_sample": False}, return_full_text=False)
    new_ids = expected["ids"][0, inputs["input_ids"].shape[1]:]
    assert out[0]["generated_text"] == processor.tokenizer.decode(new_ids, skip_special_tokens=True), out
    print("FRESH-PROCESS-OK", out[0]["generated_text"])
    """
)


def test_fresh_process_without_the_package_loads_everything(saved_folder, tmp_path):
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    result = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, str(saved_folder)], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "FRESH-PROCESS-OK" in result.stdout


def test_pipeline_with_two_images_in_process(saved_folder):
    from transformers import pipeline

    import qilin_med_vl  # noqa: F401  (registers the classes: no trust_remote_code needed)

    messages = json.loads((saved_folder / "messages.json").read_text())
    pipe = pipeline("image-text-to-text", model=str(saved_folder))
    out = pipe(text=messages, generate_kwargs={"max_new_tokens": 6, "do_sample": False}, return_full_text=False)
    expected = torch.load(saved_folder / "expected.pt")
    prompt_length = expected["logits"].shape[1]
    assert out[0]["generated_text"] == pipe.processor.tokenizer.decode(
        expected["ids"][0, prompt_length:], skip_special_tokens=True
    )
