"""Tests for the image loader that travels with checkpoints (``image_loading_qilin``).

DICOM cases use the files shipped inside pydicom (``get_testdata_file(..., download=False)``: nothing is fetched), and
every windowing result is compared with an independent numpy computation written out from the DICOM standard.
"""

import ast
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import apply_color_lut, convert_color_space, pixel_array

from qilin_med_vl.processing import image_loading_qilin
from qilin_med_vl.processing.image_loading_qilin import (
    ImageLoadingError,
    dicom_to_uint8,
    is_dicom_file,
    load_dicom,
    load_image,
    load_images,
)

torch.set_num_threads(1)


def shipped_file(name):
    path = get_testdata_file(name, download=False)
    assert path is not None, f"{name} is not shipped with this pydicom"
    return path


def to_uint8(unit):
    """The loader's rounding: [0, 1] (clipped) -> 0..255, nearest integer."""
    return np.rint(np.clip(unit, 0.0, 1.0) * 255.0).astype(np.uint8)


def percentile_window(values):
    low, high = np.percentile(values, [0.5, 99.5])
    return low, high


def linear_window(x, center, width):
    """PS3.3 C.11.2.1.2.1 'LINEAR' window as a fraction of the output range (0 below, 1 above the window)."""
    return np.clip((x - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def pixels(image):
    assert isinstance(image, Image.Image)
    assert image.mode == "RGB"
    return np.asarray(image)


def assert_gray(array):
    assert (array[..., 0] == array[..., 1]).all() and (array[..., 0] == array[..., 2]).all()
    return array[..., 0]


# ----------------------------------------------------------------------------------------------------------------
# DICOM grayscale windowing
# ----------------------------------------------------------------------------------------------------------------


def test_ct_small_without_window_uses_rescale_and_percentile_window():
    path = shipped_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    assert "WindowCenter" not in ds and "VOILUTSequence" not in ds  # so the fallback window is what is tested

    image = load_image(path)
    assert image.size == (128, 128)
    gray = assert_gray(pixels(image))

    hounsfield = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    low, high = percentile_window(hounsfield)
    np.testing.assert_array_equal(gray, to_uint8((hounsfield - low) / (high - low)))
    # The full range is used, with plenty of grey levels and only the extreme percentiles clipped.
    assert gray.min() == 0 and gray.max() == 255
    assert len(np.unique(gray)) > 200
    assert (gray == 0).mean() < 0.02 and (gray == 255).mean() < 0.02


def test_mr_small_uses_the_files_window_center_and_width():
    path = shipped_file("MR_small.dcm")
    ds = pydicom.dcmread(path)
    center, width = float(ds.WindowCenter), float(ds.WindowWidth)

    gray = assert_gray(pixels(load_dicom(path)))
    expected = to_uint8(linear_window(ds.pixel_array.astype(np.float64), center, width))
    np.testing.assert_array_equal(gray, expected)
    # Not a min-max or percentile stretch: the darkest MR pixel (127) is inside the window, above black.
    assert gray.min() == expected.min() > 0


def test_ct_window_is_applied_to_hounsfield_units_after_rescale():
    ds = pydicom.dcmread(shipped_file("CT_small.dcm"))
    ds.RescaleIntercept = -1100  # an intercept the stored values alone would not know about
    ds.WindowCenter, ds.WindowWidth = 40, 400  # abdomen window, in HU
    hounsfield = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) - 1100
    gray = dicom_to_uint8(ds)
    np.testing.assert_array_equal(gray, to_uint8(linear_window(hounsfield, 40, 400)))
    assert 0 < (gray == 255).mean() < 0.5  # windowing the raw stored values would have made it almost all white


def test_first_window_is_used_when_window_is_multi_valued():
    ds = pydicom.dcmread(shipped_file("MR_small.dcm"))
    ds.WindowCenter = [900, 40]
    ds.WindowWidth = [800, 80]
    gray = dicom_to_uint8(ds)
    np.testing.assert_array_equal(gray, to_uint8(linear_window(ds.pixel_array.astype(np.float64), 900, 800)))


def test_voi_lut_sequence_is_preferred_over_window():
    ds = pydicom.dcmread(shipped_file("MR_small.dcm"))
    assert "WindowCenter" in ds
    lut = np.rint(65535 * np.linspace(0, 1, 4096) ** 0.5).astype(int)  # a gamma curve, not a straight window
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.LUTData = [int(v) for v in lut]
    ds.VOILUTSequence = [item]

    expected = to_uint8(lut[ds.pixel_array.astype(np.int64)] / 65535.0)
    np.testing.assert_array_equal(dicom_to_uint8(ds), expected)


def test_monochrome1_is_inverted_after_windowing(tmp_path):
    path = shipped_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    ds.PhotometricInterpretation = "MONOCHROME1"
    inverted_path = tmp_path / "ct_monochrome1.dcm"
    ds.save_as(inverted_path)

    monochrome2 = pixels(load_image(path))
    monochrome1 = pixels(load_image(inverted_path))
    np.testing.assert_array_equal(monochrome1, 255 - monochrome2)


def test_monochrome1_with_window_is_inverted_after_windowing():
    ds = pydicom.dcmread(shipped_file("MR_small.dcm"))
    monochrome2 = dicom_to_uint8(ds)
    ds.PhotometricInterpretation = "MONOCHROME1"
    np.testing.assert_array_equal(dicom_to_uint8(ds), 255 - monochrome2)


def test_pixel_padding_is_left_out_of_the_percentile_window(tmp_path):
    ds = pydicom.dcmread(shipped_file("CT_small.dcm"))
    stored = ds.pixel_array.copy()
    padding = int(ds.PixelPaddingValue)
    stored[:, :40] = padding  # a third of the image outside the "reconstruction circle"
    ds.PixelData = stored.astype(np.int16).tobytes()
    path = tmp_path / "padded.dcm"
    ds.save_as(path)

    gray = assert_gray(pixels(load_image(path)))
    hounsfield = stored.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    low, high = percentile_window(hounsfield[stored != padding])
    np.testing.assert_array_equal(gray, to_uint8((hounsfield - low) / (high - low)))
    assert (gray[:, :40] == 0).all()
    # Counting the padding would have dragged the window down to -3024 HU and squashed the tissue contrast.
    naive_low, naive_high = percentile_window(hounsfield)
    assert not np.array_equal(gray, to_uint8((hounsfield - naive_low) / (naive_high - naive_low)))


def test_enhanced_functional_group_window_is_applied_per_frame():
    ds = pydicom.dcmread(shipped_file("rtdose.dcm"))
    assert "WindowCenter" not in ds
    stack = ds.pixel_array.astype(np.float64)

    def voi_group(center, width):
        window = Dataset()
        window.WindowCenter = center
        window.WindowWidth = width
        group = Dataset()
        group.FrameVOILUTSequence = [window]
        return group

    ds.SharedFunctionalGroupsSequence = [voi_group(1_000_000, 400_000)]
    ds.PerFrameFunctionalGroupsSequence = [Dataset() for _ in range(int(ds.NumberOfFrames))]
    ds.PerFrameFunctionalGroupsSequence[2] = voi_group(1_100_000, 100_000)

    np.testing.assert_array_equal(dicom_to_uint8(ds, frame=0), to_uint8(linear_window(stack[0], 1_000_000, 400_000)))
    np.testing.assert_array_equal(dicom_to_uint8(ds, frame=2), to_uint8(linear_window(stack[2], 1_100_000, 100_000)))
    # The caller's dataset is not modified (the functional-group values are not copied to its top level).
    assert "WindowCenter" not in ds


def test_dicom_to_uint8_shares_the_windowing_of_load_dicom():
    path = shipped_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    before = ds.to_json_dict()
    array = dicom_to_uint8(ds)
    assert array.shape == (128, 128) and array.dtype == np.uint8
    np.testing.assert_array_equal(array, assert_gray(pixels(load_dicom(path))))
    assert ds.to_json_dict() == before

    colour = dicom_to_uint8(pydicom.dcmread(shipped_file("examples_rgb_color.dcm")))
    assert colour.shape == (240, 320, 3) and colour.dtype == np.uint8


# ----------------------------------------------------------------------------------------------------------------
# DICOM colour
# ----------------------------------------------------------------------------------------------------------------


def test_rgb_dicom_keeps_its_colour():
    path = shipped_file("examples_rgb_color.dcm")
    rgb = pixels(load_image(path))
    assert rgb.shape == (240, 320, 3)
    np.testing.assert_array_equal(rgb, pydicom.dcmread(path).pixel_array)
    # Kept as colour, not collapsed to grey: thousands of pixels have channels that differ.
    assert (rgb[..., 0] != rgb[..., 1]).sum() > 1000 and (rgb[..., 1] != rgb[..., 2]).sum() > 1000


def test_ybr_full_422_is_converted_to_rgb_exactly_once():
    path = shipped_file("SC_ybr_full_422_uncompressed.dcm")
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "YBR_FULL_422"
    ybr = pixel_array(ds, raw=True)  # sub-sampling removed, still YCbCr
    expected = convert_color_space(ybr, "YBR_FULL", "RGB")

    rgb = pixels(load_image(path))
    np.testing.assert_array_equal(rgb, expected)
    assert not np.array_equal(rgb, ybr)
    assert not np.array_equal(rgb, convert_color_space(expected, "YBR_FULL", "RGB"))  # the double conversion


def test_multi_frame_ybr_jpeg_picks_the_requested_frame():
    path = shipped_file("examples_ybr_color.dcm")
    ds = pydicom.dcmread(path)
    assert int(ds.NumberOfFrames) == 30 and ds.PhotometricInterpretation == "YBR_FULL_422"
    frame5 = pixels(load_image(path, frame=5))
    np.testing.assert_array_equal(frame5, pixel_array(ds, index=5))  # pydicom 3 returns this frame as RGB
    assert not np.array_equal(frame5, pixels(load_image(path, frame=0)))
    assert (frame5[..., 0] != frame5[..., 2]).any()


def test_16_bit_rgb_is_scaled_down_to_8_bit():
    path = shipped_file("SC_rgb_rle_16bit.dcm")
    ds = pydicom.dcmread(path)
    assert ds.BitsStored == 16
    expected = to_uint8(ds.pixel_array.astype(np.float64) / 65535.0)
    np.testing.assert_array_equal(pixels(load_image(path)), expected)


def test_palette_colour_is_looked_up():
    path = shipped_file("examples_palette.dcm")
    ds = pydicom.dcmread(path)
    rgb16 = apply_color_lut(ds.pixel_array, ds)
    rgb = pixels(load_image(path))
    np.testing.assert_array_equal(rgb, to_uint8(rgb16 / 65535.0))
    assert (rgb[..., 0] != rgb[..., 2]).any()


# ----------------------------------------------------------------------------------------------------------------
# DICOM frames, encodings and errors
# ----------------------------------------------------------------------------------------------------------------


def test_multi_frame_grayscale_frame_choice():
    path = shipped_file("rtdose.dcm")
    ds = pydicom.dcmread(path)
    assert int(ds.NumberOfFrames) == 15
    frame = pixels(load_image(path, frame=3))
    assert frame.shape == (10, 10, 3)
    values = ds.pixel_array[3].astype(np.float64)
    low, high = percentile_window(values)
    np.testing.assert_array_equal(assert_gray(frame), to_uint8((values - low) / (high - low)))
    assert not np.array_equal(frame, pixels(load_image(path, frame=0)))


def test_multi_frame_colour_frame_choice():
    path = shipped_file("SC_rgb_rle_2frame.dcm")
    frames = pydicom.dcmread(path).pixel_array
    np.testing.assert_array_equal(pixels(load_image(path, frame=1)), frames[1])
    np.testing.assert_array_equal(pixels(load_image(path, frame=0)), frames[0])


def test_multi_frame_without_frame_says_how_many_and_how_to_choose():
    path = shipped_file("rtdose.dcm")
    with pytest.raises(ImageLoadingError, match=r"15 frames; pass frame=\.\.\.") as error:
        load_image(path)
    assert path in str(error.value)


@pytest.mark.parametrize("frame", [15, -1])
def test_multi_frame_out_of_range_lists_the_count(frame):
    path = shipped_file("rtdose.dcm")
    with pytest.raises(ImageLoadingError, match=rf"frame={frame} is out of range, the file has 15 frames") as error:
        load_dicom(path, frame=frame)
    assert path in str(error.value)


def test_single_frame_file_accepts_only_frame_zero():
    path = shipped_file("CT_small.dcm")
    np.testing.assert_array_equal(pixels(load_image(path, frame=0)), pixels(load_image(path)))
    with pytest.raises(ImageLoadingError, match="frame=1 was given but the file has a single frame"):
        load_image(path, frame=1)


def test_jpeg2000_lossless_decodes_to_the_same_image_as_uncompressed():
    # In this environment Pillow is built with OpenJPEG, so pydicom decodes JPEG 2000 without extra plugins.
    compressed = shipped_file("MR_small_jp2klossless.dcm")
    assert pydicom.dcmread(compressed).file_meta.TransferSyntaxUID.name.startswith("JPEG 2000")
    np.testing.assert_array_equal(pixels(load_image(compressed)), pixels(load_image(shipped_file("MR_small.dcm"))))


def test_missing_decoder_error_names_file_and_transfer_syntax():
    # No JPEG-LS plugin (pylibjpeg-libjpeg, pyjpegls, gdcm) is installed in the test environment.
    path = shipped_file("MR_small_jpeg_ls_lossless.dcm")
    with pytest.raises(ImageLoadingError) as error:
        load_image(path)
    message = str(error.value)
    assert path in message
    assert "JPEG-LS Lossless Image Compression" in message
    assert "no decoder" in message
    assert error.value.path == path


def test_dicom_without_pixel_data_is_an_error(tmp_path):
    ds = pydicom.dcmread(shipped_file("CT_small.dcm"))
    del ds.PixelData
    path = tmp_path / "no_pixels.dcm"
    ds.save_as(path)
    with pytest.raises(ImageLoadingError, match="no pixel data") as error:
        load_image(path)
    assert str(path) in str(error.value)


def test_rt_plan_is_not_an_image():
    with pytest.raises(ImageLoadingError, match="no pixel data.*RT Plan Storage"):
        load_image(shipped_file("rtplan.dcm"))


def _write_raw_dataset(source, destination):
    """Save `source` as a raw dataset: no 128-byte preamble, no 'DICM', no file meta (so no Transfer Syntax)."""
    ds = pydicom.dcmread(source)
    ds.preamble = None
    ds.file_meta = FileMetaDataset()
    ds.save_as(destination, implicit_vr=False, little_endian=True, enforce_file_format=False)
    with open(destination, "rb") as file:
        head = file.read(132)
    assert head[128:132] != b"DICM"


@pytest.mark.parametrize("name", ["raw.dcm", "raw.DICOM", "IM0001"])
def test_dicom_without_preamble_is_read(tmp_path, name):
    original = shipped_file("CT_small.dcm")
    path = tmp_path / name
    _write_raw_dataset(original, path)
    np.testing.assert_array_equal(pixels(load_image(path)), pixels(load_image(original)))


def test_pydicom_missing_gives_install_hint(monkeypatch):
    for module in ("pydicom", "pydicom.errors", "pydicom.pixels"):
        monkeypatch.setitem(sys.modules, module, None)  # makes `import pydicom` raise ImportError
    with pytest.raises(ImportError, match=r"Reading DICOM needs pydicom: pip install 'qilin-med-vl\[dicom\]'"):
        load_dicom(shipped_file("CT_small.dcm"))
    with pytest.raises(ImportError, match="Reading DICOM needs pydicom"):
        load_image(shipped_file("CT_small.dcm"))


def test_is_dicom_file(tmp_path):
    no_suffix = tmp_path / "IM0001"
    shutil.copy(shipped_file("CT_small.dcm"), no_suffix)
    assert is_dicom_file(no_suffix)  # by the DICM magic

    (tmp_path / "notes.dcm").write_text("not really")
    assert is_dicom_file(tmp_path / "notes.dcm")  # by the suffix

    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    assert not is_dicom_file(tmp_path / "a.png")
    assert not is_dicom_file(str(tmp_path / "missing.dcm"))
    assert not is_dicom_file(tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# Ordinary image files
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".png", ".bmp", ".tiff"])
def test_lossless_file_round_trip(tmp_path, suffix):
    rgb = np.random.default_rng(0).integers(0, 256, size=(12, 20, 3), dtype=np.uint8)
    path = tmp_path / f"image{suffix}"
    Image.fromarray(rgb).save(path)
    image = load_image(str(path))
    assert image.size == (20, 12)
    np.testing.assert_array_equal(pixels(image), rgb)


