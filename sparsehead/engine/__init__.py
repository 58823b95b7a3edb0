"""Training and evaluation: trainer, checkpoints, distributed helpers, evaluation loop, logging."""

from .checkpoint import atomic_save, atomic_write_json, load_model_weights, read_checkpoint
from .distributed import all_gather_object, get_rank, get_world_size, init_distributed, is_main_process
from .evaluation import METRIC_KEYS, evaluate, format_summary
from .launch import eval_main, run_evaluation, train_main
from .logger import setup_logging
from .trainer import CHECKPOINT, FINAL_WEIGHTS, RunError, Trainer

__all__ = [
    "CHECKPOINT",
    "FINAL_WEIGHTS",
    "METRIC_KEYS",
    "RunError",
    "Trainer",
    "all_gather_object",
    "atomic_save",
    "atomic_write_json",
    "eval_main",
    "evaluate",
    "format_summary",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_main_process",
    "load_model_weights",
    "read_checkpoint",
    "run_evaluation",
    "setup_logging",
    "train_main",
]
