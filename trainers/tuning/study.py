"""The Optuna study of `bmvae tune`: storage, objective, the shared trial budget and workers.

Every worker (a `bmvae tune` process, on this host or another sharing a PostgreSQL storage) runs
the same loop: fail the trials whose worker stopped beating (`fail_stale_trials`; each is
re-queued once with its parameters, and the retry resumes the same run directory), then start a
trial while the study has fewer than `trials` finished, running or queued trials, wait while
other workers' trials may still fail, and stop when `trials` trials are complete or pruned.
Two workers that start a trial at the same moment may both pass that check; the later trial
(by number) then finds itself over the budget, is marked failed with the user attribute
`surplus` and trains nothing, so the study holds exactly `trials` finished trials.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import socket
import subprocess
import sys
import time
import warnings
from typing import Callable, Iterator

import optuna

from bmvae_tf.errors import UserError
from bmvae_tf.trainers import config as config_lib
from bmvae_tf.trainers import run_dir as run_dir_lib
from bmvae_tf.trainers.tuning import OBJECTIVES, TERM_PREFIX, default_direction, is_known_objective, per_epoch
from bmvae_tf.trainers.tuning import space as space_lib

log = logging.getLogger("bmvae.tune")

# Heartbeats: a running trial writes one every HEARTBEAT_S seconds; one without a heartbeat for
# 3 x HEARTBEAT_S is failed (and retried) by the next worker that looks. BMVAE_TUNE_HEARTBEAT_S
# changes it (the tests use 1).
HEARTBEAT_S = 10
MAX_RETRIES = 1
ACTIVE = ("COMPLETE", "PRUNED", "RUNNING", "WAITING")



@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Heartbeats and their retry callback are 'experimental' in Optuna: no warning each time."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


class Surplus(Exception):
    """A trial started when the budget was already used up by other workers' trials."""


@dataclasses.dataclass
class Setup:
    """What every trial of a `bmvae tune` needs."""

    tune_dir: str
    data_dir: str
    config_file: str | None
    overrides: list[str]  # --set / --epochs, applied before the trial's parameters
    space: space_lib.Space
    objective: str
    trials: int
    study_name: str
    storage_url: str
    pruner: str = "median"
    direction_override: str | None = None  # --direction

    @property
    def direction(self) -> str:
        return self.direction_override or default_direction(self.objective)

    def build(self, params_overrides: list[str], workdir: str | None = None) -> config_lib.Config:
        """The config of a trial: config file < --set < the trial's parameters (< a resumed run's
        stored config, by `train.resolve_config`, when `workdir` is given)."""
        from bmvae_tf.trainers import train

        if workdir is not None:
            return train.resolve_config(workdir, self.data_dir, self.config_file,
                                        self.overrides + params_overrides)
        data = config_lib.load_yaml(self.config_file) if self.config_file else {}
        data = config_lib.apply_overrides(data, self.overrides + params_overrides)
        data.setdefault("data", {})["dir"] = self.data_dir
        return config_lib.from_dict(data, source="--set")


def default_storage(tune_dir: str) -> str:
    return "sqlite:///" + os.path.abspath(os.path.join(tune_dir, "study.db"))


def redact(url: str) -> str:
    """The URL without its password."""
    return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", url)


def driver_url(url: str) -> str:
    """`postgresql://` with the psycopg2 driver this package installs (SQLAlchemy 2.1 otherwise
    picks psycopg 3); a URL naming its driver (`postgresql+psycopg://`) is kept."""
    return re.sub(r"^postgres(?:ql)?://", "postgresql+psycopg2://", url)


def heartbeat_seconds() -> int:
    return int(os.environ.get("BMVAE_TUNE_HEARTBEAT_S", HEARTBEAT_S))


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """The RDB storage at `url` (tables made if missing), with heartbeats and one retry of a
    trial whose worker died; an unreachable or invalid URL is a UserError naming it."""
    import sqlalchemy.exc

    connect_args = {"timeout": 120} if url.startswith("sqlite") else {}
    if driver_url(url).startswith("postgresql"):
        connect_args = {"connect_timeout": 10}
    heartbeat = heartbeat_seconds()
    last = None
    for attempt in range(3):  # workers making the tables at the same moment may collide once
        try:
            with _quiet():
                return optuna.storages.RDBStorage(
                    driver_url(url), engine_kwargs={"connect_args": connect_args}, heartbeat_interval=heartbeat,
                    grace_period=3 * heartbeat,
                    heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                        max_retry=MAX_RETRIES))
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError) as e:
            last = e
            time.sleep(1.0 + attempt)
        except (sqlalchemy.exc.SQLAlchemyError, ValueError, ImportError) as e:
            last = e
            break
    first = (str(getattr(last, "orig", None) or last).strip().splitlines() or [type(last).__name__])[0]
    raise UserError(f"--storage {redact(url)}: cannot open the study storage ({first})")


