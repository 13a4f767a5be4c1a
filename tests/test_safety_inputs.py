"""Bad input gets a clear error naming the file, record or message: chat messages, the chat and demo commands,
training data files, damaged checkpoint files, the app's question box."""

import json
import struct

import pytest
import torch
from pydicom.data import get_testdata_file
from safetensors.torch import save_file

from qilin_med_vl.cli import main as cli
from qilin_med_vl.conversion import ConversionError
from qilin_med_vl.conversion.checkpoint_io import iter_tensors
from qilin_med_vl.testing import random_image, tiny_processor

# ----------------------------------------------------------------------------------------------------------------
# Chat messages
# ----------------------------------------------------------------------------------------------------------------

IMAGE = random_image(0)


@pytest.mark.parametrize("messages, match", [
    ([], "non-empty list"),
    ([{"content": "hi"}], r"message 0: role None"),
    ([{"role": "doctor", "content": "hi"}], r"message 0: role 'doctor'"),
    ([{"role": "user", "content": [{"text": "hi"}]}], r"message 0, block 0: .*'type'"),
    ([{"role": "user", "content": [{"type": "audio", "path": "a.wav"}]}], r"block 0: blocks of type 'audio'"),
    ([{"role": "user", "content": [{"type": "video", "path": "a.mp4"}, {"type": "text", "text": "q"}]}],
     r"block 0: blocks of type 'video'"),
    ([{"role": "user", "content": [{"type": "text", "text": None}]}], r"block 0: a text block needs a string"),
    ([{"role": "user", "content": [{"type": "text"}]}], r"a text block needs a string"),
    ([{"role": "user", "content": 5}], r"message 0: content must be"),
    (["hello"], r"message 0: a str"),
    ([[{"role": "user", "content": "ok"}], [{"role": "user"}, "x"]], r"conversation 1, message 0"),
])
def test_malformed_chat_messages_name_the_message(messages, match):
    with pytest.raises(ValueError, match=match):
        tiny_processor().apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)


def test_text_none_is_a_clear_error():
    with pytest.raises(ValueError, match="needs text"):
        tiny_processor()(images=IMAGE, text=None)


def test_well_formed_messages_still_work():
    messages = [{"role": "system", "content": "s"},
                {"role": "user", "content": [{"type": "image", "image": IMAGE}, {"type": "text", "text": "q"}]},
                {"role": "assistant", "content": "a"}, {"role": "user", "content": "q2"}]
    out = tiny_processor().apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                               return_tensors="pt")
    assert out["pixel_values"].shape[0] == 1


