# coding=utf-8
"""High-resolution CNN encoder for the HiA (high-resolution instruction-aware) adapter.

This is the "spatial prior module" used by ViT-Adapter and the HiA paper: a plain
ResNet-style convolutional trunk that looks at the image at a much higher resolution
than the ViT does and produces a grid of local features, which the adapter later
attends to under the guidance of the instruction.

The file is Hugging Face remote code that ships next to checkpoints, so it depends on
``torch`` and the standard library only (``safetensors`` is imported lazily and only
when a ``.safetensors`` file is loaded). Module names follow torchvision's ``ResNet``
exactly (``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer1.0.downsample.0`` ...), so an
ImageNet ResNet-50 state dict from torchvision or timm maps onto the trunk one-to-one;
``fc.*`` is the only key of a full torchvision ``resnet50`` state dict that has no home.

Shapes in docstrings use ``N`` for the number of images, ``C`` for channels and
``grid_h``/``grid_w`` for the spatial size of the final feature map.
"""

import os
from collections.abc import Mapping
from typing import Dict, List, Sequence, Tuple, Union

import torch
from torch import nn

__all__ = ["ENCODER_STEMS", "Bottleneck", "HighResolutionEncoder", "load_resnet_state_dict"]

# The two stems an encoder can have (see ``HighResolutionEncoder``); both down-sample by 4.
ENCODER_STEMS = ("resnet", "full_resolution")


# A note on BatchNorm, which applies to every ``nn.BatchNorm2d`` below.
#
# The encoder is trained as part of an adapter, typically with only a few high-resolution
# images per GPU. Batch statistics estimated from such small batches are noisy, so the
# running statistics of a pretrained ResNet can drift badly during fine-tuning. We keep
# plain ``nn.BatchNorm2d`` on purpose (rather than a frozen or group norm variant) because
# it keeps the state dict identical to torchvision's and leaves the choice to the trainer:
#   * ``module.eval()`` on the encoder (or on its BN layers only) makes BatchNorm use the
#     stored running mean/var and stop updating them; the affine weight/bias still train.
#     This is the usual choice with pretrained weights and tiny per-GPU batches.
#   * ``nn.SyncBatchNorm.convert_sync_batchnorm(encoder)`` pools statistics across GPUs.
# At inference (``model.eval()``) the running statistics are always used, so the output
# for one image does not depend on the other images in the batch.


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding; bias is omitted because BatchNorm follows."""
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution; bias is omitted because BatchNorm follows."""
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)


def _conv_bn_relu(in_channels: int, out_channels: int) -> List[nn.Module]:
    return [_conv3x3(in_channels, out_channels), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]


