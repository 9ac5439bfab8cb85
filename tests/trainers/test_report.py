"""Tests of trainers.reporting: run reports and `bmvae compare` on hand-made run directories, and the
offline HTML rendered by headless Chromium where it is installed."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from bmvae_tf.errors import UserError
from bmvae_tf.trainers import cli
from bmvae_tf.trainers.evaluation import robustness
from bmvae_tf.trainers.evaluation.metrics import Metrics
from bmvae_tf.trainers.reporting import compare, plots, report

LEVELS = [0.0, 0.5, 1.0]


def _metrics(model: str, latent: float, relative_curve: list[float], baseline: list[float]) -> dict:
    names = ["x", "y"]
    subsets = ["x", "y", "x+y"]
    return {
        "model": model, "dataset": "toy", "modalities": names, "epochs": 2, "seconds_per_epoch": 1.5,
        "split": "test",
        "latent_accuracy": {s: latent for s in subsets},
        "coherence": {"y|x": 0.5, "x|y": 0.25},
        "random_coherence": 0.1, "random_coherence_gmm": 0.2,
        "log_likelihood": {s: -100.0 for s in subsets},
        "joint_log_likelihood": -100.0, "conditional_log_likelihood": {"y|x": -40.0, "x|y": -60.0},
        "likelihood_estimators": {"log_likelihood": "toy IWAE", "joint_log_likelihood": "toy",
                                  "conditional_log_likelihood": "toy difference"},
        "classifier_accuracy": {"x": 0.9, "y": 0.8},
        "robustness": {
            "noise_levels": LEVELS, "noise": "toy noise",
            "latent_accuracy": {s: relative_curve for s in subsets},
            "baseline_accuracy": {s: baseline for s in subsets},
            "relative": {s: robustness.relative_robustness(LEVELS, relative_curve) for s in subsets},
            "effective": {s: robustness.effective_robustness(relative_curve, baseline) for s in subsets},
            "baseline_relative": {s: 0.0 for s in subsets}},
        "mixture_weights": None,
        "num_examples": {"latent_accuracy": {"train": 80, "test": 20}, "coherence": 20,
                         "random_coherence": 50, "random_coherence_gmm": {"samples": 50, "gmm_fit": 80},
                         "log_likelihood": 10, "log_likelihood_samples": 7, "classifier": {"train": 80, "test": 20},
                         "joint_log_likelihood": 10, "joint_log_likelihood_samples": 7,
                         "conditional_log_likelihood": 10, "conditional_log_likelihood_samples": 7,
                         "robustness": {"train": 80, "test": 20, "baseline_train": 80, "levels": 3}},
        "skipped": {},
    }


def _write_run(directory, metrics: dict, terms: bool = False) -> str:
    os.makedirs(os.path.join(directory, "plots"), exist_ok=True)
    with open(os.path.join(directory, "metrics.json"), "w") as f:
        json.dump(metrics, f)
    with open(os.path.join(directory, "history.jsonl"), "w") as f:
        for epoch in (1, 2):
            record = {"epoch": epoch, "step": epoch, "loss": 3.0 / epoch, "val_loss": None, "seconds": 1.5}
            if terms:
                record["terms"] = {"train/reconstruction": 2.0 / epoch, "train/kl": 1.0 / epoch,
                                   "val/reconstruction": 2.5 / epoch, "val/kl": 1.2 / epoch}
            f.write(json.dumps(record) + "\n")
    plots.save_figure(plots.robustness_figure(metrics["robustness"]),
                      os.path.join(directory, "plots", plots.ROBUSTNESS))
    return str(directory)


def _external_references(page: str) -> list[str]:
    return re.findall(r'(?:src|href)="(?!data:)[^"]*"|<script|<link|@import|url\(', page)


def test_html_is_self_contained_and_escapes_text():
    table = report.Table("T", ["a|b", "<v>"], [["<script>x</script>", "1"]], "note & more")
    image = report.Image("cap", b"\x89PNG fake", "images/x.png")
    page = report.render_html("title", [("S", [table, image, "para"])])
    assert _external_references(page) == []
    assert "&lt;script&gt;x&lt;/script&gt;" in page and "<script>" not in page
    assert "data:image/png;base64,iVBORyBmYWtl" in page
    markdown = report.render_markdown("title", [("S", [table, image])])
    assert "| a\\|b | <v> |" in markdown and "![cap](images/x.png)" in markdown


def test_run_tables_say_how_many_examples_each_number_rests_on():
    tables = {t.title: t for t in report.run_metric_tables(Metrics.from_json(_metrics("m", 0.9, [0.9, 0.6, 0.3], [0.8, 0.4, 0.2])))}
    latent = tables["Latent accuracy (linear probe on posterior means)"]
    assert latent.rows[0] == ["x", "0.900"] and "80 train" in latent.note and "20 test" in latent.note
    assert "K = 7" in tables["Log-likelihood (IWAE estimate of log p(x_S))"].note
    conditional = tables["Conditional log-likelihood log p(x_T | x_S)"]
    assert conditional.rows == [["y|x", "-40.0"], ["x|y", "-60.0"]]
    assert "10 test examples" in conditional.note and "toy difference" in conditional.note
    rob = tables["Robustness (MultiBench): latent accuracy under input noise"]
    # relative: 0.5 * (0.9 + 0.6) / 2 + 0.5 * (0.6 + 0.3) / 2 = 0.6; effective: (0 - 0) + (-0.3 + 0.4)
    # + (-0.6 + 0.6) = 0.1
    assert rob.rows[0][:5] == ["x", "0.900", "0.300", "0.600", "0.100"]
    assert "20 test examples per level" in rob.note


def test_compare_puts_runs_side_by_side_with_normalised_robustness(tmp_path):
    first = _write_run(tmp_path / "runs" / "alpha", _metrics("bmvae_m", 0.9, [0.9, 0.6, 0.3], [0.8, 0.4, 0.2]))
    second = _write_run(tmp_path / "runs" / "beta", _metrics("mmvae", 0.8, [0.8, 0.7, 0.6], [0.8, 0.4, 0.2]))
    markdown_path, html_path = compare.compare([first, second], str(tmp_path / "out"))
    with open(markdown_path) as f:
        markdown = f.read()
    assert "| alpha | 0.900 | 0.900 | 0.900 |" in markdown
    assert "| beta | 0.800 | 0.800 | 0.800 |" in markdown
    assert "| run | y\\|x | x\\|y |" in markdown
    assert "| alpha | -100.0 | -100.0 | -100.0 |" in markdown

    scores = compare.robustness_scores(compare.load_runs([first, second]))
    # relative: alpha 0.6, beta 0.5 * 1.5 / 2 + 0.5 * 1.3 / 2 = 0.7; effective: alpha 0.1,
    # beta (0 - 0) + (-0.1 + 0.4) + (-0.2 + 0.6) = 0.7. Min-max: alpha 0, beta 1 on both.
    assert scores["alpha"]["relative"] == pytest.approx(0.6) and scores["beta"]["relative"] == pytest.approx(0.7)
    assert scores["beta"]["effective"] == pytest.approx(0.7)
    assert (scores["alpha"]["mean_normalised"], scores["beta"]["mean_normalised"]) == (0.0, 1.0)
    assert "| alpha | 0.900 | 0.600 | 0.100 | 0.000 | 0.000 | 0.000 |" in markdown

    images = sorted(os.listdir(tmp_path / "out" / "images"))
    assert images == ["robustness.png", "run1_robustness.png", "run2_robustness.png", "training_curves.png"]
    for name in images:
        assert f"(images/{name})" in markdown
    with open(html_path) as f:
        page = f.read()
    assert page.count("data:image/png;base64,") == 4 and _external_references(page) == []

    assert cli.main(["compare", first, second, "--output", str(tmp_path / "again")]) == 0
    with open(tmp_path / "again" / "report.md") as f:
        assert f.read() == markdown


def test_compare_needs_evaluated_runs(tmp_path, capsys):
    os.makedirs(tmp_path / "fresh")
    with pytest.raises(UserError, match="run `bmvae evaluate"):
        compare.compare([str(tmp_path / "fresh")], str(tmp_path / "out"))
    assert cli.main(["compare", str(tmp_path / "fresh"), "--output", str(tmp_path / "out")]) == 2
    assert "metrics.json: not found" in capsys.readouterr().err


def test_run_labels_are_short_and_unique():
    assert compare.run_labels(["/a/x/run", "/a/y/run", "/b/other"]) == ["x/run", "y/run", "b/other"]
    assert compare.run_labels(["/r/one", "/r/two"]) == ["one", "two"]
    with pytest.raises(UserError, match="twice"):
        compare.run_labels(["/a/run", "/a/run/"])


def test_write_run_report_without_metrics_says_what_to_do(tmp_path):
    with open(tmp_path / "history.jsonl", "w") as f:
        f.write(json.dumps({"epoch": 1, "step": 1, "loss": 2.0, "val_loss": 2.5, "seconds": 1.0}) + "\n")
    path = report.write_run_report(str(tmp_path))
    with open(path) as f:
        page = f.read()
    assert "run `bmvae evaluate`" in page and page.count("data:image/png;base64,") == 1


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_report_renders_offline_in_headless_chromium(tmp_path):
    page = report.write_run_report(_analysed_run(tmp_path))
    shot = str(tmp_path / "shot.png")
    # --no-sandbox: CI containers run as root; the page needs no network (all images inline), and
    # Chromium's own background connections are turned off, since CI's network is closed.
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
                    "--window-size=1000,2400", f"--screenshot={shot}", f"file://{os.path.abspath(page)}"],
                   check=True, capture_output=True, timeout=120)
    from PIL import Image

    with Image.open(shot) as image:
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.shape == (2400, 1000, 3)
    # A rendered report has text, table borders and the plots' colours, not a blank page:
    # the matplotlib default blue (#1f77b4) of the curves appears, and the dark red end of the
    # diverging mixture-weight scale (RdBu_r, #67001f) for the 0.7 weight.
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50
    assert np.any(np.all(np.abs(pixels.astype(int) - [31, 119, 180]) < 8, axis=-1))
    assert np.any(np.all(np.abs(pixels.astype(int) - [103, 0, 31]) < 12, axis=-1))


def test_bmvae_train_writes_the_run_report_with_its_training_curve(tmp_path):
    from tests import synthetic

    data, run = str(tmp_path / "data"), tmp_path / "run"
    synthetic.write_dataset(data, num_train=64, num_test=16)
    assert cli.main(["train", "--data", data, "--workdir", str(run), "--epochs", "2",
                     *synthetic.TINY_CLI, "--set", "train.batch_size=16"]) == 0
    page = (run / "report.html").read_text()
    # Before `evaluate`: the training curve (the only picture) and a pointer to what comes next.
    assert page.count("data:image/png;base64,") == 1 and "Training curve" in page
    assert "run `bmvae evaluate`" in page


# ------------------------------------------------------------------------------------ the record


def test_metrics_record_round_trips_metrics_json(tmp_path):
    data = _metrics("m", 0.9, [0.9, 0.6, 0.3], [0.8, 0.4, 0.2])
    record = Metrics.from_json(data)
    assert record.to_json() == data
    assert list(record.to_json())[:3] == ["model", "dataset", "modalities"]  # the record's field order
    assert record.count("log_likelihood_samples") == 7 and record.count("absent") is None
    path = str(tmp_path / "metrics.json")
    record.write(path)
    assert Metrics.from_json(path) == record
    record.cca_coherence = {"ground_truth": 0.27}
    assert record.to_json()["cca_coherence"] == {"ground_truth": 0.27}


@pytest.mark.parametrize("content, problem", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    (json.dumps({"model": "m", "dataset": "d"}), "missing 'modalities'"),
    # Written before the likelihoods were unweighted (issue 14): its log_likelihood is not one.
    (json.dumps({k: v for k, v in _metrics("m", 0.9, [0.9, 0.6, 0.3], [0.8, 0.4, 0.2]).items()
                 if k not in ("joint_log_likelihood", "conditional_log_likelihood", "likelihood_estimators")}),
     "missing 'joint_log_likelihood', 'conditional_log_likelihood', 'likelihood_estimators'"),
    (json.dumps({**_metrics("m", 0.9, [0.9, 0.6, 0.3], [0.8, 0.4, 0.2]), "latent_acc": {}}), "unknown 'latent_acc'"),
])
def test_a_bad_or_old_metrics_json_is_a_user_error_naming_the_file(tmp_path, content, problem):
    path = tmp_path / "metrics.json"
    path.write_text(content)
    with pytest.raises(UserError, match=problem) as error:
        Metrics.from_json(str(path))
    assert str(path) in str(error.value)
    # The run report shows the problem rather than failing (training writes it too).
    with open(report.write_run_report(str(tmp_path))) as f:
        assert html.escape(str(error.value)) in f.read()


# ------------------------------------------------------------------------------------ report.html


def _analysed_run(tmp_path) -> str:
    """A run with metrics (3 x 2 mixture weights), history with per-term values, config.yaml and
    an analysis.json that calls dimension 2 private to y."""
    metrics = _metrics("bmvae_m", 0.9, [0.9, 0.6, 0.3], [0.8, 0.4, 0.2])
    metrics["mixture_weights"] = [[0.5, 0.5], [0.3, 0.7], [0.55, 0.45]]
    run = _write_run(tmp_path / "run", metrics, terms=True)
    (tmp_path / "run" / "config.yaml").write_text("model:\n  name: bmvae_m\ntrain:\n  seed: 17\n  epochs: 2\n")
    os.makedirs(tmp_path / "run" / "analysis")
    analysis = {"model": "bmvae_m", "dataset": "toy", "modalities": ["x", "y"], "weights_name": "alpha",
                "weights": metrics["mixture_weights"], "threshold": 0.3,
                "dimensions": {"private": {"x": [], "y": [2]}, "shared": [1, 3]},
                "files": {"mixture_weights": "mixture_weights.png"}}
    (tmp_path / "run" / "analysis" / "analysis.json").write_text(json.dumps(analysis))
    (tmp_path / "run" / "analysis" / "mixture_weights.png").write_bytes(b"\x89PNG analysis's own")
    return run


def test_run_report_has_a_header_then_pictures_then_tables(tmp_path):
    with open(report.write_run_report(_analysed_run(tmp_path))) as f:
        page = f.read()
    for fact in ("<dt>model</dt><dd>bmvae_m</dd>", "<dt>dataset</dt><dd>toy</dd>", "<dt>seed</dt><dd>17</dd>",
                 "<dt>source commit</dt>", "<dt>report written</dt>", "<dt>evaluated</dt>"):
        assert fact in page, fact
    assert "<details><summary>Resolved config (RUN/config.yaml)</summary><pre>model:" in page
    pictures, tables = page.index("<h2>Pictures</h2>"), page.index("<h2>Tables</h2>")
    assert page.index("<h2>Run</h2>") < pictures < page.index("data:image/png") < tables
    assert "data:image/png" not in page[tables:]
    # No table repeats a picture: no history table, no coherence table (the matrix shows it).
    assert "Training history" not in page and "Cross coherence (target|given)</h3>" not in page
    captions = re.findall(r"<figcaption>(.*?)</figcaption>", page)
    assert captions[0].startswith("Training curve") and "outlined: private dimensions" in captions[1]
    assert "target x given matrix" in captions[2] and "input noise" in captions[3]
    assert "Sub-vector" not in page and "Dimension sets" in page  # analysis tables follow
    # The mixture weights are shown once, drawn by the report with analysis.json's private sets.
    assert sum("Mixture weights" in c or "per dimension and modality" in c for c in captions) == 1
    assert "iVBORyBhbmFseXNpcydzIG93bg" not in page


def test_the_source_commit_is_read_when_the_tree_is_a_git_checkout_and_never_fails(monkeypatch):
    commit = report.source_commit()
    assert commit is None or re.fullmatch(r"[0-9a-f]{40}", commit)
    monkeypatch.setenv("PATH", "/nonexistent")  # no git at all
    assert report.source_commit() is None
    items = report.run_header("/r", None, None, None, {}, None)
    assert ("source commit", "unknown (the source tree is not a git checkout)") in items[0].items


def test_mixture_weights_diverge_around_uniform_with_private_dimensions_outlined():
    weights = np.array([[0.30, 0.35, 0.35], [0.40, 0.30, 0.30], [0.33, 0.33, 0.34]])
    figure = plots.mixture_weights_figure(weights, ["a", "b", "c"], private={"a": [1], "b": [], "c": []})
    image = figure.axes[0].images[0]
    assert image.norm.vcenter == pytest.approx(1 / 3) and image.get_cmap().name == "RdBu_r"
    # The colour scale spans the weights, not 0-1: the largest deviation from 1/M sits at an end.
    assert image.norm.vmax == pytest.approx(0.40) and image.norm.vmin == pytest.approx(2 / 3 - 0.40)
    outlined = [p for p in figure.axes[0].patches if not p.get_fill()]
    assert [(p.get_x(), p.get_y()) for p in outlined] == [(-0.5, 0.5)]  # modality a, dimension 2
    assert "2 of 3 dimensions shared" in figure.axes[0].get_title()


def test_coherence_is_a_target_by_given_matrix():
    coherence = {"y|x": 0.5, "z|x": 0.25, "x|y": 0.75, "x|y+z": 1.0}
    figure = plots.coherence_matrix_figure(coherence, ["x", "y", "z"], random_coherence=0.1)
    values = figure.axes[0].images[0].get_array()
    assert [t.get_text() for t in figure.axes[0].get_xticklabels()] == ["x", "y", "y+z"]
    np.testing.assert_array_equal(values.mask, [[True, False, False], [False, True, True], [False, True, True]])
    assert values[1, 0] == 0.5 and values[2, 0] == 0.25 and values[0, 2] == 1.0
    assert "random coherence from the prior: 0.10" in figure.axes[0].get_title()


def test_loss_curves_have_a_panel_per_recorded_term_and_degrade_to_the_loss():
    history = [{"epoch": e, "loss": 3.0 / e, "val_loss": 3.5 / e,
                "terms": {"train/bound": 3.0 / e, "train/kl_alpha": 0.1, "val/bound": 3.5 / e}} for e in (1, 2, 3)]
    assert plots.loss_term_names(history) == ["bound", "kl_alpha"]
    figure = plots.loss_terms_figure(history)
    titles = [ax.get_title() for ax in figure.axes]
    assert titles == ["loss (negative objective)", "bound", "kl_alpha"]
    bound = figure.axes[1]
    assert [len(line.get_xdata()) for line in bound.lines] == [3, 3]  # train and validation
    assert len(figure.axes[2].lines) == 1  # no validation value recorded for kl_alpha
    old = plots.loss_terms_figure([{k: v for k, v in h.items() if k != "terms"} for h in history])
    assert len(old.axes) == 1 and "records no per-term values" in old.texts[0].get_text()


def test_generation_grids_and_the_latent_embedding():
    from bmvae_tf import schema

    specs = [schema.ModalitySpec("img", "image", (4, 4, 1)),
             schema.ModalitySpec("txt", "sequence", (3,), "int64", "categorical", vocab=("<pad>", "a", "b"))]
    inputs = np.random.default_rng(0).random((10, 4, 4, 1))
    generated = {"img": np.zeros((5, 10, 4, 4, 1)), "txt": np.ones((5, 10, 3), np.int64)}
    figure = plots.cross_generation_figure(specs, "img", inputs, generated)
    ax = figure.axes[0]  # one axes: hundreds of subplots would take seconds to render
    assert len(ax.images) == 10 * (1 + 5) and len(ax.patches) == 10 * (1 + 2 * 5)
    texts = [t.get_text() for t in ax.texts]
    assert texts.count("'aaa'") == 10 * 5  # every generated sequence rendered as text
    assert "img\n#1" in texts and "txt\n#5" in texts and "#10" in texts
    prior = plots.prior_samples_figure(specs, {"img": np.zeros((10, 4, 4, 1)), "txt": np.ones((10, 3), np.int64)})
    assert len(prior.axes[0].images) == 10 and [t.get_text() for t in prior.axes[0].texts].count("'aaa'") == 10
    vector = schema.ModalitySpec("vec", "vector", (5,))
    lines = plots.prior_samples_figure([vector], {"vec": np.arange(20.0).reshape(4, 5)}).axes[0].lines
    assert len(lines) == 4 and all(len(line.get_xdata()) == 5 for line in lines)  # a vector as a curve
    rng = np.random.default_rng(1)
    means = {"img": rng.normal(size=(150, 6)), "txt": rng.normal(size=(150, 6)) + 3.0}
    labels = rng.integers(0, 3, size=150)
    embedding = plots.latent_embedding_figure(means, labels, ["zero", "one", "two"])
    assert [ax.get_title() for ax in embedding.axes] == ["coloured by class", "coloured by modality"]
    assert len(embedding.axes[0].collections[0].get_offsets()) == 300
    assert [t.get_text() for t in embedding.axes[0].get_legend().get_texts()] == ["zero", "one", "two"]
    assert "t-SNE" in embedding.texts[0].get_text()
    small = plots.latent_embedding_figure({k: v[:4] for k, v in means.items()}, None)
    assert len(small.axes) == 1 and "PCA" in small.texts[0].get_text()  # unlabelled: by modality only
