"""Sweep a config over a grid: ``python tools/sweep.py CONFIG --grid KEY=V1,V2 [KEY=V1,V2 ...]
[--include-static] [--seeds 0,1,2] [--jobs N] --out DIR [key=value ...]``.

One training and evaluation run per grid point and seed; writes DIR/sweep.csv, sweep_points.csv, sweep.json
and sweep.png. Finished runs are never re-run. See ``sparsehead.engine.sweep`` and docs/sweep.md.
"""
import sys

from sparsehead.engine.sweep import main

if __name__ == "__main__":
    sys.exit(main())
