import logging

import numpy as np
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_file

from qilin_med_vl import ImageLoadingError, QilinImageProcessor
from qilin_med_vl.processing.processing_qilin import DEFAULT_SYSTEM_PROMPT
from qilin_med_vl.testing import random_image, tiny_processor

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711])


def reference_expand2square_clip(image: Image.Image, size: int) -> np.ndarray:
    """The original LLaVA/Qilin preprocessing, written out with PIL: paste into a square filled with
    int(255 * CLIP mean), resize (bicubic), rescale, normalise."""
    width, height = image.size
    background = tuple(int(x * 255) for x in CLIP_MEAN)
    side = max(width, height)
    square = Image.new(image.mode, (side, side), background)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    resized = np.asarray(square.resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0
    return ((resized - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1)


@pytest.mark.parametrize("size", [(300, 200), (200, 300), (256, 256)])
def test_pad_to_square_matches_the_original_pixel_for_pixel(size):
    image = random_image(7, size=size)
    out = QilinImageProcessor(high_res_size=672)(image, return_tensors="np")
    np.testing.assert_allclose(out["pixel_values"][0], reference_expand2square_clip(image, 336), atol=1e-5)
    np.testing.assert_allclose(out["high_res_pixel_values"][0], reference_expand2square_clip(image, 672), atol=1e-5)
    assert out["pixel_values"].shape == (1, 3, 336, 336)
    assert out["high_res_pixel_values"].shape == (1, 3, 672, 672)


def test_high_res_view_can_be_switched_off():
    out = QilinImageProcessor()(random_image(1), return_high_res=False, return_tensors="pt")
    assert "high_res_pixel_values" not in out


def test_numpy_tensor_and_path_inputs_agree(tmp_path):
    image = random_image(3)
    path = tmp_path / "x.png"
    image.save(path)
    processor = QilinImageProcessor(return_high_res=False)
    as_pil = processor(image, return_tensors="np")["pixel_values"]
    as_numpy = processor(np.asarray(image), return_tensors="np")["pixel_values"]
    as_tensor = processor(
        torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1), return_tensors="np"
    )["pixel_values"]
    as_path = processor(str(path), return_tensors="np")["pixel_values"]
    for other in (as_numpy, as_tensor, as_path):
        np.testing.assert_array_equal(as_pil, other)


def test_chat_template_renders_the_vicuna_v1_format(processor):
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "描述图片。"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "未见异常。"}]},
        {"role": "user", "content": [{"type": "text", "text": "左侧呢？"}]},
    ]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == (
        f"{DEFAULT_SYSTEM_PROMPT} USER: <image>\n描述图片。 ASSISTANT: 未见异常。</s>USER: 左侧呢？ ASSISTANT:"
    )
    custom = [{"role": "system", "content": "你是放射科医生。"}, {"role": "user", "content": "你好"}]
    assert (
        processor.apply_chat_template(custom, add_generation_prompt=True) == "你是放射科医生。 USER: 你好 ASSISTANT:"
    )


def reference_tokenizer_image_token(tokenizer, prompt, image_token_id, image_seq_length):
    """The original LLaVA-era algorithm: tokenize each piece between placeholders with BOS, keep one BOS,
    splice the image tokens in."""
    pieces = [tokenizer(piece).input_ids for piece in prompt.split("<image>")]
    ids = [tokenizer.bos_token_id]
    for index, piece in enumerate(pieces):
        if index:
            ids += [image_token_id] * image_seq_length
        ids += piece[1:]
    return ids


def test_tokenization_follows_the_original_algorithm(processor):
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "第一张和"}, {"type": "image"},
                                       {"type": "text", "text": "第二张分别是治疗前后的图片，请对比。"}]}],
        add_generation_prompt=True,
    )
    ids = processor(images=[random_image(0), random_image(1)], text=prompt)["input_ids"][0]
    expected = reference_tokenizer_image_token(processor.tokenizer, prompt, processor.image_token_id, 4)
    assert ids == expected
    assert ids.count(processor.image_token_id) == 8


def test_apply_chat_template_with_paths_returns_model_inputs(processor, tmp_path):
    paths = []
    for seed in range(2):
        paths.append(tmp_path / f"{seed}.png")
        random_image(seed).save(paths[-1])
    messages = [{"role": "user", "content": [
        {"type": "image", "path": str(paths[0])},
        {"type": "image", "path": str(paths[1])},
        {"type": "text", "text": "第一张和第二张分别是治疗前后的图片，请对比两张图片。"},
    ]}]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    assert inputs["pixel_values"].shape == (2, 3, 28, 28)
    assert inputs["high_res_pixel_values"].shape == (2, 3, 56, 56)
    assert int((inputs["input_ids"] == processor.image_token_id).sum()) == 8
    assert inputs["input_ids"][0, 0] == processor.tokenizer.bos_token_id


