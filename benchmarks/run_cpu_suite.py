"""CPU benchmark suite: `python benchmarks/run_cpu_suite.py [--suites llava,hia,table3,validate,quant] [--quick]`.

Same as `qilin-med-vl bench`; writes benchmarks/results/cpu_suite.{json,md,png}. See benchmarks/RESULTS.md.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qilin_med_vl.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
