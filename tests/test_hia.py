"""HiA as a PEFT adapter: the paper's architecture, the correctness rules the original code broke, and the
PEFT / transformers integration paths."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from qilin_med_vl.modeling.configuration_hia import HiAConfig
from qilin_med_vl.modeling.modeling_hia import HiABlock, HiALayer, grid_position_codes
from qilin_med_vl.testing import random_image, tiny_model


def hia_config(**overrides):
    values = dict(num_queries=8, num_heads=4, encoder_depths=[1, 1], encoder_width=8, high_res_size=56)
    return HiAConfig(**{**values, **overrides})


def perturb(model, seed=0, std=0.3):
    """Give every HiA block a non-zero output projection, so the adapter is no longer the identity."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, HiABlock):
            with torch.no_grad():
                module.output_proj.weight.copy_(
                    torch.randn(module.output_proj.weight.shape, generator=generator) * std
                )
    return model


def hia_model(seed=0, perturbed=True, **overrides):
    model = get_peft_model(tiny_model(), hia_config(**overrides))
    model.eval()
    return perturb(model, seed) if perturbed else model


COMPARE = "USER: <image>\n<image>\n第一张和第二张分别是治疗前后的图片，请对比两张图片。 ASSISTANT:"


def test_default_layers_are_l_over_3_and_2l_over_3():
    model = get_peft_model(tiny_model(num_hidden_layers=6), hia_config())
    config = model.peft_config["default"]
    assert config.layers == [2, 4]
    wrapped = [name for name, module in model.named_modules() if isinstance(module, HiALayer)]
    assert wrapped == [
        "base_model.model.model.language_model.layers.2",
        "base_model.model.model.language_model.layers.4",
    ]
    assert HiAConfig().num_queries == 256 and HiAConfig().high_res_size == 672
    assert config.base_hidden_size == 64 and config.base_num_layers == 6


def test_no_block_after_the_last_decoder_layer():
    """A block edits the image tokens' hidden states; after the last layer nothing reads them again, so it would
    train to nothing. The default stays off the last layer in shallow models; asking for it is refused."""
    assert get_peft_model(tiny_model(num_hidden_layers=3), hia_config()).peft_config["default"].layers == [1]
    assert get_peft_model(tiny_model(num_hidden_layers=2), hia_config()).peft_config["default"].layers == [0]
    with pytest.raises(ValueError, match="is the last of the 4 decoder layers"):
        get_peft_model(tiny_model(), hia_config(layers=[1, 3]))
    with pytest.raises(ValueError, match="at least 2 layers"):
        get_peft_model(tiny_model(num_hidden_layers=1), hia_config())


def test_new_adapter_is_the_identity(processor, images):
    base = tiny_model()
    inputs = processor(images=images[:2], text=COMPARE, return_tensors="pt")
    with torch.no_grad():
        expected = base(**inputs).logits
        adapted = get_peft_model(tiny_model(), hia_config()).eval()
        torch.testing.assert_close(adapted(**inputs).logits, expected, atol=1e-6, rtol=0)


def test_only_encoder_and_blocks_train_and_queries_are_parameters():
    model = get_peft_model(tiny_model(), hia_config())
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".hia.default." in name for name in trainable)
    assert any(name.endswith("hia.default.queries") for name in trainable)
    assert sum(".hia.default.encoder." in name for name in trainable) > 0
    encoders = [m for m in model.modules() if isinstance(m, HiABlock) and m.encoder is not None]
    assert len(encoders) == 1  # one shared high-resolution encoder, in the first HiA layer


