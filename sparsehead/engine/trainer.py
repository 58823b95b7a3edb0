"""Training loop: SGD with warm-up and step decay, checkpoints, periodic and final evaluation."""

import json
import logging
import math
import os
import random
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm import tqdm

from sparsehead.modeling.build import build_model

from .checkpoint import (
    atomic_save,
    atomic_write_json,
    atomic_write_text,
    get_rng_state,
    read_checkpoint,
    set_rng_state,
    unwrap,
)
from .compile import compile_for_training, evaluation_stance
from .data import build_test_loader, build_train_loader
from .distributed import all_reduce_mean, barrier, init_distributed, resolve_device, set_num_threads
from .evaluation import evaluate, format_summary, head_cost
from .logger import setup_logging
from .solver import build_lr_scheduler, build_optimizer

__all__ = ["Trainer", "RunError", "prepare_data", "build_datasets", "CHECKPOINT", "FINAL_WEIGHTS"]

logger = logging.getLogger("sparsehead")

CHECKPOINT = "checkpoint.pth"  # full training state, rewritten atomically every checkpoint_period
FINAL_WEIGHTS = "model_final.pth"  # model weights (and config) at the end of training
METRICS_LOG = "metrics.jsonl"
METRICS = "metrics.json"


class RunError(RuntimeError):
    """A run cannot start or continue; the message says why and what to do."""


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def prepare_data(cfg: DictConfig, rank: int) -> None:
    """Generate the synthetic dataset (rank 0, once) when enabled, then check the data paths exist."""
    syn = cfg.data.synthetic
    if syn.enabled:
        if rank == 0:
            from sparsehead.data import ensure_dataset

            ensure_dataset(
                syn.root, syn.num_train, syn.num_val, image_size=syn.image_size,
                num_classes=syn.num_classes, seed=syn.seed,
            )
        barrier()
    for split in ("train", "val"):
        ann, img = cfg.data[split].ann_file, cfg.data[split].img_dir
        if not os.path.isfile(ann):
            raise FileNotFoundError(f"data.{split}.ann_file not found: {ann}")
        if not os.path.isdir(img):
            raise FileNotFoundError(f"data.{split}.img_dir is not a directory: {img}")


def build_datasets(cfg: DictConfig, train: bool = True) -> Dict[str, Any]:
    """The val split (and the train split when ``train``), checked against ``model.num_classes``."""
    from sparsehead.data import CocoDetection, build_transforms

    out = {"val": CocoDetection(cfg.data.val.ann_file, cfg.data.val.img_dir, transforms=None, train=False)}
    if train:
        out["train"] = CocoDetection(
            cfg.data.train.ann_file,
            cfg.data.train.img_dir,
            transforms=build_transforms(True, cfg.data.flip_prob),
            train=True,
        )
    for split, ds in out.items():
        if ds.num_classes != cfg.model.num_classes:
            raise ValueError(
                f"model.num_classes={cfg.model.num_classes} but data.{split} ({cfg.data[split].ann_file}) "
                f"has {ds.num_classes} categories"
            )
    return out


