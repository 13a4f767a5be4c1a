"""The web demo's parts without a browser: prompt building, heatmaps, the DICOM display path, the streaming engine
and the page's handlers (`qilin_med_vl.app`). The browser test is `test_app_browser.py`."""

import threading

import numpy as np
import pydicom
import pytest
import torch
from peft import get_peft_model
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from qilin_med_vl.app.heatmap import (
    attention_maps,
    colorize,
    heatmap_overlays,
    map_to_image,
    overlay,
    padded_square_box,
)
from qilin_med_vl.app.model import LoadedModel, ModelManager, ModelSpec, adapters_disabled
from qilin_med_vl.app.prompts import (
    FREE_TEXT,
    MAX_QUESTION_CHARS,
    TASKS,
    AppInputError,
    build_messages,
    check_question,
    image_caption,
    image_label,
    preset_prompt,
)
from qilin_med_vl.app.server import answer_stream, on_preset, on_upload, thumbnails
from qilin_med_vl.app.uploads import read_image, read_images
from qilin_med_vl.demo import generate_report
from qilin_med_vl.loading import load_model_and_processor
from qilin_med_vl.modeling.configuration_hia import HiAConfig
from qilin_med_vl.modeling.modeling_hia import hia_is_active
from qilin_med_vl.processing.image_loading_qilin import dicom_to_uint8, load_image
from qilin_med_vl.testing import random_image, tiny_model, tiny_processor

torch.set_num_threads(1)
TASK_KEYS = [key for key, _ in TASKS if key != FREE_TEXT]
COMPARE = preset_prompt("comparison", 2, "zh")


def make_model_folder(folder, seed=0):
    """A tiny Qilin-Med-VL with its processor and a HiA adapter in `hia/`. The adapter's output projections are
    made non-zero (a new adapter is the identity), so switching HiA changes the answer."""
    tiny_model().save_pretrained(folder)
    tiny_processor().save_pretrained(folder)
    adapted = get_peft_model(tiny_model(), HiAConfig(num_queries=8, num_heads=4, encoder_depths=[1, 1],
                                                     encoder_width=8, high_res_size=56))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in adapted.named_parameters():
            if "output_proj" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    adapted.save_pretrained(folder / "hia")
    return folder


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    folder = make_model_folder(tmp_path_factory.mktemp("app-model"))
    random_image(0, size=(40, 30)).save(folder / "before.png")
    random_image(1, size=(30, 44)).save(folder / "after.png")
    return folder


@pytest.fixture(scope="module")
def manager(model_folder):
    manager = ModelManager(ModelSpec.create(str(model_folder)))
    manager.get()
    return manager


def final(stream):
    *_, last = list(stream)
    return last


# ----------------------------------------------------------------------------------------------------------------
# Prompt building
# ----------------------------------------------------------------------------------------------------------------


def test_labels_are_the_ordinals_the_prompts_use():
    assert [image_label(i) for i in range(4)] == ["第一张", "第二张", "第三张", "第四张"]
    assert [image_label(i, "en") for i in range(4)] == ["image 1", "image 2", "image 3", "image 4"]
    assert image_caption(1, "after.dcm") == "第二张 · Image 2 · after.dcm"
    with pytest.raises(AppInputError):
        image_label(4)


@pytest.mark.parametrize("task", TASK_KEYS)
@pytest.mark.parametrize("language", ["zh", "en"])
@pytest.mark.parametrize("num_images", [1, 2, 3, 4])
def test_presets_name_every_image(task, language, num_images):
    if task == "comparison" and num_images == 1:
        with pytest.raises(AppInputError, match="at least two images"):
            preset_prompt(task, num_images, language)
        return
    text = preset_prompt(task, num_images, language)
    assert text and "<image>" not in text  # the placeholders come from the image blocks, not the text
    if num_images > 1:
        for index in range(num_images):
            assert image_label(index, language) in text.lower()
        assert image_label(num_images, language) not in text.lower() if num_images < 4 else True
    if language == "zh":
        assert all("\u4e00" <= character <= "\u9fff" or not character.isalpha() for character in text)
    else:
        assert text.isascii()


