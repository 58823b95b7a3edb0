"""Training loop: SGD with warm-up and step decay, checkpoints, periodic and final evaluation."""

import importlib.util
import json
import logging
import math
import os
import random
import signal
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm import tqdm

from sparsehead.config.load import validate_config
from sparsehead.config.schema import Config
from sparsehead.modeling.build import build_model
from sparsehead.utils.file_io import DirectoryLock, LockedError, remove_stale_temporaries

from .checkpoint import (
    atomic_save,
    atomic_write_json,
    atomic_write_text,
    get_rng_state,
    load_model_weights,
    read_checkpoint,
    set_rng_state,
    unwrap,
)
from .compile import compile_for_training, evaluation_stance
from .data import build_test_loader, build_train_loader
from .distributed import (
    all_gather_object,
    all_reduce_mean,
    barrier,
    configure_cpu,
    init_distributed,
    resolve_device,
)
from .evaluation import evaluate, format_summary, head_cost
from .logger import setup_logging
from .solver import build_lr_scheduler, build_optimizer

__all__ = [
    "Trainer", "RunError", "Stopped", "prepare_data", "build_datasets", "resume_config", "CHECKPOINT", "FINAL_WEIGHTS",
    "RESUMABLE_KEYS",
]

logger = logging.getLogger("sparsehead")

CHECKPOINT = "checkpoint.pth"  # full training state, rewritten atomically every checkpoint_period
FINAL_WEIGHTS = "model_final.pth"  # model weights (and config) at the end of training
METRICS_LOG = "metrics.jsonl"
METRICS = "metrics.json"
TENSORBOARD = "tensorboard"  # TensorBoard event files, when logging.tensorboard is on


# Settings a resumed run takes from the command line; every other setting is the saved run's.
# (Where the run and its data are is not a setting of the run: the folders may have moved.)
RESUMABLE_KEYS = (
    "solver.max_iter", "solver.checkpoint_period", "solver.eval_period", "solver.log_period",
    "data.num_workers", "num_threads", "cpu_allocator", "test.ims_per_batch", "device", "output_dir",
    "data.train.ann_file", "data.train.img_dir", "data.val.ann_file", "data.val.img_dir", "data.synthetic.root",
)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class RunError(RuntimeError):
    """A run cannot start or continue; the message says why and what to do."""


class Stopped(RuntimeError):
    """Training stopped on SIGTERM or SIGINT after writing a checkpoint; ``signum`` is the signal."""

    def __init__(self, signum: int, iteration: int) -> None:
        self.signum, self.iteration = signum, iteration
        super().__init__(f"stopped at iteration {iteration}; resume with --resume")