def test_jpeg_round_trip(tmp_path):
    y, x = np.mgrid[0:32, 0:48]
    rgb = np.stack([x * 5, y * 7, 255 - x * 5], axis=-1).astype(np.uint8)
    path = tmp_path / "photo.jpg"
    Image.fromarray(rgb).save(path, quality=95)
    loaded = pixels(load_image(path))
    assert loaded.shape == rgb.shape
    assert np.abs(loaded.astype(int) - rgb).mean() < 3


def test_jpeg_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    path = tmp_path / "sideways.jpg"
    image.save(path, exif=exif)
    assert load_image(path).size == (20, 40)


def test_16_bit_png_is_min_max_scaled_not_clipped(tmp_path):
    values = np.array([[1000, 1500], [2000, 4095]], dtype=np.uint16)
    path = tmp_path / "xray16.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    gray = assert_gray(pixels(load_image(path)))
    np.testing.assert_array_equal(gray, to_uint8((values - 1000.0) / 3095.0))


def test_multi_page_tiff_frame_choice(tmp_path):
    pages = [Image.new("RGB", (8, 8), colour) for colour in ((10, 20, 30), (200, 100, 50))]
    path = tmp_path / "stack.tiff"
    pages[0].save(path, save_all=True, append_images=pages[1:])
    assert pixels(load_image(path))[0, 0].tolist() == [10, 20, 30]
    assert pixels(load_image(path, frame=1))[0, 0].tolist() == [200, 100, 50]
    with pytest.raises(ImageLoadingError, match="frame=2 is out of range, the image has 2 frame"):
        load_image(path, frame=2)


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nowhere" / "scan.png"
    with pytest.raises(ImageLoadingError, match="image file not found: ") as error:
        load_image(path)
    assert str(path) in str(error.value)
    assert error.value.path == str(path)
    dicom_path = tmp_path / "nowhere" / "scan.dcm"
    with pytest.raises(ImageLoadingError, match="image file not found: ") as error:
        load_dicom(dicom_path)
    assert str(dicom_path) in str(error.value)


