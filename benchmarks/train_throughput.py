"""Full BYOL-A training step (augmentation included), samples/s, v1 d=512 and d=2048.

    python benchmarks/train_throughput.py --backend jax [--batch 64] [--steps 12] [--out JSON]

The core issue's entry point: `bench_train_step.py` restricted to the two v1
widths at batch 64 by default. One process per backend (run it three times, or
`benchmarks/run_all.sh`). Prints a table and writes JSON.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_train_step  # noqa: E402

if __name__ == "__main__":
    bench_train_step.main(
        name="train_throughput",
        parser=bench_train_step.build_parser(__doc__.splitlines()[0], cases=("v1-512", "v1-2048")),
    )
