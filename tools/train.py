"""Train a detector: ``python tools/train.py CONFIG [key=value ...] [--resume]``.

Multi-process: ``torchrun --nproc_per_node=N tools/train.py CONFIG ...``.
"""
import sys

from sparsehead.cli import train as main

if __name__ == "__main__":
    sys.exit(main())
