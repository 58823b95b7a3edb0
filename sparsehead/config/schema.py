"""Structured configuration schema.

Every key a config file or a command-line override may set is declared here as a dataclass field;
omegaconf rejects unknown keys and values of the wrong type against this schema.
"""

from dataclasses import dataclass, field
from typing import List, Optional

__all__ = [
    "BackboneConfig",
    "HeadConfig",
    "ModelConfig",
    "SplitConfig",
    "SyntheticConfig",
    "DataConfig",
    "SolverConfig",
    "TestConfig",
    "LoggingConfig",
    "Config",
]


@dataclass
class BackboneConfig:
    """ResNet-FPN backbone."""

    depth: int = 50  # 18, 34 or 50
    weights: str = ""  # "" (random init), "imagenet" (torch hub cache only) or a path to a .pth
    norm: str = "frozen_bn"  # frozen_bn | bn
    trainable_layers: int = 3  # 0..5, counted from the last stage
    fpn_channels: int = 256


@dataclass
class HeadConfig:
    """Detection head. ``kind``: plain (the detector's own torchvision head; FCOS's is the paper's "D2")
    | fixed (routers, no gates) | dynamic (gated routers)."""

    kind: str = "dynamic"
    num_convs: int = 4  # plain FCOS head only (torchvision's RetinaNet head always has 4)
    norm: str = "none"  # plain RetinaNet head only: none (torchvision's v1 head, the paper's baseline) | gn (v2)
    num_routers: int = 4
    tau: float = 1.5
    gate_activation: str = "geretanh"
    gate_init: float = 0.99
    budget_weight: float = 0.1
    budget_warmup: int = 0  # iterations over which the budget weight ramps linearly from 0 to budget_weight
    execution: str = "sparse"  # dense | sparse | auto: gated paths at evaluation (and training by default)
    # auto: a path runs sparse when its active fraction is at most this; null: the crossover shipped for the device
    auto_threshold: Optional[float] = None
    resample: str = "pool"  # pool | bilinear (the paper's reference): resampling between pyramid levels
    scale_bias: bool = False  # a bias in the scale units' depthwise convs (the paper's reference has one)
    train_execution: str = ""  # "" (same as execution) | dense | sparse | auto: used while training
    gn_groups: int = 32
    prior_prob: float = 0.01
    # FCOS heads (plain and routers): initial bias of the box-regression conv, in anchor sizes; every location
    # starts predicting a box reaching this far on each side. 0 is torchvision's and the reference's init.
    box_init: float = 0.0


@dataclass
class ModelConfig:
    arch: str = "fcos"  # fcos | retinanet (torchvision's detector the head plugs into)
    num_classes: Optional[int] = None  # null: the number of categories of the training annotations
    min_size: int = 800
    max_size: int = 1333
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    center_sampling_radius: float = 1.5  # fcos only
    anchor_sizes: List[int] = field(default_factory=lambda: [32, 64, 128, 256, 512])  # retinanet, P3..P7
    score_thresh: float = 0.05
    nms_thresh: float = 0.6
    detections_per_img: int = 100
    topk_candidates: int = 1000


@dataclass
class SplitConfig:
    """One COCO-format split: annotation file and image folder."""

    ann_file: str = ""
    img_dir: str = ""


@dataclass
class SyntheticConfig:
    """Generated dataset; when enabled it is written once under ``root`` and used for both splits."""

    enabled: bool = False
    root: str = "datasets/synthetic"
    num_train: int = 512
    num_val: int = 64
    image_size: int = 256
    num_classes: int = 5
    seed: int = 0


@dataclass
class DataConfig:
    train: SplitConfig = field(default_factory=SplitConfig)
    val: SplitConfig = field(default_factory=SplitConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    num_workers: int = 2
    flip_prob: float = 0.5
    skip_bad_images: bool = False  # leave out (and count) missing, unreadable or mis-sized images instead of stopping


@dataclass
class SolverConfig:
    max_iter: int = 90000
    ims_per_batch: int = 16  # total over all processes
    base_lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 500
    warmup_factor: float = 1.0 / 3
    steps: List[int] = field(default_factory=lambda: [60000, 80000])
    gamma: float = 0.1
    clip_grad_norm: float = 0.0  # 0 disables clipping
    amp: bool = False  # CUDA only
    compile: bool = False  # torch.compile the backbone and head for training (needs dense train_execution)
    checkpoint_period: int = 5000
    eval_period: int = 0  # 0: evaluate only at the end
    log_period: int = 20


@dataclass
class TestConfig:
    ims_per_batch: int = 8  # total over all processes


@dataclass
class LoggingConfig:
    """Where training logs go besides ``metrics.jsonl`` (always written)."""

    tensorboard: bool = False  # also write TensorBoard events to output_dir/tensorboard (needs the tensorboard package)


@dataclass
class Config:
    seed: int = 0
    output_dir: str = "output"
    device: str = "auto"  # auto | cpu | cuda
    num_threads: int = 0  # CPU threads per process (torch.set_num_threads); 0 keeps torch's default
    cpu_allocator: str = "tuned"  # tuned | system: glibc keeps freed blocks in the process (sparsehead.utils.allocator)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    test: TestConfig = field(default_factory=TestConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
