"""Bad images never crash or exhaust memory: size and aspect-ratio limits, decompression bombs, pad-to-square without
the full-size square, every file of pydicom's test corpus, and a property-based fuzz of the loader, the processor
and chat messages.

The fuzz tests run `QILIN_FUZZ_EXAMPLES` examples each (default 150; e.g. `QILIN_FUZZ_EXAMPLES=5000` for a long run).
"""

import os
import random
import struct
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from test_processing import reference_expand2square_clip  # noqa: E402  (tests/ is on sys.path)

from qilin_med_vl import ImageLoadingError, QilinImageProcessor
from qilin_med_vl.processing.image_loading_qilin import MAX_ASPECT_RATIO, MAX_IMAGE_PIXELS, load_image

EXAMPLES = int(os.environ.get("QILIN_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=not os.environ.get("QILIN_FUZZ_RANDOM"),
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])
# Every outcome of a fuzzed input: a valid image / batch, or one of these documented exceptions.
DOCUMENTED = (ImageLoadingError, TypeError)


def png_bytes(width, height, pixel_rows=None):
    """A grey 8-bit PNG of `width` x `height` (zlib makes a constant image tiny), or only its header."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    rows = b"".join(b"\x00" + b"\x80" * width for _ in range(height)) if pixel_rows is None else pixel_rows
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b""))


# ----------------------------------------------------------------------------------------------------------------
# Limits and bombs
# ----------------------------------------------------------------------------------------------------------------


def test_a_tiny_file_of_a_1x20000_strip_is_refused_without_allocating(tmp_path):
    path = tmp_path / "strip.png"
    path.write_bytes(png_bytes(1, 20000))
    assert path.stat().st_size < 200
    tracemalloc.start()
    try:
        with pytest.raises(ImageLoadingError, match=f"strip.png: 1 x 20000 .*aspect ratio over {MAX_ASPECT_RATIO}"):
            QilinImageProcessor()(str(path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 50 * 2**20


def process_with_peak_memory(image):
    """The processor's output for `image` at 336 / 672 px, and the peak bytes Python allocated meanwhile."""
    tracemalloc.start()
    try:
        out = QilinImageProcessor(high_res_size=672)(image, return_tensors="np")
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_pad_to_square_of_a_long_image_does_not_allocate_the_full_square():
    image = Image.new("RGB", (200, 10000), (90, 120, 200))  # allowed: aspect ratio 50
    out, peak = process_with_peak_memory(image)
    assert out["pixel_values"].shape == (1, 3, 336, 336)
    # The full square would be 10000 x 10000 x 3 bytes (286 MiB) before any float copy.
    assert peak < 100 * 2**20, f"peak {peak / 2**20:.0f} MiB"


# Wide images, tall narrow ones (the bicubic band computed like PIL) and tall wide ones (chunks of padded rows),
# each just over and well over four times the output side.
@pytest.mark.parametrize("size", [(3000, 400), (1400, 28), (70, 3001), (100, 5000), (400, 3500), (2800, 2801),
                                  (3200, 3000)])
def test_large_images_give_the_pixels_of_the_full_size_square(size):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    out = QilinImageProcessor(high_res_size=672)(image, return_tensors="np")
    np.testing.assert_allclose(out["pixel_values"][0], reference_expand2square_clip(image, 336), atol=1e-5)
    np.testing.assert_allclose(out["high_res_pixel_values"][0], reference_expand2square_clip(image, 672), atol=1e-5)


@pytest.mark.parametrize("size", [(200, 10000), (10000, 200), (2000, 10000)])
def test_no_full_size_square_for_any_shape(size):
    image = Image.new("RGB", size, (90, 120, 200))
    out, peak = process_with_peak_memory(image)
    assert out["high_res_pixel_values"].shape == (1, 3, 672, 672)
    # Proportional to the image (which the pipeline holds a few copies of), not to the square: 286 MiB of uint8.
    image_bytes = size[0] * size[1] * 3
    assert peak < 2.5 * image_bytes + 48 * 2**20 and peak < 10000**2 * 3 / 2, f"peak {peak / 2**20:.0f} MiB"


def test_images_up_to_four_times_the_output_side_take_the_original_path():
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (1344, 300, 3), dtype=np.uint8))
    out = QilinImageProcessor(high_res_size=672)(image, return_tensors="np")
    np.testing.assert_allclose(out["pixel_values"][0], reference_expand2square_clip(image, 336), atol=1e-5)
    np.testing.assert_allclose(out["high_res_pixel_values"][0], reference_expand2square_clip(image, 672), atol=1e-5)


def test_decompression_bomb_png_is_a_package_error(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_bytes(20000, 20000, pixel_rows=b""))
    with pytest.raises(ImageLoadingError, match="bomb.png"):
        load_image(path)