def test_directory_is_refused(tmp_path):
    with pytest.raises(ImageLoadingError, match="directory"):
        load_image(tmp_path)


def test_unreadable_file_is_neither_image_nor_dicom(tmp_path):
    path = tmp_path / "x.png"
    path.write_text("this is a radiology report, not a picture\n" * 10)
    with pytest.raises(ImageLoadingError, match="neither a readable image nor DICOM") as error:
        load_image(path)
    assert str(path) in str(error.value)


def test_dicom_suffix_routes_to_the_dicom_reader(tmp_path):
    path = tmp_path / "report.dcm"
    path.write_text("not a dataset")
    with pytest.raises(ImageLoadingError, match="not a DICOM image") as error:
        load_image(path)
    assert str(path) in str(error.value)


def test_load_dicom_on_a_non_dicom_file_is_a_clear_error(tmp_path):
    path = tmp_path / "x.txt"
    path.write_text("hello")
    with pytest.raises(ImageLoadingError, match="not a DICOM image") as error:
        load_dicom(path)
    assert str(path) in str(error.value)


@pytest.mark.parametrize(
    "url", ["http://example.com/chest.png", "https://example.com/ct.dcm", " HTTPS://example.com/x.jpg", "s3://b/k.png"]
)
def test_urls_are_refused_without_network(monkeypatch, url):
    def no_network(*args, **kwargs):
        raise AssertionError("the loader tried to open a network connection")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    with pytest.raises(ImageLoadingError, match="URLs are not supported"):
        load_image(url)
    with pytest.raises(ImageLoadingError, match="URLs are not supported"):
        load_dicom(url)