def _training_batch(processor, answers, padding_side):
    prompts = ["USER: <image>\n描述图片。 ASSISTANT:", "USER: <image>\n<image>\n对比两张图片的变化。 ASSISTANT:"]
    texts = [p + " " + a + "</s>" for p, a in zip(prompts, answers)]
    batch = processor(images=[[random_image(0)], [random_image(1), random_image(2)]], text=texts,
                      return_tensors="pt", padding_side=padding_side)
    labels = batch["input_ids"].clone()
    for row, prompt in enumerate(prompts):
        prompt_length = len(processor(images=[random_image(0)] * prompt.count("<image>"), text=prompt)["input_ids"][0])
        real = batch["attention_mask"][row].nonzero().flatten()
        start = int(real[0])
        labels[row, : start + prompt_length] = -100
        labels[row, batch["attention_mask"][row] == 0] = -100
    return batch, labels


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_answer_tokens_never_reach_earlier_positions(processor, padding_side):
    """h_last is the token before the first supervised one: changing an answer token changes no earlier logit."""
    model = hia_model()
    batch_a, labels_a = _training_batch(processor, ["左侧股骨下段可见片状低密度影", "好转"], padding_side)
    batch_b, labels_b = _training_batch(processor, ["右侧股骨下段可见片状低密度影", "加重"], padding_side)
    assert torch.equal(labels_a != -100, labels_b != -100)
    with torch.no_grad():
        logits_a = model(**batch_a, labels=labels_a).logits
        logits_b = model(**batch_b, labels=labels_b).logits
    for row in range(2):
        changed = (batch_a["input_ids"][row] != batch_b["input_ids"][row]).nonzero().flatten()
        first_change = int(changed[0])
        torch.testing.assert_close(logits_a[row, :first_change], logits_b[row, :first_change], atol=1e-6, rtol=0)
        assert not torch.allclose(logits_a[row, first_change:], logits_b[row, first_change:])


def test_instruction_changes_what_is_injected(processor, images):
    model = hia_model()
    a = processor(images=images[:1], text="USER: <image>\n左侧有无骨折？ ASSISTANT:", return_tensors="pt")
    b = processor(images=images[:1], text="USER: <image>\n右侧有无骨折？ ASSISTANT:", return_tensors="pt")
    image_positions = a["input_ids"][0] == processor.image_token_id
    with torch.no_grad():
        hidden_a = model(**a, output_hidden_states=True).hidden_states[-1][0, image_positions]
        hidden_b = model(**b, output_hidden_states=True).hidden_states[-1][0, image_positions]
    assert not torch.allclose(hidden_a, hidden_b)  # the image tokens saw the (different) instruction
    blind = hia_model(instruction_aware=False)
    with torch.no_grad():
        hidden_a = blind(**a, output_hidden_states=True).hidden_states[-1][0, image_positions]
        hidden_b = blind(**b, output_hidden_states=True).hidden_states[-1][0, image_positions]
    torch.testing.assert_close(hidden_a, hidden_b)  # "w/o IA": the instruction does not enter


def test_each_sample_uses_its_own_images_and_text_only_samples_pass_through(processor, images):
    model = hia_model()
    texts = [
        "USER: 你好 ASSISTANT:",
        "USER: <image>\n描述 ASSISTANT:",
        "USER: <image>\n<image>\n<image>\n对比三张 ASSISTANT:",
    ]
    sample_images = [[], images[:1], images[1:4]]
    batch = processor(images=sample_images, text=texts, return_tensors="pt", padding_side="left")
    with torch.no_grad():
        batched = model(**batch).logits
        for row, (text, sample) in enumerate(zip(texts, sample_images)):
            single = processor(images=sample or None, text=text, return_tensors="pt")
            length = single["input_ids"].shape[1]
            torch.testing.assert_close(batched[row, -length:], model(**single).logits[0], atol=1e-4, rtol=0)
        text_only = processor(text=texts[0], return_tensors="pt")
        with model.disable_adapter():
            base_logits = model(**text_only).logits
        torch.testing.assert_close(model(**text_only).logits, base_logits, atol=0, rtol=0)


def test_adapter_changes_image_conditioned_outputs(processor, images):
    model = hia_model()
    inputs = processor(images=images[:2], text=COMPARE, return_tensors="pt")
    with torch.no_grad():
        adapted = model(**inputs).logits
        with model.disable_adapter():
            base = model(**inputs).logits
    assert (adapted - base).abs().max() > 1e-3


