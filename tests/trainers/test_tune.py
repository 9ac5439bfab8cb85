"""`bmvae tune`: the search space, bad input (one line, exit 2), pruning, and a small search on
SQLite that writes best.yaml and report.html and continues when rerun."""

import dataclasses
import glob
import json
import os
import re

import optuna
import pytest
import yaml

from bmvae_tf.errors import UserError
from bmvae_tf.pipeline import build_digits
from bmvae_tf.trainers import cli
from bmvae_tf.trainers import config as config_lib
from bmvae_tf.trainers import run_dir
from bmvae_tf.trainers.tuning import space as space_lib
from bmvae_tf.trainers.tuning import study as study_lib
from tests import synthetic

SEARCH = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "search")
TINY = ["--set=model.latent_dim=4", "--set=model.hidden_units=[16]", "--set=model.channels=[8,8,8]",
        "--set=model.sequence_width=8", "--set=train.batch_size=32", "--set=train.log_every_steps=1000",
        "--set=train.validation_fraction=0.25"]
H = (64 + 768 + 8) / 3  # the synthetic data's modalities: 8x8x1, 16x16x3, 8 tokens


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("synthetic"))
    synthetic.write_dataset(directory, num_train=128, num_test=32)
    return directory


def _space(tmp_path, text: str, name: str = "space.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# ------------------------------------------------------------------------------------ the space


def test_h_is_the_mean_element_count_of_the_modalities():
    manifest = build_digits.manifest_template(source={}, pipeline_options={})
    assert space_lib.mean_element_count(manifest) == pytest.approx(H)


def test_space_reads_categories_ranges_log_int_and_multiples_of_h():
    space = space_lib.parse_space({
        "model.bmvae_m.lambda_c": {"values": ["0.01h", "0.1h", "0.5h"]},
        "train.learning_rate": {"low": "1e-4", "high": 3.0e-3, "log": True},
        "model.latent_dim": {"low": 8, "high": 32, "step": 8, "int": True},
        "model.bmvae_p.eta": {"low": "h", "high": "2*h"},
    }, h=280.0, where="s.yaml")
    lam, lr, latent, eta = space.parameters
    assert lam.values == pytest.approx((2.8, 28.0, 140.0))
    assert (lr.low, lr.high, lr.log) == (1e-4, 3e-3, True)
    assert (latent.low, latent.high, latent.step, latent.integer) == (8, 32, 8, True)
    assert (eta.low, eta.high) == (280.0, 560.0)
    assert space.grid() is None
    grid = space_lib.parse_space({"a.b": [1, 2], "c.d": {"values": ["x", "y", "z"]}}, 1.0, "g.yaml")
    assert grid.grid_size() == 6 and len(space_lib.grid_points(grid)) == 6


@pytest.mark.parametrize("spec, message", [
    ({"model.K": {"low": 5, "high": 2, "int": True}}, "is empty"),
    ({"train.learning_rate": {"low": 0.1, "high": 0.01}}, "is empty"),
    ({"train.learning_rate": {"low": 0, "high": 1, "log": True}}, "log range needs low > 0"),
    ({"model.K": {"values": []}}, "non-empty list"),
    ({"model.K": {"low": 1}}, "needs 'low' and 'high'"),
    ({"model.K": {"low": 1, "high": 3, "scale": "log"}}, "unknown field 'scale'"),
    ({"model.K": {"values": [1, 1]}}, "repeats"),
    ({"model.K": {"low": "lots", "high": 3}}, "'low' must be a number"),
    ({}, "non-empty mapping"),
])
def test_bad_space_is_one_user_error_naming_the_file_and_key(spec, message):
    with pytest.raises(UserError, match=message) as e:
        space_lib.parse_space(spec, h=10.0, where="s.yaml")
    assert str(e.value).startswith("s.yaml") and "\n" not in str(e.value)


def _setup(dataset, tune_dir, space, overrides=(), **kwargs):
    return study_lib.Setup(tune_dir=str(tune_dir), data_dir=dataset, config_file=None,
                           overrides=[o.removeprefix("--set=") for o in TINY] + list(overrides), space=space,
                           objective="val_loss", trials=kwargs.pop("trials", 2), study_name="s",
                           storage_url=study_lib.default_storage(str(tune_dir)), **kwargs)


def test_space_is_checked_against_the_config(dataset, tmp_path):
    unknown = space_lib.parse_space({"model.bmvae_m.lamda_c": [1.0, 2.0]}, 1.0, "s.yaml")
    with pytest.raises(UserError, match=r"s.yaml: model.bmvae_m.lamda_c=1: unknown config key"):
        space_lib.check_space(unknown, _setup(dataset, tmp_path, unknown).build)
    refused = space_lib.parse_space({"model.bmvae_m.lambda_c": {"low": -1.0, "high": 2.0}}, 1.0, "s.yaml")
    with pytest.raises(UserError, match=r"lambda_c=-1: .*must be >= 0"):
        space_lib.check_space(refused, _setup(dataset, tmp_path, refused).build)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(SEARCH, "*.yaml"))), ids=os.path.basename)
