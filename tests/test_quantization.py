"""bitsandbytes on CPU: only the language model is quantized; vision tower, projector and head stay as they are."""

import bitsandbytes as bnb
import pytest
import torch
from transformers import BitsAndBytesConfig

from qilin_med_vl import QilinMedVLForConditionalGeneration
from qilin_med_vl.testing import random_image, tiny_model


@pytest.fixture(scope="module")
def saved_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    tiny_model().save_pretrained(folder)
    return folder


def _quantized_names(model, layer_type):
    return {name for name, module in model.named_modules() if isinstance(module, layer_type)}


@pytest.mark.parametrize(
    "kwargs, layer_type",
    [
        ({"quantization_config": BitsAndBytesConfig(load_in_8bit=True)}, bnb.nn.Linear8bitLt),
        ({"load_in_8bit": True}, bnb.nn.Linear8bitLt),
        ({"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)},
         bnb.nn.Linear4bit),
        ({"load_in_4bit": True}, bnb.nn.Linear4bit),
    ],
)
def test_only_the_language_model_is_quantized(saved_folder, processor, kwargs, layer_type):
    model = QilinMedVLForConditionalGeneration.from_pretrained(saved_folder, device_map="cpu", **kwargs)
    quantized = _quantized_names(model, layer_type)
    assert quantized, "nothing was quantized"
    assert all(name.startswith("model.language_model.layers.") for name in quantized)
    # q, k, v, o, gate, up, down in each decoder layer
    assert len(quantized) == 7 * model.config.text_config.num_hidden_layers
    assert isinstance(model.model.multi_modal_projector.linear_1, torch.nn.Linear)
    assert not isinstance(model.model.multi_modal_projector.linear_1, layer_type)
    assert not _quantized_names(model.model.vision_tower, layer_type)
    assert type(model.lm_head) is torch.nn.Linear

    reference = QilinMedVLForConditionalGeneration.from_pretrained(saved_folder).eval()
    inputs = processor(images=[random_image(0)], text="<image>\n描述 ASSISTANT:", return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits.float()
        expected = reference(**inputs).logits
    assert torch.isfinite(logits).all()
    # Quantization error only: the vision features are exact, so the logits stay close to the fp32 model.
    assert torch.nn.functional.cosine_similarity(logits.flatten(), expected.flatten(), dim=0) > 0.9
    generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert generated.shape[1] == inputs.input_ids.shape[1] + 3


def test_user_skip_list_is_respected(saved_folder):
    config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["lm_head"])
    model = QilinMedVLForConditionalGeneration.from_pretrained(
        saved_folder, quantization_config=config, device_map="cpu"
    )
    assert _quantized_names(model.model.vision_tower, bnb.nn.Linear8bitLt)


def test_device_map_auto_loads(saved_folder, processor):
    model = QilinMedVLForConditionalGeneration.from_pretrained(saved_folder, device_map="auto")
    inputs = processor(images=[random_image(0)], text="<image>\n描述", return_tensors="pt")
    assert model(**inputs).logits.shape[:2] == inputs.input_ids.shape


def test_the_callers_quantization_config_is_left_as_it_was(saved_folder):
    config = BitsAndBytesConfig(load_in_8bit=True)
    before = config.to_dict()
    QilinMedVLForConditionalGeneration.from_pretrained(saved_folder, device_map="cpu", quantization_config=config)
    assert config.to_dict() == before and config.llm_int8_skip_modules is None
