"""Logging to the console (through tqdm, so progress bars stay intact) and to ``output_dir/log.txt``."""

import logging
import os
import sys
from typing import Optional

from tqdm import tqdm

__all__ = ["setup_logging"]

_FORMAT = "[%(asctime)s %(name)s %(levelname)s] %(message)s"
_DATEFMT = "%m/%d %H:%M:%S"


class _TqdmHandler(logging.StreamHandler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except Exception:  # noqa: BLE001
            self.handleError(record)


def setup_logging(
    output_dir: Optional[str] = None, rank: int = 0, name: str = "sparsehead"
) -> logging.Logger:
    """Configure the ``sparsehead`` logger; rank 0 logs INFO to console and file, others WARNING."""
    logger = logging.getLogger(name)
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    logger.setLevel(logging.INFO)
    logger.propagate = False
    fmt = logging.Formatter(_FORMAT if rank == 0 else f"[rank {rank}] " + _FORMAT, datefmt=_DATEFMT)
    console = _TqdmHandler(sys.stderr)
    console.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    console.setFormatter(fmt)
    logger.addHandler(console)
    if output_dir is not None and rank == 0:
        os.makedirs(output_dir, exist_ok=True)
        fh = logging.FileHandler(os.path.join(output_dir, "log.txt"), mode="a")
        fh.setFormatter(fmt)
        logger.addHandler(fh)
    return logger