def _flatten(d: Any, prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def resume_config(given: DictConfig, saved_yaml: str, source: str) -> Tuple[DictConfig, List[str], List[str]]:
    """The config a resumed run uses: the saved run's, with :data:`RESUMABLE_KEYS` from ``given``.

    Returns ``(config, ignored, applied)``: ``ignored`` lists the settings of ``given`` that differ from the
    saved run and are not used (``key=given (saved: value)``), ``applied`` the resumable ones that differ.
    """
    import yaml

    try:
        saved = OmegaConf.merge(OmegaConf.structured(Config), yaml.safe_load(saved_yaml) or {})
        validate_config(saved)
    except Exception as e:  # noqa: BLE001
        raise RunError(f"{source}: the saved run's config cannot be read ({e}); start a new run") from None
    now = _flatten(OmegaConf.to_container(given))
    before = _flatten(OmegaConf.to_container(saved))
    ignored, applied = [], []
    for key in sorted(set(now) | set(before)):
        if now.get(key) == before.get(key):
            continue
        if key in RESUMABLE_KEYS:
            OmegaConf.update(saved, key, now[key])
            applied.append(f"{key}={now[key]} (saved: {before.get(key)})")
        elif not (key == "model.num_classes" and now.get(key) is None):  # unset: the saved run inferred it
            ignored.append(f"{key}={now.get(key)} (saved: {before.get(key)})")
    return saved, ignored, applied


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
        if os.path.isdir(ann):
            raise FileNotFoundError(f"data.{split}.ann_file is a directory, not a COCO annotation JSON file: {ann}")
        if not os.path.isfile(ann):
            raise FileNotFoundError(f"data.{split}.ann_file not found: {ann}")
        if not os.path.isdir(img):
            raise FileNotFoundError(f"data.{split}.img_dir is not a directory: {img}")


def build_datasets(cfg: DictConfig, train: bool = True) -> Dict[str, Any]:
    """The val split (and the train split when ``train``), checked against ``model.num_classes``.

    ``model.num_classes`` left unset (None) is set to the number of categories of the train split (of the
    val split when ``train`` is False); a split with another number is an error.
    """
    from sparsehead.data import CocoDetection, build_transforms

    skip = cfg.data.skip_bad_images
    out = {"val": CocoDetection(cfg.data.val.ann_file, cfg.data.val.img_dir, train=False, skip_bad_images=skip)}
    if out["val"].num_boxes == 0:
        raise ValueError(
            f"data.val ({cfg.data.val.ann_file}) has no box to evaluate against ({len(out['val'])} image(s), "
            "no non-crowd annotation): COCO AP is undefined for it; give a val split with annotations"
        )
    if train:
        out["train"] = CocoDetection(
            cfg.data.train.ann_file,
            cfg.data.train.img_dir,
            transforms=build_transforms(True, cfg.data.flip_prob),
            train=True,
            skip_bad_images=skip,
        )
    if cfg.model.num_classes is None:
        split = "train" if train else "val"
        cfg.model.num_classes = out[split].num_classes
        logger.info("model.num_classes = %d, the categories of data.%s (%s)", out[split].num_classes, split,
                    cfg.data[split].ann_file)
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
        self.allocator = configure_cpu(cfg.num_threads, cfg.cpu_allocator)
        self.out = Path(cfg.output_dir)
        self.device = resolve_device(cfg.device)
        self.rank, self.world_size, self.device = init_distributed(self.device)
        self.is_main = self.rank == 0

    # -- hooks ---------------------------------------------------------------------------------
    def after_step(self, iteration: int) -> None:
        """Called after every completed iteration (``iteration`` counts completed steps)."""

    # -- setup ---------------------------------------------------------------------------------
    def _prepare_output_dir(self) -> List[str]:
        """Rank 0: create ``output_dir``, lock it for this run, remove temporaries a killed run left; returns
        warnings to log once the folder's log file is set up."""
        out = self.out
        if out.exists() and not out.is_dir():
            raise RunError(f"output_dir {out} is a file, not a folder; choose another output_dir")
        try:
            out.mkdir(parents=True, exist_ok=True)
            self._lock = DirectoryLock(out)
            stale = self._lock.acquire()
        except LockedError as e:
            raise RunError(
                f"output_dir {out} is in use by another run (pid {e.pid if e.pid is not None else 'unknown'}); "
                "wait for it to finish or stop it, or choose another output_dir"
            ) from None
        except OSError as e:
            raise RunError(f"output_dir {out} cannot be written: {e.strerror or e}") from None
        notes = []
        if stale is not None:
            notes.append(f"output_dir {out} was locked by process {stale}, which is gone; taking the lock over")
        removed = remove_stale_temporaries(out)
        if removed:
            notes.append(f"removed {len(removed)} temporary file(s) left by an interrupted write: "
                         + ", ".join(p.name for p in removed))
        return notes

    def _check_output_dir(self) -> Optional[Path]:
        ckpt = self.out / CHECKPOINT
        existing = [p.name for p in (ckpt, self.out / FINAL_WEIGHTS) if p.exists()]
        if existing and not self.resume:
            raise RunError(
                f"output_dir {self.out} already holds a run ({', '.join(existing)}); pass --resume to "
                "continue it, or choose another output_dir"
            )
        return ckpt if ckpt.exists() else None

    def _open_tensorboard(self) -> None:
        """Rank 0, ``logging.tensorboard``: a SummaryWriter on ``output_dir/tensorboard``; a resumed run drops
        the events the interrupted run wrote after its checkpoint (``purge_step``)."""
        self._tb = None
        if not (self.cfg.logging.tensorboard and self.is_main):
            return
        from torch.utils.tensorboard import SummaryWriter

        purge = self.start_iter + 1 if self.start_iter else None
        self._tb = SummaryWriter(str(self.out / TENSORBOARD), purge_step=purge)

    def _log_tensorboard(self, record: Dict[str, Any]) -> None:
        """Loss terms, learning rate and cost ratio of a training record; AP and head GMACs of an evaluation."""
        if getattr(self, "_tb", None) is None:
            return
        step = record["iteration"]
        if "eval" in record:
            values = {f"eval/{k}": v for k, v in record["eval"].items() if k not in ("iteration", "num_images")}
        else:
            values = {f"train/{k}": v for k, v in record.items() if k not in ("iteration", "time", "elapsed")}
        for tag, value in values.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self._tb.add_scalar(tag, value, step)
        self._tb.flush()

    def _release(self) -> None:
        tb = getattr(self, "_tb", None)
        if tb is not None:
            tb.close()
            self._tb = None
        lock = getattr(self, "_lock", None)
        if lock is not None:
            lock.release()

    def _setup(self) -> None:
        error, notes = None, []
        if self.is_main:
            setup_logging(None, self.rank)
            try:
                notes = self._prepare_output_dir()
            except RunError as e:
                error = str(e)
        errors = [e for e in all_gather_object(error) if e]  # every rank stops when rank 0 cannot start
        if errors:
            raise RunError(errors[0])
        setup_logging(str(self.out), self.rank)
        for note in notes:
            logger.warning("%s", note)
        resume_from = self._check_output_dir()
        if self.resume and resume_from is None:
            logger.warning("--resume: no %s in %s; starting from scratch", CHECKPOINT, self.out)
        ckpt = read_checkpoint(resume_from) if resume_from is not None else None
        if ckpt is not None:
            self._use_saved_config(ckpt, resume_from)
        cfg = self.cfg
        if cfg.logging.tensorboard and importlib.util.find_spec("tensorboard") is None:
            raise RunError(
                'logging.tensorboard=true needs the tensorboard package: pip install "sparsehead[tensorboard]" '
                "(or tensorboard), or set logging.tensorboard=false"
            )
        logger.info("Running on %s with %d process(es); CPU allocator: %s", self.device, self.world_size,
                    self.allocator)

        seed_all(cfg.seed)
        prepare_data(cfg, self.rank)
        sets = build_datasets(cfg, train=True)
        self.train_set, self.val_set = sets["train"], sets["val"]
        if self.is_main:  # the run's settings as used (model.num_classes inferred, saved ones on --resume)
            self._write("config.yaml", lambda p: atomic_write_text(OmegaConf.to_yaml(cfg), p))
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
        if ckpt is not None:
            try:
                load_model_weights(unwrap(model), ckpt, name=str(resume_from))
                self.optimizer.load_state_dict(ckpt["optimizer"])
                self.scheduler.load_state_dict(ckpt["scheduler"])
                self.scaler.load_state_dict(ckpt["scaler"])
                set_rng_state(ckpt["rng"])
                self.start_iter = int(ckpt["iteration"])
            except (KeyError, ValueError, RuntimeError) as e:
                msg = f"missing entry {e}" if isinstance(e, KeyError) else str(e).splitlines()[0]
                raise RunError(f"--resume: {resume_from} cannot be resumed: {msg}") from None
            logger.info("Resumed from %s at iteration %d", resume_from, self.start_iter)
        if self.is_main:
            self._truncate_metrics_log(self.start_iter)
        self._open_tensorboard()

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

    def _use_saved_config(self, ckpt: Dict[str, Any], path: Path) -> None:
        """On --resume the saved run's settings win, except :data:`RESUMABLE_KEYS`; one line says what differs."""
        saved = ckpt.get("config")
        source = f"{path}"
        if not isinstance(saved, str) and (self.out / "config.yaml").is_file():
            saved, source = (self.out / "config.yaml").read_text(), str(self.out / "config.yaml")
        if not isinstance(saved, str):
            logger.warning("--resume: %s records no config; using the given one", path)
            return
        self.cfg, ignored, applied = resume_config(self.cfg, saved, source)
        if ignored:
            logger.warning(
                "--resume: settings that differ from the saved run are not used (the saved run's are): %s; "
                "only %s can change on --resume; to change the others start a new run in another output_dir",
                ", ".join(ignored), ", ".join(RESUMABLE_KEYS),
            )
        if applied:
            logger.info("--resume: changed from the saved run: %s", ", ".join(applied))

    def _write(self, what: str, write: Any) -> None:
        """``write(path)`` for ``output_dir/what``; a failed write (full disk, ...) is one clear RunError."""
        path = self.out / what
        try:
            write(path)
        except (OSError, RuntimeError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip().splitlines()[-1]
            kept = " (the previous one was kept)" if path.exists() else ""
            raise RunError(f"cannot write {path}: {reason}{kept}") from None

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
        self._write(CHECKPOINT, lambda p: atomic_save(state, p))
        logger.info("Saved checkpoint at iteration %d to %s", iteration, self.out / CHECKPOINT)

    def _write_metrics(self, record: Dict[str, Any]) -> None:
        def append(path: Path) -> None:
            with open(path, "a") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()

        self._write(METRICS_LOG, append)
        self._log_tensorboard(record)

    # -- loop ----------------------------------------------------------------------------------
    def _step(
        self, images: List[torch.Tensor], targets: List[Dict[str, Any]], iteration: int
    ) -> Dict[str, float]:
        with torch.autocast(self.device.type, enabled=self.use_amp):
            loss_dict = self.model(images, targets)
        warmup = self.cfg.model.head.budget_warmup
        if "loss_budget" in loss_dict and iteration < warmup:  # the budget weight ramps up from 0
            loss_dict["loss_budget"] = loss_dict["loss_budget"] * (iteration / warmup)
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

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._stop_signal is not None:  # a second one: stop now
            raise KeyboardInterrupt
        self._stop_signal = signum

    def _stop_requested(self) -> Optional[int]:
        """The signal that asked to stop on any rank (all ranks agree, at the same iteration), or None."""
        signum = self._stop_signal or 0
        if self.world_size > 1:
            flag = torch.tensor([signum], dtype=torch.int64, device=self.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            signum = int(flag.item())
        return signum or None

    def run(self) -> Dict[str, float]:
        """Train to ``solver.max_iter``, evaluate, write ``metrics.json``; returns the metrics.

        SIGTERM or SIGINT during training finishes the current iteration, writes a checkpoint and raises
        :class:`Stopped` (a second signal stops at once). ``output_dir`` is locked for the whole run.
        """
        self._stop_signal: Optional[int] = None
        handlers = {}
        if threading.current_thread() is threading.main_thread():
            handlers = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}
        try:
            return self._run()
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
            self._release()

    def _run(self) -> Dict[str, float]:
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
                signum = self._stop_requested()
                if signum is not None and iteration < s.max_iter:
                    if iteration % s.checkpoint_period != 0:
                        self.save_checkpoint(iteration)
                    logger.warning("stopped at iteration %d; resume with --resume", iteration)
                    raise Stopped(signum, iteration)
        finally:
            bar.close()

        if self.is_main:
            final = {"model": unwrap(self.model).state_dict(), "config": OmegaConf.to_yaml(cfg), "iteration": iteration}
            self._write(FINAL_WEIGHTS, lambda p: atomic_save(final, p))
        logger.info("Training took %.1fs", time.perf_counter() - start)
        metrics = self._evaluate(iteration)
        if self.is_main:
            self._write(METRICS, lambda p: atomic_write_json(metrics, p))
            print(f"[sparsehead] final ({self.out / METRICS}): {format_summary(metrics)}", flush=True)
        barrier()
        return metrics