def test_forged_bmp_header_is_a_package_error(tmp_path):
    for name, width, height, bits in (("huge.bmp", 30000, 30000, 24), ("negative.bmp", -5, 1 << 30, 24),
                                      ("depth.bmp", 10, 10, 7), ("over.bmp", 16000, 16000, 32)):
        info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, bits, 0, 0, 2835, 2835, 0, 0)
        path = tmp_path / name
        path.write_bytes(b"BM" + struct.pack("<IHHI", 14 + len(info) + 16, 0, 0, 14 + len(info)) + info + b"\0" * 16)
        with pytest.raises(ImageLoadingError, match=name):
            load_image(path)


def test_over_the_pixel_limit_in_memory_is_refused_by_size():
    with pytest.raises(ImageLoadingError, match="over the limit"):
        side = int(MAX_IMAGE_PIXELS**0.5) + 10
        load_image(np.zeros((side, side), dtype=np.uint8))  # calloc'd: no pages touched


# ----------------------------------------------------------------------------------------------------------------
# pydicom's test corpus
# ----------------------------------------------------------------------------------------------------------------


def pydicom_corpus() -> list[Path]:
    """Every file shipped in pydicom's own test data folder (the ones `pydicom.data` finds without downloading)."""
    import pydicom.data

    root = Path(pydicom.data.__file__).parent / "test_files"
    return sorted(path for path in root.rglob("*") if path.is_file())


CORPUS = pydicom_corpus()


def test_the_corpus_is_there():
    assert len(CORPUS) > 100


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("path", CORPUS, ids=lambda path: path.name)
def test_every_pydicom_test_file_loads_plausibly_or_is_refused_by_name(path):
    try:
        image = load_image(path)
    except ImageLoadingError as error:
        assert str(path) in str(error)
        return
    assert image.mode == "RGB" and min(image.size) >= 1
    import pydicom

    dataset = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    if "Rows" in dataset and "Columns" in dataset:
        assert image.size == (dataset.Columns, dataset.Rows)


@pytest.mark.filterwarnings("ignore")
def test_byte_flipped_dicom_files_fail_only_with_the_package_error(tmp_path):
    rng = random.Random(0)
    dicoms = [path for path in CORPUS if path.suffix == ".dcm" and path.stat().st_size < 600_000]
    outcomes = {"loaded": 0, "refused": 0}
    for path in rng.sample(dicoms, 12):
        data = path.read_bytes()
        for trial in range(int(os.environ.get("QILIN_FLIPS", "8"))):
            flipped = bytearray(data)
            for _ in range(rng.randint(1, 12)):
                position = rng.randrange(128, len(flipped))  # past the preamble, into header and pixels
                flipped[position] = rng.randrange(256)
            target = tmp_path / f"{path.stem}-{trial}.dcm"
            target.write_bytes(bytes(flipped))
            try:
                assert load_image(target).mode == "RGB"
                outcomes["loaded"] += 1
            except ImageLoadingError as error:
                assert str(target) in str(error)
                outcomes["refused"] += 1
    assert sum(outcomes.values()) == 12 * int(os.environ.get("QILIN_FLIPS", "8"))


# ----------------------------------------------------------------------------------------------------------------
# Property-based fuzz of the loader and the processor
# ----------------------------------------------------------------------------------------------------------------

DTYPES = [np.uint8, np.uint16, np.int8, np.int16, np.int32, np.int64, np.float16, np.float32, np.float64, np.bool_,
          np.complex64]


@st.composite
def arrays(draw):
    layout = draw(st.sampled_from(["hw", "hwc", "chw", "odd"]))
    extreme = draw(st.booleans())
    side = st.integers(0, 40)
    height, width = draw(side), draw(side)
    if extreme:  # strips: up to the aspect-ratio limit and past it
        long = draw(st.integers(100, 3000))
        height, width = (long, draw(st.integers(1, 3))) if draw(st.booleans()) else (draw(st.integers(1, 3)), long)
    channels = draw(st.integers(0, 5))
    shape = {"hw": (height, width), "hwc": (height, width, channels), "chw": (channels, height, width),
             "odd": tuple(draw(st.lists(st.integers(0, 6), max_size=5)))}[layout]
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if dtype.kind == "b":
        array = rng.integers(0, 2, shape).astype(bool)
    elif dtype.kind in "iu":
        info = np.iinfo(dtype)
        array = rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
    else:
        scale = draw(st.sampled_from([1.0, 255.0, 1e6, 1e30]))
        array = (rng.standard_normal(shape) * scale).astype(dtype)
        if array.size and draw(st.booleans()):
            flat = array.reshape(-1)
            for value in draw(st.lists(st.sampled_from([np.nan, np.inf, -np.inf]), min_size=1, max_size=4)):
                flat[rng.integers(0, flat.size)] = value
    return array


def check_rgb(image, source_shape=None):
    assert isinstance(image, Image.Image) and image.mode == "RGB" and min(image.size) >= 1


@FUZZ
@given(arrays(), st.booleans())
def test_fuzz_arrays_and_tensors(array, as_tensor):
    value = array
    if as_tensor:
        try:
            value = torch.from_numpy(array.copy())
        except TypeError:  # dtypes torch has no tensor for (uint16 on old torch): the array itself
            value = array
    tracemalloc.start()
    try:
        try:
            check_rgb(load_image(value))
        except DOCUMENTED:
            pass
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20


