"""Tests for the HiA high-resolution CNN encoder (``high_resolution_encoder_hia``)."""

import ast
import math
import sys

import pytest
import torch

from qilin_med_vl.modeling import high_resolution_encoder_hia
from qilin_med_vl.modeling.high_resolution_encoder_hia import (
    Bottleneck,
    HighResolutionEncoder,
    load_resnet_state_dict,
)

torch.set_num_threads(1)

TINY = dict(depths=(1, 1, 1, 1), width=8)
RESNET50_TRUNK_PARAMS = 23_508_032  # torchvision resnet50: 25,557,032 total - 2,049,000 in fc


def _reference_resnet50_shapes():
    """Key -> shape of a full torchvision ``resnet50()`` state dict, built from the paper's table.

    Written out independently of the module under test so the naming/shape contract with
    torchvision is checked without importing torchvision.
    """
    shapes = {}

    def bn(prefix, channels):
        for name in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{name}"] = (channels,)
        shapes[f"{prefix}.num_batches_tracked"] = ()

    shapes["conv1.weight"] = (64, 3, 7, 7)
    bn("bn1", 64)
    in_ch = 64
    for stage, (blocks, planes) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512)), start=1):
        for block in range(blocks):
            p = f"layer{stage}.{block}"
            shapes[f"{p}.conv1.weight"] = (planes, in_ch, 1, 1)
            bn(f"{p}.bn1", planes)
            shapes[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
            bn(f"{p}.bn2", planes)
            shapes[f"{p}.conv3.weight"] = (planes * 4, planes, 1, 1)
            bn(f"{p}.bn3", planes * 4)
            if block == 0:
                shapes[f"{p}.downsample.0.weight"] = (planes * 4, in_ch, 1, 1)
                bn(f"{p}.downsample.1", planes * 4)
            in_ch = planes * 4
    shapes["fc.weight"] = (1000, 2048)
    shapes["fc.bias"] = (1000,)
    return shapes


_PARAM_SUFFIXES = ("weight", "bias")


def _trunk_state(encoder):
    return {k: v.clone() for k, v in encoder.state_dict().items() if not k.startswith("proj.")}


def _randomize_bn_stats(encoder, seed):
    # Fresh encoders share BN init (ones/zeros), so randomise everything to make
    # "weights equal after loading" a meaningful check.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in encoder.state_dict().items():
            if tensor.is_floating_point():
                tensor.copy_(torch.rand(tensor.shape, generator=gen) + 0.5)
            else:
                tensor.fill_(seed)


# ------------------------------------------------------------------------ remote code


def test_module_imports_only_torch_and_stdlib():
    # The file ships with checkpoints as Hugging Face remote code, so it must not import
    # this package (or anything else) at module level; safetensors is imported lazily.
    tree = ast.parse(open(high_resolution_encoder_hia.__file__, encoding="utf-8").read())
    top_level = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top_level.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative imports break remote code"
            top_level.add(node.module.split(".")[0])
    assert "torch" in top_level
    assert all(name == "torch" or name in sys.stdlib_module_names for name in top_level), top_level
    assert "qilin_med_vl" not in open(high_resolution_encoder_hia.__file__, encoding="utf-8").read()


# ----------------------------------------------------------------------------- shapes


def test_resnet50_default_output_shape_224_and_non_square():
    encoder = HighResolutionEncoder(output_dim=16).eval()
    assert encoder.depths == (3, 4, 6, 3) and encoder.width == 64
    assert encoder.out_channels == 2048
    assert encoder.stride == 32
    with torch.no_grad():
        features, grid = encoder(torch.randn(1, 3, 224, 224), return_grid_size=True)
        assert grid == (7, 7)
        assert features.shape == (1, 49, 16)
        features, grid = encoder(torch.randn(2, 3, 160, 224), return_grid_size=True)
    assert grid == (5, 7)
    assert features.shape == (2, 35, 16)
    assert torch.isfinite(features).all()


@pytest.mark.parametrize(
    "height, width, expected_grid",
    [
        (224, 224, (7, 7)),
        (336, 336, (11, 11)),  # 336 / 32 = 10.5 -> ceil at every halving
        (448, 448, (14, 14)),
        (672, 672, (21, 21)),
        (448, 672, (14, 21)),
        (500, 300, (16, 10)),
        (31, 33, (1, 2)),
    ],
)
@pytest.mark.parametrize("stem", ["resnet", "full_resolution"])
def test_stride_32_grid_sizes_for_any_input(height, width, expected_grid, stem):
    encoder = HighResolutionEncoder(output_dim=12, stem=stem, **TINY).eval()
    assert encoder.compute_grid_size(height, width) == expected_grid
    with torch.no_grad():
        features, grid = encoder(torch.randn(2, 3, height, width), return_grid_size=True)
    assert grid == expected_grid
    assert features.shape == (2, expected_grid[0] * expected_grid[1], 12)


def test_return_grid_size_false_returns_tensor_only():
    encoder = HighResolutionEncoder(output_dim=4, **TINY).eval()
    with torch.no_grad():
        out = encoder(torch.randn(1, 3, 64, 96))
    assert isinstance(out, torch.Tensor)
    assert out.shape == (1, 2 * 3, 4)


def test_tokens_are_row_major_over_the_grid():
    encoder = HighResolutionEncoder(output_dim=5, **TINY).eval()
    pixel_values = torch.randn(1, 3, 96, 160)
    with torch.no_grad():
        feature_map = encoder.forward_features(pixel_values)  # [1, C, gh, gw]
        features, (gh, gw) = encoder(pixel_values, return_grid_size=True)
        expected = encoder.proj(feature_map.permute(0, 2, 3, 1))  # [1, gh, gw, D]
    assert feature_map.shape == (1, encoder.out_channels, gh, gw)
    torch.testing.assert_close(features.view(1, gh, gw, 5), expected)


@pytest.mark.parametrize(
    "depths, width, stride, channels",
    [
        ((1, 1, 1, 1), 8, 32, 8 * 4 * 8),
        ((1, 1, 1), 8, 16, 8 * 4 * 4),
        ((2, 2), 8, 8, 8 * 4 * 2),
        ((2,), 16, 4, 16 * 4),
        ((1, 2, 1, 1), 4, 32, 4 * 4 * 8),
    ],
)
def test_depth_and_width_knobs(depths, width, stride, channels):
    encoder = HighResolutionEncoder(output_dim=7, depths=depths, width=width).eval()
    assert encoder.out_channels == channels
    assert encoder.stride == stride
    assert encoder.proj.in_features == channels and encoder.proj.out_features == 7
    assert encoder.conv1.out_channels == width
    assert len(encoder.stages) == len(depths)
    assert [len(stage) for stage in encoder.stages] == list(depths)
    assert not hasattr(encoder, f"layer{len(depths) + 1}")
    with torch.no_grad():
        feature_map = encoder.forward_features(torch.randn(1, 3, 64, 128))
        features, grid = encoder(torch.randn(1, 3, 64, 128), return_grid_size=True)
    assert feature_map.shape == (1, channels, 64 // stride, 128 // stride)
    assert grid == (64 // stride, 128 // stride)
    assert features.shape == (1, (64 // stride) * (128 // stride), 7)


def test_no_pooling_or_classifier_head():
    names = {name for name, _ in HighResolutionEncoder(output_dim=3, **TINY).named_modules()}
    assert "fc" not in names and "avgpool" not in names
    assert "proj" in names


def test_full_resolution_stem_layout_and_every_pixel_counts():
    """The first two convs run at stride 1 with half the width; no torchvision stem keys remain."""
    encoder = HighResolutionEncoder(output_dim=3, stem="full_resolution", **TINY).eval()
    convs = [module for module in encoder.stem if isinstance(module, torch.nn.Conv2d)]
    assert [conv.stride for conv in convs] == [(1, 1)] * 3
    assert [conv.out_channels for conv in convs] == [TINY["width"] // 2, TINY["width"] // 2, TINY["width"]]
    assert not any(name.startswith(("conv1", "bn1")) for name, _ in encoder.named_parameters())
    assert encoder.stride == 32
    # one bright pixel, at any of the four phases of the first pool, changes the features
    base = torch.zeros(1, 3, 64, 64)
    with torch.no_grad():
        reference = encoder(base)
        for dy, dx in ((0, 0), (0, 1), (1, 0), (1, 1)):
            spot = base.clone()
            spot[..., 20 + dy, 20 + dx] = 3.0
            assert not torch.allclose(encoder(spot), reference)


def test_full_resolution_stem_keeps_pytorchs_default_init():
    """The stem no ImageNet file fills keeps PyTorch's default init (uniform within 1/sqrt(fan_in)); the trunk keeps
    torchvision's fan-out init, whose weights are larger."""
    encoder = HighResolutionEncoder(output_dim=3, stem="full_resolution", depths=(1, 1), width=16)
    for conv in (module for module in encoder.stem if isinstance(module, torch.nn.Conv2d)):
        fan_in = conv.weight[0].numel()
        assert conv.weight.abs().max() <= fan_in**-0.5 + 1e-6
    trunk_conv = encoder.layer1[0].conv2
    assert trunk_conv.weight.abs().max() > trunk_conv.weight[0].numel() ** -0.5


def test_stem_names_agree_with_the_config():
    from typing import get_args

    from qilin_med_vl.modeling.configuration_hia import HiAConfig
    from qilin_med_vl.modeling.high_resolution_encoder_hia import ENCODER_STEMS

    assert get_args(HiAConfig.__annotations__["encoder_stem"]) == ENCODER_STEMS


def test_resnet_weights_fill_only_the_stages_of_a_full_resolution_encoder():
    source = HighResolutionEncoder(output_dim=3, **TINY).state_dict()
    encoder = HighResolutionEncoder(output_dim=3, stem="full_resolution", **TINY)
    report = load_resnet_state_dict(encoder, source)
    assert {"conv1.weight", "bn1.weight"} <= set(report["unexpected"])
    assert any(key.startswith("stem.") for key in report["missing"])
    assert "layer1.0.conv1.weight" in report["loaded"]


@pytest.mark.parametrize("kwargs", [dict(depths=()), dict(depths=(1, 0)), dict(width=0), dict(stem="vit")])
def test_invalid_config_raises(kwargs):
    with pytest.raises(ValueError):
        HighResolutionEncoder(output_dim=4, **kwargs)


def test_invalid_pixel_values_raise():
    encoder = HighResolutionEncoder(output_dim=4, **TINY)
    with pytest.raises(ValueError):
        encoder(torch.randn(3, 64, 64))
    with pytest.raises(ValueError):
        encoder(torch.randn(1, 1, 64, 64))


# -------------------------------------------------------------------- ResNet-50 contract


def test_bottleneck_stride_is_on_the_3x3_conv():
    block = Bottleneck(64, 32, stride=2)
    assert block.conv1.stride == (1, 1) and block.conv1.kernel_size == (1, 1)
    assert block.conv2.stride == (2, 2) and block.conv2.kernel_size == (3, 3)
    assert block.conv3.out_channels == 128
    assert block.downsample is not None
    assert Bottleneck(128, 32, stride=1).downsample is None


def test_resnet50_trunk_parameter_count_and_keys_match_torchvision():
    reference = _reference_resnet50_shapes()
    reference_params = sum(
        math.prod(shape)
        for key, shape in reference.items()
        if key.endswith(_PARAM_SUFFIXES) and not key.startswith("fc.")
    )
    assert reference_params == RESNET50_TRUNK_PARAMS

    # Meta device: only shapes are needed, no 100 MB allocation or init.
    with torch.device("meta"):
        encoder = HighResolutionEncoder(output_dim=32)
    trunk_params = sum(p.numel() for n, p in encoder.named_parameters() if not n.startswith("proj."))
    assert trunk_params == RESNET50_TRUNK_PARAMS
    assert sum(p.numel() for p in encoder.proj.parameters()) == 2048 * 32 + 32

    trunk = {k: tuple(v.shape) for k, v in encoder.state_dict().items() if not k.startswith("proj.")}
    unmatched_reference = sorted(set(reference) - set(trunk))
    assert unmatched_reference == ["fc.bias", "fc.weight"]
    assert set(trunk) <= set(reference)
    assert all(trunk[k] == reference[k] for k in trunk)


# ------------------------------------------------------------------------------ loading


@pytest.fixture
def source_and_target():
    torch.manual_seed(0)
    source = HighResolutionEncoder(output_dim=6, **TINY)
    _randomize_bn_stats(source, seed=3)
    target = HighResolutionEncoder(output_dim=6, **TINY)
    return source, target


def _prefixed_state_dict(encoder, prefix):
    state = {prefix + k: v.clone() for k, v in encoder.state_dict().items() if not k.startswith("proj.")}
    out_ch = encoder.out_channels
    state[prefix + "fc.weight"] = torch.randn(10, out_ch)
    state[prefix + "fc.bias"] = torch.randn(10)
    return state


def _assert_trunk_equal(a, b):
    sa, sb = _trunk_state(a), _trunk_state(b)
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=0, msg=key)


def test_load_state_dict_with_module_prefix_and_fc(source_and_target):
    source, target = source_and_target
    proj_before = {k: v.clone() for k, v in target.proj.state_dict().items()}
    state = _prefixed_state_dict(source, "module.")

    report = load_resnet_state_dict(target, state)

    _assert_trunk_equal(source, target)
    assert sorted(report["unexpected"]) == ["module.fc.bias", "module.fc.weight"]
    assert report["missing"] == [] and report["mismatched"] == []
    assert set(report["loaded"]) == set(_trunk_state(target))
    for key, value in target.proj.state_dict().items():
        torch.testing.assert_close(value, proj_before[key], rtol=0, atol=0)
    # Loaded BN running stats are actually used in eval mode: outputs match the source
    # (projection copied by hand since it is never loaded from a ResNet file).
    target.proj.load_state_dict(source.proj.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(target.eval()(x), source.eval()(x))


@pytest.mark.parametrize("prefix", ["", "backbone.", "model.", "spm.", "module.backbone."])
def test_load_state_dict_strips_common_prefixes(source_and_target, prefix):
    source, target = source_and_target
    report = load_resnet_state_dict(target, _prefixed_state_dict(source, prefix))
    _assert_trunk_equal(source, target)
    assert sorted(report["unexpected"]) == [prefix + "fc.bias", prefix + "fc.weight"]
    assert report["missing"] == []


def test_proj_keys_in_source_are_never_loaded(source_and_target):
    source, target = source_and_target
    proj_before = target.proj.weight.clone()
    report = load_resnet_state_dict(target, source.state_dict())
    torch.testing.assert_close(target.proj.weight, proj_before, rtol=0, atol=0)
    assert sorted(report["unexpected"]) == ["proj.bias", "proj.weight"]
    assert not any(k.startswith("proj.") for k in report["loaded"] + report["missing"])


def test_shape_mismatch_is_reported_not_loaded(source_and_target):
    source, target = source_and_target
    state = _prefixed_state_dict(source, "module.")
    state["module.layer2.0.conv2.weight"] = torch.randn(16, 16, 5, 5)
    before = target.layer2[0].conv2.weight.clone()

    report = load_resnet_state_dict(target, state)

    assert report["mismatched"] == [("layer2.0.conv2.weight", (16, 16, 5, 5), (16, 16, 3, 3))]
    assert "layer2.0.conv2.weight" not in report["loaded"]
    assert "layer2.0.conv2.weight" not in report["missing"]
    torch.testing.assert_close(target.layer2[0].conv2.weight, before, rtol=0, atol=0)
    # Everything else still loads.
    torch.testing.assert_close(target.layer2[0].conv1.weight, source.layer2[0].conv1.weight)
    assert len(report["loaded"]) == len(_trunk_state(target)) - 1


def test_missing_keys_are_reported(source_and_target):
    source, target = source_and_target
    state = {k: v for k, v in source.state_dict().items() if not k.startswith(("layer4.", "proj."))}
    # Old torchvision checkpoints have no num_batches_tracked; that is not "missing".
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    report = load_resnet_state_dict(target, state)
    assert report["missing"]
    assert all(k.startswith("layer4.") for k in report["missing"])
    assert "layer4.0.conv1.weight" in report["missing"]
    assert "layer4.0.downsample.1.running_var" in report["missing"]
    assert not any(k.endswith("num_batches_tracked") for k in report["missing"])
    torch.testing.assert_close(target.layer3[0].conv2.weight, source.layer3[0].conv2.weight)


def test_load_casts_dtype(source_and_target):
    source, target = source_and_target
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in source.state_dict().items()}
    load_resnet_state_dict(target, state)
    assert target.conv1.weight.dtype == torch.float32
    torch.testing.assert_close(target.conv1.weight, source.conv1.weight.half().float())


def test_load_from_safetensors_file(source_and_target, tmp_path):
    import safetensors.torch as safetensors_torch
    source, target = source_and_target
    state = {k: v.contiguous() for k, v in _prefixed_state_dict(source, "backbone.").items()}
    path = tmp_path / "resnet50.safetensors"
    safetensors_torch.save_file(state, str(path))

    report = load_resnet_state_dict(target, str(path))

    _assert_trunk_equal(source, target)
    assert sorted(report["unexpected"]) == ["backbone.fc.bias", "backbone.fc.weight"]
    assert report["missing"] == [] and report["mismatched"] == []


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".bin"])
def test_load_from_torch_file_with_nested_checkpoint(source_and_target, tmp_path, suffix):
    source, target = source_and_target
    path = tmp_path / f"resnet50{suffix}"
    torch.save({"state_dict": _prefixed_state_dict(source, "module."), "epoch": 90}, path)

    report = load_resnet_state_dict(target, path)  # pathlib.Path is accepted too

    _assert_trunk_equal(source, target)
    assert sorted(report["unexpected"]) == ["module.fc.bias", "module.fc.weight"]
    assert report["missing"] == []


# ---------------------------------------------------------------------- training / eval


def test_gradients_flow_to_all_parameters():
    torch.manual_seed(0)
    encoder = HighResolutionEncoder(output_dim=6, **TINY).train()
    features = encoder(torch.randn(2, 3, 64, 96))
    # Random weights instead of a plain sum: a sum over a BatchNorm output has zero
    # gradient w.r.t. its input in train mode, which would hide broken paths.
    (features * torch.randn_like(features)).sum().backward()
    for name, param in encoder.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


def test_eval_uses_running_stats_batch_independent():
    torch.manual_seed(0)
    encoder = HighResolutionEncoder(output_dim=6, **TINY)
    x = torch.randn(3, 3, 64, 64)

    encoder.eval()
    running_mean = encoder.bn1.running_mean.clone()
    with torch.no_grad():
        single = encoder(x[:1])
        batched = encoder(x)
    torch.testing.assert_close(batched[:1], single)
    torch.testing.assert_close(encoder.bn1.running_mean, running_mean, rtol=0, atol=0)

    encoder.train()
    with torch.no_grad():
        encoder(x)
    assert not torch.equal(encoder.bn1.running_mean, running_mean)