def test_comparison_preset_of_a_pair_and_free_text():
    assert preset_prompt("comparison", 2) == "第一张和第二张分别是患者治疗前后的影像，请对比两张图片。"
    assert preset_prompt("comparison", 2, "en").startswith("Image 1 and image 2 were taken before and after")
    assert preset_prompt("comparison", 3) .startswith("第一张、第二张和第三张")
    assert preset_prompt(FREE_TEXT, 2) == ""
    with pytest.raises(AppInputError, match="At most 4 images"):
        preset_prompt("description", 5)
    with pytest.raises(AppInputError, match="Upload 1 to 4 images"):
        preset_prompt("description", 0)


def test_question_checks():
    assert check_question("  请对比。 ") == "请对比。"
    with pytest.raises(AppInputError, match="Type a question"):
        check_question("   ")
    with pytest.raises(AppInputError, match=f"Prompt too long: {MAX_QUESTION_CHARS + 1} characters"):
        check_question("字" * (MAX_QUESTION_CHARS + 1))


def test_messages_put_the_images_in_the_first_turn_in_order(processor):
    images = [random_image(seed) for seed in range(3)]
    messages = build_messages(images, [("描述第一张。", "第一张可见骨折。")], "第二张呢？")
    assert [message["role"] for message in messages] == ["user", "assistant", "user"]
    assert [block["image"] for block in messages[0]["content"][:3]] == images
    assert messages[0]["content"][3] == {"type": "text", "text": "描述第一张。"}
    assert messages[2]["content"] == [{"type": "text", "text": "第二张呢？"}]
    rendered = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert ("USER: <image>\n<image>\n<image>\n描述第一张。 ASSISTANT: 第一张可见骨折。</s>"
            "USER: 第二张呢？ ASSISTANT:") in rendered
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    assert inputs["pixel_values"].shape[0] == 3
    with pytest.raises(AppInputError, match="At most 4 images"):
        build_messages([random_image(0)] * 5, [], "?")


# ----------------------------------------------------------------------------------------------------------------
# Heatmaps
# ----------------------------------------------------------------------------------------------------------------


def test_attention_maps_average_layers_and_queries_then_scale_per_image():
    rng = np.random.default_rng(0)
    layers = [rng.random((2, 3, 12)) for _ in range(2)]
    maps = attention_maps(layers, (3, 4))
    assert maps.shape == (2, 3, 4)
    expected = np.mean(np.stack(layers), axis=(0, 2)).reshape(2, 3, 4)
    for index in range(2):
        scaled = (expected[index] - expected[index].min()) / np.ptp(expected[index])
        np.testing.assert_allclose(maps[index], scaled)
        assert maps[index].min() == 0 and maps[index].max() == 1
    np.testing.assert_array_equal(attention_maps(np.full((1, 2, 6), 1 / 6), (2, 3)), np.zeros((1, 2, 3)))
    with pytest.raises(ValueError, match="grid cells"):
        attention_maps(layers, (4, 4))
    with pytest.raises(ValueError, match="no HiA attentions"):
        attention_maps([], (3, 4))


@pytest.mark.parametrize("size", [(40, 30), (30, 44), (33, 33), (41, 20)])
def test_padded_square_box_is_where_the_processor_puts_the_image(size, processor):
    width, height = size
    left, top, side = padded_square_box(width, height)
    white = Image.new("RGB", size, (255, 255, 255))
    view = processor.image_processor(white, return_tensors="np", high_res_size=side, do_normalize=False)
    view = view["high_res_pixel_values"][0].mean(0)  # (side, side) in [0, 1]; white = 1, the CLIP mean < 1
    inside = np.zeros((side, side), dtype=bool)
    inside[top : top + height, left : left + width] = True
    assert np.all(view[inside] > 0.99) and np.all(view[~inside] < 0.6)


