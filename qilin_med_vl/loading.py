# Copyright 2026 The qilin-med-vl Authors. Licensed under the Apache License, Version 2.0.
"""One place that loads a model (optionally quantized, optionally with an adapter) and its processor, for the
command line, the evaluation and the demos."""

import os
from pathlib import Path

import torch


class IncompleteCheckpointError(ValueError):
    """A checkpoint whose weights do not match its config: tensors the model needs are missing (transformers would
    fill them with random values), or the files hold tensors the model does not have (usually renamed keys)."""


def check_loading_info(info: dict, model: str) -> None:
    """Raise `IncompleteCheckpointError` naming the tensors when `info` (`from_pretrained(...,
    output_loading_info=True)`) reports missing, unexpected or wrongly shaped weights."""
    problems = []
    for key, what in (("missing_keys", "missing (would be random)"), ("unexpected_keys", "not used by the model"),
                      ("mismatched_keys", "of the wrong shape")):
        names = sorted(str(name) for name in info.get(key) or [])
        if names:
            shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
            problems.append(f"{len(names)} weight(s) {what}: {shown}")
    if problems:
        raise IncompleteCheckpointError(
            f"{model}: the weights do not match the config ({'; '.join(problems)}). The checkpoint is damaged or "
            "its config.json does not describe it; pass allow_missing_weights=True (--allow-missing-weights) to "
            "load it anyway."
        )


def check_model_location(model: str, what: str = "--model") -> None:
    """A path-like `model` (absolute, `./`, `~`, or more than one `/`) that is not a folder is a typo, not a Hub
    repo id: say so instead of huggingface_hub's "Repo id must be in the form ..."."""
    text = os.fspath(model)
    looks_local = text.startswith((".", "/", "~")) or text.count("/") > 1 or os.path.exists(text)
    if looks_local and not os.path.isdir(os.path.expanduser(text)):
        state = "is not a folder" if os.path.exists(os.path.expanduser(text)) else "does not exist"
        raise FileNotFoundError(f"{what} {text}: the local folder {state}")


# The embedded demo model (package data): what `demo`, `chat` and the app load when no model is named.
DEMO_MODEL_DIR = Path(__file__).parent / "demo_model"
DEMO_EXAMPLES_DIR = DEMO_MODEL_DIR / "examples"
NOT_FOR_CLINICAL_USE = (
    "注意：演示模型仅在合成数据上训练，输出不可用于临床诊断。 (Synthetic demo model: not for clinical use.)"
)


def demo_model_available() -> bool:
    return (DEMO_MODEL_DIR / "config.json").is_file()


# Where a model folder or Hub repo keeps its HiA adapter: `model.load_adapter("hia")` loads it.
HIA_SUBFOLDER = "hia"


def default_adapter(model: str | os.PathLike) -> str | None:
    """`"hia"` when `model` is a local folder with a saved adapter in its `hia/` subfolder, else None: what the
    command line, the demo and the web app load when no adapter is named."""
    return HIA_SUBFOLDER if os.path.isfile(os.path.join(model, HIA_SUBFOLDER, "adapter_config.json")) else None


def adapter_copied_modules(model: str, adapter: str | None) -> list[str]:
    """Full names of the base modules an adapter ships its own copy of (PEFT's `modules_to_save`), for example
    `["model.language_model.layers.3", "lm_head"]`: they must stay unquantized, or the copy cannot load. Empty
    without an adapter or without such modules."""
    if not adapter:
        return []
    from peft import PeftConfig
    from transformers import AutoConfig, AutoModelForImageTextToText

    subfolder = {"subfolder": HIA_SUBFOLDER} if adapter == HIA_SUBFOLDER else {}
    config = PeftConfig.from_pretrained(model if subfolder else adapter, **subfolder)
    entries = getattr(config, "modules_to_save", None) or []
    if not entries:
        return []
    # The names as the model has them, read from a weightless copy (meta device: no memory, no download of weights)
    with torch.device("meta"):
        skeleton = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(model))
    return [name for name, _ in skeleton.named_modules()
            if any(name == entry or name.endswith("." + entry) for entry in entries)]


def check_images(paths, frame=None) -> str | None:
    """The first problem with the image files (one line naming the file), or None: checked before a model load
    that takes seconds to minutes, so a typo fails at once."""
    from .processing.image_loading_qilin import ImageLoadingError, load_image

    for path in paths:
        try:
            load_image(path, frame=frame)
        except (ImageLoadingError, ImportError, TypeError) as error:
            return str(error) + (" (choose one with --frame N)" if "pass frame=" in str(error) else "")
    return None


def load_model_and_processor(
    model: str,
    adapter: str | None = None,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    load_in_4bit: bool = False,
    load_in_8bit: bool = False,
    allow_missing_weights: bool = False,
):
    """`(model, processor)` ready for generation.

    Args:
        model: a local folder or Hub repo id.
        adapter: `"hia"` (the `hia/` subfolder of `model`) or an adapter folder / repo id.
        device: a device or device map (`"cpu"`, `"cuda:0"`, `"auto"`); quantized models default to `"auto"`.
        dtype: weights dtype (`"bfloat16"`, `torch.float16`, ...).
        load_in_4bit / load_in_8bit: bitsandbytes quantization of the language model only.
        allow_missing_weights: load a checkpoint whose weights do not match its config (missing tensors are then
            randomly initialised). By default that raises `IncompleteCheckpointError` naming the tensors.

    Raises:
        `FileNotFoundError`: `model` or `adapter` looks like a local path but is not a folder.
        `IncompleteCheckpointError`: see `allow_missing_weights`.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor, BitsAndBytesConfig

    import qilin_med_vl  # noqa: F401  (registers the auto classes and the HiA adapter type)
    from qilin_med_vl.modeling.modeling_qilin_med_vl import QUANTIZATION_SKIP_MODULES

    if load_in_4bit and load_in_8bit:
        raise ValueError("Choose one of load_in_4bit and load_in_8bit")
    check_model_location(model, "model")
    if adapter and adapter != "hia":
        check_model_location(adapter, "adapter")
    kwargs = {}
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if dtype is not None:
        kwargs["dtype"] = dtype
    if load_in_4bit or load_in_8bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=load_in_4bit, load_in_8bit=load_in_8bit, bnb_4bit_compute_dtype=dtype or torch.bfloat16,
            llm_int8_skip_modules=QUANTIZATION_SKIP_MODULES + adapter_copied_modules(model, adapter),
        )
        device = device or "auto"
    if device:
        kwargs["device_map"] = device
    loaded, info = AutoModelForImageTextToText.from_pretrained(model, output_loading_info=True, **kwargs)
    if not allow_missing_weights:
        check_loading_info(info, model)
    loaded.eval()
    processor = AutoProcessor.from_pretrained(model)
    if adapter:
        loaded.load_adapter(adapter)
        # The processor's high-resolution view must be the size the adapter was trained at.
        high_res_size = getattr(next(reversed(loaded.peft_config.values())), "high_res_size", None)
        if high_res_size:
            processor.image_processor.high_res_size = high_res_size
    return loaded, processor
