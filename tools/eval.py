"""Evaluate a detector: ``python tools/eval.py CONFIG --weights CKPT [key=value ...]``.

Writes ``output_dir/metrics.json`` (COCO box AP as fractions and realised head GMACs per image).
"""

from sparsehead.engine import eval_main

if __name__ == "__main__":
    eval_main()