# ----------------------------------------------------------------------------------------------------------------
# chat and demo: inputs checked before the model is loaded
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def unloadable(tmp_path_factory):
    """A model folder that fails to load: an error about it means the image was not checked first."""
    folder = tmp_path_factory.mktemp("broken") / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{not json")
    return folder


@pytest.mark.parametrize("make_image, match", [
    (lambda tmp: tmp / "missing.png", "image file not found: .*missing.png"),
    (lambda tmp: (tmp / "bad.png").write_bytes(b"\x89PNG broken") and tmp / "bad.png", "bad.png"),
])
def test_chat_checks_images_before_loading_the_model(unloadable, tmp_path, capsys, make_image, match):
    image = make_image(tmp_path)
    assert cli(["chat", "--model", str(unloadable), "--image", str(image), "describe"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert __import__("re").search(match, err)


def test_demo_checks_images_before_loading_the_model(unloadable, tmp_path, capsys):
    assert cli(["demo", "--model", str(unloadable), "--image", str(tmp_path / "nope.dcm")]) == 2
    err = capsys.readouterr().err
    assert "nope.dcm" in err and "Traceback" not in err


def test_chat_has_the_frame_option_it_asks_for(saved, capsys):
    path = get_testdata_file("SC_rgb_rle_2frame.dcm")
    assert cli(["chat", "--model", str(saved), "--image", path, "--max-new-tokens", "1", "describe"]) == 2
    assert "--frame" in capsys.readouterr().err
    assert cli(["chat", "--model", str(saved), "--image", path, "--frame", "1", "--max-new-tokens", "1",
                "describe"]) == 0


# ----------------------------------------------------------------------------------------------------------------
# Training data
# ----------------------------------------------------------------------------------------------------------------

GOOD_TURNS = [{"from": "human", "value": "描述"}, {"from": "gpt", "value": "好"}]


@pytest.mark.parametrize("name, content, match", [
    ("empty.json", b"", r"empty.json: the file is empty"),
    ("blank.json", b"  \n", r"blank.json: the file is empty"),
    ("binary.json", bytes(range(256)) * 4, r"binary.json: not a UTF-8 text file"),
    ("binary.jsonl", b"\xff\xfe\x00garbage\n", r"binary.jsonl: not a UTF-8 text file"),
    ("broken.json", b'[{"id": 1,', r"broken.json: not valid JSON"),
    ("strings.json", json.dumps(["a record?"]).encode(), r"record '#0': not a record object but a str"),
    ("lists.json", json.dumps([[1, 2]]).encode(), r"record '#0': not a record object but a list"),
    ("images.json", json.dumps([{"id": "x", "images": 5, "conversations": GOOD_TURNS}]).encode(),
     r"record 'x': images must be a file path"),
    ("numbers.json", json.dumps([{"id": "n", "conversations": [{"from": "human", "value": 3},
                                                                 {"from": "gpt", "value": 4}]}]).encode(),
     r"record 'n': turn 0: value is a int"),
    ("turns.json", json.dumps([{"id": "t", "conversations": "hello"}]).encode(),
     r"record 't': conversations is a str"),
])
def test_bad_training_files_and_records_are_named(saved, tmp_path, capsys, name, content, match):
    path = tmp_path / name
    path.write_bytes(content)
    code = cli(["train", "--stage", "instruct", "--model", str(saved), "--data", str(path), "--validate-only",
                "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert __import__("re").search(match, err), err


# ----------------------------------------------------------------------------------------------------------------
# Damaged checkpoint files
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture
def good_files(tmp_path):
    torch.save({"w": torch.randn(64, 64)}, tmp_path / "good.bin")
    save_file({"w": torch.randn(64, 64)}, tmp_path / "good.safetensors")
    return tmp_path


def damage(folder, name, data):
    path = folder / name
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("make, match", [
    (lambda d: damage(d, "empty.bin", b""), "empty.bin: the file is empty"),
    (lambda d: damage(d, "half.bin", (d / "good.bin").read_bytes()[:3000]), "half.bin: not a readable torch"),
    (lambda d: damage(d, "text.bin", b"hello" * 100), "text.bin: not a readable torch"),
    (lambda d: damage(d, "empty.safetensors", b""), "empty.safetensors: not a valid safetensors file"),
    (lambda d: damage(d, "half.safetensors", (d / "good.safetensors").read_bytes()[:5000]),
     r"half.safetensors: .*does not fit"),
    (lambda d: damage(d, "huge.safetensors", struct.pack("<Q", 2**60) + b"{}"), r"huge.safetensors: .*header claims"),
    (lambda d: damage(d, "notjson.safetensors", struct.pack("<Q", 4) + b"{{{{"), r"notjson.safetensors: .*not JSON"),
    (lambda d: damage(d, "dtype.safetensors", struct.pack("<Q", 60) +
                      b'{"w": {"dtype": "X9", "shape": [1], "data_offsets": [0, 4]}}'.ljust(60) + b"\0" * 4),
     r"dtype.safetensors: .*'w'"),
])
def test_damaged_weight_files_name_the_file_and_the_problem(good_files, make, match):
    path = make(good_files)
    with pytest.raises(ConversionError, match=match):
        list(iter_tensors(path))


class Payload:
    def __reduce__(self):
        return (print, ("this would have run",))


def test_refused_pickles_name_the_file_and_never_suggest_weights_only_false(tmp_path):
    torch.save({"w": torch.zeros(2), "extra": Payload()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ConversionError) as error:
        list(iter_tensors(tmp_path / "pytorch_model.bin"))
    message = str(error.value)
    assert "pytorch_model.bin: refused" in message and "type print" in message
    assert "weights_only" not in message


def test_convert_command_names_a_truncated_shard(tmp_path, capsys):
    from test_conversion import build_clip, build_original_release  # noqa: E402  (tests/ is on sys.path)

    clip = build_clip(tmp_path / "clip")
    release = tmp_path / "release"
    build_original_release(release, clip, shards=1)
    shard = next(release.glob("pytorch_model*.bin"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])
    assert cli(["convert", "original", str(release), str(tmp_path / "out"), "--clip", str(clip),
                "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert shard.name in err and "Traceback" not in err and not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------------------
# The app's question box
# ----------------------------------------------------------------------------------------------------------------


def test_a_typed_image_placeholder_is_explained():
    from qilin_med_vl.app.prompts import AppInputError, check_question

    with pytest.raises(AppInputError, match="<image>"):
        check_question("请对比 <image> 和第二张")
