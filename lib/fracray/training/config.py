"""One classifier's training run, as options: TrainConfig (every option, its default from
training.defaults, its checks), what the trainer, the bundle and the reports read."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from ..imaging.preprocess import PreprocessConfig
from .defaults import DATASET_TRAINING_DEFAULTS
from .precision import PRECISIONS

__all__ = ["TrainConfig"]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One classifier's training run.

    task: "fracture" (binary, label = image_label) or "body_part" (label = the index
        of body_part in ``classes``: the router).
    threshold_target / threshold_value: operating point chosen on validation data
        ("youden", or "sensitivity"/"specificity" with a value such as 0.9).
    progress_file: a local file each worker appends JSON lines to (rank, pid, epoch):
        a heartbeat for monitoring, and how the fault-tolerance test finds a worker.
    cpu_threads: intra-op threads of a CPU training worker. None keeps Ray's default
        (one per reserved CPU). The data stream's reserved CPU is mostly idle when images
        are small, so train_all lets the workers' threads use the cores that would idle.
    """

    model: str = "efficientnet_lite0"
    pretrained: bool | str = True
    # epochs, batch_size, lr, strategy: the real-data defaults (training.defaults), the one place they live.
    strategy: str = DATASET_TRAINING_DEFAULTS["strategy"]
    head: str = "linear"
    bam: bool = False
    task: str = "fracture"
    classes: tuple[str, ...] = ("normal", "abnormal")
    epochs: int = DATASET_TRAINING_DEFAULTS["epochs"]
    batch_size: int = DATASET_TRAINING_DEFAULTS["batch_size"]
    lr: float = DATASET_TRAINING_DEFAULTS["lr"]
    weight_decay: float = 0.0
    loss: str = "weighted_ce"
    focal_gamma: float = 2.0
    lr_schedule: str = "cosine"
    early_stopping_patience: int = 3
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    amp: bool = True
    # Training precision (training.precision): auto = float16 on CUDA, bf16 on a CPU with native
    # bf16 (avx512_bf16 / AMX), else float32; float32 forces full precision anywhere.
    precision: str = "auto"
    augment: bool = True
    # Also train on what archives hold: quarter turns, inverted grey scale, gamma/contrast, JPEG
    # re-compression, downscaling, a canvas with burnt-in text (AugmentConfig.robust).
    robust_augment: bool = False
    # Preprocessing overrides on the model's own data config (resolve_preprocess merges them).
    image_size: int | None = None
    normalization: str | None = None
    enhancement: str = "none"
    sharpen_factor: float = 1.5
    # Localisation: a fracture-map branch trained from masks/boxes where the data has them.
    localization: bool = False
    # "map": the fracture map at stride 16 (region growing gives boxes); "detector": the FCOS-style
    # box detector at stride 8 (models.detection), trained from the release's boxes.
    localization_head: str = "map"
    map_loss_weight: float = 1.0      # weight of the map's or the detector's loss
    map_pos_weight: float = 10.0
    # Per-epoch sampling: every positive and about this many negatives per positive, drawn
    # afresh each epoch (None: every image every epoch).
    negatives_per_positive: float | None = None
    # Class balance by augmenting positives (MURA humerus paper): augmented copies of the fractured
    # training images until they match the others (data.pipeline.balance_positives).
    balance_positives: bool = False
    tta_flip: bool = False
    # Temperature, threshold and operating points are fitted on this share of the training
    # studies (held out of training), so validation figures are measured on images the
    # calibration never saw. 0: fit on the validation split itself (optimistic).
    calibration_fraction: float = 0.1
    threshold_target: str = "youden"
    threshold_value: float | None = None
    max_failures: int = 0
    seed: int = 0
    progress_file: str | None = None
    cpu_threads: int | None = None

    def __post_init__(self):
        if self.task not in ("fracture", "body_part"):
            raise ValueError(f"task must be fracture or body_part. Got {self.task!r}")
        if self.loss not in ("weighted_ce", "ce", "focal"):
            raise ValueError(f"loss must be weighted_ce, ce or focal. Got {self.loss!r}")
        if self.lr_schedule not in ("cosine", "none"):
            raise ValueError(f"lr_schedule must be cosine or none. Got {self.lr_schedule!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.num_workers < 1:
            raise ValueError("epochs, batch_size and num_workers must be >= 1")
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ValueError(f"cpu_threads must be >= 1 (or None for Ray's default). Got {self.cpu_threads}")
        if self.image_size is not None and self.image_size < 32:
            raise ValueError(f"image_size must be >= 32 pixels (or None for the model's own). Got {self.image_size}")
        if not 0.0 <= self.calibration_fraction < 0.5:
            raise ValueError(f"calibration_fraction must be in [0, 0.5). Got {self.calibration_fraction}")
        if self.negatives_per_positive is not None and self.negatives_per_positive <= 0:
            raise ValueError(f"negatives_per_positive must be > 0 (or None for all). Got {self.negatives_per_positive}")
        if self.balance_positives and self.negatives_per_positive is not None:
            raise ValueError("balance_positives (--balance-positives: copies of positives up to the negatives' "
                             "count) and negatives_per_positive (--negatives-per-positive: fewer negatives per epoch) "
                             "are two ways to balance the classes that would undo each other: choose one")
        if self.balance_positives and self.task != "fracture":
            raise ValueError("balance_positives applies to fracture models, not the body-part router")
        if self.batch_size < 2 and (self.head == "dense3" or self.localization):
            raise ValueError(f"head dense3 and the fracture map have BatchNorm layers, which need batches of at least "
                             f"2 images to train. Got batch_size {self.batch_size}")
        if self.localization_head not in ("map", "detector"):
            raise ValueError(f"localization_head must be map or detector. Got {self.localization_head!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}. Got {self.precision!r}")
        if self.localization and self.task != "fracture":
            raise ValueError("localization applies to fracture models, not the body-part router")
        object.__setattr__(self, "classes", tuple(self.classes))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def labels(self, image_labels, body_parts) -> np.ndarray:
        """Each image's class index in this run (the one label-to-index map): its image label
        (0 or 1) for a fracture model, the index of its body part in ``classes`` for the router;
        -1 where it has none (unlabelled, or a body part outside ``classes``)."""
        if self.task == "fracture":
            return np.asarray([int(v) if v in (0, 1) else -1 for v in image_labels], dtype=np.int64)
        index = {c: i for i, c in enumerate(self.classes)}
        return np.asarray([index.get(str(p), -1) for p in body_parts], dtype=np.int64)

    def preprocess(self) -> PreprocessConfig:
        """What this run's model sees: the model's data config merged with this run's overrides."""
        from ..models.registry import resolve_preprocess

        return resolve_preprocess(self.model, image_size=self.image_size, normalization=self.normalization,
                                  enhancement=self.enhancement, sharpen_factor=self.sharpen_factor)
