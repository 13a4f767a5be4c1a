# Copyright 2026 The qilin-med-vl Authors. Licensed under the Apache License, Version 2.0.
"""One place that loads a model (optionally quantized, optionally with an adapter) and its processor, for the
command line, the evaluation and the demos."""

import torch


def load_model_and_processor(
    model: str,
    adapter: str | None = None,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    load_in_4bit: bool = False,
    load_in_8bit: bool = False,
):
    """`(model, processor)` ready for generation.

    Args:
        model: a local folder or Hub repo id.
        adapter: `"hia"` (the `hia/` subfolder of `model`) or an adapter folder / repo id.
        device: a device or device map (`"cpu"`, `"cuda:0"`, `"auto"`); quantized models default to `"auto"`.
        dtype: weights dtype (`"bfloat16"`, `torch.float16`, ...).
        load_in_4bit / load_in_8bit: bitsandbytes quantization of the language model only.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor, BitsAndBytesConfig

    import qilin_med_vl  # noqa: F401  (registers the auto classes and the HiA adapter type)

    if load_in_4bit and load_in_8bit:
        raise ValueError("Choose one of load_in_4bit and load_in_8bit")
    kwargs = {}
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if dtype is not None:
        kwargs["dtype"] = dtype
    if load_in_4bit or load_in_8bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=load_in_4bit, load_in_8bit=load_in_8bit, bnb_4bit_compute_dtype=dtype or torch.bfloat16
        )
        device = device or "auto"
    if device:
        kwargs["device_map"] = device
    loaded = AutoModelForImageTextToText.from_pretrained(model, **kwargs).eval()
    processor = AutoProcessor.from_pretrained(model)
    if adapter:
        loaded.load_adapter(adapter)
        # The processor's high-resolution view must be the size the adapter was trained at.
        high_res_size = getattr(next(reversed(loaded.peft_config.values())), "high_res_size", None)
        if high_res_size:
            processor.image_processor.high_res_size = high_res_size
    return loaded, processor