def test_batch_with_zero_one_and_three_images(processor):
    texts = ["你好", "<image>\n描述", "<image>\n<image>\n<image>\n对比"]
    images = [[], [random_image(0)], [random_image(1), random_image(2), random_image(3)]]
    out = processor(images=images, text=texts, return_tensors="pt", padding_side="right")
    assert out["pixel_values"].shape[0] == 4
    assert (out["input_ids"] == processor.image_token_id).sum(dim=1).tolist() == [0, 4, 12]
    assert out["attention_mask"][0].sum() < out["attention_mask"].shape[1]
    assert out["attention_mask"][0, 0] == 1  # right padding keeps the start
    flat = processor(
        images=[random_image(0), random_image(1), random_image(2), random_image(3)], text=texts, return_tensors="pt"
    )
    assert torch.equal(flat["input_ids"], processor(images=images, text=texts, return_tensors="pt")["input_ids"])


def test_placeholder_count_mismatch_names_both_counts(processor):
    with pytest.raises(ValueError, match=r"2 <image> placeholder\(s\) but 1 image"):
        processor(images=[random_image(0)], text="<image><image>对比")
    with pytest.raises(ValueError, match=r"Prompt 1 has 1 <image> placeholder\(s\) but 2 image"):
        processor(images=[[random_image(0)], [random_image(1), random_image(2)]], text=["<image>a", "<image>b"])
    with pytest.raises(ValueError, match=r"1 <image> placeholder\(s\) but 0 image"):
        processor(text="<image>描述")


def test_prompt_too_long_after_expansion_is_an_error_not_a_truncation():
    processor = tiny_processor(model_max_length=20)
    processor(images=[random_image(0)], text="<image>\n描述")  # fits: 1 + 4 + a few
    with pytest.raises(ValueError, match=r"expanding its 4 image\(s\).*over the limit of 20"):
        processor(images=[random_image(i) for i in range(4)], text="<image>" * 4 + "描述这四张图片")


def test_missing_and_unreadable_files_are_named(processor, tmp_path):
    with pytest.raises(ImageLoadingError, match="nowhere.png"):
        processor(images=[str(tmp_path / "nowhere.png")], text="<image>描述")
    bad = tmp_path / "broken.png"
    bad.write_text("not an image")
    with pytest.raises(ImageLoadingError, match="broken.png"):
        processor(images=[str(bad)], text="<image>描述")


def test_dicom_files_go_through_the_same_pipeline(processor):
    paths = [get_testdata_file(name) for name in ("CT_small.dcm", "MR_small.dcm", "examples_rgb_color.dcm")]
    out = processor(images=paths, text="<image><image><image>对比", return_tensors="pt")
    assert out["pixel_values"].shape == (3, 3, 28, 28)
    assert torch.isfinite(out["pixel_values"]).all()
    rgb = out["high_res_pixel_values"][2]
    assert not torch.allclose(rgb[0], rgb[1])  # colour ultrasound stays colour


def test_processor_round_trips_through_save_pretrained(processor, tmp_path):
    from transformers import AutoProcessor

    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded).__name__ == "QilinProcessor"
    assert loaded.image_seq_length == 4 and loaded.image_processor.high_res_size == 56
    text = "<image>\n第一张"
    image = random_image(0)
    a = processor(images=[image], text=text, return_tensors="pt")
    b = loaded(images=[image], text=text, return_tensors="pt")
    for key in a:
        assert torch.equal(a[key], b[key])


def test_options_are_routed_like_every_transformers_processor(processor, images):
    """Grouped (`text_kwargs` / `images_kwargs`) and flat options both take effect; none is dropped silently."""
    text = ["<image>\n描述", "<image>\n请描述这张图片的病变位置"]
    flat = processor(images=images[:2], text=text, padding_side="right", high_res_size=84, return_tensors="pt")
    grouped = processor(images=images[:2], text=text, text_kwargs={"padding_side": "right"},
                        images_kwargs={"high_res_size": 84}, return_tensors="pt")
    for key in ("input_ids", "attention_mask", "pixel_values", "high_res_pixel_values"):
        assert torch.equal(flat[key], grouped[key]), key
    assert flat["high_res_pixel_values"].shape[-1] == 84
    assert flat["attention_mask"][0, -1] == 0  # right padding took effect


def test_truncation_is_refused_and_unknown_options_are_named(processor, images, caplog):
    with pytest.raises(ValueError, match="never truncates"):
        processor(images=images[:1], text="<image>\n描述", truncation=True)
    processor(images=images[:1], text="<image>\n描述", truncation=False)  # the default, accepted
    with caplog.at_level(logging.WARNING):
        processor(images=images[:1], text="<image>\n描述", an_option_nobody_knows=3)
    assert "an_option_nobody_knows" in caplog.text
    with pytest.raises(ValueError, match="return_overflowing_tokens"):
        processor(images=images[:1], text="<image>\n描述", return_overflowing_tokens=True)


def test_offsets_follow_each_samples_own_length_without_padding(processor):
    out = processor(text=["短", "一个更长的问题"], padding=False, return_offsets_mapping=True)
    assert [len(o) for o in out["offset_mapping"]] == [len(ids) for ids in out["input_ids"]]
    assert len(out["input_ids"][0]) < len(out["input_ids"][1])
