# Copyright 2026 The qilin-med-vl Authors. Licensed under the Apache License, Version 2.0.
"""The web demo for comparative reading: a Gradio app (`qilin-med-vl app`, or `app.py` as a Hub Space).

Upload 1 to 4 images (PNG, JPEG, DICOM), pick a task preset or type a question, read the streamed answer and, with
HiA on, one heatmap per image of where its instruction-aware queries looked on the high-resolution view. The model
is loaded once and shared by all visitors; requests that need it wait in one queue.

This module holds the page: its logic as plain functions of the page's values, and the Gradio layout (`build_app`,
which needs `pip install 'qilin-med-vl[app]'`). The model (`model.py`) and the uploads (`uploads.py`) need no Gradio.
"""

import logging
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

from PIL import Image

from ..loading import NOT_FOR_CLINICAL_USE
from .model import DEFAULT_MAX_NEW_TOKENS, ModelManager, ModelSpec, quantization_available
from .prompts import (
    FREE_TEXT,
    MAX_IMAGES,
    TASKS,
    AppInputError,
    build_messages,
    check_question,
    image_caption,
    preset_prompt,
)
from .uploads import UploadedImage, read_images

logger = logging.getLogger(__name__)

MAX_UPLOAD_SIZE = "200mb"
GRADIO_MISSING_MESSAGE = "The web demo needs Gradio: pip install 'qilin-med-vl[app]'"
APP_NOTICE = ("注意：输出仅供研究演示，不可用于临床诊断或治疗决策。 "
              "(Outputs are a research demo, not for clinical use.)")
QUANTIZATION_CHOICES = (("无 · none", "none"), ("8-bit", "8bit"), ("4-bit", "4bit"))


# ----------------------------------------------------------------------------------------------------------------
# Page logic (plain functions of the page's values, so they can be tested without a browser)
# ----------------------------------------------------------------------------------------------------------------


def error_markdown(message: str) -> str:
    return f"⚠️ {message}"


def thumbnails(images: list[UploadedImage]) -> list[tuple[Image.Image, str]]:
    return [(item.display, image_caption(index, item.name) + (f" · {item.note}" if item.note else ""))
            for index, item in enumerate(images)]


def heatmap_gallery(heatmaps: list[Image.Image]) -> list[tuple[Image.Image, str]]:
    return [(image, f"{image_caption(index)} · HiA") for index, image in enumerate(heatmaps)]


def chat_messages(turns: list[tuple[str, str]]) -> list[dict]:
    messages = []
    for question, answer in turns:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return messages


@dataclass
class Conversation:
    """Per-browser-session state: the files the turns are about and the `(question, answer)` turns so far."""

    files: list[str] = field(default_factory=list)
    turns: list[tuple[str, str]] = field(default_factory=list)


def file_paths(files) -> list[str]:
    if not files:
        return []
    files = files if isinstance(files, (list, tuple)) else [files]
    return [os.fspath(getattr(item, "name", item)) for item in files]