def test_greedy_generation_equals_a_teacher_forced_pass(processor, images):
    model = hia_model()
    inputs = processor(images=images[:2], text=COMPARE, return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=0)
    prompt_length = inputs["input_ids"].shape[1]
    labels = generated.clone()
    labels[:, :prompt_length] = -100  # so h_last is the last prompt token, as at inference
    with torch.no_grad():
        logits = model(input_ids=generated, pixel_values=inputs["pixel_values"],
                       high_res_pixel_values=inputs["high_res_pixel_values"], labels=labels).logits
    assert torch.equal(logits[0, prompt_length - 1 : -1].argmax(-1), generated[0, prompt_length:])


def test_high_res_view_is_dropped_after_prefill(processor, images):
    model = hia_model()
    inputs = processor(images=images[:2], text=COMPARE, return_tensors="pt")
    encoder = next(m.encoder for m in model.modules() if isinstance(m, HiABlock) and m.encoder is not None)
    calls = []
    handle = encoder.register_forward_hook(lambda *args: calls.append(1))
    model.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=0)
    handle.remove()
    assert len(calls) == 1


def test_batched_generation_matches_one_prompt_at_a_time(processor, images):
    model = hia_model()
    texts = [COMPARE, "USER: <image>\n描述图片。 ASSISTANT:", "USER: 你好 ASSISTANT:"]
    sample_images = [images[:2], images[2:3], []]
    batch = processor(images=sample_images, text=texts, return_tensors="pt", padding_side="left")
    out = model.generate(
        **batch, max_new_tokens=5, do_sample=False, output_scores=True, return_dict_in_generate=True, pad_token_id=0
    )
    scores = torch.stack(out.scores, dim=1)
    for row, (text, sample) in enumerate(zip(texts, sample_images)):
        single = processor(images=sample or None, text=text, return_tensors="pt")
        single_out = model.generate(
            **single, max_new_tokens=5, do_sample=False, output_scores=True, return_dict_in_generate=True,
            pad_token_id=0,
        )
        torch.testing.assert_close(scores[row], torch.stack(single_out.scores, dim=1)[0], atol=1e-4, rtol=0)


