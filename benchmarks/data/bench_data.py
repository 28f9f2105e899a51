"""Data-loading benchmark: FFCV ImageNet pipeline vs PIL + torch DataLoader; same as
`kdengine bench data` (arguments pass through).

    python benchmarks/data/bench_data.py --num-images 3000 --workers 2 --epochs 5
"""
import sys

from kdengine.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "data", *sys.argv[1:]]))
