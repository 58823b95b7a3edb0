"""Benchmark dense vs sparse vs auto execution of the dynamic head: ``python tools/benchmark.py --quick``.

Writes ``--out``/benchmark.json, benchmark.csv and benchmark.png; ``--help`` lists the options.
"""
import sys

from sparsehead.cli import benchmark as main

if __name__ == "__main__":
    sys.exit(main())