def test_heatmap_is_stretched_over_the_padded_square_then_cropped():
    width, height = 30, 60  # tall: 15 px of padding left and right in a 60 px square
    grid = np.zeros((4, 4))
    grid[1, 2] = 1.0  # cell centre in the square: x = 2.5 * 15 = 37.5, y = 1.5 * 15 = 22.5
    values = map_to_image(grid, (width, height))
    assert values.shape == (height, width)
    y, x = np.unravel_index(np.argmax(values), values.shape)
    assert abs(x - (37.5 - 15)) <= 1 and abs(y - 22.5) <= 1
    grid = np.zeros((4, 4))
    grid[:, 0] = 1.0  # the first column of cells covers only padding: almost nothing reaches the image
    assert map_to_image(grid, (width, height)).max() < 0.55


def test_colorize_and_overlay():
    assert colorize(np.array([0.0]))[0].tolist() == [0, 0, 143]
    assert colorize(np.array([1.0]))[0].tolist() == [200, 0, 0]
    image = random_image(3, size=(20, 10))
    values = np.linspace(0, 1, 200).reshape(10, 20)
    assert np.array_equal(np.asarray(overlay(image, values, alpha=0.0)), np.asarray(image))
    assert np.array_equal(np.asarray(overlay(image, values, alpha=1.0)), colorize(values))
    with pytest.raises(ValueError, match="does not match"):
        overlay(image, values.T)


def test_heatmaps_of_the_model_one_per_image_in_image_size(model_folder):
    model, processor = load_model_and_processor(str(model_folder), "hia")
    images = [Image.open(model_folder / "before.png"), Image.open(model_folder / "after.png")]
    messages = build_messages(images, [], COMPARE)
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    with torch.no_grad():
        output = model(**inputs, output_hia_attentions=True)
    attentions = [layer.numpy() for layer in output.hia_attentions]
    overlays = heatmap_overlays(images, attentions, output.hia_grid_size)
    assert [item.size for item in overlays] == [(40, 30), (30, 44)]
    maps = attention_maps(attentions, output.hia_grid_size)
    assert not np.array_equal(maps[0], maps[1])  # each image its own map


# ----------------------------------------------------------------------------------------------------------------
# Images and the DICOM display path
# ----------------------------------------------------------------------------------------------------------------


