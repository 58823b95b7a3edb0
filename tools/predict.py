"""Detect objects in images with a trained model: ``python tools/predict.py CONFIG --weights CKPT
--input IMAGE_OR_DIR --out preds.json [--score-thresh 0.3] [--draw DIR] [--ann-file ANN]``.

Writes COCO-format results and, beside them, the realised head GMACs per image; see
``sparsehead.engine.predict``. Installed: ``sparsehead-predict``.
"""

import sys

from sparsehead.cli import predict as main

if __name__ == "__main__":
    sys.exit(main())