def answer_stream(manager: ModelManager, files, question: str, use_hia: bool, max_new_tokens: int,
                  conversation: Conversation | None) -> Iterator[tuple[list[dict], list, str, Conversation, str]]:
    """The send button: yields `(chat, heatmaps, status, conversation, prompt)` as the answer streams; `heatmaps` is
    a gallery value when it changes and None when the page should keep what it shows. Bad input and failures end
    in a readable status line, never a traceback."""
    conversation = conversation or Conversation()
    chat = chat_messages(conversation.turns)
    try:
        paths = file_paths(files)
        if paths != conversation.files:  # new images: a new conversation
            conversation = Conversation(files=paths)
            chat = []
        images = read_images(paths)
        question = check_question(question)
        loaded = manager.get()
        messages = build_messages([item.image for item in images], conversation.turns, question)
        prompt = loaded.render_prompt(messages)
        hia_note = ""
        if use_hia and not loaded.has_hia:
            hia_note = "此模型未加载 HiA 适配器，无热力图。 (No HiA adapter loaded: no heatmaps.)"
        elif not use_hia:
            hia_note = "HiA 已关闭：无热力图。 (HiA off: no heatmaps.)"
        status = "生成中… · generating…"
        yield chat + [{"role": "user", "content": question}], [], status, conversation, prompt
        shown_heatmaps = False
        for update in loaded.stream([item.image for item in images], messages, use_hia, int(max_new_tokens),
                                    display_images=[item.display for item in images]):
            heatmaps = None  # unchanged: the page keeps what it shows
            if update.heatmaps and not shown_heatmaps:
                heatmaps, shown_heatmaps = heatmap_gallery(update.heatmaps), True
            shown = chat + [{"role": "user", "content": question}, {"role": "assistant", "content": update.text}]
            if update.done:
                conversation = Conversation(conversation.files, [*conversation.turns, (question, update.text)])
                status = " ".join(part for part in ("完成 · done.", hia_note) if part)
            yield shown, heatmaps, status, conversation, prompt
    except AppInputError as error:
        yield chat, [], error_markdown(str(error)), conversation, ""
    except Exception as error:
        logger.exception("generation failed")
        yield chat, [], error_markdown(f"出错了 · Something went wrong: {type(error).__name__}: {error}"), \
            conversation, ""


def on_upload(files, task: str, language: str):
    """New files: thumbnails, a reset conversation, and the preset question re-filled for the new image count.
    Returns `(thumbnails, status, prompt or None to keep it)`."""
    paths = file_paths(files)
    if not paths:
        return [], "", None
    try:
        images = read_images(paths)
    except AppInputError as error:
        return [], error_markdown(str(error)), None
    status = f"已上传 {len(images)} 张图片。 ({len(images)} image(s) ready.)"
    prompt = None
    if task and task != FREE_TEXT:
        try:
            prompt = preset_prompt(task, len(images), language)
        except AppInputError as error:
            status = error_markdown(str(error))
    return thumbnails(images), status, prompt


def on_preset(files, task: str, language: str):
    """A task preset or the language was chosen: `(prompt or None to keep it, status)`."""
    if not task or task == FREE_TEXT:
        return None, ""
    try:
        return preset_prompt(task, len(file_paths(files)), language), ""
    except AppInputError as error:
        return None, error_markdown(str(error))


def on_load_model(manager: ModelManager, model: str, adapter: str, quantization: str):
    """The load button: `(model status, HiA checkbox value)`. Refused unless the server was started with
    `--allow-model-switching` (checked here, not only by hiding the button: the event is reachable by API)."""
    if not manager.allow_model_switching:
        return error_markdown(
            "模型由服务器启动者选定。 (The model is chosen by whoever started the server: restart it with --model, or "
            "with --allow-model-switching to let visitors load models.)"), manager.loaded is not None and \
            manager.loaded.has_hia
    try:
        spec = ModelSpec.create(model, adapter="auto" if (adapter or "").strip() == "auto" else adapter,
                                quantization=quantization, device=manager.spec.device, dtype=manager.spec.dtype)
        loaded = manager.get(spec)
    except AppInputError as error:
        return error_markdown(str(error)), False
    return manager.describe(), loaded.has_hia


# ----------------------------------------------------------------------------------------------------------------
# The Gradio page
# ----------------------------------------------------------------------------------------------------------------

CSS = """
#notice {border: 2px solid #d97706; background: #fffbeb; border-radius: 8px; padding: 6px 12px; color: #7c2d12;}
#notice p {margin: 0; font-weight: 600;}
#status p {margin: 0;}
"""