class Trainer:
    """Trains the model ``cfg`` describes; ``run()`` returns the final evaluation metrics.

    Runs as one process or as one rank of a torchrun job (DistributedDataParallel). Rank 0 owns the
    output folder: ``config.yaml``, ``log.txt``, ``metrics.jsonl``, ``checkpoint.pth``,
    ``model_final.pth`` and ``metrics.json``.
    """

    def __init__(self, cfg: DictConfig, resume: bool = False) -> None:
        self.cfg = cfg
        self.resume = resume
        set_num_threads(cfg.num_threads)
        self.out = Path(cfg.output_dir)
        self.device = resolve_device(cfg.device)
        self.rank, self.world_size, self.device = init_distributed(self.device)
        self.is_main = self.rank == 0

    # -- hooks ---------------------------------------------------------------------------------
    def after_step(self, iteration: int) -> None:
        """Called after every completed iteration (``iteration`` counts completed steps)."""

    # -- setup ---------------------------------------------------------------------------------
    def _check_output_dir(self) -> Optional[Path]:
        ckpt = self.out / CHECKPOINT
        existing = [p.name for p in (ckpt, self.out / FINAL_WEIGHTS) if p.exists()]
        if existing and not self.resume:
            raise RunError(
                f"output_dir {self.out} already holds a run ({', '.join(existing)}); pass --resume to "
                "continue it, or choose another output_dir"
            )
        return ckpt if ckpt.exists() else None

    def _setup(self) -> None:
        cfg = self.cfg
        resume_from = self._check_output_dir()
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        barrier()
        setup_logging(str(self.out), self.rank)
        if self.resume and resume_from is None:
            logger.warning("--resume: no %s in %s; starting from scratch", CHECKPOINT, self.out)
        logger.info("Running on %s with %d process(es)", self.device, self.world_size)
        if self.is_main:
            atomic_write_text(OmegaConf.to_yaml(cfg), self.out / "config.yaml")

        seed_all(cfg.seed)
        prepare_data(cfg, self.rank)
        sets = build_datasets(cfg, train=True)
        self.train_set, self.val_set = sets["train"], sets["val"]
        logger.info("train: %d images, val: %d images, %d classes",
                    len(self.train_set), len(self.val_set), self.train_set.num_classes)

        model = build_model(cfg).to(self.device)
        if cfg.solver.compile:
            compile_for_training(model)
        self.optimizer = build_optimizer(model, cfg.solver)
        self.scheduler = build_lr_scheduler(self.optimizer, cfg.solver)
        self.use_amp = bool(cfg.solver.amp) and self.device.type == "cuda"
        if cfg.solver.amp and not self.use_amp:
            logger.warning("solver.amp is only used on CUDA; training in float32 on %s", self.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.start_iter = 0
        if resume_from is not None:
            ckpt = read_checkpoint(resume_from)
            unwrap(model).load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
            self.scaler.load_state_dict(ckpt["scaler"])
            set_rng_state(ckpt["rng"])
            self.start_iter = int(ckpt["iteration"])
            sampler = ckpt.get("sampler", {})
            for key, now in (("seed", cfg.seed), ("ims_per_batch", cfg.solver.ims_per_batch)):
                if sampler.get(key, now) != now:
                    logger.warning(
                        "%s changed from %s to %s since the checkpoint: the data order differs from the "
                        "interrupted run's", key, sampler[key], now,
                    )
            logger.info("Resumed from %s at iteration %d", resume_from, self.start_iter)
        if self.is_main:
            self._truncate_metrics_log(self.start_iter)

        if self.world_size > 1:
            # Gated paths that are inactive everywhere in a batch get no gradient, so DDP must be told
            # that parameters may go unused; the plain and fixed heads use every parameter.
            find_unused = cfg.model.head.kind == "dynamic"
            model = nn.parallel.DistributedDataParallel(
                model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=find_unused,
            )
        self.model = model

        from sparsehead.data import collate_fn

        self.collate_fn = collate_fn
        self.train_loader = build_train_loader(
            self.train_set, collate_fn, cfg.solver.ims_per_batch, cfg.seed, self.start_iter,
            cfg.solver.max_iter, cfg.data.num_workers, self.rank, self.world_size,
        )
        self.val_loader = build_test_loader(
            self.val_set, collate_fn, cfg.test.ims_per_batch, cfg.data.num_workers, self.rank, self.world_size
        )

    def _truncate_metrics_log(self, start_iter: int) -> None:
        """Drop records past ``start_iter`` (written after the checkpoint a resumed run restarts from)."""
        path = self.out / METRICS_LOG
        if not path.exists():
            return
        keep: List[str] = []
        if start_iter > 0:
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if rec.get("iteration", 0) <= start_iter:
                    keep.append(line)
        atomic_write_text("".join(line + "\n" for line in keep), path)

    # -- state ---------------------------------------------------------------------------------
    def save_checkpoint(self, iteration: int) -> None:
        if not self.is_main:
            return
        state = {
            "model": unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "iteration": iteration,
            "seed": self.cfg.seed,
            "rng": get_rng_state(),
            # The data order is a function of these (see sparsehead.engine.data).
            "sampler": {
                "seed": self.cfg.seed, "iteration": iteration, "ims_per_batch": self.cfg.solver.ims_per_batch
            },
            "config": OmegaConf.to_yaml(self.cfg),
        }
        atomic_save(state, self.out / CHECKPOINT)
        logger.info("Saved checkpoint at iteration %d to %s", iteration, self.out / CHECKPOINT)

    def _write_metrics(self, record: Dict[str, Any]) -> None:
        with open(self.out / METRICS_LOG, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()

    # -- loop ----------------------------------------------------------------------------------
    def _step(
        self, images: List[torch.Tensor], targets: List[Dict[str, Any]], iteration: int
    ) -> Dict[str, float]:
        with torch.autocast(self.device.type, enabled=self.use_amp):
            loss_dict = self.model(images, targets)
        names = sorted(loss_dict)
        values = torch.stack([loss_dict[k].detach().float() for k in names])
        values = all_reduce_mean(values)  # same numbers on every rank: all stop together on NaN
        if not torch.isfinite(values).all():
            bad = [f"{k}={v:.4g}" for k, v in zip(names, values.tolist()) if not math.isfinite(v)]
            raise FloatingPointError(
                f"loss became non-finite at iteration {iteration}: {', '.join(bad)}; the last checkpoint "
                f"({self.out / CHECKPOINT}) was left as it was"
            )
        total = sum(loss_dict[k] for k in names)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        grad_norm = None
        if self.cfg.solver.clip_grad_norm > 0:
            self.scaler.unscale_(self.optimizer)
            params = [p for p in self.model.parameters() if p.requires_grad]
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.cfg.solver.clip_grad_norm))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        out = {k: float(v) for k, v in zip(names, values.tolist())}
        out["loss"] = float(values.sum())
        if grad_norm is not None:
            out["grad_norm"] = grad_norm
        return out

    def _cost_ratio(self) -> float:
        cost = head_cost(self.model)
        full = float(cost.full.sum())
        return float(cost.realized.sum()) / full if full > 0 else math.nan

    def _set_execution(self, training: bool) -> None:
        """Gated heads run in ``model.head.train_execution`` (when set) while training and in
        ``model.head.execution`` otherwise."""
        head = unwrap(self.model).head
        mode = self.cfg.model.head.train_execution if training else ""
        if hasattr(head, "set_execution"):
            head.set_execution(mode or self.cfg.model.head.execution)

    def _evaluate(self, iteration: int) -> Dict[str, float]:
        self._set_execution(training=False)
        try:
            with evaluation_stance(self.cfg.solver.compile):
                metrics = evaluate(self.model, self.val_loader, self.val_set, self.device)
        finally:
            self._set_execution(training=True)
        metrics["iteration"] = iteration
        if self.is_main:
            self._write_metrics({"iteration": iteration, "eval": metrics})
        logger.info("Evaluation at iteration %d: %s", iteration, format_summary(metrics))
        return metrics

    def run(self) -> Dict[str, float]:
        """Train to ``solver.max_iter``, evaluate, write ``metrics.json``; returns the metrics."""
        self._setup()
        cfg, s = self.cfg, self.cfg.solver
        self.model.train()
        self._set_execution(training=True)
        metrics: Optional[Dict[str, float]] = None
        bar = tqdm(
            total=s.max_iter, initial=self.start_iter, desc="train", disable=not self.is_main,
            dynamic_ncols=True, smoothing=0.1,
        )
        logger.info("Training from iteration %d to %d", self.start_iter, s.max_iter)
        start = time.perf_counter()
        it_start = time.perf_counter()
        iteration = self.start_iter
        try:
            for images, targets in self.train_loader:
                iteration += 1
                images = [img.to(self.device, non_blocking=True) for img in images]
                targets = [
                    {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in t.items()}
                    for t in targets
                ]
                lr = self.optimizer.param_groups[0]["lr"]
                losses = self._step(images, targets, iteration)
                self.scheduler.step()
                ratio = self._cost_ratio()
                now = time.perf_counter()
                step_time, it_start = now - it_start, now
                bar.set_postfix(
                    loss=f"{losses['loss']:.3f}", lr=f"{lr:.2e}", cost=f"{ratio:.2f}", refresh=False
                )
                bar.update(1)
                if self.is_main and (iteration % s.log_period == 0 or iteration == s.max_iter):
                    self._write_metrics(
                        {"iteration": iteration, **losses, "lr": lr, "cost_ratio": ratio,
                         "time": step_time, "elapsed": now - start}
                    )
                if iteration % s.checkpoint_period == 0 or iteration == s.max_iter:
                    self.save_checkpoint(iteration)
                if s.eval_period and iteration % s.eval_period == 0 and iteration != s.max_iter:
                    self._evaluate(iteration)
                    self.model.train()
                self.after_step(iteration)
        finally:
            bar.close()

        if self.is_main:
            atomic_save({"model": unwrap(self.model).state_dict(), "config": OmegaConf.to_yaml(cfg),
                         "iteration": iteration}, self.out / FINAL_WEIGHTS)
        logger.info("Training took %.1fs", time.perf_counter() - start)
        metrics = self._evaluate(iteration)
        if self.is_main:
            atomic_write_json(metrics, self.out / METRICS)
            print(f"[sparsehead] final ({self.out / METRICS}): {format_summary(metrics)}", flush=True)
        barrier()
        return metrics
