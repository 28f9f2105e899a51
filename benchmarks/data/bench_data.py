"""Data-loading benchmark, FFCV ImageNet pipeline vs PIL + torch DataLoader: `kdengine bench data`
appending to this repository's benchmarks/results/data.csv (arguments pass through; a later
--output or --no-save wins).

    python benchmarks/data/bench_data.py --num-images 3000 --workers 2 --epochs 5
"""
import sys
from pathlib import Path

from kdengine.cli import main

RESULTS = Path(__file__).resolve().parents[1] / "results" / "data.csv"

if __name__ == "__main__":
    sys.exit(main(["bench", "data", "--output", str(RESULTS), *sys.argv[1:]]))