def build_app(manager: ModelManager | None = None, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS):
    """The Gradio Blocks page around `manager` (default: the embedded demo model, HiA on). Launch it with
    `launch(demo)` or `demo.launch(**launch_kwargs())`."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    manager = manager or ModelManager()
    spec = manager.spec
    with gr.Blocks(title="Qilin-Med-VL · HiA 对比阅片", analytics_enabled=False, delete_cache=(1800, 3600)) as demo:
        gr.Markdown("# Qilin-Med-VL · HiA 对比阅片演示\nComparative reading with Qilin-Med-VL and the HiA "
                    "high-resolution adapter. 上传 1–4 张图片（PNG / JPEG / DICOM），选择任务或自由提问。")
        gr.Markdown(NOT_FOR_CLINICAL_USE if spec.is_demo else APP_NOTICE, elem_id="notice")
        conversation = gr.State(Conversation())
        with gr.Row():
            with gr.Column(scale=2):
                upload = gr.File(label=f"上传图片 · Upload 1–{MAX_IMAGES} images (PNG / JPEG / DICOM)",
                                 file_count="multiple", type="filepath", elem_id="upload", height=140)
                gallery = gr.Gallery(label="图片（提示中的顺序）· Images, in prompt order", columns=MAX_IMAGES,
                                     height=230, object_fit="contain", elem_id="thumbnails", interactive=False,
                                     allow_preview=True)
                heatmaps = gr.Gallery(label="HiA 注意力热力图 · where HiA looked (high-resolution view)",
                                      columns=MAX_IMAGES, height=230, object_fit="contain", elem_id="heatmaps",
                                      interactive=False)
                with gr.Accordion("模型 · Model", open=False):
                    switching = manager.allow_model_switching
                    model_box = gr.Textbox(label="本地路径或 repo id · local folder or Hub repo id",
                                           value=spec.model, elem_id="model-path", interactive=switching)
                    adapter_box = gr.Textbox(label='适配器 · adapter ("hia" = the model\'s hia/ folder; empty = none)',
                                             value=spec.adapter or "", elem_id="model-adapter", interactive=switching)
                    quantization = gr.Radio(QUANTIZATION_CHOICES, value=spec.quantization or "none",
                                            label="量化 · quantization (bitsandbytes + GPU)",
                                            visible=switching and quantization_available())
                    load_button = gr.Button("加载 · Load", elem_id="load-model", visible=switching)
                    model_status = gr.Markdown(manager.describe(), elem_id="model-status")
            with gr.Column(scale=3):
                with gr.Row():
                    language = gr.Radio([("中文", "zh"), ("English", "en")], value="zh", label="语言 · Language",
                                        elem_id="language", scale=1)
                    task = gr.Radio([(label, key) for key, label in TASKS], value=FREE_TEXT,
                                    label="任务 · Task preset", elem_id="preset", scale=3)
                prompt = gr.Textbox(label="问题 · Question", lines=3, elem_id="prompt",
                                    placeholder="例如：第一张和第二张分别是患者治疗前后的影像，请对比两张图片。")
                with gr.Row():
                    use_hia = gr.Checkbox(value=spec.adapter is not None, label="HiA 高分辨率适配器 · HiA on",
                                          elem_id="hia-switch")
                    tokens = gr.Slider(8, 512, value=max_new_tokens, step=8, label="最多生成 token · max new tokens")
                with gr.Row():
                    send = gr.Button("发送 · Send", variant="primary", elem_id="send")
                    clear = gr.Button("新对话 · New chat", elem_id="clear")
                status = gr.Markdown("", elem_id="status")
                chatbot = gr.Chatbot(label="回答 · Answer", height=380, elem_id="chat", render_markdown=False,
                                     buttons=["copy"], feedback_options=None)
                with gr.Accordion("发送给模型的提示 · Prompt as the model reads it", open=False):
                    prompt_view = gr.Textbox(show_label=False, lines=4, interactive=False, elem_id="prompt-view")

        def _keep(value):
            return gr.update() if value is None else value

        def upload_changed(files, task_value, language_value):
            thumbs, message, question = on_upload(files, task_value, language_value)
            return thumbs, message, _keep(question), [], [], Conversation(file_paths(files)), ""

        upload.change(upload_changed, [upload, task, language],
                      [gallery, status, prompt, chatbot, heatmaps, conversation, prompt_view],
                      concurrency_limit=None, show_progress="minimal")

        def preset_changed(files, task_value, language_value):
            question, message = on_preset(files, task_value, language_value)
            return _keep(question), message

        for control in (task, language):
            control.change(preset_changed, [upload, task, language], [prompt, status], concurrency_limit=None,
                           show_progress="hidden")

        def send_clicked(files, question, hia_value, tokens_value, state):
            for chat, maps, message, new_state, rendered in answer_stream(manager, files, question, hia_value,
                                                                           tokens_value, state):
                yield chat, _keep(maps), message, new_state, rendered

        send_inputs = [upload, prompt, use_hia, tokens, conversation]
        send_outputs = [chatbot, heatmaps, status, conversation, prompt_view]
        for trigger in (send.click, prompt.submit):
            trigger(send_clicked, send_inputs, send_outputs, concurrency_id="model", concurrency_limit=1)

        clear.click(lambda files: ([], [], "", Conversation(file_paths(files)), ""), [upload],
                    [chatbot, heatmaps, status, conversation, prompt_view], concurrency_limit=None)

        load_button.click(lambda *values: on_load_model(manager, *values), [model_box, adapter_box, quantization],
                          [model_status, use_hia], concurrency_id="model", concurrency_limit=1)
    demo.queue(default_concurrency_limit=1, max_size=64)
    return demo


def launch_kwargs(host: str = "127.0.0.1", port: int | None = None) -> dict:
    """Offline, no share link, no tracebacks in the page."""
    import gradio as gr

    return dict(server_name=host, server_port=port, share=False, show_error=False, ssr_mode=False,
                max_file_size=MAX_UPLOAD_SIZE, theme=gr.themes.Default(), css=CSS, footer_links=[],
                mcp_server=False, pwa=False)


def serve(model: str | None = None, adapter: str | None = "auto", quantization: str | None = None,
          device: str | None = None, dtype: str | None = None, host: str = "127.0.0.1", port: int | None = None,
          max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, allow_model_switching: bool = False) -> int:
    """Load the model, then serve the page until interrupted (Ctrl-C or SIGTERM); returns the exit status.

    `model` None is the embedded demo model; `adapter` "auto" loads `hia/` when the model folder has one, None
    serves the base model; `quantization` "4bit", "8bit" or None. Uploads live in a temporary directory that is
    removed on exit."""
    import importlib.util

    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    if importlib.util.find_spec("gradio") is None:  # not imported yet: GRADIO_TEMP_DIR must be set first
        print(GRADIO_MISSING_MESSAGE, file=sys.stderr)
        return 1
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    spec = ModelSpec.create(model, adapter, quantization, device, dtype)
    manager = ModelManager(spec, allow_model_switching=allow_model_switching)
    try:
        manager.get()
    except AppInputError as error:
        if not spec.is_demo:
            print(f"error: {error}", file=sys.stderr)
            return 1
        print(f"warning: {error}", file=sys.stderr)  # the page explains it and offers the model box
    print(NOT_FOR_CLINICAL_USE if spec.is_demo else APP_NOTICE, file=sys.stderr)
    print(manager.describe().replace("`", ""), file=sys.stderr)

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt) if threading.current_thread() is threading.main_thread() \
        else None
    with tempfile.TemporaryDirectory(prefix="qilin-med-vl-app-") as upload_dir:
        # Gradio keeps uploads and the images it serves under GRADIO_TEMP_DIR (read when it is imported and when
        # the server starts): here, a folder that goes away with the server.
        os.environ["GRADIO_TEMP_DIR"] = upload_dir
        print(f"uploads: {upload_dir} (removed on exit)", file=sys.stderr, flush=True)
        demo = None
        try:
            demo = build_app(manager, max_new_tokens=max_new_tokens)
            demo.launch(**launch_kwargs(host, port))
        except KeyboardInterrupt:
            pass
        finally:
            if demo is not None:
                demo.close()
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
    print("server stopped; uploads removed", file=sys.stderr, flush=True)
    return 0
