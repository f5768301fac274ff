"""The training a job gets when it says nothing, in one place. Keys are TrainConfig (epochs,
batch_size, lr, strategy) and TrainingSettings (router_*) field names.

- ``DATASET_TRAINING_DEFAULTS``: with a dataset, the conservative fine-tuning that the real-data
  results in docs/results.md were measured with; also what a TrainConfig and a TrainingSettings
  are when built without these fields (their dataclass defaults read it).
- ``EMBEDDED_TRAINING_DEFAULTS``: the embedded synthetic default, sized to show the system
  learning in minutes on a 2-core laptop (router accuracy near 1 and fracture AUROC above 0.85 on
  its own validation split: README "Two commands", docs/training.md).

``jobs.train.training_defaults`` picks one for a job, and ``fracray train --help`` prints both.
"""

from __future__ import annotations

from typing import Any

__all__ = ["DATASET_TRAINING_DEFAULTS", "EMBEDDED_TRAINING_DEFAULTS"]

DATASET_TRAINING_DEFAULTS: dict[str, Any] = {"epochs": 2, "batch_size": 16, "lr": 1e-4, "strategy": "full",
                                             "router_strategy": "full", "router_epochs": None}
EMBEDDED_TRAINING_DEFAULTS: dict[str, Any] = {"epochs": 10, "batch_size": 8, "lr": 1e-3, "strategy": "last60",
                                              "router_strategy": "last30", "router_epochs": 2}
