"""The benchmark arithmetic: FLOP counts against torch's FlopCounterMode, KV-cache / footprint bytes against real
tensors, and the live-tensor tracker. Functional only: nothing here times anything."""

import copy

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.flops import (
    clip_vision_flops,
    decode_flops,
    flop_counter,
    kv_cache_bytes,
    prefill_flops,
    quantized_footprint_bytes,
    resnet_flops,
    resnet_grid,
    split_decoder_linear_parameters,
)
from benchmarks.memory import LiveTensorBytes, peak_live_bytes
from benchmarks.models import bench_config, build_model, hia_config_for, make_inputs, qilin_class, with_vision_size
from benchmarks.stage_replay import build_meta_model, measure_prefill_stages
from benchmarks.suite_hia import hia_grid_13b
from qilin_med_vl.modeling.high_resolution_encoder_hia import HighResolutionEncoder
from qilin_med_vl.modeling.modeling_qilin_med_vl import CACHE_NAME


def small_config(**overrides):
    values = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, vision_hidden_size=32, vision_layers=2,
                  vision_heads=2, image_size=56, vocab_size=32064)
    return bench_config(**{**values, **overrides})


def small_hia(size=56, **overrides):
    return hia_config_for(size, **{**dict(num_queries=8, num_heads=4, encoder_width=8), **overrides})


def counted_flops(model, inputs, **kwargs):
    with torch.inference_mode(), flop_counter() as counter:
        out = model(**inputs, **kwargs)
    return counter.get_total_flops(), out


def test_cpu_sdpa_attention_is_counted():
    q = torch.randn(2, 4, 16, 8)
    with FlopCounterMode(display=False) as plain:
        F.scaled_dot_product_attention(q, q, q, is_causal=True)
    with flop_counter() as ours:
        F.scaled_dot_product_attention(q, q, q, is_causal=True)
    assert plain.get_total_flops() == 0  # why flop_counter() exists: torch misses the CPU kernel
    assert ours.get_total_flops() == 4 * 2 * 4 * 16 * 16 * 8


@pytest.mark.parametrize("num_images", [0, 1, 3])
def test_prefill_flops_match_flop_counter(num_images):
    config = small_config()
    model = build_model(config)
    inputs = make_inputs(config, num_images, text_tokens=20)
    counted, _ = counted_flops(model, inputs, use_cache=True, logits_to_keep=1)
    analytic = prefill_flops(config, num_images, text_tokens=20)
    assert analytic["tokens"] == inputs["input_ids"].shape[1]
    assert counted == pytest.approx(analytic["total"], rel=0.01)


@pytest.mark.parametrize("high_res_size,num_images", [(56, 1), (70, 2)])
def test_hia_prefill_flops_match_flop_counter(high_res_size, num_images):
    config = small_config()
    hia = small_hia(high_res_size)
    model = get_peft_model(build_model(config), copy.deepcopy(hia)).eval()
    inputs = make_inputs(config, num_images, text_tokens=20, high_res_size=high_res_size)
    counted, _ = counted_flops(model, inputs, use_cache=True, logits_to_keep=1)
    analytic = prefill_flops(config, num_images, text_tokens=20, hia=model.peft_config["default"],
                             high_res_size=high_res_size)
    assert analytic["hia_encoder"] > 0 and analytic["hia_blocks"] > 0
    assert counted == pytest.approx(analytic["total"], rel=0.01)


def test_decode_step_flops_and_kv_cache_bytes():
    config = small_config()
    model = build_model(config)
    inputs = make_inputs(config, 1, text_tokens=20)
    _, out = counted_flops(model, inputs, use_cache=True, logits_to_keep=1)
    context = inputs["input_ids"].shape[1]
    cache = getattr(out, CACHE_NAME)
    stored = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    assert stored == kv_cache_bytes(config.text_config, context, bytes_per_element=4)
    step = {"input_ids": torch.tensor([[5]]), CACHE_NAME: cache, "use_cache": True, "logits_to_keep": 1}
    counted, _ = counted_flops(model, step)
    assert counted == pytest.approx(decode_flops(config, context), rel=0.01)


def test_baseline_at_higher_resolution_is_clip_with_interpolated_positions():
    config = small_config()
    model = build_model(config)
    pixels = torch.randn(2, 3, 112, 112)
    with torch.inference_mode(), flop_counter() as counter:
        out = model.model.vision_tower(pixels, output_hidden_states=True, interpolate_pos_encoding=True)
    assert out.hidden_states[-2].shape[1] - 1 == with_vision_size(config, 112).image_seq_length == 64
    assert counter.get_total_flops() == clip_vision_flops(config.vision_config, 112, num_images=2)


@pytest.mark.parametrize("size", [56, 100, 224])
def test_resnet_grid_and_flops(size):
    encoder = HighResolutionEncoder(output_dim=48, depths=(1, 2), width=8).eval()
    assert resnet_grid(size, (1, 2)) == encoder.compute_grid_size(size, size)[0] ** 2
    with torch.inference_mode(), flop_counter() as counter:
        features = encoder(torch.randn(1, 3, size, size))
    assert features.shape[1] == resnet_grid(size, (1, 2))
    assert counter.get_total_flops() == resnet_flops(size, (1, 2), 8, 48)


