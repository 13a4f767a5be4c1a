# Copyright 2026 The qilin-med-vl Authors. Licensed under the Apache License, Version 2.0.
"""Image processor for Qilin-Med-VL: a low-resolution view for the CLIP tower and a high-resolution view for HiA.

Remote code: imports only numpy/PIL/transformers and flat siblings (pydicom lazily, through image_loading_qilin).
"""

import numpy as np
from PIL import Image
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling, SizeDict
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
from transformers.processing_utils import ImagesKwargs

from .image_loading_qilin import load_image

# Padding to a square happens at the image's full size (as the original `expand2square` did), so its cost grows with
# the square of the long side. An image whose long side is more than this many times the largest output side is
# first resized (bicubic) to exactly that long side; below it the pixels are those of the original pipeline
# exactly, above it they differ by the rounding of one extra resize (see tests/test_safety_images.py).
PRE_SHRINK_FACTOR = 4


class QilinImagesKwargs(ImagesKwargs, total=False):
    """
    high_res_size (`int`, *optional*, defaults to 672):
        Side of the square high-resolution view returned as `high_res_pixel_values` for the HiA adapter.
    return_high_res (`bool`, *optional*, defaults to `True`):
        Whether to compute the high-resolution view at all (a model without HiA ignores it).
    frame (`int`, *optional*):
        Frame to read from multi-frame DICOM files.
    """

    high_res_size: int
    return_high_res: bool
    frame: int


class QilinImageProcessor(LlavaImageProcessorPil):
    r"""
    Pads each image to a square filled with the CLIP mean colour, then resizes it to 336 px and CLIP-normalises it:
    pixel for pixel the original Qilin-Med-VL / LLaVA `expand2square` + `CLIPImageProcessor`. The same padded square
    resized to `high_res_size` is returned as `high_res_pixel_values` for HiA.

    Accepts PIL images, numpy arrays, torch tensors and file paths (PNG, JPEG, ... and DICOM through pydicom).

    Returns:
        `pixel_values`: `(num_images, 3, 336, 336)`; `high_res_pixel_values`: `(num_images, 3, high_res_size,
        high_res_size)` unless `return_high_res=False`.
    """

    model_input_names = ["pixel_values", "high_res_pixel_values"]
    valid_kwargs = QilinImagesKwargs
    resample = PILImageResampling.BICUBIC
    image_mean = OPENAI_CLIP_MEAN
    image_std = OPENAI_CLIP_STD
    size = {"shortest_edge": 336}
    crop_size = {"height": 336, "width": 336}
    do_pad = True
    do_resize = True
    do_center_crop = True
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True
    high_res_size = 672
    return_high_res = True

    def _prepare_image_like_inputs(self, images, *args, frame=None, **kwargs):
        # Every input goes through one loader first, so paths, DICOM, 16-bit arrays and odd PIL modes all reach the
        # CLIP pipeline as 8-bit RGB, and an unreadable file fails with an error naming it.
        return super()._prepare_image_like_inputs(_load_nested(images, frame), *args, **kwargs)

    def _preprocess(self, images, high_res_size=None, return_high_res=None, frame=None, **kwargs) -> BatchFeature:
        return_tensors = kwargs.pop("return_tensors", None)
        if kwargs.get("do_pad"):
            sides = [high_res_size if return_high_res else 0]
            for size in (kwargs.get("size"), kwargs.get("crop_size")):
                sides += [value for value in (getattr(size, "shortest_edge", None), getattr(size, "height", None),
                                              getattr(size, "width", None)) if value]
            images = [_shrink_long_side(image, PRE_SHRINK_FACTOR * max(sides)) for image in images]
        low_res = super()._preprocess(images, return_tensors=None, **kwargs)
        data = {"pixel_values": low_res["pixel_values"]}
        if return_high_res:
            side = SizeDict(height=high_res_size, width=high_res_size)
            high_res_kwargs = {**kwargs, "size": side, "crop_size": side}
            data["high_res_pixel_values"] = super()._preprocess(images, return_tensors=None, **high_res_kwargs)[
                "pixel_values"
            ]
        return BatchFeature(data=data, tensor_type=return_tensors)


def _shrink_long_side(image, limit: int):
    """`image` (`(channels, height, width)` uint8, as the PIL backend holds it) resized so that its long side is
    `limit` pixels when it is longer: the square it is padded to then holds `limit**2` pixels, not `long_side**2`."""
    channels, height, width = image.shape
    if max(height, width) <= limit or not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        return image
    scale = limit / max(height, width)
    new_size = (max(1, round(width * scale)), max(1, round(height * scale)))
    pil = Image.fromarray(np.ascontiguousarray(np.moveaxis(image, 0, -1)).squeeze(-1) if channels == 1
                          else np.ascontiguousarray(np.moveaxis(image, 0, -1)))
    resized = np.asarray(pil.resize(new_size, Image.BICUBIC))
    return resized[None] if resized.ndim == 2 else np.ascontiguousarray(np.moveaxis(resized, -1, 0))


def _load_nested(images, frame):
    if isinstance(images, (list, tuple)):
        return [_load_nested(image, frame) for image in images]
    return load_image(images, frame=frame)


__all__ = ["QilinImageProcessor"]