def test_every_search_space_in_configs_fits_the_digits_config(path, tmp_path):
    manifest = build_digits.manifest_template(source={}, pipeline_options={})
    space = space_lib.load_space(path, space_lib.mean_element_count(manifest))
    name = os.path.basename(path)
    model = "bmvae_p" if name.startswith("bmvae_p") else "mmvae" if name == "baselines.yaml" else "bmvae_m"
    setup = _setup("/nowhere", tmp_path, space, [f"model.name={model}"])
    space_lib.check_space(space, setup.build)
    if name == "bmvae_m.yaml":
        assert space.grid() == {"model.bmvae_m.lambda_c": pytest.approx([2.8, 28.0, 140.0])}


# ------------------------------------------------------------------------------------ bad input


def _tune(argv, capsys):
    code = cli.main(["tune", *argv])
    captured = capsys.readouterr()
    return code, captured.err.strip().splitlines(), captured.out


@pytest.mark.parametrize("space, extra, message", [
    ("model.bmvae_m.lamda_c: [1.0, 2.0]\n", [], "unknown config key 'model.bmvae_m.lamda_c'"),
    ("train.learning_rate: {low: 0.1, high: 0.01}\n", [], "is empty"),
    ("model.bmvae_m.lambda_c: [1.0, 2.0]\n", ["--objective", "val_elbo"], "--objective val_elbo: unknown"),
    ("model.bmvae_m.lambda_c: [1.0, 2.0]\n", ["--direction", "up"], "--direction up: choose"),
    ("model.bmvae_m.lambda_c: [1.0, 2.0]\n", ["--storage", "postgresql://u:secret@127.0.0.1:1/db"],
     "cannot open the study storage"),
    ("model.bmvae_m.lambda_c: [1.0, 2.0]\n", ["--storage", "sqlite:////no/such/dir/study.db"],
     "cannot open the study storage"),
    ("model.bmvae_m.lambda_c: [1.0, 2.0]\n", ["--set", "train.validation_fraction=0", "--objective", "val_loss"],
     "--objective val_loss: .* has no validation split .*set train.validation_fraction"),
    ("model.bmvae_m.lambda_c: [1.0, 2.0]\n", ["--objective", "val_coherence"],
     "--objective val_coherence: .* needs a labelled validation split"),
])
def test_bad_input_is_one_line_and_exit_2(dataset, tmp_path, capsys, space, extra, message):
    # A dataset built before validation splits: val_loss may hold out part of train, an
    # evaluation objective may not.
    if "--objective" in extra and extra[-1] != "val_elbo":
        dataset = str(tmp_path / "no_validation")
        synthetic.write_dataset(dataset, num_train=64, num_test=16, num_validation=0)
    argv = ["--data", dataset, "--workdir", str(tmp_path / "tune"), "--space", _space(tmp_path, space),
            *TINY, *extra]
    code, errors, _ = _tune(argv, capsys)
    assert code == 2
    assert len(errors) == 1 and errors[0].startswith("bmvae: error:"), errors
    assert re.search(message, errors[0]), errors[0]
    assert "secret" not in errors[0]
    assert not glob.glob(str(tmp_path / "tune" / "trials" / "*"))


