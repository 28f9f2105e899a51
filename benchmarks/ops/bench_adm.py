"""Benchmark of the ADM ops and ADMLoss: `kdengine bench ops` appending to this repository's
benchmarks/results/ops.csv (arguments pass through; a later --output or --no-save wins).

    python benchmarks/ops/bench_adm.py --cases cifar_r32x4_r8x4 --no-save
"""
import sys
from pathlib import Path

from kdengine.cli import main

RESULTS = Path(__file__).resolve().parents[1] / "results" / "ops.csv"

if __name__ == "__main__":
    sys.exit(main(["bench", "ops", "--output", str(RESULTS), *sys.argv[1:]]))
