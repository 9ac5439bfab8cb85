"""Several seeds of one run: `bmvae train --seeds 0,1,2 --workdir W` trains W/seed-0, W/seed-1,
W/seed-2, each an ordinary run directory (its own config.yaml with `train.seed` = N, checkpoints,
history), so each resumes on its own and a rerun of the same command continues the unfinished
ones. `evaluate` and `analyze` given W do every seed; `compare` given W compares every seed.

W itself holds nothing but the seed directories: a directory is a *seed root* when it has no
config.yaml and at least one `seed-N` subdirectory.
"""

from __future__ import annotations

import logging
import os
import re

import tensorflow as tf

from bmvae_tf.errors import UserError
from bmvae_tf.trainers import config as config_lib
from bmvae_tf.trainers import run_dir, train
from bmvae_tf.trainers.training.nonfinite import TrainingDiverged

log = logging.getLogger("bmvae.seeds")

PREFIX = "seed-"
_NAME = re.compile(r"^seed-(\d+)$")


def parse_seeds(text: str) -> list[int]:
    """`--seeds` as a list: "0,1,2", or a range "0-4" (both ends included), or both ("0-2,7").

    Raises:
      UserError: naming the part that is not a seed >= 0, or a seed given twice.
    """
    seeds: list[int] = []
    for part in text.split(","):
        part = part.strip()
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not match:
            raise UserError(f"--seeds {text}: {part!r} is not a seed (a whole number >= 0) or a "
                            "range like 0-4; write e.g. --seeds 0,1,2")
        low, high = int(match.group(1)), int(match.group(2) or match.group(1))
        if high < low:
            raise UserError(f"--seeds {text}: the range {part!r} is empty; write it low-high")
        seeds.extend(range(low, high + 1))
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise UserError(f"--seeds {text}: seed {repeated[0]} is given twice")
    return seeds


def seed_dir(workdir: str, seed: int) -> str:
    """W/seed-N: the run directory of seed N under the seed root W."""
    return os.path.join(workdir, f"{PREFIX}{seed}")


def is_seed_name(name: str) -> bool:
    """True for a seed directory's name, `seed-N`."""
    return bool(_NAME.match(name))


def seed_runs(workdir: str) -> dict[int, str]:
    """{seed: W/seed-N} of the seed directories directly under `workdir`, by seed."""
    if not tf.io.gfile.isdir(workdir):
        return {}
    found = {}
    for name in tf.io.gfile.listdir(workdir):
        match = _NAME.match(name.rstrip("/"))
        path = os.path.join(workdir, name.rstrip("/"))
        if match and tf.io.gfile.isdir(path):
            found[int(match.group(1))] = path
    return dict(sorted(found.items()))


def is_seed_root(workdir: str) -> bool:
    """True when `workdir` is not a run itself but holds seed-N runs."""
    return not tf.io.gfile.exists(run_dir.RunPaths(workdir).config) and bool(seed_runs(workdir))


def expand(workdir: str) -> list[str]:
    """The runs `workdir` stands for: its seed-N runs if it is a seed root, else itself."""
    return list(seed_runs(workdir).values()) if is_seed_root(workdir) else [workdir]


def run_seed(workdir: str) -> int | None:
    """The seed a run trained with: `train.seed` of RUN/config.yaml, else N of a `seed-N`
    directory name, else None (a hand-made run directory). The YAML is read without the
    config's checks, so a run written by another version still has its seed."""
    paths = run_dir.RunPaths(workdir)
    if tf.io.gfile.exists(paths.config):
        seed = (config_lib.load_yaml(paths.config).get("train") or {}).get("seed", config_lib.TrainConfig.seed)
        if isinstance(seed, int) and not isinstance(seed, bool):
            return seed
    match = _NAME.match(os.path.basename(os.path.normpath(workdir)))
    return int(match.group(1)) if match else None


def refuse_seed_root(workdir: str, *, train: bool = False) -> None:
    """A command that takes one run, given a seed root: a UserError saying what to pass
    (train: also how to train them all)."""
    if is_seed_root(workdir):
        runs = seed_runs(workdir)
        listed = ",".join(map(str, runs))
        also = f", or --seeds {listed} to train every one" if train else ""
        raise UserError(
            f"--workdir {workdir}: holds the runs of seeds {listed} (made by `bmvae train --seeds`), "
            f"not one run; pass one of them, e.g. --workdir {next(iter(runs.values()))}{also}")


def train_seeds(workdir: str, data_dir: str | None, config_file: str | None, overrides: list[str],
                seeds: list[int]) -> dict[int, list[dict]]:
    """Trains (or resumes) W/seed-N for each seed, one after another; returns {seed: history}.

    Every seed's config is resolved before any training starts, so a bad key or a changed model
    section fails at once. A seed that diverges does not stop the others; the first divergence is
    raised once they have run.

    Raises:
      UserError: `workdir` is a single run, or `overrides` set train.seed.
      TrainingDiverged: naming the seeds that diverged.
    """
    if any(o.split("=", 1)[0].strip() == "train.seed" for o in overrides):
        raise UserError("--set train.seed: --seeds sets each run's train.seed; drop one of the two")
    run_dir.check_run_directory(workdir)
    if tf.io.gfile.exists(run_dir.RunPaths(workdir).config):
        raise UserError(f"--workdir {workdir}: is a single run (it has config.yaml); --seeds puts "
                        "its runs under seed-N of a new or multi-seed --workdir")
    configs: dict[int, config_lib.Config] = {
        seed: train.resolve_config(seed_dir(workdir, seed), data_dir, config_file,
                                   [*overrides, f"train.seed={seed}"]) for seed in seeds}
    if len(seeds) > 1 and any(c.train.strategy == "multi_worker" for c in configs.values()):
        # One process can join one MultiWorkerMirroredStrategy cluster only.
        raise UserError("--seeds with train.strategy=multi_worker: a cluster trains one run; start "
                        "one `bmvae train --workdir W/seed-N --set train.seed=N` per seed")
    histories, diverged = {}, {}
    for seed, config in configs.items():
        log.info("seed %d: training %s", seed, seed_dir(workdir, seed))
        try:
            histories[seed] = train.train(config, seed_dir(workdir, seed), write_report=True)
        except TrainingDiverged as e:
            log.error("seed %d diverged (%s); going on with the other seeds", seed, e)
            diverged[seed] = e
    if diverged:
        names = ", ".join(seed_dir(workdir, s) for s in diverged)
        raise TrainingDiverged(f"{len(diverged)} of {len(seeds)} seeds diverged ({names}); "
                               f"first: {next(iter(diverged.values()))}")
    return histories
