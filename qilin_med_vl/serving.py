# Copyright 2026 The qilin-med-vl Authors. Licensed under the Apache License, Version 2.0.
"""Qilin-Med-VL, HiA included, behind an OpenAI-compatible API (`qilin-med-vl serve`): transformers' own
`transformers serve` server with the model loaded the package's way.

transformers' server (FastAPI, `/v1/chat/completions` with streaming, `/v1/responses`, `/v1/models`, `/health`)
is reused as it is; three of its classes are subclassed where it cannot know this model:

- `QilinModelManager` (its `ModelManager`): loads the one model the server is pinned to with
  `qilin_med_vl.loading.load_model_and_processor` (the HiA adapter, the processor's high-resolution size to match,
  quantization of the language model only, the checks of a damaged checkpoint), where transformers would look the
  class up by name among its own, and reports it as a vision-language model. It refuses to load any other model.
- `QilinChatCompletionHandler` and `QilinResponseHandler`: images must be base64 `data:` URLs and are decoded by the
  package's image loader (PNG, JPEG, DICOM windowed as a viewer shows it, size limits), so the server never fetches
  a URL or opens one of its own files on a client's behalf; a bad image or message is a 400 naming it.

Everything else is transformers': the chat template is applied by the processor, every processor output
(`pixel_values`, `high_res_pixel_values`, ...) goes to `generate`, which runs on one inference thread per model
(requests queue; HiA's per-forward state is never shared by two forwards), and tokens are streamed as server-sent
events.

Continuous batching is refused (`CONTINUOUS_BATCHING_UNSUPPORTED` says why). Needs `pip install
'qilin-med-vl[serve]'` (transformers' `serving` extra); importing this module does not.
"""

import base64
import binascii
import os
import sys
import tempfile

from PIL import Image
from transformers.utils.import_utils import is_serve_available

from .loading import DEMO_MODEL_DIR, NOT_FOR_CLINICAL_USE, default_adapter, load_model_and_processor
from .processing.image_loading_qilin import ImageLoadingError, load_image
from .processing.processing_qilin import check_chat_messages

if is_serve_available():
    from fastapi import HTTPException
    from transformers.cli.serving.chat_completion import ChatCompletionHandler
    from transformers.cli.serving.completion import CompletionHandler
    from transformers.cli.serving.model_manager import ModelManager
    from transformers.cli.serving.response import ResponseHandler
    from transformers.cli.serving.server import build_server
    from transformers.cli.serving.utils import GenerationState, Modality
else:  # `build_app` raises SERVE_EXTRA_MISSING before any of these is used.
    ChatCompletionHandler = CompletionHandler = ModelManager = ResponseHandler = object

SERVE_EXTRA_MISSING = "Serving needs transformers' serving extra: pip install 'qilin-med-vl[serve]'"
CONTINUOUS_BATCHING_UNSUPPORTED = (
    "--continuous-batching is not supported for Qilin-Med-VL: transformers' continuous batching schedules token ids "
    "only (ContinuousBatchingManager.add_request takes input_ids, and each step calls the model with the packed "
    "input_ids and position_ids, no pixel_values), so the images would never reach the model; transformers serve "
    "itself uses it for text-only models alone (GenerationState.use_continuous_batching requires Modality.LLM). HiA "
    "also reads one sample per batch row, its image tokens and its last instruction token in the same prefill "
    "forward, where continuous batching packs several requests into one row and splits long prompts across steps. "
    "Requests are served by generate(), one at a time, in arrival order."
)
QUANTIZATION_CHOICES = ("bnb-4bit", "bnb-8bit")
# Endpoints of transformers serve that Qilin-Med-VL does not serve (audio; typed decisions).
NOT_SERVED = "Qilin-Med-VL serves /v1/chat/completions, /v1/responses and /v1/completions only"


# ----------------------------------------------------------------------------------------------------------------
# Images: base64 data URLs only, read by the package's loader
# ----------------------------------------------------------------------------------------------------------------


class InvalidRequestError(ValueError):
    """A request the model cannot read (a bad image, a message the chat template does not render): answered with
    status 400 and OpenAI's error body, `{"error": {"message": ..., "type": "invalid_request_error", ...}}`, whose
    message OpenAI's clients show."""


def invalid_request_response(request, error: InvalidRequestError):
    from fastapi.responses import JSONResponse

    body = {"message": str(error), "type": "invalid_request_error", "param": "messages", "code": None}
    return JSONResponse({"error": body}, status_code=400)