def open_study(setup: Setup) -> optuna.Study:
    """Creates the study, or loads it to continue; refuses one made for another search."""
    storage = open_storage(setup.storage_url)
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # trials are logged by bmvae.tune
    study = optuna.create_study(storage=storage, study_name=setup.study_name, direction=setup.direction,
                                sampler=_sampler(setup.space), pruner=_pruner(setup.pruner),
                                load_if_exists=True)
    made_for = {"objective": setup.objective, "space": setup.space.describe()}
    stored = {key: study.user_attrs.get(key) for key in made_for}
    if all(value is None for value in stored.values()):
        for key, value in made_for.items():
            study.set_user_attr(key, value)
    elif stored != made_for:
        key = next(k for k in made_for if stored[k] != made_for[k])
        raise UserError(f"--study {setup.study_name}: this study in {redact(setup.storage_url)} was made "
                        f"with {key} {stored[key]!r}, not {made_for[key]!r}; use another --study")
    if study.direction.name.lower() != setup.direction:
        raise UserError(f"--study {setup.study_name}: the study {study.direction.name.lower()}s, but "
                        f"--objective {setup.objective} is to {setup.direction}")
    return study


def _sampler(space: space_lib.Space) -> optuna.samplers.BaseSampler:
    """A grid for an all-categorical space (each point once), else TPE (unseeded: workers that
    share a study must not draw the same startup points)."""
    grid = space.grid()
    if grid is not None:
        return optuna.samplers.GridSampler(grid)
    return optuna.samplers.TPESampler()


def _pruner(name: str) -> optuna.pruners.BasePruner:
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner()
    return optuna.pruners.NopPruner()


# ------------------------------------------------------------------------------------ the budget


def counts(study: optuna.Study) -> dict[str, int]:
    """{state name: trials}, surplus trials left out."""
    out = dict.fromkeys(("COMPLETE", "PRUNED", "RUNNING", "WAITING", "FAIL"), 0)
    for trial in study.get_trials(deepcopy=False):
        if not trial.user_attrs.get("surplus"):
            out[trial.state.name] = out.get(trial.state.name, 0) + 1
    return out


def run_worker(setup: Setup, study: optuna.Study, poll_s: float | None = None) -> None:
    """Runs trials of the study until `setup.trials` of them are complete or pruned."""
    from bmvae_tf.trainers.training.nonfinite import TrainingDiverged

    poll_s = heartbeat_seconds() if poll_s is None else poll_s
    objective = Objective(setup, study)
    while True:
        with _quiet():
            optuna.storages.fail_stale_trials(study)
        n = counts(study)
        done, active = n["COMPLETE"] + n["PRUNED"], sum(n[s] for s in ACTIVE)
        if done >= setup.trials:
            return
        if n["FAIL"] > setup.trials + MAX_RETRIES * setup.trials:
            raise UserError(f"--study {setup.study_name}: {n['FAIL']} trials failed; see "
                            f"{os.path.join(setup.tune_dir, 'trials')} and the log above")
        if n["WAITING"] or active < setup.trials:
            with _quiet():
                study.optimize(objective, n_trials=1, catch=(Surplus, TrainingDiverged), gc_after_trial=True)
        elif n["RUNNING"]:
            time.sleep(poll_s)  # another worker's trial may still die and need a rerun
        else:
            return


# ------------------------------------------------------------------------------------ a trial


