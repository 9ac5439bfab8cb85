"""The results of a study: TUNE_DIR/best.yaml, TUNE_DIR/report.html and the printed summary.

The table and the plots are pure functions of the study's trials (their states, values,
parameters, per-epoch val_loss and the user attributes the objective records), so any host
sharing the study can write them.
"""

from __future__ import annotations

import datetime
import math
import os

import numpy as np
import optuna
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from bmvae_tf import atomic
from bmvae_tf.errors import UserError
from bmvae_tf.trainers.reporting import plots, report
from bmvae_tf.trainers.tuning import OBJECTIVES, per_epoch
from bmvae_tf.trainers.tuning import space as space_lib
from bmvae_tf.trainers.tuning import study as study_lib

BEST_YAML = "best.yaml"
REPORT_HTML = "report.html"


def trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The study's trials by number, surplus ones (which never trained) left out."""
    return [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get("surplus")]


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    complete = [t for t in trials(study) if t.state.name == "COMPLETE" and t.value is not None]
    if not complete:
        return None
    pick = min if study.direction.name == "MINIMIZE" else max
    return pick(complete, key=lambda t: t.value)


def _figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def _value(value) -> str:
    return "" if value is None else f"{value:.5g}"


def trials_table(study: optuna.Study, setup: study_lib.Setup) -> report.Table:
    best = best_trial(study)
    keys = setup.space.keys
    headers = ["trial", "state", setup.objective, *keys, "epochs", "minutes", "run"]
    rows = []
    for t in trials(study):
        state = t.state.name.lower() + (" (best)" if best is not None and t.number == best.number else "")
        retried = t.system_attrs.get("failed_trial")
        if retried is not None:
            state += f", retry of {retried}"
        minutes = ((t.datetime_complete - t.datetime_start).total_seconds() / 60
                   if t.datetime_complete and t.datetime_start else None)
        epochs = max(t.intermediate_values) if t.intermediate_values else t.user_attrs.get("epochs")
        rows.append([str(t.number), state, _value(t.value),
                     *(space_lib._short(t.params[k]) if k in t.params else "" for k in keys),
                     "" if epochs is None else str(epochs), "" if minutes is None else f"{minutes:.1f}",
                     t.user_attrs.get("run_dir", "")])
    what = OBJECTIVES[setup.objective][1] if setup.objective in OBJECTIVES else \
        "the model's validation term of the trial's last epoch (pruned per epoch)"
    note = (f"{setup.objective}: {what}; the study {setup.direction}s it. "
            f"Pruned trials stopped after the epoch shown; failed ones were killed or diverged.")
    return report.Table(f"Trials of study {setup.study_name}", headers, rows, note)


def text_table(table: report.Table) -> str:
    """The table as aligned plain text, for the terminal."""
    rows = [table.headers, *table.rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(table.headers))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def write_best(study: optuna.Study, setup: study_lib.Setup) -> str:
    """TUNE_DIR/best.yaml: the best trial's complete config, with how it was chosen on top."""
    best = best_trial(study)
    if best is None:
        raise UserError(f"--study {setup.study_name}: no trial completed; see "
                        f"{os.path.join(setup.tune_dir, 'trials')} and the log above")
    n = study_lib.counts(study)
    params = ", ".join(f"{k}={space_lib._short(v)}" for k, v in best.params.items())
    header = [
        f"# Chosen by `bmvae tune` on {datetime.date.today().isoformat()}: trial {best.number} of study "
        f"{setup.study_name!r} ({study_lib.redact(setup.storage_url)}),",
        f"# {params},",
        f"# the best {setup.objective} ({setup.direction}) = {best.value:.6g} over {n['COMPLETE']} complete "
        f"and {n['PRUNED']} pruned trials of the space {setup.space.path} (h = {setup.space.h:g}).",
        "# Search space: " + "; ".join(f"{k} in {v}" for k, v in setup.space.describe().items()),
    ]
    path = os.path.join(setup.tune_dir, BEST_YAML)
    atomic.write_text(path, "\n".join(header) + "\n" + best.user_attrs["config"])
    return path


def _history_figure(study: optuna.Study, setup: study_lib.Setup):
    done = [t for t in trials(study) if t.state.name == "COMPLETE" and t.value is not None]
    figure = _figure(6.0, 3.2)
    ax = figure.add_subplot(1, 1, 1)
    numbers, values = [t.number for t in done], [t.value for t in done]
    ax.plot(numbers, values, "o", label=f"complete trials' {setup.objective}")
    best = (np.minimum if setup.direction == "minimize" else np.maximum).accumulate(values) if values else []
    ax.step(numbers, best, where="post", color="C3", label="best so far")
    ax.set_xlabel("trial")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.ticklabel_format(axis="y", useOffset=False)
    ax.set_ylabel(setup.objective)
    ax.legend(fontsize=8)
    figure.tight_layout()
    return figure