def decode_data_url(url) -> Image.Image:
    """An 8-bit RGB PIL image from a `data:<media type>;base64,<data>` URL (PNG, JPEG, DICOM and the other formats
    `qilin_med_vl.load_image` reads, with its size limits). Raises `ImageLoadingError` for anything else: http(s)
    URLs and file paths are refused, the server neither fetches nor opens them."""
    if not isinstance(url, str) or not url.startswith("data:"):
        shown = f"{url[:60]!r}" if isinstance(url, str) else f"a {type(url).__name__}"
        raise ImageLoadingError(
            f"images must be base64 data URLs (data:image/png;base64,...), got {shown}: the server does not fetch "
            "URLs or read its own files"
        )
    header, comma, payload = url.partition(",")
    if not comma or not header.endswith(";base64"):
        raise ImageLoadingError(f"the data URL {header[:60]!r}... is not base64 (expected data:<type>;base64,<data>)")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as error:
        raise ImageLoadingError(f"the data URL's payload is not valid base64 ({error})") from error
    if not data:
        raise ImageLoadingError("the data URL holds no data")
    # Through a file, so DICOM is recognised and windowed the same way as on the command line.
    with tempfile.NamedTemporaryFile(prefix="qilin-serve-") as file:
        file.write(data)
        file.flush()
        try:
            return load_image(file.name)
        except ImageLoadingError as error:
            raise ImageLoadingError(str(error).replace(file.name, "the image")) from None


class QilinImagesMixin:
    """Replaces the `{"type": "image", "url": ...}` blocks transformers makes of `image_url` / `input_image` parts
    by decoded images, and checks the messages, so a bad request is a 400 before the model is touched. The
    processor's own refusals (a prompt over the length limit once its images are expanded, ...) are 400s too."""

    async def handle_request(self, body: dict, request_id: str):
        try:
            return await super().handle_request(body, request_id)
        except InvalidRequestError:
            raise
        except ValueError as error:
            # What the processor and `generate` refuse before generating (the package's errors name the problem).
            raise InvalidRequestError(str(error)) from error

    def get_processor_inputs_from_messages(self, messages: list[dict], modality) -> list[dict]:
        processor_inputs = super().get_processor_inputs_from_messages(messages, modality)
        image_number = 0
        for message_number, message in enumerate(processor_inputs):
            if not isinstance(message.get("content"), list):
                continue
            for block in message["content"]:
                if block.get("type") != "image":
                    continue
                try:
                    block["image"] = decode_data_url(block.pop("url", None))
                except ImageLoadingError as error:
                    raise InvalidRequestError(f"message {message_number}, image {image_number}: {error}") from None
                image_number += 1
        try:
            check_chat_messages(processor_inputs)
        except ValueError as error:
            raise InvalidRequestError(str(error)) from None
        return processor_inputs


class QilinChatCompletionHandler(QilinImagesMixin, ChatCompletionHandler):
    """transformers' `/v1/chat/completions` handler, with images decoded by the package (`QilinImagesMixin`)."""


class QilinResponseHandler(QilinImagesMixin, ResponseHandler):
    """transformers' `/v1/responses` handler, with images decoded by the package (`QilinImagesMixin`)."""


class NotServedHandler:
    """Stands for the handlers of transformers serve's endpoints that this model does not serve."""

    async def handle_request(self, *args, **kwargs):
        raise HTTPException(status_code=404, detail=NOT_SERVED)


# ----------------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------------


class QilinModelManager(ModelManager):
    """transformers serve's `ModelManager`, pinned to one Qilin-Med-VL model that it loads (at start-up, and again
    after a `/reset`) with `qilin_med_vl.loading.load_model_and_processor`.

    Args:
        served_model_name: the name requests give as `model` (and `/v1/models` lists).
        load_kwargs: `load_model_and_processor`'s arguments (`model`, `adapter`, `device`, `dtype`, ...).
    """

    def __init__(self, served_model_name: str, **load_kwargs):
        self.load_kwargs = load_kwargs
        self._model_of_processor = None
        # Loads the model at once (transformers' `force_model`), which is never unloaded for inactivity.
        super().__init__(device=str(load_kwargs.get("device") or "cpu"), force_model=served_model_name)

    def load_model_and_processor(self, model_id_and_revision: str, **kwargs):
        pinned = self.process_model_name(self.force_model)
        if model_id_and_revision != pinned or kwargs.get("gguf_file") is not None:
            raise ValueError(f"This server serves {self.force_model!r} only; it does not load other models")
        return super().load_model_and_processor(model_id_and_revision, **kwargs)

    # transformers loads the processor, then the model, both under the model's lock; the package loads the two
    # together (the processor's high-resolution size follows the adapter), so the model waits for `_load_model`.
    # These are private methods of transformers' ModelManager (5.23-5.24): tests/test_serving.py runs on both ends
    # of the supported range, so a release that renames them fails CI before it is allowed.
    def _load_processor(self, model_id_and_revision: str, gguf_file: str | None = None):
        self._model_of_processor, processor = load_model_and_processor(**self.load_kwargs)
        return processor

    def _load_model(self, model_id_and_revision: str, **kwargs):
        model, self._model_of_processor = self._model_of_processor, None
        return model

    def list_models(self, cache_dir: str | None = None) -> list[dict]:
        """`/v1/models`: the served model alone (transformers 5.23 listed every model of the machine's Hub cache)."""
        status = "loaded" if self.loaded_models else "unloaded"
        return [{"id": self.force_model, "object": "model", "created": 0, "owned_by": "local",
                 "status": {"value": status}}]

    get_gen_models = list_models  # the name transformers 5.23's server calls

    @staticmethod
    def process_model_name(model_id: str) -> str:
        # Models are not looked up on the Hub by name (no "@main" revision): the served name is the model's name.
        return model_id

    @staticmethod
    def get_model_modality(model, processor=None) -> "Modality":
        # transformers recognises vision-language models by class name among its own; this one is out of tree.
        return Modality.VLM


