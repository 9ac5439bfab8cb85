"""`bmvae tune`'s entry point: checks the inputs, opens the study, runs its workers, writes results."""

from __future__ import annotations

import dataclasses
import logging
import os

from bmvae_tf import schema
from bmvae_tf.errors import UserError
from bmvae_tf.trainers.tuning import DEFAULT_TRIALS, OBJECTIVES, PRUNERS, is_known_objective
from bmvae_tf.trainers.tuning import space as space_lib

log = logging.getLogger("bmvae.tune")


@dataclasses.dataclass
class TuneArgs:
    data: str
    workdir: str
    space: str
    config: str | None = None
    overrides: list[str] = dataclasses.field(default_factory=list)
    trials: int | None = None
    workers: int = 1
    storage: str | None = None
    study: str = "bmvae-tune"
    objective: str = "val_loss"
    pruner: str = "median"
    direction: str | None = None  # default: the objective's
    results: bool = True  # False: a worker started by --workers; the parent writes the results


def prepare(args: TuneArgs):
    """The Setup of the search after every check that needs no trial: objective, pruner,
    trials, workers, the space against the config, and that the runs produce the objective."""
    from bmvae_tf.trainers.tuning import study as study_lib

    if not is_known_objective(args.objective):
        raise UserError(f"--objective {args.objective}: unknown objective; choose one of "
                        f"{', '.join(OBJECTIVES)} or val/<metric> (a term in the runs' history.jsonl)")
    if args.direction not in (None, "minimize", "maximize"):
        raise UserError(f"--direction {args.direction}: choose minimize or maximize")
    if args.pruner not in PRUNERS:
        raise UserError(f"--pruner {args.pruner}: choose one of {', '.join(PRUNERS)}")
    if args.workers < 1 or (args.trials is not None and args.trials < 1):
        raise UserError("--trials and --workers must be at least 1")
    manifest = schema.read_manifest(args.data)
    space = space_lib.load_space(args.space, space_lib.mean_element_count(manifest))
    trials = args.trials or space.grid_size() or DEFAULT_TRIALS
    if space.grid_size() is not None and trials > space.grid_size():
        log.info("the space is a grid of %d points: %d trials, not %d", space.grid_size(), space.grid_size(), trials)
        trials = space.grid_size()
    data_dir = os.path.abspath(args.data) if "://" not in args.data else args.data
    setup = study_lib.Setup(
        tune_dir=os.path.abspath(args.workdir), data_dir=data_dir, config_file=args.config,
        overrides=list(args.overrides), space=space, objective=args.objective, trials=trials,
        study_name=args.study, storage_url=args.storage or study_lib.default_storage(args.workdir),
        pruner=args.pruner, direction_override=args.direction)
    space_lib.check_space(space, setup.build)
    study_lib.check_objective(setup, setup.build([]), manifest)
    return setup


def tune(args: TuneArgs, worker_argv: list[str] | None = None) -> int:
    """Runs the search; with args.workers > 1, as that many processes of `worker_argv`."""
    from bmvae_tf.trainers.tuning import results
    from bmvae_tf.trainers.tuning import study as study_lib

    setup = prepare(args)
    os.makedirs(os.path.join(setup.tune_dir, "trials"), exist_ok=True)
    study = study_lib.open_study(setup)  # made here first, so workers only load it
    log.info("study %s in %s: %s of %s, %d trials, h = %g", setup.study_name,
             study_lib.redact(setup.storage_url), setup.objective,
             "; ".join(f"{k} in {v}" for k, v in setup.space.describe().items()), setup.trials, setup.space.h)
    if args.workers > 1:
        code = study_lib.run_workers(worker_argv, args.workers)
        if code:
            log.warning("a worker exited with code %s; finishing the study in this process", code)
    # With workers: nothing left to do, unless one died and left a trial to fail and rerun.
    study_lib.run_worker(setup, study)
    if args.results:
        results.write_results(study, setup)
    return 0