class Bottleneck(nn.Module):
    """ResNet bottleneck block (torchvision "v1.5": the stride sits on the 3x3 conv).

    ``1x1 (planes) -> 3x3 (planes, stride) -> 1x1 (planes * expansion)`` with BatchNorm
    after every conv, ReLU after the first two and after the residual sum. A projection
    shortcut (``downsample`` = 1x1 conv + BatchNorm) is used whenever the stride or the
    number of channels changes.

    Args:
        in_channels: channels of the input feature map.
        planes: width of the bottleneck; the block outputs ``planes * 4`` channels.
        stride: spatial stride of the block (applied in the 3x3 conv and the shortcut).

    Shapes:
        input: ``[N, in_channels, H, W]``
        output: ``[N, planes * 4, ceil(H / stride), ceil(W / stride)]``
    """

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = _conv1x1(in_channels, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, out_channels)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        # Named ``downsample`` (Sequential of conv, bn) to match torchvision's keys
        # ``layerX.0.downsample.0.weight`` / ``layerX.0.downsample.1.*``.
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                _conv1x1(in_channels, out_channels, stride),
                nn.BatchNorm2d(out_channels),
            )
        else:
            self.downsample = None
        self.stride = stride

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        identity = hidden_states if self.downsample is None else self.downsample(hidden_states)

        out = self.relu(self.bn1(self.conv1(hidden_states)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class HighResolutionEncoder(nn.Module):
    """ResNet trunk + per-position linear projection (HiA / ViT-Adapter spatial prior module).

    Stem (``stem="resnet"``, torchvision's): ``conv1`` 7x7 stride 2 (3 -> ``width``) + ``bn1`` + ReLU + 3x3
    max-pool stride 2. With ``stem="full_resolution"`` it is instead ``stem``: two 3x3 stride-1 convs of
    ``width // 2`` channels at the input's own resolution, a 2x2 max-pool, a 3x3 conv of ``width`` channels, a 2x2
    max-pool (BatchNorm and ReLU after each conv).
    Both down-sample by 4 and give the same grid. The second applies non-linear filters at full resolution before
    anything is sub-sampled, where ResNet's stem has one linear 7x7 filter bank at stride 2; it is meant for
    lesions of a few pixels in the high-resolution view. It costs more than ResNet's stem, increasingly with the
    width: about 1.8x the multiply-adds at width 16, 6x at width 64 (ResNet-50), with more activation memory.

    Then ``len(depths)`` bottleneck stages ``layer1 .. layerK``. Stage ``i`` (0-based) has ``depths[i]`` blocks
    of bottleneck width ``width * 2**i`` and stride 1 for the first stage, 2 for the others. There is no average
    pool and no classifier: every position of the last feature map becomes one token, projected by ``proj`` to
    ``output_dim``.

    The defaults ``depths=(3, 4, 6, 3), width=64`` are exactly ResNet-50 (2048 output
    channels, overall stride 32, 23,508,032 trunk parameters). Smaller configurations are
    allowed, e.g. ``depths=(2, 2)`` gives an overall stride of 8 and ``width * 4 * 2``
    output channels.

    Args:
        output_dim: size of each output token (usually the language model's hidden size).
        depths: number of bottleneck blocks per stage (1 to any number of stages).
        width: number of stem channels and bottleneck width of the first stage.
        stem: ``"resnet"`` (default; torchvision keys ``conv1``/``bn1``) or ``"full_resolution"`` (keys
            ``stem.*``; an ImageNet ResNet then fills the stages only).

    Shapes:
        pixel_values: ``[N, 3, H, W]`` for any ``H, W`` (not necessarily square or
            divisible by the stride).
        output: ``[N, grid_h * grid_w, output_dim]`` in row-major order, i.e. token
            ``r * grid_w + c`` comes from row ``r``, column ``c`` of the feature map, so
            ``features.view(N, grid_h, grid_w, -1)`` recovers the spatial layout (e.g. for a
            heatmap). ``grid_h, grid_w`` are given by :meth:`compute_grid_size`.
    """

    def __init__(
        self, output_dim: int, depths: Sequence[int] = (3, 4, 6, 3), width: int = 64, stem: str = "resnet"
    ) -> None:
        super().__init__()
        depths = tuple(int(d) for d in depths)
        if len(depths) == 0 or any(d < 1 for d in depths):
            raise ValueError(f"`depths` must be a non-empty sequence of positive integers, got {depths}.")
        if width < 1:
            raise ValueError(f"`width` must be positive, got {width}.")
        if output_dim < 1:
            raise ValueError(f"`output_dim` must be positive, got {output_dim}.")
        if stem not in ENCODER_STEMS:
            raise ValueError(f"`stem` must be one of {ENCODER_STEMS}, got {stem!r}.")
        self.depths = depths
        self.width = int(width)
        self.output_dim = int(output_dim)
        self.stem_type = stem

        # Stem (stride 4 in total).
        if stem == "resnet":
            self.conv1 = nn.Conv2d(3, self.width, kernel_size=7, stride=2, padding=3, bias=False)
            self.bn1 = nn.BatchNorm2d(self.width)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            # ceil_mode keeps the "ceil(n / 2) per halving" rule of compute_grid_size for odd sides.
            # Half width at full resolution, where each channel costs 4x what it costs after the first pool.
            fine = max(self.width // 2, 1)
            self.stem = nn.Sequential(
                *_conv_bn_relu(3, fine),
                *_conv_bn_relu(fine, fine),
                nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True),
                *_conv_bn_relu(fine, self.width),
                nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True),
            )

        # Stages are registered as ``layer1``, ``layer2``, ... (torchvision naming) rather
        # than in a ModuleList, so pretrained keys need no renaming.
        in_channels = self.width
        for stage_idx, depth in enumerate(depths):
            planes = self.width * 2**stage_idx
            stride = 1 if stage_idx == 0 else 2
            blocks = [Bottleneck(in_channels, planes, stride)]
            in_channels = planes * Bottleneck.expansion
            blocks.extend(Bottleneck(in_channels, planes) for _ in range(depth - 1))
            self.add_module(f"layer{stage_idx + 1}", nn.Sequential(*blocks))
        self._out_channels = in_channels

        # New, randomly initialised projection into the adapter / language-model space.
        self.proj = nn.Linear(self._out_channels, self.output_dim)

        self._init_weights()

    @property
    def out_channels(self) -> int:
        """Channels of the trunk's last feature map (``width * 4 * 2**(len(depths) - 1)``)."""
        return self._out_channels

    @property
    def stride(self) -> int:
        """Overall down-sampling factor of the trunk (4 for the stem, x2 per later stage)."""
        return 4 * 2 ** (len(self.depths) - 1)

    @property
    def stages(self) -> List[nn.Sequential]:
        """The bottleneck stages ``layer1 .. layerK`` in order."""
        return [getattr(self, f"layer{i + 1}") for i in range(len(self.depths))]

    def _init_weights(self) -> None:
        # Same initialisation as torchvision's ResNet, so training from scratch behaves
        # like the reference; pretrained weights overwrite all of this except ``proj``.
        # The full-resolution stem, which no ImageNet file fills, keeps PyTorch's default
        # initialisation: with torchvision's (fan-out, about 2.5x larger weights) it learned
        # to tell small-flake windows from normal ones far more slowly in the demo model's
        # warm-up (validation AUC 0.79 against 0.96 after 300 steps).
        stem_modules = set(self.stem.modules()) if self.stem_type == "full_resolution" else set()
        for module in self.modules():
            if module in stem_modules:
                continue
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def compute_grid_size(self, height: int, width: int) -> Tuple[int, int]:
        """Feature-grid size ``(grid_h, grid_w)`` produced for an ``height x width`` input.

        Every stride-2 layer here (7x7 conv pad 3, 3x3 max-pool pad 1, 2x2 max-pool in ceil mode, 3x3 conv
        pad 1 and the 1x1 stride-2 shortcut) maps a length ``n`` to ``ceil(n / 2)``, so the grid is
        ``ceil`` applied once per halving, e.g. 336 -> 11 and 224 -> 7 for ResNet-50.
        """
        num_halvings = 2 + (len(self.depths) - 1)
        grid_h, grid_w = int(height), int(width)
        for _ in range(num_halvings):
            grid_h = (grid_h + 1) // 2
            grid_w = (grid_w + 1) // 2
        return grid_h, grid_w

    def forward_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Run the convolutional trunk only.

        Args:
            pixel_values: ``[N, 3, H, W]``.

        Returns:
            ``[N, out_channels, grid_h, grid_w]`` feature map.
        """
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
            raise ValueError(
                f"`pixel_values` must have shape [num_images, 3, height, width], got {tuple(pixel_values.shape)}."
            )
        if self.stem_type == "resnet":
            hidden_states = self.maxpool(self.relu(self.bn1(self.conv1(pixel_values))))
        else:
            hidden_states = self.stem(pixel_values)
        for stage in self.stages:
            hidden_states = stage(hidden_states)
        return hidden_states

    def forward(
        self, pixel_values: torch.Tensor, return_grid_size: bool = False
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, Tuple[int, int]]]:
        """Encode images into a sequence of projected grid features.

        Args:
            pixel_values: ``[N, 3, H, W]`` float tensor, any ``H, W``.
            return_grid_size: also return ``(grid_h, grid_w)``; needed to fold the token
                sequence back into a 2-D map (heatmaps, 2-D position embeddings).

        Returns:
            ``features`` of shape ``[N, grid_h * grid_w, output_dim]`` (row-major over the
            grid), or ``(features, (grid_h, grid_w))`` if ``return_grid_size``.
        """
        feature_map = self.forward_features(pixel_values)
        grid_h, grid_w = feature_map.shape[-2:]
        # [N, C, gh, gw] -> [N, gh * gw, C]: flatten keeps row-major order.
        tokens = feature_map.flatten(2).transpose(1, 2)
        features = self.proj(tokens)
        if return_grid_size:
            return features, (int(grid_h), int(grid_w))
        return features


# --------------------------------------------------------------------------------------
# Loading pretrained ResNet weights
# --------------------------------------------------------------------------------------

# Prefixes added by common wrappers: DataParallel/DDP (``module.``), detection/adapter
# code bases (``backbone.``, ``spm.``) and generic ``model.`` wrappers. They can stack
# (``module.backbone.``), so they are stripped repeatedly.
_STRIP_PREFIXES = ("module.", "backbone.", "model.", "spm.")

# Training checkpoints often nest the weights one level down.
_NESTED_STATE_DICT_KEYS = ("state_dict", "model", "module")

# Module name of the projection, which is new and never taken from a ResNet file.
_PROJ_PREFIX = "proj."


def _read_state_dict(path: Union[str, "os.PathLike[str]"]) -> Mapping:
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        # Lazy import: safetensors is only needed for this file format.
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    # ``.pth`` / ``.pt`` / ``.bin`` and anything else torch can read. ``weights_only``
    # refuses arbitrary pickled objects from user-supplied files.
    return torch.load(path, map_location="cpu", weights_only=True)


def _unwrap_state_dict(obj: Mapping) -> Mapping:
    # A bare state dict has tensor values; a training checkpoint such as
    # ``{"state_dict": {...}, "epoch": 10}`` has none at the top level.
    while isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        nested = next((obj[k] for k in _NESTED_STATE_DICT_KEYS if isinstance(obj.get(k), Mapping)), None)
        if nested is None:
            break
        obj = nested
    return obj


def _strip_prefixes(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in _STRIP_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                stripped = True
    return key


def load_resnet_state_dict(
    encoder: HighResolutionEncoder,
    path_or_state_dict: Union[str, "os.PathLike[str]", Mapping],
) -> Dict[str, list]:
    """Load a (torchvision/timm-style) ResNet state dict into ``encoder``'s trunk.

    Accepts a file path (``.pth``/``.pt``/``.bin`` read with ``torch.load(weights_only=True)``,
    ``.safetensors`` read with ``safetensors.torch.load_file``) or an in-memory mapping.
    Keys may carry the prefixes ``module.``, ``backbone.``, ``model.`` or ``spm.`` (also
    stacked); they are stripped. Each remaining key that names a trunk parameter/buffer with
    the same shape is copied (cast to the destination dtype/device); everything else is
    reported, never raised on. The projection ``proj`` is new and is never loaded.

    Args:
        encoder: the :class:`HighResolutionEncoder` to fill in place.
        path_or_state_dict: file path or mapping of name -> tensor.

    Returns:
        A report dict:
            ``loaded``: encoder keys that were copied.
            ``unexpected``: source keys (as given, prefixes included) that were not used,
                e.g. ``fc.weight``/``fc.bias`` or any ``proj.*``.
            ``missing``: encoder trunk keys the source did not provide. BatchNorm's
                ``num_batches_tracked`` counters are not listed: old checkpoints lack them
                and they do not affect the output.
            ``mismatched``: ``(key, source_shape, encoder_shape)`` for keys that exist in
                both but differ in shape; these are not loaded.
    """
    if isinstance(path_or_state_dict, Mapping):
        source = path_or_state_dict
    else:
        source = _read_state_dict(path_or_state_dict)
    source = _unwrap_state_dict(source)

    # Trunk = everything except the new projection; buffers (BatchNorm running stats)
    # are included because they are part of a pretrained ResNet.
    targets: Dict[str, torch.Tensor] = {
        name: tensor
        for name, tensor in list(encoder.named_parameters()) + list(encoder.named_buffers())
        if not name.startswith(_PROJ_PREFIX)
    }

    loaded: List[str] = []
    unexpected: List[str] = []
    mismatched: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]] = []

    with torch.no_grad():
        for source_key, value in source.items():
            key = _strip_prefixes(source_key)
            target = targets.get(key)
            if target is None or not isinstance(value, torch.Tensor):
                unexpected.append(source_key)
                continue
            if tuple(value.shape) != tuple(target.shape):
                mismatched.append((key, tuple(value.shape), tuple(target.shape)))
                continue
            if key in loaded:
                # Two source keys collapse to the same name after prefix stripping; the
                # first one wins and the duplicate is reported instead of silently
                # overwriting it.
                unexpected.append(source_key)
                continue
            target.copy_(value)
            loaded.append(key)

    seen = set(loaded) | {key for key, _, _ in mismatched}
    missing = [
        name for name in targets if name not in seen and not name.endswith("num_batches_tracked")
    ]
    return {"loaded": loaded, "unexpected": unexpected, "missing": missing, "mismatched": mismatched}
