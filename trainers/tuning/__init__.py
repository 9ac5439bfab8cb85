"""`bmvae tune`: the paper's validation search over config keys, on Optuna.

- `space`: the search-space YAML (dotted `--set` keys; categorical, int and float ranges, log
  scale, multiples of h = the mean element count of the dataset's modalities). No TensorFlow,
  no Optuna.
- `study`: the study (its RDB storage: SQLite in TUNE_DIR by default, PostgreSQL to share it
  between hosts; heartbeats, so a killed worker's trial is failed and retried), the objective
  (each trial an ordinary run directory TUNE_DIR/trials/NNNN trained by `run_training`, pruned
  on its per-epoch val_loss), the trial budget shared by every worker, and `--workers` processes.
- `results`: TUNE_DIR/best.yaml, TUNE_DIR/report.html and the printed summary table.

This module stays light (no TensorFlow, no Optuna): the command line imports it for --help.
"""

# name -> (direction, what it is). The objective is always a validation value, never a test one.
OBJECTIVES = {
    "val_loss": ("minimize", "the validation loss of the trial's last epoch (pruned per epoch)"),
    "val_coherence": ("maximize", "mean cross coherence on the validation split (bmvae evaluate)"),
    "val_latent_accuracy": ("maximize", "mean latent accuracy on the validation split (bmvae evaluate)"),
}
# Also: "val/<metric>", a loss term the model records each epoch in history.jsonl ("terms"), e.g.
# val/bound or val/reconstruction: unlike val_loss, these do not include the weighted penalty
# terms (lambda_c, eta) that the search changes. Maximised unless --direction says otherwise.
TERM_PREFIX = "val/"
DEFAULT_OBJECTIVE = "val_loss"


def is_known_objective(name: str) -> bool:
    return name in OBJECTIVES or (name.startswith(TERM_PREFIX) and len(name) > len(TERM_PREFIX))


def default_direction(name: str) -> str:
    return OBJECTIVES[name][0] if name in OBJECTIVES else "maximize"


def per_epoch(name: str) -> bool:
    """Whether the objective is recorded every epoch (so trials are pruned on it)."""
    return name == "val_loss" or name.startswith(TERM_PREFIX)
PRUNERS = ("median", "hyperband", "none")
DEFAULT_TRIALS = 20  # for a space with ranges; a grid's default is its size
DEFAULT_STUDY = "bmvae-tune"