# ----------------------------------------------------------------------------------------------------------------
# PIL images
# ----------------------------------------------------------------------------------------------------------------


def test_pil_grayscale_and_rgb():
    gray = Image.fromarray(np.arange(12, dtype=np.uint8).reshape(3, 4) * 20)
    np.testing.assert_array_equal(assert_gray(pixels(load_image(gray))), np.asarray(gray))
    rgb = Image.new("RGB", (3, 2), (1, 2, 3))
    np.testing.assert_array_equal(pixels(load_image(rgb)), np.asarray(rgb))
    assert load_image(Image.new("1", (5, 5), 1)).getpixel((0, 0)) == (255, 255, 255)


def test_pil_alpha_is_composited_on_black():
    rgba = Image.new("RGBA", (2, 2), (200, 100, 50, 128))
    expected = np.rint(np.array([200, 100, 50]) * 128 / 255).astype(np.uint8)
    np.testing.assert_array_equal(pixels(load_image(rgba))[0, 0], expected)

    la = Image.new("LA", (2, 2), (200, 0))
    np.testing.assert_array_equal(pixels(load_image(la)), 0)


def test_pil_palette_images():
    palette = Image.new("P", (2, 2), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    np.testing.assert_array_equal(pixels(load_image(palette))[0, 0], [10, 200, 30])

    palette.info["transparency"] = 1
    np.testing.assert_array_equal(pixels(load_image(palette)), 0)


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_pil_high_bit_depth_modes_are_min_max_scaled(mode):
    values = np.array([[-50, 0], [3000, 40000]], dtype=np.float64)
    if mode == "I;16":
        values = values - values.min()
        image = Image.fromarray(values.astype(np.uint16))
    elif mode == "I":
        image = Image.fromarray(values.astype(np.int32))
    else:
        image = Image.fromarray(values.astype(np.float32))
    assert image.mode == mode
    gray = assert_gray(pixels(load_image(image)))
    np.testing.assert_array_equal(gray, to_uint8((values - values.min()) / (values.max() - values.min())))
    assert gray.max() == 255 and gray.min() == 0


def test_pil_cmyk_is_converted():
    assert load_image(Image.new("CMYK", (2, 2), (0, 0, 0, 0))).getpixel((0, 0)) == (255, 255, 255)


# ----------------------------------------------------------------------------------------------------------------
# numpy arrays and torch tensors
# ----------------------------------------------------------------------------------------------------------------


def test_uint8_arrays_are_taken_as_is():
    rgb = np.random.default_rng(1).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    np.testing.assert_array_equal(pixels(load_image(rgb)), rgb)
    np.testing.assert_array_equal(assert_gray(pixels(load_image(rgb[..., 0]))), rgb[..., 0])
    np.testing.assert_array_equal(assert_gray(pixels(load_image(rgb[..., :1]))), rgb[..., 0])
    assert load_image(rgb).size == (7, 5)


def test_uint16_array_is_min_max_scaled():
    values = np.array([[512, 1024], [2048, 4095]], dtype=np.uint16)
    gray = assert_gray(pixels(load_image(values)))
    np.testing.assert_array_equal(gray, to_uint8((values - 512.0) / (4095.0 - 512.0)))
    assert gray.tolist() == [[0, 36], [109, 255]]


def test_signed_int_array_is_min_max_scaled():
    values = np.array([[-1024, 0], [400, 3071]], dtype=np.int16)
    gray = assert_gray(pixels(load_image(values)))
    np.testing.assert_array_equal(gray, to_uint8((values + 1024.0) / 4095.0))


def test_float_arrays():
    unit = np.array([[0.0, 0.25], [0.5, 1.0]], dtype=np.float32)
    np.testing.assert_array_equal(assert_gray(pixels(load_image(unit))), [[0, 64], [128, 255]])
    # Outside [0, 1]: min-max, not clipping.
    hounsfield = np.array([[-1000.0, 0.0], [500.0, 1000.0]])
    np.testing.assert_array_equal(assert_gray(pixels(load_image(hounsfield))), [[0, 128], [191, 255]])


def test_constant_array_is_black():
    np.testing.assert_array_equal(pixels(load_image(np.full((3, 3), 1234, dtype=np.uint16))), 0)


def test_channels_first_arrays():
    hwc = np.random.default_rng(2).integers(0, 256, size=(6, 9, 3), dtype=np.uint8)
    chw = np.ascontiguousarray(hwc.transpose(2, 0, 1))
    np.testing.assert_array_equal(pixels(load_image(chw)), hwc)
    np.testing.assert_array_equal(assert_gray(pixels(load_image(chw[:1]))), hwc[..., 0])


def test_rgba_array_is_composited_on_black():
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[...] = (200, 100, 50, 255)
    rgba[0, 0, 3] = 0
    rgb = pixels(load_image(rgba))
    assert rgb[0, 0].tolist() == [0, 0, 0] and rgb[1, 1].tolist() == [200, 100, 50]


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (4, 4, 2), (5,), (0, 4)])
def test_unsupported_array_shapes(shape):
    with pytest.raises(ImageLoadingError, match="cannot read an"):
        load_image(np.zeros(shape, dtype=np.uint8))


