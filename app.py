# Copyright 2026 The qilin-med-vl Authors. Licensed under the Apache License, Version 2.0.
"""Hugging Face Space entry point: the Qilin-Med-VL web demo on the embedded demo model.

The `qilin_med_vl` package must be installed: a Space (SDK gradio, `app_file: app.py`) installs it from this
repository through `requirements.txt` (`.[app]`); locally, `pip install -e ".[app]"`. The Space then runs
`python app.py`; it sets GRADIO_SERVER_NAME / GRADIO_SERVER_PORT, which the app reads. Locally:
`python app.py [--model PATH_OR_REPO] [--port 7860]`, the same as `qilin-med-vl app`.
"""

import os
import sys

# Analytics off unless the environment says otherwise; set before anything imports gradio.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from qilin_med_vl.cli import main  # noqa: E402  (after the environment variable above)

if __name__ == "__main__":
    sys.exit(main(["app", *sys.argv[1:]]))
