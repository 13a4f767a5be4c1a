import pytest
import torch
from transformers import LlavaForConditionalGeneration

from qilin_med_vl import QilinMedVLConfig
from qilin_med_vl.conversion import llava_config_from_qilin
from qilin_med_vl.testing import tiny_config, tiny_model


def test_default_config_describes_the_13b_release():
    config = QilinMedVLConfig()
    text, vision = config.text_config, config.vision_config
    assert (text.hidden_size, text.intermediate_size, text.num_hidden_layers) == (5120, 13824, 40)
    assert (text.num_attention_heads, text.num_key_value_heads, text.max_position_embeddings) == (40, 40, 4096)
    assert (vision.hidden_size, vision.image_size, vision.patch_size, vision.num_hidden_layers) == (1024, 336, 14, 24)
    assert config.projector_type == "mlp2x_gelu"
    assert (config.vision_feature_layer, config.vision_feature_select_strategy) == (-2, "default")
    assert config.image_seq_length == 576 and config.image_token_id == 32000


def test_config_rejects_inconsistent_sizes():
    with pytest.raises(ValueError, match="image_seq_length=5"):
        tiny_config().__class__(**{**tiny_config().to_dict(), "image_seq_length": 5})
    with pytest.raises(ValueError, match="projector_type"):
        tiny_config(projector_type="resampler")


def test_module_tree_and_weight_names_match_transformers_llava():
    model = tiny_model()
    llava = LlavaForConditionalGeneration(llava_config_from_qilin(model.config))
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in llava.state_dict().items()}


def _llava_with_same_weights(model):
    llava = LlavaForConditionalGeneration(llava_config_from_qilin(model.config)).eval()
    llava.load_state_dict(model.state_dict(), strict=True)
    return llava


@pytest.mark.parametrize("num_images", [1, 2])
def test_llava_weights_give_the_same_logits_and_greedy_output(processor, images, num_images):
    model = tiny_model()
    llava = _llava_with_same_weights(model)
    prompt = "USER: " + "<image>\n" * num_images + "请对比两张图片。 ASSISTANT:"
    inputs = processor(images=images[:num_images], text=prompt, return_tensors="pt")
    with torch.no_grad():
        ours = model(**inputs).logits
        theirs = llava(
            input_ids=inputs.input_ids, pixel_values=inputs.pixel_values, attention_mask=inputs.attention_mask
        ).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    generate_kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    ours_ids = model.generate(**inputs, **generate_kwargs)
    theirs_ids = llava.generate(
        input_ids=inputs.input_ids, pixel_values=inputs.pixel_values, attention_mask=inputs.attention_mask,
        **generate_kwargs,
    )
    assert torch.equal(ours_ids, theirs_ids)


def test_linear_projector_has_one_layer():
    model = tiny_model(projector_type="linear")
    names = [name for name, _ in model.model.multi_modal_projector.named_parameters()]
    assert names == ["linear_1.weight", "linear_1.bias"]
    features = model.get_image_features(torch.randn(2, 3, 28, 28)).pooler_output
    assert features.shape == (2, 4, 64)


def test_image_count_mismatch_inside_the_model_is_a_clear_error(processor, images):
    model = tiny_model()
    inputs = processor(images=images[:1], text="<image>\n描述", return_tensors="pt")
    with pytest.raises(ValueError, match="4 image tokens but 2 images"):
        model(input_ids=inputs.input_ids, pixel_values=torch.cat([inputs.pixel_values] * 2))


def test_high_res_view_is_ignored_without_hia(processor, images):
    model = tiny_model()
    inputs = processor(images=images[:2], text="<image>\n<image>\n对比", return_tensors="pt")
    with torch.no_grad():
        with_high_res = model(**inputs).logits
        without = model(input_ids=inputs.input_ids, pixel_values=inputs.pixel_values).logits
    torch.testing.assert_close(with_high_res, without, atol=0, rtol=0)


def _step_scores(model, inputs, steps):
    out = model.generate(
        **inputs, max_new_tokens=steps, do_sample=False, output_scores=True, return_dict_in_generate=True,
        pad_token_id=0,
    )
    return out.sequences, torch.stack(out.scores, dim=1)


def test_batched_left_padded_generation_matches_one_prompt_at_a_time(processor, images):
    model = tiny_model()
    texts = [
        "USER: <image>\n描述图片。 ASSISTANT:",
        "USER: 你好 ASSISTANT:",
        "USER: <image>\n左侧<image>\n右侧<image>\n对比这三张图片的变化。 ASSISTANT:",
    ]
    per_sample_images = [images[:1], [], images[1:4]]
    batch = processor(images=per_sample_images, text=texts, return_tensors="pt", padding_side="left")
    assert batch.pixel_values.shape[0] == 4
    batched_ids, batched_scores = _step_scores(model, batch, steps=6)
    prompt_length = batch.input_ids.shape[1]
    for index, (text, sample_images) in enumerate(zip(texts, per_sample_images)):
        single = processor(images=sample_images or None, text=text, return_tensors="pt")
        ids, scores = _step_scores(model, single, steps=6)
        torch.testing.assert_close(batched_scores[index], scores[0], atol=1e-4, rtol=0)
        assert torch.equal(batched_ids[index, prompt_length:], ids[0, single.input_ids.shape[1]:])


def test_kv_cache_generation_equals_recomputing_the_full_sequence(processor, images):
    model = tiny_model()
    inputs = processor(images=images[:2], text="USER: <image>\n<image>\n对比 ASSISTANT:", return_tensors="pt")
    ids = model.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=inputs.pixel_values).logits
    prompt_length = inputs.input_ids.shape[1]
    assert torch.equal(logits[0, prompt_length - 1 : -1].argmax(-1), ids[0, prompt_length:])


def test_loss_is_taken_only_on_labelled_positions(processor, images):
    model = tiny_model()
    inputs = processor(images=images[:1], text="<image>\n骨折", return_tensors="pt")
    labels = torch.full_like(inputs.input_ids, -100)
    labels[0, -2:] = inputs.input_ids[0, -2:]
    out = model(**inputs, labels=labels)
    expected = torch.nn.functional.cross_entropy(out.logits[0, -3:-1], inputs.input_ids[0, -2:])
    torch.testing.assert_close(out.loss, expected)


def test_gradient_checkpointing_gives_the_same_gradients(processor, images):
    inputs = processor(images=images[:1], text="<image>\n骨折", return_tensors="pt")
    grads = []
    for checkpointing in (False, True):
        model = tiny_model().train()
        if checkpointing:
            model.activation_checkpointing_enable()
        model(**inputs, labels=inputs.input_ids).loss.backward()
        grads.append(model.model.multi_modal_projector.linear_1.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])