def test_resnet50_flops_are_the_textbook_figure():
    # torchvision's ResNet-50 trunk is ~4.1 GMACs at 224 px.
    assert resnet_flops(224, output_dim=1) / 2 == pytest.approx(4.09e9, rel=0.02)


def test_live_tensor_bytes_counts_new_storage_only():
    weight = torch.ones(100, 100)
    with LiveTensorBytes() as tracker:
        view = weight.t()  # a view of pre-existing storage: not counted
        a = torch.ones(1000)  # 4000 bytes
        b = a * 2  # 8000 live
        del a  # 4000 live
        c = b.view(10, 100)  # a view: no new bytes
        d = b + 1  # 8000 live
    assert tracker.peak == 8000 and tracker.current == 8000
    assert view.shape == (100, 100) and c.shape == (10, 100) and d.shape == (1000,)


def test_live_tensor_bytes_works_on_the_meta_device():
    with LiveTensorBytes() as tracker:
        a = torch.empty(256, 256, device="meta")
        b = a @ a
        del a
    assert tracker.peak == 2 * 256 * 256 * 4 and tracker.current == 256 * 256 * 4
    assert b.device.type == "meta"


@pytest.mark.parametrize("with_hia", [False, True])
def test_stage_replay_matches_the_real_forward(with_hia):
    """The stage-by-stage replay used on the meta device: same FLOPs as the real forward, and a peak within a few % of
    the real one (the replay skips a few tiny tensors such as the boolean image mask, and composes HiA's transient
    as an upper bound)."""
    config = small_config(hidden_size=128, image_size=112)
    model = build_model(config)
    if with_hia:
        model = get_peft_model(model, small_hia(112)).eval()
    inputs = make_inputs(config, 2, text_tokens=24, high_res_size=112 if with_hia else None)
    real_flops, _ = counted_flops(model, inputs, use_cache=True, logits_to_keep=1)
    real_peak = peak_live_bytes(lambda: model(**inputs, use_cache=True, logits_to_keep=1))
    staged = measure_prefill_stages(model, 2, text_tokens=24, high_res_size=112 if with_hia else None)
    assert staged["flops"] == real_flops
    assert 0.97 * real_peak <= staged["activation_peak_bytes"] <= 1.1 * real_peak


def test_stage_replay_on_meta_equals_arithmetic():
    config = small_config()
    hia = small_hia(84)
    model = build_meta_model(config, hia, dtype=torch.bfloat16)
    assert all(p.device.type == "meta" for p in model.parameters())
    for vision_size, high_res in ((None, 84), (84, None)):
        with (model.disable_adapter() if not high_res else torch.inference_mode()):
            staged = measure_prefill_stages(model, 2, text_tokens=30, vision_size=vision_size,
                                            high_res_size=high_res)
        expected = prefill_flops(config, 2, text_tokens=30, vision_size=vision_size,
                                 hia=model.peft_config["default"] if high_res else None, high_res_size=high_res)
        assert staged["flops"] == expected["total"]
        assert staged["stage2_language_model"]["kv_cache_bytes"] == kv_cache_bytes(config.text_config,
                                                                                   expected["tokens"], 2)


def test_footprint_arithmetic_matches_get_memory_footprint():
    config = small_config()
    model = build_model(config)
    counts = split_decoder_linear_parameters(model)
    assert counts[0] == 3 * (4 * 64 * 64 + 3 * 64 * config.text_config.intermediate_size)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert model.get_memory_footprint() - buffers == quantized_footprint_bytes(counts, "fp32")
    model = model.to(torch.bfloat16)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert model.get_memory_footprint() - buffers == quantized_footprint_bytes(counts, "bf16")


def test_int8_footprint_arithmetic(tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    config = small_config()
    build_model(config).save_pretrained(tmp_path)
    model = qilin_class().from_pretrained(tmp_path, quantization_config=BitsAndBytesConfig(load_in_8bit=True),
                                          device_map="cpu", dtype=torch.bfloat16)
    counts = split_decoder_linear_parameters(model)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert model.get_memory_footprint() - buffers == quantized_footprint_bytes(counts, "int8")


def test_13b_targets_by_arithmetic():
    grid = hia_grid_13b(sizes=(448, 672), image_counts=(2,))
    target = grid["target_672px_2_images"]
    assert target["met"] and 1.0 < target["hia_over_base"] < 1.10
    for cell in grid["cells"]:
        assert cell["baseline_tokens"] > cell["base_tokens"]
        assert cell["baseline_over_base"] > 1.5
        # HiA leaves the sequence length alone: decode costs the same with and without it.
        assert cell["kv_cache_gib_base_and_hia"] < cell["kv_cache_gib_baseline"]