PIL_MODES = ["1", "L", "P", "RGB", "RGBA", "LA", "PA", "I", "I;16", "F", "CMYK", "YCbCr", "HSV", "LAB", "RGBX"]


@FUZZ
@given(st.sampled_from(PIL_MODES), st.integers(1, 48), st.integers(1, 48), st.integers(0, 2**32 - 1),
       st.sampled_from([None, 0, 1, -1]))
def test_fuzz_pil_modes(mode, width, height, seed, frame):
    rng = np.random.default_rng(seed)
    image = Image.frombytes("RGB", (width, height), rng.integers(0, 256, width * height * 3, dtype=np.uint8).tobytes())
    try:
        image = image.convert(mode)
    except ValueError:
        image = Image.new(mode, (width, height))
    try:
        check_rgb(load_image(image, frame=frame))
    except DOCUMENTED:
        assert frame not in (None, 0)


@FUZZ
@given(st.binary(min_size=0, max_size=2048), st.sampled_from(["", ".png", ".jpg", ".dcm", ".bmp", ".tif", ".gif"]),
       st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"BM", b"GIF89a", b"II*\x00", b"\xff\xd8\xff",
                        b"\0" * 128 + b"DICM"]))
def test_fuzz_random_bytes_as_files(tmp_path_factory, data, suffix, magic):
    path = tmp_path_factory.mktemp("bytes") / f"input{suffix}"
    path.write_bytes(magic + data)
    try:
        check_rgb(load_image(path))
    except ImageLoadingError as error:
        assert str(path) in str(error)


@FUZZ
@given(st.lists(arrays(), min_size=1, max_size=3), st.booleans())
def test_fuzz_the_processor_gives_a_batch_or_a_documented_error(images, high_res):
    processor = QilinImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
                                    high_res_size=56)
    try:
        out = processor(images, return_high_res=high_res, return_tensors="pt")
    except DOCUMENTED:
        return
    assert out["pixel_values"].shape == (len(images), 3, 28, 28)
    assert torch.isfinite(out["pixel_values"]).all()
    if high_res:
        assert out["high_res_pixel_values"].shape == (len(images), 3, 56, 56)


# Chat messages: random structures, some well-formed, most not.
_values = st.one_of(st.none(), st.integers(-3, 3), st.text(max_size=12), st.sampled_from(["<image>", "user", "text"]))
_blocks = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": st.one_of(st.text(max_size=20), _values)}),
    st.fixed_dictionaries({"type": st.just("image")}, optional={"image": st.just("PIL")}),
    st.dictionaries(st.sampled_from(["type", "text", "image", "path", "url"]),
                    st.one_of(_values, st.sampled_from(["video", "audio", "image", "text"])), max_size=3),
    _values,
)
_messages = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system"]),
                           "content": st.one_of(st.text(max_size=30), st.lists(_blocks, max_size=3))}),
    st.dictionaries(st.sampled_from(["role", "content", "name"]), st.one_of(_values, st.lists(_blocks, max_size=2)),
                    max_size=3),
    _values,
)
_conversations = st.one_of(st.lists(_messages, max_size=4), st.lists(st.lists(_messages, max_size=3), max_size=2),
                           _values)


def _with_images(value):
    if isinstance(value, dict):
        return {key: Image.new("RGB", (8, 8)) if item == "PIL" else _with_images(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_with_images(item) for item in value]
    return value


@FUZZ
@given(_conversations, st.booleans())
def test_fuzz_chat_messages_give_inputs_or_a_value_error(processor, conversation, generation_prompt):
    conversation = _with_images(conversation)
    try:
        out = processor.apply_chat_template(conversation, add_generation_prompt=generation_prompt, tokenize=True,
                                            return_dict=True, return_tensors="pt")
    except (ValueError, TypeError):  # check_chat_messages, placeholder/image counts, ImageLoadingError
        return
    assert out["input_ids"].ndim == 2 and out["input_ids"].shape[1] > 0


@FUZZ
@given(st.integers(113, 900), st.integers(1, 900), st.booleans(), st.integers(0, 2**32 - 1))
def test_fuzz_large_image_pixels_equal_the_full_size_square(long_side, short_side, tall, seed):
    """Any shape over four times the output side (28 and 56 px here): the pixels of the original pipeline."""
    short_side = max(short_side, -(-long_side // MAX_ASPECT_RATIO))
    short_side = min(short_side, long_side)
    width, height = (short_side, long_side) if tall else (long_side, short_side)
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    processor = QilinImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
                                    high_res_size=56)
    out = processor(image, return_tensors="np")
    np.testing.assert_allclose(out["pixel_values"][0], reference_expand2square_clip(image, 28), atol=1e-5)
    np.testing.assert_allclose(out["high_res_pixel_values"][0], reference_expand2square_clip(image, 56), atol=1e-5)