def write_dicom(path, frames):
    """A 16-bit MONOCHROME2 secondary capture with a window (centre 1000, width 801)."""
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = frames.shape[-2:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = 1000, 801
    if frames.ndim == 3:
        ds.NumberOfFrames = frames.shape[0]
    ds.PixelData = frames.astype("<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_dicom_thumbnail_is_the_windowed_image_the_model_sees(tmp_path, processor):
    rng = np.random.default_rng(0)
    stored = rng.integers(0, 4096, size=(24, 36))
    path = write_dicom(tmp_path / "knee.dcm", stored)
    item = read_image(path)
    shown = np.asarray(item.image)
    assert item.name == "knee.dcm" and item.note == "DICOM" and shown.shape == (24, 36, 3)
    # The window: at or below 1000 - 400.5 is black, above 1000 + 399.5 is white, linear in between.
    expected = np.rint(np.clip((stored - 999.5) / 800 + 0.5, 0, 1) * 255).astype(np.uint8)
    np.testing.assert_array_equal(shown[..., 0], expected)
    np.testing.assert_array_equal(shown, np.asarray(load_image(path)))
    (thumbnail, caption), = thumbnails([item])
    np.testing.assert_array_equal(np.asarray(thumbnail), shown)
    assert caption == "第一张 · Image 1 · knee.dcm · DICOM"
    from_path = processor.image_processor(str(path), return_tensors="np")
    from_thumbnail = processor.image_processor(item.image, return_tensors="np")
    for key in ("pixel_values", "high_res_pixel_values"):
        np.testing.assert_array_equal(from_path[key], from_thumbnail[key])


def test_shipped_dicom_files_and_multi_frame(tmp_path):
    for name in ("CT_small.dcm", "MR_small.dcm"):
        path = get_testdata_file(name, download=False)
        np.testing.assert_array_equal(np.asarray(read_image(path).image), np.asarray(load_image(path)))
    frames = np.stack([np.full((8, 10), 500), np.full((8, 10), 1500)])
    path = write_dicom(tmp_path / "series.dcm", frames)
    item = read_image(path)
    assert item.note == "帧 1/2 · frame 1 of 2"
    np.testing.assert_array_equal(np.asarray(item.image)[..., 0], dicom_to_uint8(pydicom.dcmread(path), frame=0))


def test_bad_files_give_readable_messages(tmp_path):
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"\x00" * 300)
    with pytest.raises(AppInputError) as error:
        read_image(broken)
    assert "broken.dcm" in str(error.value) and str(tmp_path) not in str(error.value)
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(AppInputError, match="Cannot read notes.png"):
        read_images([text])
    good = tmp_path / "good.png"
    random_image(0).save(good)
    with pytest.raises(AppInputError, match="At most 4 images; 5 were given"):
        read_images([good] * 5)
    assert [item.name for item in read_images([good, good])] == ["good.png", "good.png"]


def test_large_images_are_shown_on_smaller_copies(tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (2000, 1000), (10, 20, 30)).save(path)
    item = read_image(path)
    assert item.image.size == (2000, 1000) and item.display.size == (768, 384)


# ----------------------------------------------------------------------------------------------------------------
# The engine and the page's handlers
# ----------------------------------------------------------------------------------------------------------------


def direct_answer(folder, adapter, question, max_new_tokens, history=()):
    model, processor = load_model_and_processor(str(folder), adapter)
    images = [load_image(folder / "before.png"), load_image(folder / "after.png")]
    if not history:
        return generate_report(model, processor, images, question, max_new_tokens)
    inputs = processor.apply_chat_template(build_messages(images, list(history), question), add_generation_prompt=True,
                                           tokenize=True, return_dict=True, return_tensors="pt")
    ids = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.tokenizer.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def files(folder):
    return [str(folder / "before.png"), str(folder / "after.png")]


def test_streamed_answer_equals_direct_generation_with_hia_and_heatmaps(manager, model_folder):
    updates = list(answer_stream(manager, files(model_folder), COMPARE, True, 12, None))
    chat, _, status, conversation, prompt = updates[-1]
    expected = direct_answer(model_folder, "hia", COMPARE, 12)
    assert expected and chat[-1] == {"role": "assistant", "content": expected}
    assert chat[-2] == {"role": "user", "content": COMPARE}
    assert status == "完成 · done." and conversation.turns == [(COMPARE, expected)]
    assert prompt.count("<image>") == 2
    shown = [item for update in updates if update[1] for item in update[1]]
    assert [caption for _, caption in shown] == ["第一张 · Image 1 · HiA", "第二张 · Image 2 · HiA"]
    assert [image.size for image, _ in shown] == [(40, 30), (30, 44)]
    texts = [update[0][-1]["content"] for update in updates[1:]]
    assert len(texts) > 2 and all(expected.startswith(text.strip()) for text in texts[:-1])  # it streamed


def test_heatmaps_come_from_the_prompt_pass_of_generation(manager, model_folder):
    loaded = manager.get()
    images = [load_image(path) for path in files(model_folder)]
    messages = build_messages(images, [], COMPARE)
    streamed = final(loaded.stream(images, messages, True, 4)).heatmaps
    inputs = loaded.build_inputs(messages, 4)
    with torch.no_grad():
        output = loaded.model(**inputs, output_hia_attentions=True)
    direct = heatmap_overlays(images, [layer.numpy() for layer in output.hia_attentions], output.hia_grid_size)
    assert len(streamed) == len(direct) == 2
    for ours, theirs in zip(streamed, direct, strict=True):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))


def test_hia_switch_gives_the_base_model_then_hia_again(manager, model_folder):
    loaded = manager.get()
    images = [load_image(path) for path in files(model_folder)]
    inputs = loaded.build_inputs(build_messages(images, [], COMPARE), 8)

    def logits():
        with torch.no_grad():
            return loaded.model(**inputs).logits[0, -1]

    with_hia = logits()
    updates = list(answer_stream(manager, files(model_folder), COMPARE, False, 12, None))
    off = updates[-1]
    assert off[0][-1]["content"] == direct_answer(model_folder, None, COMPARE, 12)
    assert not any(update[1] for update in updates) and "HiA off" in off[2]
    torch.testing.assert_close(logits(), with_hia, rtol=0, atol=1e-6)  # switched back on afterwards
    with adapters_disabled(loaded.model):
        assert (logits() - with_hia).abs().max() > 1e-4  # and switching it off does change the model
    on = final(answer_stream(manager, files(model_folder), COMPARE, True, 12, None))
    assert on[0][-1]["content"] == direct_answer(model_folder, "hia", COMPARE, 12)


