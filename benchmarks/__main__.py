# Copyright 2026 The qilin-med-vl Authors. Licensed under the Apache License, Version 2.0.
"""`python -m benchmarks [--suites ...] [--quick] [--gpu] [--gpu-smoke-test]` from the repository root."""

import sys

from .cli import main

# Guarded although `python -m` always runs this as __main__: processes the suites spawn must not start the CLI again.
if __name__ == "__main__":
    sys.exit(main())
