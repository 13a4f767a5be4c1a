# Copyright 2026 The qilin-med-vl Authors. Licensed under the Apache License, Version 2.0.
"""Turn whatever a user hands the processor into an 8-bit RGB `PIL.Image.Image`.

Accepted inputs are PIL images (any mode), numpy arrays, torch tensors and local file paths: PNG, JPEG, BMP, TIFF and
the other formats PIL reads, and DICOM through pydicom. DICOM grayscale is windowed the way a radiologist's viewer
shows it (Modality LUT, then the file's VOI LUT or window, MONOCHROME1 inverted), so the model sees what a reader of
the report would have seen.

Remote code: this file is copied next to checkpoints and imported by `trust_remote_code=True`, so it imports only the
standard library, numpy and PIL at module level. pydicom is an optional extra and is imported inside the functions
that need it; torch is only looked up in `sys.modules` (a tensor cannot exist unless torch is already imported).
"""

import logging
import os
import re
import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

if TYPE_CHECKING:
    from pydicom.dataset import Dataset


__all__ = [
    "MAX_ASPECT_RATIO",
    "MAX_IMAGE_PIXELS",
    "ImageLoadingError",
    "check_image_size",
    "dicom_to_uint8",
    "is_dicom_file",
    "load_dicom",
    "load_image",
    "load_images",
]

logger = logging.getLogger(__name__)

PYDICOM_MISSING_MESSAGE = "Reading DICOM needs pydicom: pip install 'qilin-med-vl[dicom]'"

DICOM_SUFFIXES = (".dcm", ".dicom")
# Lower and upper percentile of the fallback window for grayscale DICOM without a VOI LUT or window. Clipping the
# extreme 0.5% on each side keeps a few very bright (metal, contrast) or very dark (air, padding) pixels from
# squashing the tissue into a handful of grey levels.
FALLBACK_WINDOW_PERCENTILES = (0.5, 99.5)

# Input limits, checked before a file's pixels are decoded. The largest medical images the model is meant for
# (mammograms, about 4096 x 3328; chest films, 4280 x 3520) are far below MAX_IMAGE_PIXELS; beyond it a few bytes of
# compressed file (a "decompression bomb") could ask for gigabytes. PIL's own bomb limit (about 179 million pixels)
# is higher and raises an exception of its own; this one is lower and raises `ImageLoadingError`.
MAX_IMAGE_PIXELS = 100_000_000
# Longest side / shortest side. Padding a 1 x 20000 strip to a square makes a 20000 x 20000 image of which all but
# 0.005% is padding: nothing a model reading 336 px can use, and a memory trap. 50:1 still admits ECG strips.
MAX_ASPECT_RATIO = 50

# Any "scheme://" prefix: http(s), but also s3://, gs://, ftp://... None of them is fetched (no network code here).
_URL_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
_HIGH_BIT_DEPTH_PIL_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_ALPHA_PIL_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
_PIXEL_DATA_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# Functional-group macros of enhanced multi-frame objects (Enhanced CT/MR/XA...) that carry, per frame or shared,
# the rescale and window that a classic single-frame file keeps at the top level.
_FRAME_MACROS = ("PixelValueTransformationSequence", "FrameVOILUTSequence")


class ImageLoadingError(ValueError):
    """
    An input could not be turned into an image. The message names the file (when there is one) and the problem.

    Args:
        message (`str`):
            Human-readable description, already naming the file when there is one.
        path (`str`, *optional*):
            The offending file, for callers that want it without parsing the message.
    """

    def __init__(self, message: str, path: str | None = None):
        super().__init__(message)
        self.path = path


# ----------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------


