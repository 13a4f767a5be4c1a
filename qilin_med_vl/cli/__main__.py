# Copyright 2026 The qilin-med-vl Authors. Licensed under the Apache License, Version 2.0.
"""`python -m qilin_med_vl.cli ...`, the same as `qilin-med-vl ...` (for torchrun and accelerate launch)."""

import sys

from . import main

sys.exit(main())
