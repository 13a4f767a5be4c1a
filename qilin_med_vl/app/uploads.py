# Copyright 2026 The qilin-med-vl Authors. Licensed under the Apache License, Version 2.0.
"""The web demo's uploads: each file read once (PNG, JPEG, DICOM through the processor's own windowing) into the
image the model gets and a display copy; unreadable files raise `AppInputError` naming the upload."""

import os
from dataclasses import dataclass

from PIL import Image

from .prompts import (
    AppInputError,
    check_num_images,
)

# Thumbnails and heatmaps are drawn on copies at most this large; the model always gets the full image.
DISPLAY_MAX_SIDE = 768


@dataclass
class UploadedImage:
    """One uploaded file as the model gets it (`image`: 8-bit RGB, DICOM already windowed) and as it is shown."""

    name: str
    image: Image.Image
    note: str = ""

    @property
    def display(self) -> Image.Image:
        return display_copy(self.image)


def display_copy(image: Image.Image, max_side: int = DISPLAY_MAX_SIDE) -> Image.Image:
    if max(image.size) <= max_side:
        return image
    scale = max_side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


def read_image(path: str | os.PathLike, name: str | None = None) -> UploadedImage:
    """Read one uploaded file. DICOM goes through `dicom_to_uint8`, the windowing the processor applies, so the
    thumbnail is exactly what the model sees; a multi-frame DICOM gives its first frame. Anything unreadable raises
    `AppInputError` naming the file (by its upload name, not the temporary path)."""
    from ..processing.dicom_qilin import dicom_to_uint8, is_dicom_file, read_dicom_dataset
    from ..processing.image_loading_qilin import ImageLoadingError, load_image

    path = os.fspath(path)
    name = name or os.path.basename(path)
    try:
        if is_dicom_file(path):
            dataset = read_dicom_dataset(path)
            frames = int(dataset.get("NumberOfFrames") or 1)
            pixels = dicom_to_uint8(dataset, frame=0 if frames > 1 else None)
            image = Image.fromarray(pixels).convert("RGB")
            note = f"帧 1/{frames} · frame 1 of {frames}" if frames > 1 else "DICOM"
            return UploadedImage(name, image, note)
        return UploadedImage(name, load_image(path))
    except ImportError as error:
        raise AppInputError(f"无法读取 {name}：{error} (cannot read {name}: {error})") from None
    except Exception as error:  # ImageLoadingError, pydicom's own errors, truncated files...
        detail = str(error).replace(path, name)
        if not isinstance(error, ImageLoadingError):
            detail = f"{type(error).__name__}: {detail}"
        raise AppInputError(f"无法读取文件 {name}。 (Cannot read {name}: {detail})") from None


def read_images(paths) -> list[UploadedImage]:
    """The uploaded files in order; `AppInputError` for none, more than `MAX_IMAGES`, or an unreadable one."""
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths or [])
    check_num_images(len(paths))
    return [read_image(path) for path in paths]
