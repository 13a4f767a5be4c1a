# Copyright 2026 The qilin-med-vl Authors. Licensed under the Apache License, Version 2.0.
"""What every image reader of Qilin-Med-VL refuses, and the error it raises: shared by the general loader
(`image_loading_qilin`) and the DICOM reader (`dicom_qilin`).

Remote code: copied next to checkpoints; imports only the standard library and numpy.
"""

from typing import Any

import numpy as np

__all__ = ["MAX_ASPECT_RATIO", "MAX_IMAGE_PIXELS", "ImageLoadingError", "check_frame_argument", "check_image_size",
           "scale_to_uint8", "type_name"]

# Input limits, checked before a file's pixels are decoded. The largest medical images the model is meant for
# (mammograms, about 4096 x 3328; chest films, 4280 x 3520) are far below MAX_IMAGE_PIXELS; beyond it a few bytes of
# compressed file (a "decompression bomb") could ask for gigabytes. PIL's own bomb limit (about 179 million pixels)
# is higher and raises an exception of its own; this one is lower and raises `ImageLoadingError`.
MAX_IMAGE_PIXELS = 100_000_000
# Longest side / shortest side. Padding a 1 x 20000 strip to a square makes a 20000 x 20000 image of which all but
# 0.005% is padding: nothing a model reading 336 px can use, and a memory trap. 50:1 still admits ECG strips.
MAX_ASPECT_RATIO = 50


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


def check_frame_argument(frame: Any) -> None:
    if frame is not None and (isinstance(frame, bool) or not isinstance(frame, (int, np.integer))):
        raise TypeError(f"frame must be None or an int, got {type_name(frame)}")


def scale_to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map `low` -> 0 and `high` -> 255 linearly, clip outside, round to nearest. `low == high` gives black."""
    if high == low:
        return np.zeros(values.shape, dtype=np.uint8)
    unit = np.clip((values - low) / (high - low), 0.0, 1.0)
    return np.rint(unit * 255.0).astype(np.uint8)


def type_name(obj: Any) -> str:
    cls = type(obj)
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