def test_torch_channels_first_float_tensor():
    chw = torch.rand(3, 8, 5, dtype=torch.float32)
    expected = to_uint8(chw.permute(1, 2, 0).numpy().astype(np.float64))
    image = load_image(chw)
    assert image.size == (5, 8)
    np.testing.assert_array_equal(pixels(image), expected)


def test_torch_tensors_of_other_dtypes():
    hwc = torch.randint(0, 256, (4, 6, 3), dtype=torch.uint8)
    np.testing.assert_array_equal(pixels(load_image(hwc)), hwc.numpy())
    grad = torch.rand(1, 4, 4, requires_grad=True)
    assert load_image(grad).size == (4, 4)
    half = torch.tensor([[0.0, 1.0]], dtype=torch.bfloat16)
    np.testing.assert_array_equal(assert_gray(pixels(load_image(half))), [[0, 255]])
    wide = torch.tensor([[0, 4095]], dtype=torch.int32)
    np.testing.assert_array_equal(assert_gray(pixels(load_image(wide))), [[0, 255]])


# ----------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [42, None, b"\x89PNG", [[0, 1]], {"path": "a.png"}])
def test_unsupported_type_names_the_type(value):
    with pytest.raises(TypeError, match=type(value).__qualname__):
        load_image(value)


def test_frame_for_in_memory_images():
    array = np.zeros((4, 4), dtype=np.uint8)
    assert load_image(array, frame=0).size == (4, 4)
    with pytest.raises(ImageLoadingError, match="frame=1 was given but a numpy array holds a single image"):
        load_image(array, frame=1)
    with pytest.raises(TypeError, match="frame must be None or an int"):
        load_image(array, frame="1")


