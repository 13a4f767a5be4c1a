# Copyright 2026 The qilin-med-vl Authors. Licensed under the Apache License, Version 2.0.
"""The web demo's model, shared by all visitors: what to load (`ModelSpec`), loading and switching it
(`ModelManager`), and one streamed answer at a time with HiA on or off and its attention maps (`LoadedModel`).
Needs no Gradio."""

import logging
import re
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..inference import build_inputs, decode_answers
from ..loading import DEMO_MODEL_DIR, default_adapter
from ..modeling.modeling_hia import record_hia_attentions
from .heatmap import heatmap_overlays
from .prompts import (
    AppInputError,
)

logger = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 128


@dataclass(frozen=True)
class ModelSpec:
    """What to load: a folder or repo id, an adapter (`"hia"` = the model's `hia/` subfolder), quantization."""

    model: str = str(DEMO_MODEL_DIR)
    adapter: str | None = None
    quantization: str | None = None  # None, "8bit" or "4bit"
    device: str | None = None
    dtype: str | None = None

    @classmethod
    def create(cls, model=None, adapter="auto", quantization=None, device=None, dtype=None) -> "ModelSpec":
        model = (model or "").strip() or str(DEMO_MODEL_DIR)
        if adapter == "auto":
            adapter = default_adapter(model)
        quantization = None if quantization in (None, "", "none") else quantization
        if quantization not in (None, "8bit", "4bit"):
            raise ValueError(f"quantization must be None, '8bit' or '4bit', got {quantization!r}")
        return cls(model, (adapter or "").strip() or None, quantization, device or None, dtype or None)

    @property
    def is_demo(self) -> bool:
        return Path(self.model).resolve() == DEMO_MODEL_DIR.resolve()


def quantization_available() -> bool:
    """8-bit / 4-bit loading is offered when bitsandbytes is installed and a CUDA GPU is present."""
    try:
        import importlib.util

        import torch

        return importlib.util.find_spec("bitsandbytes") is not None and torch.cuda.is_available()
    except Exception:
        return False


@dataclass
class StreamUpdate:
    """One step of a streamed answer: the text so far, and the heatmaps once the prompt has been read (None while
    not yet known, an empty list with HiA off)."""

    text: str
    heatmaps: list[Image.Image] | None = None
    done: bool = False


