"""Training jobs: what ``kdcore distill`` runs.

- :mod:`kdcore.training.config`: the ``[train]`` table (:class:`TrainConfig`) and job files.
- :mod:`kdcore.training.loop`: :func:`train`, the loop (logging, checkpoints, resume, export);
  its docstring states the data-factory contract.
- :mod:`kdcore.training.demo`: the embedded default job on the UCI digits (``data/``).
"""

from __future__ import annotations

from kdcore.training.config import TrainConfig, load_job, structure_train
from kdcore.training.loop import TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "load_job", "structure_train", "train"]
