"""Command-line entry points behind ``tools/train.py`` and ``tools/eval.py``."""

import argparse
import logging
import signal
import sys
from pathlib import Path
from typing import Dict, List, Optional

from omegaconf import DictConfig

from sparsehead.config import ConfigError, load_config

from .checkpoint import atomic_write_json, load_trained_model
from .data import build_test_loader
from .distributed import configure_cpu, destroy_distributed, init_distributed, resolve_device
from .evaluation import evaluate, format_summary
from .logger import setup_logging
from .trainer import RunError, Stopped, Trainer, build_datasets, prepare_data

# The evaluation tool's own file: a training run's ``metrics.json`` in the same folder is left as it is.
EVAL_METRICS = "eval_metrics.json"

__all__ = ["train_main", "eval_main", "run_evaluation"]

logger = logging.getLogger("sparsehead")

# Errors whose message is the whole story: print it and exit 1, no traceback.
_USER_ERRORS = (ConfigError, RunError, FileNotFoundError, ValueError, FloatingPointError)


def _fail(err: BaseException) -> "SystemExit":
    """The exit with ``error: <message>`` on stderr; the message also goes to the run's log file, if open."""
    record = logging.LogRecord("sparsehead", logging.ERROR, __file__, 0, "%s", (err,), None)
    for handler in logging.getLogger("sparsehead").handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
    return SystemExit(f"error: {err}")


def train_main(argv: Optional[List[str]] = None) -> Dict[str, float]:
    """``train.py CONFIG [key=value ...] [--resume]``."""
    parser = argparse.ArgumentParser(
        description="Train an FCOS or RetinaNet detector with a plain, fixed or dynamic head."
    )
    parser.add_argument("config", help="YAML config file, or the name of a packaged config (e.g. demo)")
    parser.add_argument("overrides", nargs="*", help="config overrides as dotted.key=value")
    parser.add_argument(
        "--resume", action="store_true",
        help="continue from output_dir/checkpoint.pth with the saved run's settings (only solver.max_iter, "
             "the periods, data locations, workers, threads and device may change)",
    )
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        return Trainer(cfg, resume=args.resume).run()
    except Stopped as e:  # the trainer logged "stopped at iteration N; resume with --resume"
        raise SystemExit(128 + e.signum) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(128 + signal.SIGINT) from None
    except _USER_ERRORS as e:
        raise _fail(e) from None
    finally:
        destroy_distributed()


def run_evaluation(cfg: DictConfig, weights: str) -> Dict[str, float]:
    """Evaluate ``weights`` on ``cfg.data.val``; rank 0 writes ``output_dir/eval_metrics.json`` (replacing
    the previous evaluation's, never the training run's ``metrics.json``)."""
    from sparsehead.data import collate_fn

    if not Path(weights).is_file():
        raise FileNotFoundError(f"--weights file not found: {weights}")
    configure_cpu(cfg.num_threads, cfg.cpu_allocator)
    device = resolve_device(cfg.device)
    rank, world, device = init_distributed(device)
    out = Path(cfg.output_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    setup_logging(str(out), rank)
    model = load_trained_model(cfg, weights)
    prepare_data(cfg, rank)
    val_set = build_datasets(cfg, train=False)["val"]
    model.to(device).eval()
    loader = build_test_loader(val_set, collate_fn, cfg.test.ims_per_batch, cfg.data.num_workers, rank, world)
    logger.info("Evaluating %s on %s (%d images)", weights, cfg.data.val.ann_file, len(val_set))
    metrics = evaluate(model, loader, val_set, device)
    if rank == 0:
        atomic_write_json(metrics, out / EVAL_METRICS)
        print(f"[sparsehead] {out / EVAL_METRICS}: {format_summary(metrics)}", flush=True)
    return metrics


def eval_main(argv: Optional[List[str]] = None) -> Dict[str, float]:
    """``eval.py CONFIG --weights CKPT [key=value ...]``."""
    parser = argparse.ArgumentParser(
        description="Evaluate a detector: COCO AP and head GMACs."
    )
    parser.add_argument("config", help="YAML config file the weights were trained with (or a packaged config's name)")
    parser.add_argument("overrides", nargs="*", help="config overrides as dotted.key=value")
    parser.add_argument("--weights", required=True, help="checkpoint.pth / model_final.pth or a state dict")
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        return run_evaluation(cfg, args.weights)
    except _USER_ERRORS as e:
        raise _fail(e) from None
    finally:
        destroy_distributed()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(train_main())