def test_load_images(tmp_path):
    Image.new("RGB", (3, 3), (9, 9, 9)).save(tmp_path / "a.png")
    images = load_images([tmp_path / "a.png", np.zeros((2, 2)), shipped_file("CT_small.dcm")])
    assert [image.size for image in images] == [(3, 3), (2, 2), (128, 128)]
    assert all(image.mode == "RGB" for image in images)
    frames = load_images((shipped_file("rtdose.dcm"), shipped_file("rtdose.dcm")), frame=4)
    assert len(frames) == 2 and frames[0].size == (10, 10)
    with pytest.raises(TypeError, match="load_images\\(\\) expects a list"):
        load_images(str(tmp_path / "a.png"))


def test_errors_are_value_errors():
    assert issubclass(ImageLoadingError, ValueError)


# ----------------------------------------------------------------------------------------------------------------
# Remote-code constraints
# ----------------------------------------------------------------------------------------------------------------


LOADER_FILES = ("image_loading_qilin.py", "dicom_qilin.py", "image_checks_qilin.py")


def test_module_imports_are_remote_code_safe():
    # The loader travels as remote code: three flat files importing the standard library, numpy, PIL and each other
    # (single-dot imports, which transformers resolves inside its dynamic-module package), nothing from the package.
    folder = os.path.dirname(image_loading_qilin.__file__)
    for name in LOADER_FILES:
        tree = ast.parse(open(os.path.join(folder, name), encoding="utf-8").read())
        top_level = set()
        for node in tree.body:
            if isinstance(node, ast.Import):
                top_level.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                top_level.add(node.module.split(".")[0])
            elif isinstance(node, ast.ImportFrom):
                assert node.level == 1 and f"{node.module}.py" in LOADER_FILES, (name, node.module)
        assert top_level <= {"logging", "os", "re", "sys", "collections", "typing", "numpy", "PIL"}, (name, top_level)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                assert node.level in (0, 1) and not (node.module or "").startswith("qilin_med_vl")
            if isinstance(node, ast.Import):
                assert not any(alias.name.startswith("qilin_med_vl") for alias in node.names)


def test_module_loads_standalone_without_torch_or_pydicom(tmp_path):
    # As remote code: the loader's files alone, in a package of their own as transformers lays dynamic modules out,
    # must import without pulling in torch or pydicom.
    package = tmp_path / "remote_code"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name in LOADER_FILES:
        shutil.copy(os.path.join(os.path.dirname(image_loading_qilin.__file__), name), package / name)
    script = (
        "import sys, numpy as np\n"
        "import remote_code.image_loading_qilin as m\n"
        "assert 'torch' not in sys.modules and 'pydicom' not in sys.modules, sorted(sys.modules)\n"
        "assert not any(name.startswith('qilin_med_vl') for name in sys.modules)\n"
        "assert m.load_image(np.zeros((2, 3), dtype=np.uint16)).size == (3, 2)\n"
        "assert 'pydicom' not in sys.modules\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