# ------------------------------------------------------------------------------------ trials


@pytest.mark.slow
def test_val_loss_prunes_a_trial_after_its_epoch(dataset, tmp_path):
    space = space_lib.parse_space({"model.bmvae_m.lambda_c": {"low": 1.0, "high": 10.0}}, H, "s.yaml")
    setup = _setup(dataset, tmp_path, space, ["train.epochs=2"])
    # val_loss is in the thousands: a threshold of 1 prunes after the first epoch.
    study = optuna.create_study(pruner=optuna.pruners.ThresholdPruner(upper=1.0))
    study.optimize(study_lib.Objective(setup, study), n_trials=1)
    [trial] = study.trials
    assert trial.state.name == "PRUNED" and list(trial.intermediate_values) == [1]
    history = run_dir.read_history(run_dir.RunPaths(str(tmp_path / "trials" / "0000")))
    assert [h["epoch"] for h in history] == [1]  # stopped there, resumable
    assert trial.intermediate_values[1] == pytest.approx(history[0]["val_loss"])


@pytest.mark.slow
def test_search_on_sqlite_writes_best_and_report_and_a_rerun_continues(dataset, tmp_path, capsys):
    tune_dir = tmp_path / "tune"
    argv = ["--data", dataset, "--workdir", str(tune_dir), "--epochs", "1", *TINY,
            "--space", _space(tmp_path, "model.bmvae_m.lambda_c: {low: 0.01h, high: 0.5h, log: true}\n")]
    code, _, out = _tune([*argv, "--trials", "2"], capsys)
    assert code == 0
    study = optuna.load_study(study_name="bmvae-tune", storage=f"sqlite:///{tune_dir}/study.db")
    first = {t.number: (t.value, t.params, t.datetime_complete) for t in study.trials}
    assert len(first) == 2 and all(t.state.name == "COMPLETE" for t in study.trials)
    assert all(0.01 * H <= t.params["model.bmvae_m.lambda_c"] <= 0.5 * H for t in study.trials)
    best = min(study.trials, key=lambda t: t.value)

    # Each trial is an ordinary run; best.yaml is the best one's config, ready for `bmvae train`.
    for t in study.trials:
        config = run_dir.read_config(run_dir.RunPaths(str(tune_dir / "trials" / f"{t.number:04d}")))
        assert config.model.bmvae_m.lambda_c == pytest.approx(t.params["model.bmvae_m.lambda_c"])
    with open(tune_dir / "best.yaml") as f:
        text = f.read()
    assert text.startswith("# Chosen by `bmvae tune`") and f"trial {best.number} of study" in text
    chosen = config_lib.from_dict(yaml.safe_load(text))
    assert chosen.model.bmvae_m.lambda_c == pytest.approx(best.params["model.bmvae_m.lambda_c"])
    assert chosen.train.epochs == 1 and chosen.model.latent_dim == 4
    page = (tune_dir / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3  # history, val_loss curves, lambda_c
    assert "trials/0001" in page and "http" not in page.replace("http-equiv", "")
    assert "complete (best)" in out and "model.bmvae_m.lambda_c" in out

    # Rerunning with more trials continues the study: the two finished ones are kept, not rerun.
    code, _, out = _tune([*argv, "--trials", "3"], capsys)
    assert code == 0
    study = optuna.load_study(study_name="bmvae-tune", storage=f"sqlite:///{tune_dir}/study.db")
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    assert {t.number: (t.value, t.params, t.datetime_complete) for t in study.trials[:2]} == first
    assert json.loads(open(tune_dir / "trials" / "0002" / "history.jsonl").readline())["epoch"] == 1


def test_a_study_made_for_another_objective_or_space_is_refused(dataset, tmp_path):
    space = space_lib.parse_space({"model.bmvae_m.lambda_c": [1.0, 2.0]}, H, "s.yaml")
    setup = _setup(dataset, tmp_path, space)
    first = study_lib.open_study(setup)
    assert first.user_attrs["objective"] == "val_loss"
    again = study_lib.open_study(setup)  # the same search continues
    assert again._study_id == first._study_id
    other = space_lib.parse_space({"model.bmvae_m.lambda_c": [1.0, 3.0]}, H, "s.yaml")
    with pytest.raises(UserError, match=r"--study s: this study in sqlite:///.* was made with space"):
        study_lib.open_study(_setup(dataset, tmp_path, other))
    with pytest.raises(UserError, match="was made with objective 'val_loss'"):
        study_lib.open_study(dataclasses.replace(setup, objective="val_coherence"))


def test_a_trial_directory_of_another_study_is_not_taken_over(dataset, tmp_path, capsys):
    tune_dir = tmp_path / "tune"
    (tune_dir / "trials" / "0000").mkdir(parents=True)
    (tune_dir / "trials" / "0000" / "config.yaml").write_text("model: {name: bmvae_p}\n")
    argv = ["--data", dataset, "--workdir", str(tune_dir), *TINY, "--study", "another",
            "--space", _space(tmp_path, "model.bmvae_m.lambda_c: [1.0, 2.0]\n")]
    code, errors, _ = _tune(argv, capsys)
    assert code == 2 and not any("Traceback" in line for line in errors)
    assert errors[-1].startswith("bmvae: error:") and "trials/0000: holds a run that is not trial 0 " \
        "of study another" in errors[-1]


def test_a_val_term_objective_is_read_from_each_epoch_and_must_exist():
    record = {"epoch": 2, "val_loss": 10.0, "terms": {"val/bound": -9.5, "train/bound": -9.0}}
    assert study_lib.objective_value("val/bound", "RUN", [record]) == -9.5
    assert study_lib.objective_value("val_loss", "RUN", [record]) == 10.0
    study = optuna.create_study(direction="maximize")
    trial = study.ask()
    study_lib._report(trial, record, "val/bound")
    assert study.trials[0].intermediate_values == {2: -9.5}
    with pytest.raises(UserError, match=r"--objective val/elbo: the model records no such term; it has \['val/bound'\]"):
        study_lib._report(trial, record, "val/elbo")
    with pytest.raises(UserError, match="recorded no val/elbo"):
        study_lib.objective_value("val/elbo", "RUN", [record])


def test_the_trials_table_shows_epochs_for_objectives_not_reported_per_epoch(dataset, tmp_path):
    from bmvae_tf.trainers.tuning import results

    space = space_lib.parse_space({"model.bmvae_m.lambda_c": [1.0, 2.0]}, H, "s.yaml")
    setup = _setup(dataset, tmp_path, space)
    study = optuna.create_study(direction="maximize")
    per_epoch = study.ask({"model.bmvae_m.lambda_c": optuna.distributions.CategoricalDistribution([1.0, 2.0])})
    per_epoch.report(5.0, 3)
    study.tell(per_epoch, 5.0)
    after_training = study.ask({"model.bmvae_m.lambda_c": optuna.distributions.CategoricalDistribution([1.0, 2.0])})
    after_training.set_user_attr("epochs", 15)  # what Objective records for val_coherence
    study.tell(after_training, 0.6)
    table = results.trials_table(study, setup)
    column = table.headers.index("epochs")
    assert [row[column] for row in table.rows] == ["3", "15"]
