# Copyright 2026 The qilin-med-vl Authors. Licensed under the Apache License, Version 2.0.
"""Hugging Face Space entry point: the Qilin-Med-VL web demo on the embedded demo model.

A Space (SDK gradio, `app_file: app.py`) runs `python app.py`; it sets GRADIO_SERVER_NAME / GRADIO_SERVER_PORT, which
the app reads. Locally: `python app.py [--model PATH_OR_REPO] [--port 7860]`, the same as `qilin-med-vl app`.
"""

import os
import sys

# Run from a checkout (as a Space does) without installing the package first.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from qilin_med_vl.app.server import main  # noqa: E402  (after the sys.path line)

if __name__ == "__main__":
    sys.exit(main())
