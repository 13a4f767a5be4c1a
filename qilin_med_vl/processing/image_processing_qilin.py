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
# whose long side is more than this many times the output side is instead padded and resized piece by piece
# (`_pad_and_resize`), never holding the square, with the same pixels (see tests/test_safety_images.py).
DIRECT_PAD_FACTOR = 4
# Rows of the padded square resized at a time, in bytes: bounds the memory `_pad_and_resize` needs.
_CHUNK_BYTES = 1 << 24
# PIL's fixed-point precision for 8-bit resampling (libImaging/Resample.c).
_PRECISION_BITS = 32 - 8 - 2

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
    resized to `(3, side, side)`: pixel for pixel what PIL gives for the full-size square, without building it.

    PIL resizes in two separable passes, horizontal then vertical, rounding to 8 bits in between. The horizontal
    pass works row by row; the vertical pass then reads an intermediate image of `long_side` rows and `side`
    columns (small). Padding rows (above and below a wide image) all give the same intermediate row, the background;
    padding columns (beside a tall image) are handled by resizing chunks of full-width rows, or, for a narrow image,
    by `_horizontal_pass_of_band`. Memory: the image, the intermediate and one chunk; never `long_side**2`. Other
    inputs are returned as they are (the parent pipeline handles them)."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[0] != 3:
        return image
    _, height, width = image.shape
    long_side = max(height, width)
    offset = (long_side - min(height, width)) // 2  # where pad_to_square puts the image along its short side
    colour = np.asarray(background, dtype=np.uint8)
    pixels = np.moveaxis(image, 0, -1)
    intermediate = np.empty((long_side, side, 3), dtype=np.uint8)  # after the horizontal pass
    if width >= height:
        # Rows of padding above and below: their horizontal pass is the background (a constant row, and the
        # filter's weights sum to one). The image's rows are full-width rows of the square.
        intermediate[...] = colour
        rows = Image.fromarray(np.ascontiguousarray(pixels)).resize((side, height), resample)
        intermediate[offset : offset + height] = np.asarray(rows)
    elif resample in (Image.Resampling.BICUBIC, int(Image.Resampling.BICUBIC)) and 10 * width < height:
        # A narrow image: computing only the band of columns it reaches is far cheaper than resizing full rows.
        # (For wider images the band is most of the row, and PIL's own C loop is faster than the matrix product.)
        intermediate[...] = colour
        _horizontal_pass_of_band(pixels, long_side, side, offset, colour, intermediate)
    else:
        chunk_rows = max(1, _CHUNK_BYTES // (3 * long_side))
        chunk = np.empty((chunk_rows, long_side, 3), dtype=np.uint8)
        for start in range(0, height, chunk_rows):
            count = min(chunk_rows, height - start)
            chunk[:count] = colour
            chunk[:count, offset : offset + width] = pixels[start : start + count]
            intermediate[start : start + count] = np.asarray(
                Image.fromarray(chunk[:count]).resize((side, count), resample))
    result = np.asarray(Image.fromarray(intermediate).resize((side, side), resample))
    return np.ascontiguousarray(np.moveaxis(result, -1, 0))


def _bicubic(x: np.ndarray) -> np.ndarray:
    """PIL's bicubic kernel (a = -0.5), written as libImaging/Resample.c evaluates it."""
    a = -0.5
    x = np.abs(x)
    out = np.zeros_like(x)
    near, far = x < 1.0, (x >= 1.0) & (x < 2.0)
    out[near] = ((a + 2.0) * x[near] - (a + 3.0)) * x[near] * x[near] + 1
    out[far] = (((x[far] - 5) * x[far] + 8) * x[far] - 4) * a
    return out


def _horizontal_pass_of_band(pixels, long_side: int, side: int, offset: int, colour, out) -> None:
    """PIL's horizontal bicubic pass of the rows of a `long_side`-wide square holding `pixels` `(height, width, 3)`
    at column `offset` (padding elsewhere), written into `out[:, first:last]` for the output columns `first..last`
    whose window reaches the image (the others are the background). The weights and the fixed-point sums are
    computed as libImaging/Resample.c does (`precompute_coeffs`, `normalize_coeffs_8bpc`), so the result is PIL's
    bit for bit; the cost grows with the image, not with the square."""
    height, width, _ = pixels.shape
    scale = long_side / side
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    ksize = int(np.ceil(support)) * 2 + 1
    first = max(0, int(np.floor((offset - support) / scale - 0.5)))
    last = min(side, int(np.ceil((offset + width + support) / scale + 0.5)))
    centre = 0.0 + (np.arange(first, last, dtype=np.float64) + 0.5) * scale
    low = np.maximum(np.trunc(centre - support + 0.5).astype(np.int64), 0)
    count = np.minimum(np.trunc(centre + support + 0.5).astype(np.int64), long_side) - low
    taps = np.arange(ksize)
    valid = taps[None, :] < count[:, None]
    weights = np.where(valid, _bicubic(((taps[None, :] + low[:, None]).astype(np.float64) - centre[:, None] + 0.5)
                                       * (1.0 / filterscale)), 0.0)
    total = np.cumsum(weights, axis=1)[:, -1]  # summed in order, as the C loop does
    weights = np.where(total[:, None] != 0.0, weights / np.where(total == 0.0, 1.0, total)[:, None], weights)
    fixed = np.trunc(np.where(weights < 0, -0.5 + weights * (1 << _PRECISION_BITS),
                              0.5 + weights * (1 << _PRECISION_BITS))).astype(np.int64)
    # The input pixels the windows read, as a band of the padded rows: the image plus the padding it needs.
    begin, end = int(low.min()), int((low + count).max())
    band_start = min(begin, offset)
    band = np.empty((height, max(end, offset + width) - band_start, 3), dtype=np.uint8)
    band[...] = colour
    band[:, offset - band_start : offset - band_start + width] = pixels
    # The pass as one matrix: column `c` of `matrix` holds output column `c`'s fixed-point weights at the band
    # columns its window reads. A float64 product is exact here (integer terms, sums below 2**53), so the
    # integer sums are PIL's whatever order BLAS adds them in.
    index = low[:, None] + taps[None, :] - band_start
    matrix = np.zeros((band.shape[1], last - first), dtype=np.float64)
    columns = np.broadcast_to(np.arange(last - first)[:, None], index.shape)
    np.add.at(matrix, (index[valid], columns[valid]), fixed[valid].astype(np.float64))
    chunk_rows = max(1, _CHUNK_BYTES // (8 * band.shape[1]))
    for start in range(0, height, chunk_rows):
        rows = band[start : start + chunk_rows]
        for channel in range(3):
            sums = (rows[:, :, channel].astype(np.float64) @ matrix).astype(np.int64) + (1 << (_PRECISION_BITS - 1))
            out[start : start + rows.shape[0], first:last, channel] = np.clip(sums >> _PRECISION_BITS, 0, 255)


def _load_nested(images, frame):
    if isinstance(images, (list, tuple)):
        return [_load_nested(image, frame) for image in images]
    return load_image(images, frame=frame)


__all__ = ["QilinImageProcessor"]