def test_a_visitor_leaving_mid_answer_stops_generation_and_restores_hia(manager, model_folder):
    loaded = manager.get()
    images = [load_image(path) for path in files(model_folder)]
    stream = loaded.stream(images, build_messages(images, [], COMPARE), use_hia=False, max_new_tokens=400)
    next(stream), next(stream)
    assert loaded.lock.locked() and not hia_is_active(loaded.model)
    stream.close()  # what Gradio does when the page goes away
    assert not loaded.lock.locked() and hia_is_active(loaded.model)
    assert not any(thread.name == "qilin-med-vl-generate" for thread in threading.enumerate())


def test_multi_turn_keeps_the_images_and_new_images_start_over(manager, model_folder):
    first = final(answer_stream(manager, files(model_folder), COMPARE, True, 6, None))
    second = final(answer_stream(manager, files(model_folder), "第二张呢？", True, 6, first[3]))
    answer = first[3].turns[0][1]
    assert second[0][-1]["content"] == direct_answer(model_folder, "hia", "第二张呢？", 6, [(COMPARE, answer)])
    assert len(second[0]) == 4 and second[4].count("<image>") == 2 and second[4].count("USER:") == 2
    swapped = final(answer_stream(manager, files(model_folder)[::-1], COMPARE, True, 6, second[3]))
    assert len(swapped[0]) == 2 and len(swapped[3].turns) == 1


def test_bad_input_ends_in_a_status_message(manager, model_folder, tmp_path):
    (tmp_path / "x.png").write_bytes(b"\x89PNG broken")
    cases = {  # expected message: (files, question, max new tokens)
        "Upload 1 to 4 images": ([], COMPARE, 8),
        "At most 4 images; 6 were given": (files(model_folder) * 3, COMPARE, 8),
        "Cannot read x.png": ([str(tmp_path / "x.png")], COMPARE, 8),
        "Type a question": (files(model_folder), " ", 8),
        "Prompt too long: 2001 characters": (files(model_folder), "字" * 2001, 8),
        # within the character limit, but over the tiny model's 2048 tokens in the processor
        "Prompt too long for the model": (files(model_folder), "骨" * 2000, 8),
        # the prompt fits, the prompt and the new tokens do not
        "new tokens exceed the model's 2048": (files(model_folder), "骨" * 1700, 512),
    }
    for expected, (paths, question, max_new_tokens) in cases.items():
        chat, heatmaps, status, _, _ = final(answer_stream(manager, paths, question, True, max_new_tokens, None))
        assert status.startswith("⚠️") and expected in status and "Traceback" not in status, (expected, status)
        assert heatmaps == [] and chat == []


def test_processor_token_limit_is_reported(model_folder):
    loaded = LoadedModel(ModelSpec.create(str(model_folder)))
    loaded.processor.tokenizer.model_max_length = 64
    messages = build_messages([load_image(model_folder / "before.png")], [], "字" * 100)
    with pytest.raises(AppInputError, match="提示过长.*Prompt too long for the model"):
        loaded.build_inputs(messages, 8)


