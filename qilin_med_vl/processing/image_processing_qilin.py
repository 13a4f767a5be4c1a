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

# Padding to a square happens at the image's full size in the original pipeline (`expand2square`, then resize), so
# its memory grows with the square of the long side: a 200 x 10000 image becomes a 10000 x 10000 square. An image
# whose long side is more than this many times the output side is instead resized straight to the output square
# (`_pad_and_resize`): only the band of output pixels the image reaches is computed, from the image plus a few
# padding pixels, with the same PIL filter and coordinates. The pixels are those of the full-size square except
# that about 1% of them may differ by one grey level (PIL derives its filter weights from the box coordinates in
# floating point, and a rounding flip moves a fixed-point sum across .5). Images up to the limit take the
# original path unchanged.
DIRECT_PAD_FACTOR = 4

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
        low_res = self._preprocess_view(images, kwargs)
        data = {"pixel_values": low_res["pixel_values"]}
        if return_high_res:
            side = SizeDict(height=high_res_size, width=high_res_size)
            high_res_kwargs = {**kwargs, "size": side, "crop_size": side}
            data["high_res_pixel_values"] = self._preprocess_view(images, high_res_kwargs)["pixel_values"]
        return BatchFeature(data=data, tensor_type=return_tensors)

    def _preprocess_view(self, images, kwargs) -> BatchFeature:
        size = kwargs.get("size")
        side = getattr(size, "shortest_edge", None) or (
            size.height if getattr(size, "height", None) and size.height == getattr(size, "width", None) else None)
        if kwargs.get("do_pad") and kwargs.get("do_resize") and side:
            # Large images become the `side` x `side` square here; the parent's pad (of a square) and resize (to
            # its own size) then leave them as they are.
            mean = kwargs.get("image_mean")
            background = tuple(int(x * 255) for x in mean) if mean else (0, 0, 0)
            resample = kwargs.get("resample")
            resample = Image.Resampling.BICUBIC if resample is None else resample
            images = [_pad_and_resize(image, side, background, resample)
                      if max(image.shape[-2:]) > DIRECT_PAD_FACTOR * side else image for image in images]
        return super()._preprocess(images, return_tensors=None, **kwargs)


def _pad_and_resize(image, side: int, background: tuple, resample) -> np.ndarray:
    """`image` `(3, height, width)` uint8 padded to a square with `background` (centred, as `pad_to_square`) and
    resized to `(3, side, side)` without building the full-size square.

    PIL resizes in two separable passes, each output pixel a filtered sum over a window of input pixels. Output
    pixels whose window holds only padding are the background colour; the others are computed by `Image.resize`
    with a `box` in the coordinates of the full-size square, from the image plus enough padding on both sides to
    cover their windows. Memory: the image plus that margin, not `long_side**2`; time: proportional to the image,
    not to the square. Other inputs are returned as they are (the parent pipeline handles them)."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[0] != 3:
        return image
    _, height, width = image.shape
    long_side = max(height, width)
    tall = height >= width
    short_side = width if tall else height
    offset = (long_side - short_side) // 2  # where pad_to_square puts the image along its short side
    scale = side / long_side  # output pixels per input pixel
    support = 2.0 / scale  # bicubic (and bilinear, smaller) window half-width in input pixels when shrinking
    first = max(0, int(np.floor((offset - support) * scale - 0.5)))  # output pixels before it see only padding
    last = min(side, int(np.ceil((offset + short_side + support) * scale + 0.5)))
    margin = int(np.ceil(2 * support + 2 / scale)) + 2
    before, after = min(margin, offset), min(margin, long_side - offset - short_side)
    band_shape = (long_side, before + short_side + after, 3) if tall else (before + short_side + after, long_side, 3)
    band = np.empty(band_shape, dtype=np.uint8)
    band[...] = np.asarray(background, dtype=np.uint8)
    pixels = np.moveaxis(image, 0, -1)
    if tall:
        band[:, before : before + short_side] = pixels
    else:
        band[before : before + short_side] = pixels
    start = offset - before  # the band's first row/column in the full square
    low, high = first / scale - start, last / scale - start
    box = (low, 0, high, long_side) if tall else (0, low, long_side, high)
    out_size = (last - first, side) if tall else (side, last - first)
    resized = np.asarray(Image.fromarray(band).resize(out_size, resample, box=box))
    result = np.empty((side, side, 3), dtype=np.uint8)
    result[...] = np.asarray(background, dtype=np.uint8)
    if tall:
        result[:, first:last] = resized
    else:
        result[first:last] = resized
    return np.ascontiguousarray(np.moveaxis(result, -1, 0))


def _load_nested(images, frame):
    if isinstance(images, (list, tuple)):
        return [_load_nested(image, frame) for image in images]
    return load_image(images, frame=frame)


__all__ = ["QilinImageProcessor"]