def _parameter_figure(study: optuna.Study, setup: study_lib.Setup, parameter: space_lib.Parameter):
    figure = _figure(4.0, 3.0)
    ax = figure.add_subplot(1, 1, 1)
    for state, marker in (("COMPLETE", "o"), ("PRUNED", "x")):
        chosen = [t for t in trials(study) if t.state.name == state and parameter.key in t.params]
        values = [t.value if t.value is not None else _last(t) for t in chosen]
        xs = [t.params[parameter.key] for t in chosen]
        if parameter.categorical:
            labels = [space_lib._short(v) for v in parameter.values]
            xs = [labels.index(space_lib._short(x)) for x in xs]
            ax.set_xticks(range(len(labels)), labels)
        ax.plot(xs, values, marker, linestyle="none", label=state.lower())
    if parameter.log:
        ax.set_xscale("log")
    ax.set_xlabel(parameter.key)
    ax.ticklabel_format(axis="y", useOffset=False)
    ax.set_ylabel(setup.objective)
    ax.legend(fontsize=8)
    figure.tight_layout()
    return figure


def _last(trial) -> float:
    return trial.intermediate_values[max(trial.intermediate_values)] if trial.intermediate_values else math.nan


def _curves_figure(study: optuna.Study, objective: str):
    figure = _figure(6.0, 3.2)
    ax = figure.add_subplot(1, 1, 1)
    for t in trials(study):
        if t.intermediate_values:
            steps = sorted(t.intermediate_values)
            ax.plot(steps, [t.intermediate_values[s] for s in steps], "--" if t.state.name == "PRUNED" else "-",
                    label=f"{t.number} ({t.state.name.lower()})")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.ticklabel_format(axis="y", useOffset=False)
    ax.set_ylabel(objective)
    if len(trials(study)) <= 12:
        ax.legend(fontsize=7)
    figure.tight_layout()
    return figure


def write_report(study: optuna.Study, setup: study_lib.Setup) -> str:
    """TUNE_DIR/report.html: facts, the trials table, the optimisation history and the
    objective against each parameter (inline PNGs: it opens offline)."""
    best = best_trial(study)
    n = study_lib.counts(study)
    facts = report.Facts([
        ("study", setup.study_name), ("storage", study_lib.redact(setup.storage_url)),
        ("objective", f"{setup.objective} ({setup.direction})"), ("data", setup.data_dir),
        ("config", setup.config_file or "defaults"), ("space", setup.space.path),
        ("h", f"{setup.space.h:g} (mean element count of the modalities)"),
        ("trials", ", ".join(f"{v} {k.lower()}" for k, v in n.items() if v)),
        ("best", "none yet" if best is None else f"trial {best.number}: {best.value:.6g}, " + ", ".join(
            f"{k}={space_lib._short(v)}" for k, v in best.params.items()))])
    images = [report.Image("Optimisation history: each complete trial's value and the best so far",
                           plots.figure_png(_history_figure(study, setup)), "history.png")]
    if per_epoch(setup.objective):
        images.append(report.Image(f"{setup.objective} per epoch of every trial (dashed: pruned)",
                                   plots.figure_png(_curves_figure(study, setup.objective)), "curves.png"))
    for p in setup.space.parameters:
        images.append(report.Image(f"{setup.objective} against {p.key} (pruned: their last epoch's)",
                                   plots.figure_png(_parameter_figure(study, setup, p)), f"{p.key}.png"))
    sections = [("Study", [facts]), ("Trials", [trials_table(study, setup)]), ("Plots", images)]
    if best is not None:
        sections.append(("Best config", [report.Details(f"trial {best.number}: {BEST_YAML}",
                                                        best.user_attrs["config"])]))
    page = report.render_html(f"bmvae tune: {setup.study_name}", sections)
    path = os.path.join(setup.tune_dir, REPORT_HTML)
    atomic.write_text(path, page)
    return path


def write_results(study: optuna.Study, setup: study_lib.Setup) -> None:
    """Prints the trials table, writes report.html and best.yaml (a UserError if no trial
    completed) and says where."""
    print(text_table(trials_table(study, setup)), flush=True)
    page = write_report(study, setup)
    best = write_best(study, setup)
    print(f"wrote {best} and {page}")