class Objective:
    """Optuna's objective: trains the trial's run directory and returns its validation value."""

    def __init__(self, setup: Setup, study: optuna.Study):
        self.setup, self.study = setup, study

    def __call__(self, trial: optuna.Trial) -> float:
        self._check_budget(trial)
        params = space_lib.suggest(trial, self.setup.space)
        retry = trial.user_attrs.get("run_dir")  # a retry resumes the failed trial's run
        relative = retry or os.path.join("trials", f"{trial.number:04d}")
        workdir = os.path.join(self.setup.tune_dir, relative)
        if not retry and os.path.exists(os.path.join(workdir, "config.yaml")):
            raise UserError(f"{workdir}: holds a run that is not trial {trial.number} of study "
                            f"{self.setup.study_name}; use a new --workdir for a new study")
        trial.set_user_attr("run_dir", relative)
        trial.set_user_attr("host", socket.gethostname())
        config = self.setup.build(space_lib.overrides(params), workdir)
        trial.set_user_attr("config", config_lib.dump_yaml(config))
        log.info("trial %d: %s -> %s", trial.number,
                 ", ".join(f"{k}={space_lib._short(v)}" for k, v in params.items()), workdir)
        objective = self.setup.objective
        if per_epoch(objective):  # a resumed run: its recorded epochs first
            for record in run_dir_lib.read_history(run_dir_lib.RunPaths(workdir)):
                _report(trial, record, objective, prune=False)
        from bmvae_tf.trainers.training.loop import run_training

        history, _ = run_training(config, workdir, write_report=True, on_epoch=(
            (lambda record: _report(trial, record, objective)) if per_epoch(objective) else None))
        if history:  # the trials table's epochs, also for objectives not reported per epoch
            trial.set_user_attr("epochs", int(history[-1]["epoch"]))
        value = objective_value(self.setup.objective, workdir, history)
        log.info("trial %d: %s %.6g", trial.number, self.setup.objective, value)
        return value

    def _check_budget(self, trial: optuna.Trial) -> None:
        ahead = [t for t in self.study.get_trials(deepcopy=False)
                 if t.number < trial.number and t.state.name in ACTIVE and not t.user_attrs.get("surplus")]
        if len(ahead) >= self.setup.trials:
            trial.set_user_attr("surplus", True)
            raise Surplus(f"trial {trial.number}: the study already has {self.setup.trials} trials")


def epoch_value(record: dict, objective: str) -> float | None:
    """An epoch's value of a per-epoch objective: val_loss, or the "val/<metric>" term."""
    value = record.get("val_loss") if objective == "val_loss" else record.get("terms", {}).get(objective)
    return None if value is None else float(value)


def _report(trial: optuna.Trial, record: dict, objective: str, prune: bool = True) -> None:
    """Reports an epoch's value to the pruner; raises TrialPruned when it says so."""
    value = epoch_value(record, objective)
    if value is None:
        if objective.startswith(TERM_PREFIX) and record.get("val_loss") is not None:
            known = sorted(k for k in record.get("terms", {}) if k.startswith(TERM_PREFIX))
            raise UserError(f"--objective {objective}: the model records no such term; it has {known}")
        return
    trial.report(value, int(record["epoch"]))
    if prune and trial.should_prune():
        log.info("trial %d: pruned after epoch %d (%s %.6g)", trial.number, record["epoch"], objective, value)
        raise optuna.TrialPruned(f"pruned after epoch {record['epoch']} ({objective} {value:.6g})")


def objective_value(objective: str, workdir: str, history: list[dict]) -> float:
    """The objective of a trained run: val_loss of its last epoch, or a validation metric."""
    if per_epoch(objective):
        value = epoch_value(history[-1], objective) if history else None
        if value is None:
            raise UserError(f"{workdir}: the run recorded no {objective}")
        return value
    from bmvae_tf.trainers.evaluation import evaluate

    metrics = evaluate.evaluate(workdir, split="validation")
    if objective == "val_coherence":
        values = [v for k, v in (metrics.get("coherence") or {}).items()
                  if v is not None and k.split("|")[0] not in k.split("|")[1].split("+")]
    else:
        values = [v for v in (metrics.get("latent_accuracy") or {}).values() if v is not None]
    if not values:
        raise UserError(f"{workdir}: evaluation on the validation split gave no {objective}")
    return float(sum(values) / len(values))


def check_objective(setup: Setup, config: config_lib.Config, manifest) -> None:
    """Refuses an objective the runs would not produce (before any trial starts)."""
    from bmvae_tf.trainers.training import inputs

    if not is_known_objective(setup.objective):
        raise UserError(f"--objective {setup.objective}: unknown; choose one of {', '.join(OBJECTIVES)} "
                        f"or {TERM_PREFIX}<metric>")
    try:  # the per-epoch objectives read a validation split or a held-out part of train
        inputs.choose_validation(manifest, config.train)
    except UserError as error:
        raise UserError(f"--objective {setup.objective}: {error}") from None
    if per_epoch(setup.objective):
        return
    if "validation" not in manifest.splits or manifest.label is None:
        raise UserError(f"--objective {setup.objective}: {setup.data_dir} needs a labelled validation split")


# ------------------------------------------------------------------------------------ workers


def run_workers(argv: list[str], workers: int, on_start: Callable[[list[subprocess.Popen]], None] | None = None) -> int:
    """Runs `workers` `bmvae tune` processes with `argv` (each a single worker writing no
    results); returns the worst exit code."""
    command = [sys.executable, "-m", "bmvae_tf.trainers.cli", *argv]
    processes = [subprocess.Popen(command) for _ in range(workers)]
    if on_start is not None:
        on_start(processes)
    codes = [p.wait() for p in processes]
    return max(codes)
