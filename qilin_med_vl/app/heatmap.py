# Copyright 2026 The qilin-med-vl Authors. Licensed under the Apache License, Version 2.0.
"""HiA attention -> one heatmap per image, overlaid on the image. Pure numpy and PIL.

The model returns, per HiA layer, `(num_images, num_queries, grid_h * grid_w)`: how much each instruction-aware
query attended to each cell of the high-resolution feature grid (rows of the grid in order, each row summing to 1).
That grid covers the high-resolution view, which is the image padded to a square (centred, with the CLIP mean colour)
and then resized, so a map is first stretched over that padded square and then cropped back to the image.
"""

import numpy as np
from PIL import Image

# Anchors of a "jet"-like colour map: dark blue (little attention) -> cyan -> yellow -> red (most attention).
_COLORMAP_POSITIONS = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
_COLORMAP_COLOURS = np.array([[0, 0, 143], [0, 160, 255], [120, 255, 120], [255, 200, 0], [200, 0, 0]], dtype=float)
DEFAULT_ALPHA = 0.45


def attention_maps(attentions, grid_size: tuple[int, int]) -> np.ndarray:
    """Mean over HiA layers and queries, per image, as `(num_images, grid_h, grid_w)` scaled to [0, 1].

    Args:
        attentions: a sequence (one per HiA layer) of arrays `(num_images, num_queries, grid_h * grid_w)`, or a
            single such array; numpy or anything `np.asarray` takes (convert torch tensors with `.numpy()` first).
        grid_size: `(grid_h, grid_w)` of the high-resolution grid (`hia_grid_size` of the model output).

    Each image's map is min-max scaled on its own (a uniform map becomes all zeros), so colours compare places
    within one image, not attention strength across images.
    """
    layers = [np.asarray(layer, dtype=np.float64) for layer in (
        [attentions] if isinstance(attentions, np.ndarray) else attentions)]
    if not layers:
        raise ValueError("no HiA attentions given (is a HiA adapter loaded and enabled?)")
    shapes = {layer.shape for layer in layers}
    if len(shapes) != 1 or len(layers[0].shape) != 3:
        raise ValueError(f"expected arrays of one shape (num_images, num_queries, grid cells), got {sorted(shapes)}")
    grid_h, grid_w = (int(side) for side in grid_size)
    num_images, _, cells = layers[0].shape
    if cells != grid_h * grid_w:
        raise ValueError(f"the attentions have {cells} grid cells but grid_size {grid_h}x{grid_w} has "
                         f"{grid_h * grid_w}")
    mean = np.mean(np.stack(layers), axis=(0, 2)).reshape(num_images, grid_h, grid_w)
    low = mean.min(axis=(1, 2), keepdims=True)
    span = mean.max(axis=(1, 2), keepdims=True) - low
    return np.where(span > 0, (mean - low) / np.where(span > 0, span, 1.0), 0.0)


def padded_square_box(width: int, height: int) -> tuple[int, int, int]:
    """`(left, top, side)`: where a `width` x `height` image sits in the square it is padded to (as the processor
    does it: side = the longer edge, the image centred, the odd pixel of padding after it)."""
    side = max(width, height)
    return (side - width) // 2, (side - height) // 2, side


def map_to_image(grid_map: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    """Stretch one `(grid_h, grid_w)` map over the padded square of an image of `image_size` `(width, height)`
    (bilinear), then crop the image's part: `(height, width)` float values."""
    width, height = image_size
    left, top, side = padded_square_box(width, height)
    stretched = Image.fromarray(np.ascontiguousarray(grid_map, dtype=np.float32)).resize(  # mode "F"
        (side, side), Image.Resampling.BILINEAR)
    return np.asarray(stretched, dtype=np.float64)[top : top + height, left : left + width]


def colorize(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (any shape) -> `uint8` RGB colours of shape `values.shape + (3,)`."""
    values = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float64)), 0.0, 1.0)
    channels = [np.interp(values, _COLORMAP_POSITIONS, _COLORMAP_COLOURS[:, c]) for c in range(3)]
    return np.rint(np.stack(channels, axis=-1)).astype(np.uint8)


def overlay(image: Image.Image, values: np.ndarray, alpha: float = DEFAULT_ALPHA) -> Image.Image:
    """Blend the colourised `values` `(height, width)` over `image` (RGB) with opacity `alpha`."""
    base = np.asarray(image.convert("RGB"), dtype=np.float64)
    if base.shape[:2] != np.shape(values):
        raise ValueError(f"heatmap of shape {np.shape(values)} does not match the image ({base.shape[:2]})")
    blended = (1.0 - alpha) * base + alpha * colorize(values).astype(np.float64)
    return Image.fromarray(np.rint(blended).astype(np.uint8))


def heatmap_overlays(images: list[Image.Image], attentions, grid_size: tuple[int, int],
                     alpha: float = DEFAULT_ALPHA) -> list[Image.Image]:
    """One overlay per image, in order: where HiA's queries attended on that image's high-resolution view."""
    maps = attention_maps(attentions, grid_size)
    if len(maps) != len(images):
        raise ValueError(f"got attentions for {len(maps)} images but {len(images)} images")
    return [overlay(image, map_to_image(grid_map, image.size), alpha)
            for image, grid_map in zip(images, maps, strict=True)]


__all__ = ["DEFAULT_ALPHA", "attention_maps", "colorize", "heatmap_overlays", "map_to_image", "overlay",
           "padded_square_box"]
