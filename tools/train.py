"""Train a detector: ``python tools/train.py CONFIG [key=value ...] [--resume]``.

Multi-process: ``torchrun --nproc_per_node=N tools/train.py CONFIG ...``.
"""

from sparsehead.engine import train_main

if __name__ == "__main__":
    train_main()