def load_image(image: Any, frame: int | None = None) -> Image.Image:
    """
    Load one image as 8-bit RGB.

    Args:
        image (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor`, `str` or `os.PathLike`):
            - PIL image in any mode. 16-bit and 32-bit modes ("I;16", "I", "F") are min-max scaled to 0..255; modes
              with transparency are composited on black.
            - Array or tensor of shape `(height, width)`, `(height, width, channels)` with channels 1, 3 or 4, or
              `(channels, height, width)` with channels 1 or 3 (channels-first wins when both readings fit, as in
              transformers' `infer_channel_dimension_format`). `uint8`
              values are used as they are; floats within [0, 1] are multiplied by 255; any other integer or float
              data is min-max scaled to 0..255 (a constant image becomes black).
            - Path to a local file: anything PIL reads (PNG, JPEG, BMP, TIFF, ...) or DICOM (see `load_dicom`). URLs
              are refused: this function never touches the network.
        frame (`int`, *optional*):
            0-based frame of a multi-frame file: required for multi-frame DICOM, optional for multi-page TIFF/GIF
            (first page by default). For single images only `None` or `0` is accepted.

    Returns:
        `PIL.Image.Image`: mode "RGB", size `(width, height)` of the input (EXIF orientation applied).

    Raises:
        `TypeError`: `image` is of an unsupported type.
        `ImageLoadingError`: the file is missing or unreadable, the array has an unsupported shape or dtype, the
            frame choice does not fit the file, or the image is over the size limits (`MAX_IMAGE_PIXELS` pixels,
            `MAX_ASPECT_RATIO` : 1 between its sides; checked before a file's pixels are decoded).
    """
    _check_frame_argument(frame)
    if isinstance(image, Image.Image):
        check_image_size(*image.size, name="the PIL image")
        return _pil_to_rgb(_select_pil_frame(image, frame, name="the PIL image"))
    if isinstance(image, np.ndarray):
        _check_single_image_frame(frame, "a numpy array")
        return _array_to_rgb(image)
    if _is_torch_tensor(image):
        _check_single_image_frame(frame, "a torch tensor")
        return _array_to_rgb(_tensor_to_numpy(image))
    if isinstance(image, (str, os.PathLike)):
        try:
            return _load_path(image, frame)
        except (ImageLoadingError, ImportError):
            raise
        except Exception as error:
            # A corrupted file can make a decoder fail in ways no list of exception types anticipates (PIL's
            # DecompressionBombError, struct.error, MemoryError on a forged header...): still one named error.
            raise ImageLoadingError(f"{os.fspath(image)}: cannot read the image ({type(error).__name__}: {error})",
                                    path=os.fspath(image)) from error
    raise TypeError(
        f"load_image() cannot read an object of type {_type_name(image)}: expected a PIL image, a numpy array, a "
        "torch tensor or a local file path (str or os.PathLike)"
    )


def check_image_size(width: int, height: int, name: str = "the image") -> None:
    """Raise `ImageLoadingError` naming `name` when a `width` x `height` image (pixels) is over the limits:
    more than `MAX_IMAGE_PIXELS` pixels, or sides more than `MAX_ASPECT_RATIO` : 1 apart."""
    path = None if name.startswith("the ") else name
    if width < 1 or height < 1:
        raise ImageLoadingError(f"{name}: the image is empty ({width} x {height} pixels)", path=path)
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageLoadingError(
            f"{name}: {width} x {height} pixels is over the limit of {MAX_IMAGE_PIXELS:,} pixels; downscale it first "
            "(the model reads 336 px, HiA 672 px)", path=path)
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise ImageLoadingError(
            f"{name}: {width} x {height} pixels has an aspect ratio over {MAX_ASPECT_RATIO}:1; crop it to the region "
            "of interest first (padded to a square, almost all of it would be padding)", path=path)


def load_images(images: Iterable[Any], frame: int | None = None) -> list[Image.Image]:
    """
    Apply `load_image` to each element of `images` (a list, tuple or other iterable of images).

    Returns:
        `list[PIL.Image.Image]`: one RGB image per input, in order.
    """
    # A lone path or image would otherwise be iterated character by character (or row by row).
    if isinstance(images, (str, bytes, os.PathLike, Image.Image)):
        raise TypeError(
            f"load_images() expects a list of images, got a single {_type_name(images)}; use load_image() for one"
        )
    return [load_image(image, frame=frame) for image in images]


