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

from .dicom_qilin import (
    dicom_dataset_to_uint8,
    dicom_to_uint8,
    has_dicom_magic,
    has_dicom_suffix,
    is_dicom_file,
    read_dicom_dataset,
)
from .image_checks_qilin import (
    MAX_ASPECT_RATIO,
    MAX_IMAGE_PIXELS,
    ImageLoadingError,
    check_frame_argument,
    check_image_size,
    scale_to_uint8,
    type_name,
)

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

# Any "scheme://" prefix: http(s), but also s3://, gs://, ftp://... None of them is fetched (no network code here).
_URL_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
_HIGH_BIT_DEPTH_PIL_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_ALPHA_PIL_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
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
    check_frame_argument(frame)
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
        f"load_image() cannot read an object of type {type_name(image)}: expected a PIL image, a numpy array, a "
        "torch tensor or a local file path (str or os.PathLike)"
    )


def load_images(images: Iterable[Any], frame: int | None = None) -> list[Image.Image]:
    """
    Apply `load_image` to each element of `images` (a list, tuple or other iterable of images).

    Returns:
        `list[PIL.Image.Image]`: one RGB image per input, in order.
    """
    # A lone path or image would otherwise be iterated character by character (or row by row).
    if isinstance(images, (str, bytes, os.PathLike, Image.Image)):
        raise TypeError(
            f"load_images() expects a list of images, got a single {type_name(images)}; use load_image() for one"
        )
    return [load_image(image, frame=frame) for image in images]


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
    check_frame_argument(frame)
    path = _resolve_local_path(path)
    return _dataset_to_rgb(read_dicom_dataset(path), frame, path)


def _dataset_to_rgb(dataset: "Dataset", frame: int | None, path: str) -> Image.Image:
    try:
        return _uint8_to_rgb(dicom_dataset_to_uint8(dataset, frame, name=path))
    except ImageLoadingError:
        raise
    except Exception as error:
        # Damaged headers reach pydicom's LUT and decoder code with values it does not expect.
        raise ImageLoadingError(f"{path}: cannot read the DICOM image ({type(error).__name__}: {error})",
                                path=path) from error


# ----------------------------------------------------------------------------------------------------------------
# Paths
# ----------------------------------------------------------------------------------------------------------------


def _resolve_local_path(path: str | os.PathLike) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"expected a file path (str or os.PathLike), got {type_name(path)}")
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
    if has_dicom_suffix(path) or has_dicom_magic(path):
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
        dataset = read_dicom_dataset(path, headerless_only=True)
        if dataset is None:
            raise ImageLoadingError(
                f"{path}: neither a readable image nor DICOM (PIL: {pil_error})", path=path
            ) from pil_error
    return _dataset_to_rgb(dataset, frame, path)


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
            return scale_to_uint8(values, 0.0, 1.0)
    return _min_max_to_uint8(array)


def _min_max_to_uint8(array: np.ndarray) -> np.ndarray:
    values = array.astype(np.float64)
    finite = np.isfinite(values)
    if not finite.any():
        return np.zeros(values.shape, dtype=np.uint8)
    low, high = float(values[finite].min()), float(values[finite].max())
    if not finite.all():
        values = np.nan_to_num(values, nan=low, posinf=high, neginf=low)
    return scale_to_uint8(values, low, high)


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
# Argument checks
# ----------------------------------------------------------------------------------------------------------------


def _check_single_image_frame(frame: int | None, what: str) -> None:
    if frame not in (None, 0):
        raise ImageLoadingError(f"frame={frame} was given but {what} holds a single image")