@contextmanager
def adapters_disabled(model):
    """Switch every PEFT adapter layer of `model` off for the block, with PEFT's own layer switch (transformers'
    `disable_adapters()` refuses PEFT < 0.22 from transformers 5.24 on, and no such PEFT is released yet). The
    adapter's `modules_to_save` copies are switched too, so the base's own weights answer."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    layers = [module for module in model.modules() if isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper))]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


class LoadedModel:
    """A model and its processor; `stream` generates one answer at a time (a lock serialises callers, since the
    HiA switch is a property of the shared model)."""

    def __init__(self, spec: ModelSpec):
        from ..loading import load_model_and_processor

        self.spec = spec
        self.model, self.processor = load_model_and_processor(
            spec.model, spec.adapter, spec.device, spec.dtype,
            load_in_4bit=spec.quantization == "4bit", load_in_8bit=spec.quantization == "8bit",
        )
        self.lock = threading.Lock()
        self.has_adapter = spec.adapter is not None
        # HiA layers mark themselves; another adapter type (LoRA) can be switched off but draws no heatmaps.
        self.has_hia = self.has_adapter and any(getattr(module, "hia_active", False)
                                                for module in self.model.modules())

    def max_length(self) -> int:
        text_config = getattr(self.model.config, "text_config", self.model.config)
        limits = [getattr(text_config, "max_position_embeddings", None), self.processor.tokenizer.model_max_length]
        return min(int(limit) for limit in limits if limit and limit < 10**9)

    def render_prompt(self, messages: list[dict]) -> str:
        """The prompt text as the model reads it, with one `<image>` per image."""
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def build_inputs(self, messages: list[dict], max_new_tokens: int):
        limit = self.max_length()
        try:
            inputs = build_inputs(self.processor, messages, max_length=limit)
        except ValueError as error:
            if "over the limit" not in str(error):
                raise
            found = re.search(r"is (\d+) tokens long", str(error))
            length = f"{found.group(1)} 个 token，" if found else ""
            raise AppInputError(
                f"提示过长：{length}上限 {limit}（每张图片占 {self.processor.image_seq_length} 个 token）。"
                f"请缩短问题、减少图片或开始新对话。 (Prompt too long for the model: {error})"
            ) from None
        length = inputs["input_ids"].shape[1]
        if length + max_new_tokens > limit:
            raise AppInputError(
                f"对话过长：提示 {length} 个 token，加上最多 {max_new_tokens} 个新 token 超过上限 {limit}。"
                f"请开始新对话或减少生成长度。 (Prompt too long: {length} prompt tokens + {max_new_tokens} new "
                f"tokens exceed the model's {limit}; start a new chat or lower the number of new tokens.)"
            )
        return inputs.to(self.model.device)

    def stream(self, images: list[Image.Image], messages: list[dict], use_hia: bool = True,
               max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, display_images: list[Image.Image] | None = None
               ) -> Iterator[StreamUpdate]:
        """Greedy answer to `messages` (built by `build_messages`), streamed. With HiA on, the first update that
        knows them carries one heatmap per image, drawn on `display_images` (default: `images`)."""
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        display_images = display_images or images
        use_hia = use_hia and self.has_adapter
        inputs = self.build_inputs(messages, max_new_tokens)
        tokenizer = self.processor.tokenizer
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        stop = threading.Event()

        class _Stop(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                import torch

                return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool, device=input_ids.device)

        result = {}

        def generate():
            try:
                kwargs = {"max_new_tokens": max_new_tokens, "do_sample": False, "streamer": streamer,
                          "stopping_criteria": StoppingCriteriaList([_Stop()])}
                result["ids"] = self.model.generate(**inputs, **kwargs)
            except BaseException as error:  # re-raised in the caller's thread
                result["error"] = error
                streamer.end()

        heatmaps = None if use_hia and self.has_hia else []

        def take_heatmaps():
            nonlocal heatmaps
            if heatmaps is None and recorded:  # the first HiA pass is the prompt's prefill
                attentions, grid_size = recorded[0]
                heatmaps = heatmap_overlays(
                    display_images, [a.detach().float().cpu().numpy() for a in attentions], grid_size
                )

        with self.lock, ExitStack() as switches:
            recorded = switches.enter_context(record_hia_attentions(self.model)) if use_hia and self.has_hia else []
            if self.has_adapter and not use_hia:
                switches.enter_context(adapters_disabled(self.model))
            thread = threading.Thread(target=generate, name="qilin-med-vl-generate", daemon=True)
            try:
                thread.start()
                text = ""
                for chunk in streamer:
                    text += chunk
                    take_heatmaps()
                    yield StreamUpdate(text, heatmaps)
                thread.join()
                if "error" in result:
                    raise result["error"]
                (answer,) = decode_answers(self.processor, inputs, result["ids"])
                take_heatmaps()
                yield StreamUpdate(answer, heatmaps if heatmaps is not None else [], done=True)
            finally:
                stop.set()  # a visitor who left (the page closed the stream) stops the generation too
                if thread.ident is not None:
                    thread.join()


class ModelManager:
    """Holds the one loaded model; `get` loads on first use or when another spec is asked for (the old one is
    dropped first, so two models never sit in memory together)."""

    def __init__(self, spec: ModelSpec | None = None, allow_model_switching: bool = False):
        self.spec = spec or ModelSpec.create()
        # Whether page visitors may load another model. Off by default: the model box would otherwise let anyone who
        # reaches the page read any local folder the server can, or start a Hub download of any size.
        self.allow_model_switching = allow_model_switching
        self._loaded: LoadedModel | None = None
        self._lock = threading.Lock()

    @property
    def loaded(self) -> LoadedModel | None:
        return self._loaded

    def get(self, spec: ModelSpec | None = None) -> LoadedModel:
        with self._lock:
            spec = spec or self.spec
            if self._loaded is not None and self._loaded.spec == spec:
                return self._loaded
            if spec.is_demo and not (DEMO_MODEL_DIR / "config.json").is_file():
                raise AppInputError(
                    "内置演示模型未随本安装提供，请在“模型”中填写本地路径或 Hub repo id。 "
                    "(The embedded demo model is not in this installation; enter a local path or repo id under Model.)"
                )
            if spec.quantization and not quantization_available():
                raise AppInputError("8/4-bit 需要 bitsandbytes 和 GPU。 (8-bit / 4-bit needs bitsandbytes and a GPU.)")
            self._loaded = None  # dropped before loading the next, so two models never share the memory
            try:
                loaded = LoadedModel(spec)
            except Exception as error:
                logger.exception("loading %s failed", spec)
                keeping = "" if spec == self.spec else f"; the next request reloads {self.spec.model}"
                raise AppInputError(
                    f"无法加载模型 {spec.model}。 (Cannot load {spec.model}: {type(error).__name__}: {error}{keeping})"
                ) from None
            self._loaded, self.spec = loaded, spec
            return loaded

    def describe(self) -> str:
        loaded = self._loaded
        if loaded is None:
            return f"模型 · model: `{self.spec.model}`（未加载 · not loaded yet）"
        spec = loaded.spec
        name = "内置演示模型 · embedded demo model" if spec.is_demo else f"`{spec.model}`"
        parts = [f"模型 · model: {name}", f"HiA: {'`' + spec.adapter + '`' if loaded.has_hia else '无 · none'}"]
        if spec.quantization:
            parts.append(spec.quantization)
        return " · ".join(parts)
