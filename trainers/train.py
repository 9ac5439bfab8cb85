"""`bmvae train`'s entry points: the run's config, and training it.

The loop lives in `bmvae_tf.trainers.training` (trainer, steps, loop and its helpers); this
module is what the CLI, the demo and the benchmarks call.
"""

from __future__ import annotations

import dataclasses
import os

import tensorflow as tf

from bmvae_tf.errors import UserError
from bmvae_tf.trainers import config as config_lib
from bmvae_tf.trainers import run_dir
from bmvae_tf.trainers.training.loop import run_training
from bmvae_tf.trainers.training.nonfinite import TrainingDiverged

__all__ = ["TrainingDiverged", "resolve_config", "run_training", "train"]


def train(config: config_lib.Config, workdir: str, *,
          strategy: tf.distribute.Strategy | None = None, write_report: bool = False) -> list[dict]:
    """Trains (or resumes) the run in `workdir`; returns the whole history, one dict per epoch.

    write_report: the chief also writes RUN/report.html (training curves so far; `evaluate` and
    `analyze` rewrite it with their tables and plots)."""
    return run_training(config, workdir, strategy=strategy, write_report=write_report)[0]


def resolve_config(workdir: str, data_dir: str | None, config_file: str | None,
                   overrides: list[str]) -> config_lib.Config:
    """The run's config: defaults < stored RUN/config.yaml (on resume) < --config < overrides.

    Rerunning an existing RUN resumes it; a different model section is refused, since the
    checkpoint would not fit it.
    """
    paths = run_dir.RunPaths(workdir)
    stored = run_dir.read_config(paths) if tf.io.gfile.exists(paths.config) else None
    data = config_lib.to_dict(stored) if stored is not None else {}
    if config_file:
        data = config_lib.merge(data, config_lib.load_yaml(config_file))
    data = config_lib.apply_overrides(data, overrides)
    if data_dir:
        data.setdefault("data", {})["dir"] = os.path.abspath(data_dir) if "://" not in data_dir else data_dir
    config = config_lib.from_dict(data, source=config_file or "--set")
    if not config.data.dir:
        raise UserError("--data: a dataset directory is required")
    if stored is not None and stored.model != config.model:
        old, new = dataclasses.asdict(stored.model), dataclasses.asdict(config.model)
        key = next(k for k in old if old[k] != new[k])
        raise UserError(f"{paths.config}: this run was trained with model.{key}={old[key]!r}, "
                        f"not {new[key]!r}; use a new --workdir")
    return config
