# Copyright 2026 The qilin-med-vl Authors. Licensed under the Apache License, Version 2.0.
"""The web demo: `qilin-med-vl app` (or `python app.py`, the Hub Space entry point).

- `prompts`: task presets (Chinese and English) and chat messages, images labelled 第一张, 第二张, ...
- `heatmap`: HiA attentions -> one heatmap per image, mapped back from the padded square (numpy and PIL only).
- `uploads`: uploaded files -> the model's images and display copies (DICOM windowed as the processor does).
- `model`: the shared model: loading, switching, streaming answers with HiA on or off (no Gradio needed).
- `server`: the page's logic and the Gradio page (`pip install 'qilin-med-vl[app]'`), and `serve`.

Importing this package does not import Gradio.
"""

from .heatmap import attention_maps, heatmap_overlays, map_to_image, overlay
from .prompts import TASKS, AppInputError, build_messages, image_label, preset_prompt

__all__ = ["TASKS", "AppInputError", "attention_maps", "build_messages", "heatmap_overlays", "image_label",
           "map_to_image", "overlay", "preset_prompt"]
