"""Visualise a dynamic head: ``python tools/visualize.py CONFIG --weights CKPT (--input IMAGE_OR_FOLDER | --val)
--out DIR [--score-thresh 0.3] [key=value ...]``.

Writes 1600×900 PNGs: per image the detections, gate maps and work maps; with ``--val`` (or several images)
also a histogram of the realised head GMACs per image and the active fraction per router and level.
See ``sparsehead.visualization`` and docs/visualize.md.
"""
import sys

from sparsehead.cli import visualize as main

if __name__ == "__main__":
    sys.exit(main())