def test_concurrent_requests_wait_for_each_other(manager, model_folder):
    expected = {use_hia: direct_answer(model_folder, "hia" if use_hia else None, COMPARE, 10)
                for use_hia in (True, False)}
    results = {}

    def ask(index, use_hia):
        results[index] = final(answer_stream(manager, files(model_folder), COMPARE, use_hia, 10, None))[0][-1]

    threads = [threading.Thread(target=ask, args=(index, index % 2 == 0)) for index in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert {index: message["content"] for index, message in results.items()} == {
        index: expected[index % 2 == 0] for index in range(4)}


def test_upload_and_preset_handlers(model_folder, tmp_path):
    thumbs, status, prompt = on_upload(files(model_folder), "comparison", "en")
    assert [caption for _, caption in thumbs] == ["第一张 · Image 1 · before.png", "第二张 · Image 2 · after.png"]
    assert prompt == preset_prompt("comparison", 2, "en") and "2 image(s) ready" in status
    thumbs, status, prompt = on_upload(files(model_folder)[:1], "comparison", "zh")
    assert prompt is None and "at least two images" in status and len(thumbs) == 1
    thumbs, status, prompt = on_upload(files(model_folder) * 3, "comparison", "zh")
    assert thumbs == [] and "At most 4 images" in status
    assert on_preset(files(model_folder), "location", "zh") == (preset_prompt("location", 2, "zh"), "")
    assert on_preset(files(model_folder), FREE_TEXT, "zh") == (None, "")


def test_model_manager_messages(tmp_path, monkeypatch):
    from qilin_med_vl.app import model

    monkeypatch.setattr(model, "DEMO_MODEL_DIR", tmp_path / "demo_model")
    spec = ModelSpec(model=str(tmp_path / "demo_model"))
    with pytest.raises(AppInputError, match="embedded demo model is not in this installation"):
        ModelManager(spec).get()
    with pytest.raises(AppInputError, match="Cannot load"):
        ModelManager(ModelSpec.create(str(tmp_path / "missing"))).get()
    assert ModelSpec.create(str(tmp_path)).adapter is None
    assert ModelSpec.create(str(tmp_path), adapter=None).adapter is None


def test_model_spec_finds_the_hia_folder(model_folder):
    assert ModelSpec.create(str(model_folder)).adapter == "hia"
    assert ModelSpec.create(str(model_folder), adapter=None).adapter is None
    with pytest.raises(ValueError, match="quantization"):
        ModelSpec.create(str(model_folder), quantization="2bit")


def test_cli_options():
    from qilin_med_vl.cli import app as app_command
    from qilin_med_vl.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["app", "--model", "m", "--adapter", "hia", "--host", "0.0.0.0", "--port", "8000",
                              "--load-in-4bit"])
    assert (args.model, args.adapter, args.host, args.port, args.load_in_4bit) == ("m", "hia", "0.0.0.0", 8000, True)
    assert args.handler is app_command.run
    with pytest.raises(SystemExit):
        parser.parse_args(["app", "--load-in-4bit", "--load-in-8bit"])


def test_page_builds(manager):
    import gradio

    from qilin_med_vl.app.server import build_app

    demo = build_app(manager)
    assert isinstance(demo, gradio.Blocks)
    ids = {block.elem_id for block in demo.blocks.values() if getattr(block, "elem_id", None)}
    assert {"upload", "thumbnails", "preset", "prompt", "send", "chat", "heatmaps", "hia-switch", "status",
            "notice", "model-path"} <= ids


def test_hia_switch_also_switches_the_adapters_copies_of_base_modules(processor, images):
    """An adapter trained with modules_to_save (here lm_head) carries its own copy; with HiA off the base's head
    must answer, or the 'base' the app shows would be half adapted."""
    base = tiny_model()
    model = get_peft_model(tiny_model(), HiAConfig(num_queries=4, num_heads=2, encoder_depths=[1, 1],
                                                   encoder_width=8, high_res_size=56, modules_to_save=["lm_head"]))
    with torch.no_grad():
        model.get_base_model().lm_head.modules_to_save["default"].weight.mul_(2.0)
    model.eval()
    inputs = processor(images=images[:1], text="USER: <image>\n描述图片。 ASSISTANT:", return_tensors="pt")
    with torch.no_grad():
        adapted = model(**inputs).logits
        with adapters_disabled(model):
            torch.testing.assert_close(model(**inputs).logits, base(**inputs).logits, atol=1e-6, rtol=0)
        torch.testing.assert_close(model(**inputs).logits, adapted, atol=0, rtol=0)
