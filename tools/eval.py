"""Evaluate a detector: ``python tools/eval.py CONFIG --weights CKPT [key=value ...]``.

Writes ``output_dir/eval_metrics.json`` (COCO box AP as fractions and realised head GMACs per image),
replacing the previous evaluation's; a training run's ``metrics.json`` in that folder is left as it is.
"""
import sys

from sparsehead.cli import evaluate as main

if __name__ == "__main__":
    sys.exit(main())