def train_three_steps(model, processor, images):
    """Three AdamW steps (lr 1e-2) of everything trainable, on one comparative answer."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = processor(images=images[:2], text=COMPARE + " 好转</s>", return_tensors="pt")
    labels = batch["input_ids"].clone()
    labels[:, :-3] = -100
    for _ in range(3):
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def test_base_stays_bit_identical_after_training_steps(processor, images):
    model = get_peft_model(tiny_model(), hia_config())
    before = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    adapter_before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    train_three_steps(model, processor, images)
    for name, p in model.named_parameters():
        if name in before:
            assert torch.equal(p, before[name]), name
    changed = [
        name for name, p in model.named_parameters() if p.requires_grad and not torch.equal(p, adapter_before[name])
    ]
    assert any("queries" in name for name in changed) and any("encoder" in name for name in changed)


def test_gradient_checkpointing_gives_the_same_gradients(processor, images):
    batch = processor(images=images[:2], text=COMPARE + " 好转</s>", return_tensors="pt")
    grads = []
    for checkpointing in (False, True):
        model = hia_model()
        model.train()
        if checkpointing:
            model.base_model.model.activation_checkpointing_enable()
            model.enable_input_require_grads()
        model(**batch, labels=batch["input_ids"]).loss.backward()
        grads.append(
            {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
        )
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4)


def test_bfloat16_forward(processor, images):
    model = hia_model().to(torch.bfloat16)
    inputs = processor(images=images[:2], text=COMPARE, return_tensors="pt")
    logits = model(**inputs).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


def test_extractor_attention_is_returned_per_layer_and_image(processor, images):
    model = hia_model()
    inputs = processor(images=images[:2], text=COMPARE, return_tensors="pt")
    out = model(**inputs, output_hia_attentions=True)
    assert len(out.hia_attentions) == 2  # two HiA layers
    grid_h, grid_w = out.hia_grid_size
    assert out.hia_attentions[0].shape == (2, 8, grid_h * grid_w)
    torch.testing.assert_close(out.hia_attentions[0].sum(-1), torch.ones(2, 8))


def test_save_writes_only_the_adapter_and_loads_under_any_name(processor, images, tmp_path):
    model = hia_model()
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert all(".hia." in key and ".default." not in key for key in saved)
    assert any(key.endswith("hia.queries") for key in saved)
    assert any("running_mean" in key for key in saved)  # BatchNorm statistics of the encoder travel too
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "HIA" and config["layers"] == [1, 2]

    inputs = processor(images=images[:2], text=COMPARE, return_tensors="pt")
    with torch.no_grad():
        expected = model(**inputs).logits
        loaded = PeftModel.from_pretrained(tiny_model(), tmp_path, adapter_name="xray").eval()
        torch.testing.assert_close(loaded(**inputs).logits, expected, atol=1e-6, rtol=0)
        native = tiny_model()
        native.load_adapter(str(tmp_path), adapter_name="other")
        torch.testing.assert_close(native(**inputs).logits, expected, atol=1e-6, rtol=0)


def test_modules_to_save_train_with_the_adapter_and_leave_the_base_alone(processor, images, tmp_path):
    """The decoder layer after HiA's last block and lm_head (what reads HiA's injection) train as PEFT
    modules_to_save copies: saved in the adapter, reloaded by PEFT and by transformers' load_adapter, and the base's
    own weights come back when the adapter is disabled."""
    model = get_peft_model(tiny_model(), hia_config(modules_to_save=["language_model.layers.3", "lm_head"]))
    base_head = model.get_base_model().lm_head.original_module.weight.detach().clone()
    train_three_steps(model, processor, images)
    model.eval()
    head = model.get_base_model().lm_head
    assert not torch.equal(head.modules_to_save["default"].weight, base_head)
    assert torch.equal(head.original_module.weight, base_head)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert "base_model.model.lm_head.weight" in saved
    assert any(".language_model.layers.3.mlp." in key for key in saved)
    assert not any(".language_model.layers.2.mlp." in key for key in saved)  # the frozen layers stay in the base

    inputs = processor(images=images[:2], text=COMPARE, return_tensors="pt")
    with torch.no_grad():
        expected = model(**inputs).logits
        loaded = PeftModel.from_pretrained(tiny_model(), tmp_path).eval()
        torch.testing.assert_close(loaded(**inputs).logits, expected, atol=1e-6, rtol=0)
        native = tiny_model()
        native.load_adapter(str(tmp_path), adapter_name="hia")
        torch.testing.assert_close(native(**inputs).logits, expected, atol=1e-6, rtol=0)
        with loaded.disable_adapter():
            torch.testing.assert_close(loaded(**inputs).logits, tiny_model()(**inputs).logits, atol=1e-6, rtol=0)
    for name in ("language_model.layers.2.mlp", "layers.2", "model.language_model.layers.2"):
        with pytest.raises(ValueError, match="lies in decoder layer 2, which HiA wraps"):
            get_peft_model(tiny_model(), hia_config(modules_to_save=[name]))
    with pytest.raises(ValueError, match="lies in decoder layer 1, which HiA wraps"):  # "mlp" matches every layer's
        get_peft_model(tiny_model(), hia_config(modules_to_save=["mlp"]))
    with pytest.raises(ValueError, match="'language_model.layer.3' matches no module"):  # a typo trains nothing
        get_peft_model(tiny_model(), hia_config(modules_to_save=["language_model.layer.3"]))
    # the vision tower's layer of the same index is not HiA's: it trains and is saved
    vision = get_peft_model(tiny_model(), hia_config(modules_to_save=["encoder.layers.1"]))
    assert any(".vision_tower." in name and ".modules_to_save." in name
               for name, p in vision.named_parameters() if p.requires_grad)


def test_full_resolution_stem_is_saved_and_rebuilt_from_the_config(processor, images, tmp_path):
    model = hia_model(encoder_stem="full_resolution")
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["encoder_stem"] == "full_resolution"
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert any(".hia.encoder.stem." in key for key in saved) and not any("encoder.conv1" in key for key in saved)
    inputs = processor(images=images[:2], text=COMPARE, return_tensors="pt")
    with torch.no_grad():
        expected = model(**inputs).logits
        loaded = PeftModel.from_pretrained(tiny_model(), tmp_path).eval()
        torch.testing.assert_close(loaded(**inputs).logits, expected, atol=1e-6, rtol=0)
        # the stem reads the high-resolution view: another view changes the answer's logits
        inputs["high_res_pixel_values"] = inputs["high_res_pixel_values"].flip(-1)
        assert not torch.allclose(loaded(**inputs).logits, expected, atol=1e-4)
    with pytest.raises(ValueError, match="encoder_stem must be 'resnet' or 'full_resolution', got 'vit'"):
        hia_config(encoder_stem="vit")


def test_an_adapter_saved_before_encoder_stem_and_feature_positions_loads_as_it_was(processor, images, tmp_path):
    model = hia_model()
    model.save_pretrained(tmp_path)
    config_path = tmp_path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    assert config.pop("encoder_stem") == "resnet"
    assert config.pop("feature_positions") == "none"
    config_path.write_text(json.dumps(config))
    inputs = processor(images=images[:2], text=COMPARE, return_tensors="pt")
    with torch.no_grad():
        loaded = PeftModel.from_pretrained(tiny_model(), tmp_path).eval()
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, atol=1e-6, rtol=0)
    assert loaded.peft_config["default"].encoder_stem == "resnet"
    assert loaded.peft_config["default"].feature_positions == "none"


def test_grid_position_codes_tell_every_cell_apart_row_and_column_separately():
    codes = grid_position_codes((3, 5), 16)
    assert codes.shape == (15, 16)
    assert len({tuple(code.tolist()) for code in codes.round(decimals=5)}) == 15
    grid = codes.view(3, 5, 16)
    # the first half codes the row (equal along a row), the second the column (equal down a column)
    torch.testing.assert_close(grid[:, :, :8], grid[:, :1, :8].expand(3, 5, 8))
    torch.testing.assert_close(grid[:, :, 8:], grid[:1, :, 8:].expand(3, 5, 8))
    # fractions of the grid: the slowest column code changes sign between the image's halves at any resolution
    for columns in (4, 21):
        slowest = grid_position_codes((1, columns), 16)[:, 12]  # cos(pi * x) of the column centre x
        assert (slowest[: columns // 2] > 0).all() and (slowest[columns - columns // 2 :] < 0).all()


@pytest.mark.parametrize("feature_positions", ["none", "sincos"])
def test_feature_positions_let_the_extractor_tell_where_a_feature_is(feature_positions):
    block = HiABlock(hia_config(feature_positions=feature_positions, hidden_size=16), 32, owns_encoder=False).eval()
    torch.nn.init.normal_(block.output_proj.weight)
    visual, instruction = torch.randn(1, 4, 32), torch.randn(1, 32)
    # one distinct feature on a 2 x 2 grid, in the top-left cell or the top-right one; the others equal
    left, right = torch.zeros(1, 4, 16), torch.zeros(1, 4, 16)
    left[0, 0], right[0, 1] = 3.0 * torch.arange(16.0).cos(), 3.0 * torch.arange(16.0).cos()
    with torch.no_grad():
        on_left, _ = block(visual, instruction, left, False, (2, 2))
        on_right, _ = block(visual, instruction, right, False, (2, 2))
    if feature_positions == "none":  # attention over an unordered set: the same features anywhere, the same update
        torch.testing.assert_close(on_left, on_right)
    else:
        assert (on_left - on_right).abs().max() > 1e-3


def test_feature_positions_refuse_bad_values_and_a_missing_grid():
    with pytest.raises(ValueError, match="feature_positions must be 'none' or 'sincos', got 'learned'"):
        hia_config(feature_positions="learned")
    with pytest.raises(ValueError, match="must be a multiple of 4 for feature_positions='sincos'"):
        HiABlock(hia_config(feature_positions="sincos", hidden_size=10, num_heads=2), 32, owns_encoder=False)
    block = HiABlock(hia_config(feature_positions="sincos", hidden_size=16), 32, owns_encoder=False)
    with pytest.raises(ValueError, match="needs the grid of the 4 features, got None"):
        block(torch.randn(1, 4, 32), torch.randn(1, 32), torch.randn(1, 4, 16), False)


def test_sincos_adapter_is_saved_and_reloads_with_its_positions(processor, images, tmp_path):
    model = hia_model(feature_positions="sincos")
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["feature_positions"] == "sincos"
    inputs = processor(images=images[:2], text=COMPARE, return_tensors="pt")
    with torch.no_grad():
        expected = model(**inputs).logits
        loaded = PeftModel.from_pretrained(tiny_model(), tmp_path).eval()
        torch.testing.assert_close(loaded(**inputs).logits, expected, atol=1e-6, rtol=0)
        loaded.peft_config["default"].feature_positions = "none"  # the same weights without the codes differ
        for module in loaded.modules():
            if isinstance(module, HiABlock):
                module.feature_positions = "none"
        assert not torch.allclose(loaded(**inputs).logits, expected, atol=1e-4)


def test_several_named_adapters(processor, images, tmp_path):
    first, second = hia_model(seed=1), hia_model(seed=2)
    first.save_pretrained(tmp_path / "first")
    second.save_pretrained(tmp_path / "second")
    inputs = processor(images=images[:2], text=COMPARE, return_tensors="pt")
    with torch.no_grad():
        expected_first, expected_second = first(**inputs).logits, second(**inputs).logits
        model = PeftModel.from_pretrained(tiny_model(), tmp_path / "first", adapter_name="first")
        model.load_adapter(tmp_path / "second", adapter_name="second")
        model.eval()
        model.set_adapter("second")
        torch.testing.assert_close(model(**inputs).logits, expected_second, atol=1e-6, rtol=0)
        model.set_adapter("first")
        torch.testing.assert_close(model(**inputs).logits, expected_first, atol=1e-6, rtol=0)


@pytest.fixture
def folder_with_hia(tmp_path, processor):
    tiny_model().save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    adapted = hia_model()
    adapted.save_pretrained(tmp_path / "hia")
    return tmp_path, adapted


def test_load_adapter_by_bare_name_and_adapter_kwargs(folder_with_hia, processor, images):
    from transformers import AutoModelForImageTextToText

    folder, adapted = folder_with_hia
    inputs = processor(images=images[:2], text=COMPARE, return_tensors="pt")
    with torch.no_grad():
        expected = adapted(**inputs).logits
        model = AutoModelForImageTextToText.from_pretrained(folder).eval()
        model.load_adapter("hia")
        torch.testing.assert_close(model(**inputs).logits, expected, atol=1e-6, rtol=0)
        direct = AutoModelForImageTextToText.from_pretrained(folder, adapter_kwargs={"subfolder": "hia"}).eval()
        torch.testing.assert_close(direct(**inputs).logits, expected, atol=1e-6, rtol=0)


def test_pipeline_with_hia_loaded(folder_with_hia, processor, images, tmp_path):
    from transformers import AutoModelForImageTextToText, pipeline

    folder, _ = folder_with_hia
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    model.load_adapter("hia")
    for index in range(2):
        images[index].save(tmp_path / f"{index}.png")
    messages = [{"role": "user", "content": [{"type": "image", "path": str(tmp_path / "0.png")},
                                             {"type": "image", "path": str(tmp_path / "1.png")},
                                             {"type": "text", "text": "请对比两张图片。"}]}]
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    out = pipe(text=messages, generate_kwargs={"max_new_tokens": 5, "do_sample": False}, return_full_text=False)
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    ids = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert out[0]["generated_text"] == processor.tokenizer.decode(
        ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True
    )


def test_clear_errors(folder_with_hia, processor, images, tmp_path):
    folder, adapted = folder_with_hia
    inputs = processor(images=images[:1], text="<image>\n描述", return_tensors="pt")
    with pytest.raises(ValueError, match="no high_res_pixel_values"):
        adapted(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"])
    wrong_size = processor(images=images[:1], text="<image>\n描述", return_tensors="pt", high_res_size=84)
    with pytest.raises(ValueError, match="built for 56x56 .* got 84x84"):
        adapted(**wrong_size)
    with pytest.raises(ValueError, match="hidden size 64, but the model has 128"):
        PeftModel.from_pretrained(tiny_model(hidden_size=128), folder / "hia")
    with pytest.raises(ValueError, match="built for a language model of 4 layers, but the model has 5"):
        PeftModel.from_pretrained(tiny_model(num_hidden_layers=5), folder / "hia")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no adapter_config.json"):
        tiny_model().load_adapter(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="cannot be merged"):
        adapted.merge_and_unload()


FRESH_PROCESS = textwrap.dedent(
    """
    import sys, torch
    sys.modules["qilin_med_vl"] = None  # only transformers + peft + the folder's remote code
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor
    folder = sys.argv[1]
    expected = torch.load(folder + "/expected.pt")
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    inputs = processor(images=[folder + "/0.png", folder + "/1.png"], text=expected["text"], return_tensors="pt")
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    model.load_adapter("hia")
    torch.testing.assert_close(model(**inputs).logits, expected["logits"], atol=1e-6, rtol=0)
    direct = AutoModelForImageTextToText.from_pretrained(
        folder, trust_remote_code=True, adapter_kwargs={"subfolder": "hia"}
    )
    torch.testing.assert_close(direct(**inputs).logits, expected["logits"], atol=1e-6, rtol=0)
    peft_model = PeftModel.from_pretrained(
        AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True), folder + "/hia"
    )
    torch.testing.assert_close(peft_model(**inputs).logits, expected["logits"], atol=1e-6, rtol=0)
    print("FRESH-HIA-OK")
    """
)


def test_hia_loads_in_a_fresh_process_with_remote_code_only(folder_with_hia, processor, images, tmp_path):
    folder, adapted = folder_with_hia
    for index in range(2):
        images[index].save(folder / f"{index}.png")
    inputs = processor(images=[str(folder / "0.png"), str(folder / "1.png")], text=COMPARE, return_tensors="pt")
    with torch.no_grad():
        torch.save({"logits": adapted(**inputs).logits, "text": COMPARE}, folder / "expected.pt")
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    result = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(folder)], cwd=tmp_path, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "FRESH-HIA-OK" in result.stdout


@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_hia_trains_on_a_quantized_base(tmp_path, processor, images, quantization):
    import bitsandbytes as bnb
    from transformers import BitsAndBytesConfig

    from qilin_med_vl import QilinMedVLForConditionalGeneration

    tiny_model().save_pretrained(tmp_path)
    config = (BitsAndBytesConfig(load_in_8bit=True) if quantization == "8bit"
              else BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32))
    base = QilinMedVLForConditionalGeneration.from_pretrained(tmp_path, quantization_config=config, device_map="cpu")
    assert any(isinstance(m, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)) for m in base.modules())
    model = get_peft_model(base, hia_config())
    adapter_parameters = [p for p in model.parameters() if p.requires_grad]
    assert adapter_parameters and all(p.dtype == torch.float32 for p in adapter_parameters)
    batch = processor(images=images[:2], text=COMPARE + " 好转</s>", return_tensors="pt")
    model.train()
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in adapter_parameters]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    model.eval()
    generated = model.generate(**processor(images=images[:2], text=COMPARE, return_tensors="pt"), max_new_tokens=3,
                               do_sample=False, pad_token_id=0)
    assert generated.shape[1] > 3


def test_an_adapter_with_modules_to_save_loads_on_a_4bit_base(tmp_path, processor, images):
    """The copied modules must stay unquantized: the package's loader keeps them so; a base quantized without them
    gets an error that says what to do, not a size mismatch."""
    import bitsandbytes as bnb
    from transformers import BitsAndBytesConfig

    from qilin_med_vl import QilinMedVLForConditionalGeneration
    from qilin_med_vl.loading import adapter_copied_modules, load_model_and_processor

    tiny_model().save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    adapted = hia_model(modules_to_save=["language_model.layers.3", "lm_head"])
    with torch.no_grad():
        adapted.get_base_model().lm_head.modules_to_save["default"].weight.mul_(2.0)
    adapted.save_pretrained(tmp_path / "hia")
    assert adapter_copied_modules(str(tmp_path), "hia") == ["model.language_model.layers.3", "lm_head"]

    model, _ = load_model_and_processor(str(tmp_path), "hia", "cpu", load_in_4bit=True, dtype=torch.float32)
    quantized = [name for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 3 * 7 and not any(".layers.3." in name for name in quantized)
    inputs = processor(images=images[:2], text=COMPARE, return_tensors="pt")
    with torch.no_grad():
        quantized_logits, float_logits = model(**inputs).logits, adapted(**inputs).logits
        with adapted.disable_adapter():
            base_logits = adapted(**inputs).logits
    # the adapter's doubled head answers on the 4-bit base, not the base's own head
    assert (quantized_logits - float_logits).abs().mean() < 0.5 * (quantized_logits - base_logits).abs().mean()

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    base = QilinMedVLForConditionalGeneration.from_pretrained(tmp_path, quantization_config=config, device_map="cpu")
    with pytest.raises(ValueError, match="is quantized .bitsandbytes. in this model.*llm_int8_skip_modules"):
        base.load_adapter(str(tmp_path / "hia"))


def test_hia_attaches_to_transformers_llava_identity_trains_saves_reloads(processor, images, tmp_path):
    """HiA needs nothing from the model it wraps: on transformers' own Llava (the same weights as a tiny Qilin-Med-VL)
    it starts as the identity, trains, saves and reloads, and then acts exactly as the Qilin-Med-VL adapter does."""
    from transformers import LlavaForConditionalGeneration

    from qilin_med_vl.conversion import llava_config_from_qilin

    def llava():
        reference = tiny_model()  # seeded: the same weights every call
        model = LlavaForConditionalGeneration(llava_config_from_qilin(reference.config)).eval()
        model.load_state_dict(reference.state_dict(), strict=True)
        return model

    inputs = processor(images=images[:2], text=COMPARE, return_tensors="pt")
    with torch.no_grad():
        base_logits = llava()(**{k: v for k, v in inputs.items() if k != "high_res_pixel_values"}).logits
        adapted = get_peft_model(llava(), hia_config())
        torch.testing.assert_close(adapted(**inputs).logits, base_logits, atol=0, rtol=0)  # identity at creation

    adapted.train()
    optimizer = torch.optim.AdamW([p for p in adapted.parameters() if p.requires_grad], lr=1e-2)
    labels = inputs["input_ids"].clone()
    for _ in range(3):
        loss = adapted(**inputs, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    adapted.eval()
    with torch.no_grad():
        trained_logits = adapted(**inputs).logits
    assert (trained_logits - base_logits).abs().max() > 1e-4  # it trained and acts
    adapted.save_pretrained(tmp_path)

    with torch.no_grad():
        reloaded = PeftModel.from_pretrained(llava(), tmp_path).eval()
        torch.testing.assert_close(reloaded(**inputs).logits, trained_logits, atol=1e-6, rtol=0)
        ours = PeftModel.from_pretrained(tiny_model(), tmp_path).eval()  # the same adapter on Qilin-Med-VL
        torch.testing.assert_close(ours(**inputs).logits, trained_logits, atol=1e-5, rtol=0)


def test_adapter_dtype_follows_peft_rules(tmp_path, processor, images):
    """For training, HiA follows `autocast_adapter_dtype` as LoRA does (float32 by default on a bf16 base, the
    base dtype when it is False); loaded for inference, it runs in the base model's dtype."""

    def hia_dtypes(model):
        return {p.dtype for name, p in model.named_parameters() if ".hia." in name}

    def bf16_base():
        return tiny_model().to(torch.bfloat16)

    assert hia_dtypes(get_peft_model(bf16_base(), hia_config())) == {torch.float32}
    trained = get_peft_model(bf16_base(), hia_config(), autocast_adapter_dtype=False)
    assert hia_dtypes(trained) == {torch.bfloat16}
    trained.save_pretrained(tmp_path)
    for_inference = PeftModel.from_pretrained(bf16_base(), tmp_path)
    assert hia_dtypes(for_inference) == {torch.bfloat16}
    assert hia_dtypes(PeftModel.from_pretrained(bf16_base(), tmp_path, is_trainable=True)) == {torch.float32}
    inputs = processor(images=images[:2], text=COMPARE, return_tensors="pt")
    with torch.no_grad():
        assert for_inference(**inputs).logits.dtype == torch.bfloat16
