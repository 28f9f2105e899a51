"""Benchmark of the ADM ops and ADMLoss; same as `kdengine bench ops` (arguments pass through).

    python benchmarks/ops/bench_adm.py --cases cifar_r32x4_r8x4 --no-save
"""
import sys

from kdengine.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "ops", *sys.argv[1:]]))