# ----------------------------------------------------------------------------------------------------------------
# The app
# ----------------------------------------------------------------------------------------------------------------


def resolve_adapter(model: str, adapter: str | None) -> str | None:
    """`"auto"`: the model folder's `hia/` adapter when there is one; `None` or `"none"`: the base model alone."""
    if adapter == "auto":
        return default_adapter(model)
    return None if adapter in (None, "none") else adapter


def check_options(continuous_batching: bool = False, quantization: str | None = None) -> None:
    """Raise before anything is loaded: `ValueError` for continuous batching (`CONTINUOUS_BATCHING_UNSUPPORTED`) or
    an unknown quantization, `ImportError` without transformers' serving extra."""
    if continuous_batching:
        raise ValueError(CONTINUOUS_BATCHING_UNSUPPORTED)
    if quantization not in (None, *QUANTIZATION_CHOICES):
        raise ValueError(f"quantization must be one of {QUANTIZATION_CHOICES}, got {quantization!r}")
    if not is_serve_available():
        raise ImportError(SERVE_EXTRA_MISSING)


def build_app(
    model: str | os.PathLike | None = None,
    adapter: str | None = "auto",
    *,
    served_model_name: str | None = None,
    device: str | None = "auto",
    dtype: str | None = None,
    quantization: str | None = None,
    allow_missing_weights: bool = False,
    continuous_batching: bool = False,
    enable_cors: bool = False,
):
    """transformers serve's FastAPI app, serving `model` (default: the embedded demo model) with `adapter`.

    Args:
        model: a local folder or Hub repo id.
        adapter: `"auto"` (the model folder's `hia/` adapter when present), `"hia"`, an adapter folder or repo id,
            or `None` / `"none"` for the base model alone.
        served_model_name: the name clients pass as `model` (default: `model` as given).
        device, dtype, allow_missing_weights: as for `qilin_med_vl.loading.load_model_and_processor`.
        quantization: `"bnb-4bit"` or `"bnb-8bit"` (bitsandbytes, language model only).
        continuous_batching: refused with `CONTINUOUS_BATCHING_UNSUPPORTED` (a `ValueError`).
        enable_cors: allow requests from any web origin.

    The model is loaded before this returns. Raises `ImportError` without transformers' serving extra.
    """
    check_options(continuous_batching, quantization)
    model = os.fspath(model) if model is not None else str(DEMO_MODEL_DIR)
    model_manager = QilinModelManager(
        served_model_name or model,
        model=model,
        adapter=resolve_adapter(model, adapter),
        device=device,
        dtype=dtype,
        load_in_4bit=quantization == "bnb-4bit",
        load_in_8bit=quantization == "bnb-8bit",
        allow_missing_weights=allow_missing_weights,
    )
    generation_state = GenerationState()
    app = build_server(
        model_manager,
        QilinChatCompletionHandler(model_manager, generation_state),
        completion_handler=CompletionHandler(model_manager, generation_state),
        response_handler=QilinResponseHandler(model_manager, generation_state),
        transcription_handler=NotServedHandler(),
        systemone_handler=NotServedHandler(),
        generation_state=generation_state,
        enable_cors=enable_cors,
    )
    app.add_exception_handler(InvalidRequestError, invalid_request_response)
    app.state.model_manager = model_manager  # the loaded model: `model_manager.loaded_models`
    return app


def serve(model: str | os.PathLike | None = None, adapter: str | None = "auto", host: str = "127.0.0.1",
          port: int = 8000, log_level: str = "info", **options) -> None:
    """Load the model, then answer OpenAI-compatible requests on `host:port` until interrupted. `options` go to
    `build_app`. The server has no authentication: bind it to 127.0.0.1 (the default) behind a proxy that has."""
    import uvicorn

    check_options(options.get("continuous_batching", False), options.get("quantization"))
    model = os.fspath(model) if model is not None else str(DEMO_MODEL_DIR)
    resolved = resolve_adapter(model, adapter)
    print(f"Serving {model} as {options.get('served_model_name') or model!r}, "
          + (f"with the HiA adapter {resolved!r}" if resolved else "without an adapter (base model only"
             + ("; --adapter hia loads a Hub repo's HiA)" if not os.path.isdir(model) else ")")),
          file=sys.stderr)
    if os.path.realpath(model) == os.path.realpath(DEMO_MODEL_DIR):
        print(NOT_FOR_CLINICAL_USE, file=sys.stderr)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {host} without authentication or TLS: put an authenticating proxy in front",
              file=sys.stderr)
    app = build_app(model, resolved or "none", **options)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