def is_dicom_file(path: str | os.PathLike) -> bool:
    """
    Whether `path` is an existing file that should be read as DICOM: it has the "DICM" magic at byte offset 128
    (Part 10 files) or a `.dcm` / `.dicom` suffix (raw datasets without preamble exist, and are named that way).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        return False
    if _has_dicom_suffix(path):
        return True
    return _has_dicom_magic(path)


def load_dicom(path: str | os.PathLike, frame: int | None = None) -> Image.Image:
    """
    Read a DICOM file as an RGB image, windowed as by `dicom_to_uint8`.

    Args:
        path (`str` or `os.PathLike`):
            Local DICOM file, with or without the 128-byte preamble.
        frame (`int`, *optional*):
            0-based frame; required when the file has more than one frame.

    Returns:
        `PIL.Image.Image`: mode "RGB", size `(Columns, Rows)`. Grayscale data is replicated in the three channels.

    Raises:
        `ImportError`: pydicom is not installed.
        `ImageLoadingError`: the file is missing, is not DICOM, has no pixel data, needs a decoder that is not
            installed, or the frame choice does not fit it.
    """
    _check_frame_argument(frame)
    path = _resolve_local_path(path)
    pydicom = _import_pydicom()
    try:
        dataset = pydicom.dcmread(path)
    except pydicom.errors.InvalidDicomError:
        # No "DICM" preamble: a raw dataset, as some PACS exports and older tools write them. `force=True` also
        # "reads" files that are not DICOM at all, so the result only counts if it describes an image.
        try:
            dataset = pydicom.dcmread(path, force=True)
        except Exception as error:
            raise ImageLoadingError(f"{path}: not a readable DICOM file ({error})", path=path) from error
        if not any(keyword in dataset for keyword in _PIXEL_DATA_KEYWORDS):
            raise ImageLoadingError(
                f"{path}: not a DICOM image (no 'DICM' preamble and no pixel data could be read)", path=path
            ) from None
    except Exception as error:
        raise ImageLoadingError(f"{path}: not a readable DICOM file ({error})", path=path) from error
    try:
        return _uint8_to_rgb(_dataset_to_uint8(dataset, frame, name=path))
    except ImageLoadingError:
        raise
    except Exception as error:
        # Damaged headers reach pydicom's LUT and decoder code with values it does not expect.
        raise ImageLoadingError(f"{path}: cannot read the DICOM image ({type(error).__name__}: {error})",
                                path=path) from error


def dicom_to_uint8(ds: "Dataset", frame: int | None = None) -> np.ndarray:
    """
    Decode one frame of a DICOM dataset to display-ready 8-bit values. A display path can call this to show exactly
    what the model receives.

    Grayscale (MONOCHROME1/2): the Modality LUT (or Rescale Slope/Intercept) is applied, then the VOI LUT Sequence or
    the first Window Center/Width (`pydicom.pixels.apply_voi_lut`); without either, a window from the 0.5th to the
    99.5th percentile of the frame (ignoring Pixel Padding Value). The window's output range maps linearly to 0..255,
    and MONOCHROME1 is inverted afterwards so that dense tissue is bright. Enhanced multi-frame objects take rescale
    and window from their shared or per-frame functional groups.

    Colour: YBR is converted to RGB (once: pydicom's decoder already does it), PALETTE COLOR is looked up, and more
    than 8 bits stored are scaled down to 8.

    Args:
        ds (`pydicom.dataset.Dataset`):
            Dataset with pixel data. It is not modified.
        frame (`int`, *optional*):
            0-based frame; required when the dataset has more than one frame, and only `0` is valid otherwise.

    Returns:
        `np.ndarray`: `uint8` of shape `(Rows, Columns)` for grayscale or `(Rows, Columns, 3)` for colour.
    """
    _check_frame_argument(frame)
    _import_pydicom()
    return _dataset_to_uint8(ds, frame, name=_dataset_name(ds))


# ----------------------------------------------------------------------------------------------------------------
# Paths
# ----------------------------------------------------------------------------------------------------------------


def _resolve_local_path(path: str | os.PathLike) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"expected a file path (str or os.PathLike), got {_type_name(path)}")
    path = os.fspath(path)
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    stripped = path.strip()
    if _URL_PATTERN.match(stripped) or stripped.lower().startswith("data:"):
        raise ImageLoadingError(
            f"refusing to load {stripped[:200]!r}: URLs are not supported (this loader never uses the network); "
            "download the file and pass its local path",
            path=path,
        )
    if not os.path.exists(path):
        raise ImageLoadingError(f"image file not found: {path}", path=path)
    if os.path.isdir(path):
        raise ImageLoadingError(f"expected an image file but got a directory: {path}", path=path)
    return path


def _load_path(path: str | os.PathLike, frame: int | None) -> Image.Image:
    path = _resolve_local_path(path)
    if _has_dicom_suffix(path) or _has_dicom_magic(path):
        return load_dicom(path, frame=frame)
    try:
        with Image.open(path) as image:
            # The size comes from the header: checked before any pixel is decoded.
            check_image_size(*image.size, name=path)
            selected = _select_pil_frame(image, frame, name=path)
            selected.load()
            # Converting inside the `with` block: the result must not depend on the file staying open.
            return _pil_to_rgb(selected)
    except ImageLoadingError:
        raise
    except Image.DecompressionBombError as error:
        raise ImageLoadingError(f"{path}: refused as a possible decompression bomb ({error})", path=path) from error
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as pil_error:
        # Neither suffix nor preamble says DICOM, but raw datasets are sometimes stored as "IM0001" or similar.
        dataset = _read_headerless_dicom(path)
        if dataset is None:
            raise ImageLoadingError(
                f"{path}: neither a readable image nor DICOM (PIL: {pil_error})", path=path
            ) from pil_error
    return _uint8_to_rgb(_dataset_to_uint8(dataset, frame, name=path))


def _read_headerless_dicom(path: str) -> "Dataset | None":
    """A dataset from `path` read with `force=True`, or `None` when it is not plausibly DICOM image data."""
    try:
        import pydicom
    except ImportError:
        return None
    try:
        dataset = pydicom.dcmread(path, force=True)
    except Exception:
        return None
    # `force=True` "succeeds" on many non-DICOM files; only accept something that really describes an image.
    if any(keyword in dataset for keyword in _PIXEL_DATA_KEYWORDS) and "Rows" in dataset and "Columns" in dataset:
        return dataset
    return None


def _has_dicom_suffix(path: str) -> bool:
    return path.lower().endswith(DICOM_SUFFIXES)


def _has_dicom_magic(path: str) -> bool:
    try:
        with open(path, "rb") as file:
            file.seek(128)
            return file.read(4) == b"DICM"
    except OSError:
        return False


# ----------------------------------------------------------------------------------------------------------------
# PIL images, arrays and tensors
# ----------------------------------------------------------------------------------------------------------------


def _select_pil_frame(image: Image.Image, frame: int | None, name: str) -> Image.Image:
    num_frames = getattr(image, "n_frames", 1)
    if frame is None:
        # Multi-page TIFF / animated GIF: PIL's first frame, as every image viewer shows it.
        return image
    if not 0 <= frame < num_frames:
        raise ImageLoadingError(
            f"{name}: frame={frame} is out of range, the image has {num_frames} frame(s) "
            f"(valid: 0 to {num_frames - 1})",
            path=name if name != "the PIL image" else None,
        )
    if num_frames > 1:
        image.seek(frame)
    return image


def _pil_to_rgb(image: Image.Image) -> Image.Image:
    # Phone photographs (dermatology, wounds, printed films) are often stored sideways with an EXIF rotation flag.
    image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _HIGH_BIT_DEPTH_PIL_MODES:
        # 16-bit PNG/TIFF (radiographs, microscopy) and float images: min-max, since clipping at 255 would turn
        # almost all of a 12-bit exposure white.
        return _uint8_to_rgb(_min_max_to_uint8(np.asarray(image)))
    if mode in _ALPHA_PIL_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as error:
        raise ImageLoadingError(f"cannot convert a PIL image in mode {mode!r} to RGB ({error})") from error


def _is_torch_tensor(obj: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.Tensor)


def _tensor_to_numpy(tensor: Any) -> np.ndarray:
    import torch

    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        # numpy has no bfloat16.
        tensor = tensor.float()
    return tensor.numpy()


def _array_to_rgb(array: np.ndarray) -> Image.Image:
    """`(H, W)`, `(H, W, C)` with C in 1/3/4, or `(C, H, W)` with C in 1/3 -> RGB PIL image of size `(W, H)`."""
    # Channels-first wins when both readings fit, as in transformers: a (1, 4, 4) tensor is a 4x4 grey image, not
    # a 1x4 RGBA strip, and images 1 or 3 pixels high are far rarer than channels-first tensors.
    if array.ndim == 3 and array.shape[0] in (1, 3):
        array = np.moveaxis(array, 0, -1)
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (1, 3, 4))):
        raise ImageLoadingError(
            f"cannot read an array of shape {tuple(array.shape)} as an image: expected (height, width), "
            "(height, width, channels) with 1, 3 or 4 channels, or (channels, height, width) with 1 or 3 channels"
        )
    if array.size == 0:
        raise ImageLoadingError(f"cannot read an empty array of shape {tuple(array.shape)} as an image")
    check_image_size(array.shape[1], array.shape[0], name=f"the array of shape {tuple(array.shape)}")
    if array.dtype.kind not in "buif":
        raise ImageLoadingError(f"cannot read an array of dtype {array.dtype} as an image")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2 or array.shape[-1] == 3:
        return _uint8_to_rgb(_to_uint8(array))
    # RGBA: colour channels are scaled together (keeping their balance), alpha on its own absolute scale, then the
    # colour is composited on black.
    rgb = _to_uint8(array[..., :3]).astype(np.float64)
    alpha = _alpha_to_unit(array[..., 3])
    return _uint8_to_rgb(np.rint(rgb * alpha[..., None]).astype(np.uint8))


def _to_uint8(array: np.ndarray) -> np.ndarray:
    """uint8 as is, bool as 0/255, floats within [0, 1] times 255, anything else min-max to 0..255."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if array.dtype.kind == "f":
        finite = array[np.isfinite(array)]
        if finite.size and finite.min() >= 0 and finite.max() <= 1:
            values = np.nan_to_num(array.astype(np.float64), nan=0.0, posinf=1.0, neginf=0.0)
            return _scale_to_uint8(values, 0.0, 1.0)
    return _min_max_to_uint8(array)


def _min_max_to_uint8(array: np.ndarray) -> np.ndarray:
    values = array.astype(np.float64)
    finite = np.isfinite(values)
    if not finite.any():
        return np.zeros(values.shape, dtype=np.uint8)
    low, high = float(values[finite].min()), float(values[finite].max())
    if not finite.all():
        values = np.nan_to_num(values, nan=low, posinf=high, neginf=low)
    return _scale_to_uint8(values, low, high)


def _scale_to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map `low` -> 0 and `high` -> 255 linearly, clip outside, round to nearest. `low == high` gives black."""
    if high == low:
        return np.zeros(values.shape, dtype=np.uint8)
    unit = np.clip((values - low) / (high - low), 0.0, 1.0)
    return np.rint(unit * 255.0).astype(np.uint8)


def _alpha_to_unit(alpha: np.ndarray) -> np.ndarray:
    # Alpha is an absolute opacity, not a signal to stretch: min-max would make a constant (opaque) alpha transparent.
    if alpha.dtype == np.bool_:
        return alpha.astype(np.float64)
    if alpha.dtype.kind == "f":
        alpha = np.nan_to_num(alpha.astype(np.float64), nan=1.0)
        return np.clip(alpha if alpha.max() <= 1 else alpha / 255.0, 0.0, 1.0)
    return np.clip(alpha.astype(np.float64) / np.iinfo(alpha.dtype).max, 0.0, 1.0)


def _uint8_to_rgb(array: np.ndarray) -> Image.Image:
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    return Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8))


# ----------------------------------------------------------------------------------------------------------------
# DICOM
# ----------------------------------------------------------------------------------------------------------------


def _import_pydicom():
    try:
        import pydicom
        import pydicom.errors
        import pydicom.pixels
    except ImportError as error:
        raise ImportError(PYDICOM_MISSING_MESSAGE) from error
    return pydicom


_IN_MEMORY_DATASET = "DICOM dataset"


def _dataset_name(ds: "Dataset") -> str:
    # A dataset read from disk remembers its file, so errors from `dicom_to_uint8` can still name it.
    filename = getattr(ds, "filename", None)
    return os.fspath(filename) if isinstance(filename, (str, os.PathLike)) else _IN_MEMORY_DATASET


def _path_of(name: str) -> str | None:
    return None if name == _IN_MEMORY_DATASET else name


def _dataset_to_uint8(ds: "Dataset", frame: int | None, name: str) -> np.ndarray:
    if not any(keyword in ds for keyword in _PIXEL_DATA_KEYWORDS):
        raise ImageLoadingError(
            f"{name}: the DICOM file has no pixel data (no PixelData element); it is not an image "
            f"(SOP Class: {getattr(ds.get('SOPClassUID'), 'name', 'unknown')})",
            path=_path_of(name),
        )
    try:
        rows, columns = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    except (TypeError, ValueError):
        rows = columns = 0
    if rows and columns:  # checked before decoding: a forged header must not make pydicom allocate gigabytes
        check_image_size(columns, rows, name=name if name != _IN_MEMORY_DATASET else "the DICOM dataset")
    num_frames = _number_of_frames(ds)
    index = _resolve_dicom_frame(frame, num_frames, name)
    view = _frame_view(ds, index, name)
    pixels, photometric = _decode_frame(view, index, name)

    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        rgb = apply_color_lut(pixels, view)
        return _colour_to_uint8(rgb, max_value=np.iinfo(rgb.dtype).max)
    if pixels.ndim == 2:
        return _grayscale_to_uint8(pixels, view, photometric, name)
    if pixels.ndim == 3 and pixels.shape[-1] == 3:
        if photometric in ("YBR_FULL", "YBR_FULL_422"):
            # pydicom 3's decoders convert YBR_FULL(_422) to RGB themselves and then report "RGB"; only convert if
            # this pydicom did not, so the colour transform is never applied twice.
            from pydicom.pixels import convert_color_space

            pixels = convert_color_space(pixels, photometric, "RGB")
        bits_stored = int(view.get("BitsStored") or pixels.dtype.itemsize * 8)
        return _colour_to_uint8(pixels, max_value=2**bits_stored - 1)
    raise ImageLoadingError(
        f"{name}: unsupported DICOM pixel layout (shape {pixels.shape}, Photometric Interpretation {photometric!r})",
        path=_path_of(name),
    )


def _number_of_frames(ds: "Dataset") -> int:
    try:
        return max(int(ds.get("NumberOfFrames") or 1), 1)
    except (TypeError, ValueError):
        return 1


def _resolve_dicom_frame(frame: int | None, num_frames: int, name: str) -> int:
    path = _path_of(name)
    if num_frames > 1:
        if frame is None:
            raise ImageLoadingError(
                f"{name}: the file has {num_frames} frames; pass frame=... (0 to {num_frames - 1}) to choose one",
                path=path,
            )
        if not 0 <= frame < num_frames:
            raise ImageLoadingError(
                f"{name}: frame={frame} is out of range, the file has {num_frames} frames (valid: 0 to "
                f"{num_frames - 1})",
                path=path,
            )
        return int(frame)
    if frame not in (None, 0):
        raise ImageLoadingError(f"{name}: frame={frame} was given but the file has a single frame", path=path)
    return 0


def _frame_view(ds: "Dataset", index: int, name: str) -> "Dataset":
    """
    A new dataset holding what decoding and windowing frame `index` needs: the Image Pixel, Modality LUT and VOI LUT
    attributes (all in group 0x0028), the pixel data (group 0x7FE0), and for enhanced multi-frame objects the shared
    then per-frame functional-group values of Pixel Value Transformation and Frame VOI LUT lifted to the top level,
    where pydicom's `apply_*` functions look for them. Working on a view leaves the caller's dataset untouched.
    """
    from pydicom.dataset import Dataset, FileMetaDataset

    view = Dataset()
    for element in ds:
        if element.tag.group in (0x0028, 0x7FE0):
            view.add(element)

    groups = []
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        groups.append(shared[0])
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame and index < len(per_frame):
        groups.append(per_frame[index])
    for group in groups:
        for macro in _FRAME_MACROS:
            items = group.get(macro)
            if items:
                for element in items[0]:
                    if element.tag.group == 0x0028:
                        view.add(element)

    view.file_meta = FileMetaDataset()
    view.file_meta.TransferSyntaxUID = _transfer_syntax(ds, name)
    return view


def _transfer_syntax(ds: "Dataset", name: str):
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    file_meta = getattr(ds, "file_meta", None)
    transfer_syntax = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    if transfer_syntax:
        return transfer_syntax
    # Raw datasets (no file meta) are native-encoded; the encoding they were read with tells which syntax.
    implicit_vr, little_endian = getattr(ds, "original_encoding", (None, None))
    if implicit_vr is True and little_endian is True:
        return ImplicitVRLittleEndian
    if implicit_vr is False:
        return ExplicitVRLittleEndian if little_endian else ExplicitVRBigEndian
    raise ImageLoadingError(
        f"{name}: the DICOM dataset has no Transfer Syntax UID (0002,0010), so its pixel data cannot be decoded",
        path=_path_of(name),
    )


def _decode_frame(view: "Dataset", index: int, name: str) -> tuple[np.ndarray, str]:
    """Frame `index` as stored (after YBR->RGB where pydicom does it) and the Photometric Interpretation it now has."""
    from pydicom.pixels import get_decoder

    path = _path_of(name)
    transfer_syntax = view.file_meta.TransferSyntaxUID
    syntax = f"{transfer_syntax.name} ({transfer_syntax})"
    try:
        decoder = get_decoder(transfer_syntax)
    except NotImplementedError as error:
        raise ImageLoadingError(
            f"{name}: pixel data uses the Transfer Syntax {syntax}, which pydicom cannot decode", path=path
        ) from error
    if not decoder.is_available:
        options = "; ".join(decoder.missing_dependencies) or "see the pydicom documentation"
        raise ImageLoadingError(
            f"{name}: pixel data is compressed with the Transfer Syntax {syntax} and no decoder for it is "
            f"installed ({options})",
            path=path,
        )
    try:
        pixels, meta = decoder.as_array(view, index=index)
    except Exception as error:
        raise ImageLoadingError(f"{name}: could not decode the {syntax} pixel data: {error}", path=path) from error
    photometric = str(meta.get("photometric_interpretation") or view.get("PhotometricInterpretation") or "")
    return pixels, photometric.strip().upper()


def _grayscale_to_uint8(pixels: np.ndarray, view: "Dataset", photometric: str, name: str) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    values = apply_modality_lut(pixels, view)
    output_range = _voi_output_range(view) if photometric in _MONOCHROME else None
    windowed = None
    if output_range is not None:
        if output_range[2] == "lut" and values.dtype.kind == "f" and np.array_equal(values, np.round(values)):
            # A rescale with integral slope/intercept gives whole-number floats; a VOI LUT indexes with integers.
            values = values.astype(np.int64)
        try:
            windowed = apply_voi_lut(values, view, index=0)
        except (ValueError, NotImplementedError, IndexError, AttributeError) as error:
            # Broken window headers (Window Width 0, odd LUT depth) are common in the wild; a percentile window
            # still gives a readable image.
            logger.warning("%s: ignoring unusable VOI LUT / window (%s); using a percentile window", name, error)
    if windowed is not None:
        low, high = output_range[0], output_range[1]
    else:
        windowed = values.astype(np.float64)
        low, high = _percentile_window(windowed, pixels, view)
    result = _scale_to_uint8(np.asarray(windowed, dtype=np.float64), low, high)
    if photometric == "MONOCHROME1":
        # MONOCHROME1 stores dense tissue as low values; invert after windowing so bone is bright, as displayed.
        result = 255 - result
    return result


def _voi_output_range(view: "Dataset") -> tuple[float, float, str] | None:
    """
    The values `apply_voi_lut` maps the bottom and top of the window to, mirroring its choice (VOI LUT Sequence
    first, then Window Center/Width), or `None` when the dataset defines neither.
    """
    voi_sequence = view.get("VOILUTSequence")
    if voi_sequence and None not in (voi_sequence[0].get("LUTDescriptor"), voi_sequence[0].get("LUTData")):
        # PS3.3 C.11.2.1.1: the LUT's output range is 0 to 2**bits - 1, bits being the descriptor's third value.
        return 0.0, float(2 ** int(voi_sequence[0].LUTDescriptor[2]) - 1), "lut"
    if view.get("WindowCenter") is None or view.get("WindowWidth") is None:
        return None
    # PS3.3 C.11.2.1.2: windowing outputs y_min below the window and y_max above it, the range of the input to the
    # VOI stage: the Modality LUT's output range, else the stored range taken through the rescale.
    modality_lut = view.get("ModalityLUTSequence")
    bits_stored = int(view.get("BitsStored") or 16)
    if modality_lut:
        y_min, y_max = 0.0, float(2 ** int(modality_lut[0].LUTDescriptor[2]) - 1)
    elif view.get("PixelRepresentation", 0) == 0:
        y_min, y_max = 0.0, float(2**bits_stored - 1)
    else:
        y_min, y_max = float(-(2 ** (bits_stored - 1))), float(2 ** (bits_stored - 1) - 1)
    slope, intercept = view.get("RescaleSlope"), view.get("RescaleIntercept")
    if not modality_lut and slope is not None and intercept is not None:
        y_min, y_max = y_min * float(slope) + float(intercept), y_max * float(slope) + float(intercept)
    # With a negative slope y_min > y_max; keeping the order (not sorting) keeps "below the window" dark.
    return y_min, y_max, "window"


def _percentile_window(values: np.ndarray, stored: np.ndarray, view: "Dataset") -> tuple[float, float]:
    # CT padding (often -2000 or -3024 outside the reconstruction circle) is not anatomy; leave it out of the
    # statistics or it would drag the lower bound down to the padding value.
    mask = _padding_mask(stored, view)
    sample = values[~mask] if mask is not None and not mask.all() else values
    low, high = (float(v) for v in np.percentile(sample, FALLBACK_WINDOW_PERCENTILES))
    if high <= low:
        # Mostly constant images (masks, 1-bit overlays): fall back to the full range.
        low, high = float(sample.min()), float(sample.max())
    return low, high


def _padding_mask(stored: np.ndarray, view: "Dataset") -> np.ndarray | None:
    padding = view.get("PixelPaddingValue")
    if padding is None:
        return None
    limit = view.get("PixelPaddingRangeLimit")
    if limit is None:
        return stored == padding
    low, high = sorted((int(padding), int(limit)))
    return (stored >= low) & (stored <= high)


def _colour_to_uint8(pixels: np.ndarray, max_value: int) -> np.ndarray:
    if pixels.dtype == np.uint8:
        return pixels
    # Colour is absolute (no window): scale the nominal range, not the image's own min/max.
    return _scale_to_uint8(pixels.astype(np.float64), 0.0, float(max_value))


# ----------------------------------------------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------------------------------------------


def _check_frame_argument(frame: Any) -> None:
    if frame is not None and (isinstance(frame, bool) or not isinstance(frame, (int, np.integer))):
        raise TypeError(f"frame must be None or an int, got {_type_name(frame)}")


def _check_single_image_frame(frame: int | None, what: str) -> None:
    if frame not in (None, 0):
        raise ImageLoadingError(f"frame={frame} was given but {what} holds a single image")


def _type_name(obj: Any) -> str:
    cls = type(obj)
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
