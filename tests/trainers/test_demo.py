"""`bmvae demo` end to end on the real Digits data (shortened to one epoch)."""

import io
import json
import os

import pytest
import tensorflow as tf

from bmvae_tf.trainers import demo


@pytest.mark.slow
def test_demo_runs_end_to_end_and_prints_the_summary(tmp_path):
    out = io.StringIO()
    metrics = demo.run_demo(str(tmp_path), epochs=1, stream=out)
    table = out.getvalue()
    assert "latent accuracy" in table and "digit+street+text" in table
    assert "street|digit" in table and "mean over single givens" in table
    assert str(tmp_path / "export") in table

    with open(tmp_path / "run" / "metrics.json") as f:
        on_disk = json.load(f)
    assert on_disk["latent_accuracy"] == metrics["latent_accuracy"]
    assert len(on_disk["latent_accuracy"]) == 7
    assert on_disk["epochs"] == 1
    for plot in ("mixture_weights.png", "training_curve.png", "prior_samples.png", "latent_embedding.png",
                 "cross_generation_digit.png", "cross_generation_street.png", "cross_generation_text.png"):
        assert os.path.getsize(tmp_path / "run" / "plots" / plot) > 0
    # The demo analyses the mixture weights too, so its report has every section.
    assert os.path.exists(tmp_path / "run" / "analysis" / "analysis.json")
    page = (tmp_path / "run" / "report.html").read_text()
    for section in ("<dt>seed</dt>", "Resolved config", "Training curve", "Mixture weights", "target x given",
                    "Cross generation from text", "Joint generation from the prior", "embedded together in 2-D (t-SNE)",
                    "against input noise", "Dimension sets from the normalised", "Sub-vector latent accuracy",
                    "R^2 of each ground-truth factor", "Latent accuracy (linear probe"):
        assert section in page, section
    with open(tmp_path / "run" / "analysis" / "analysis.json") as f:
        private = json.load(f)["dimensions"]["private"]
    for modality, dims in private.items():  # one epoch may leave the weights too uniform for any
        assert (f"Dimension swap (Fig. 7) for {modality}" in page) == bool(dims)
    loaded = tf.saved_model.load(str(tmp_path / "export"))
    assert set(loaded.signatures) >= {"encode", "cross_generate", "sample", "serving_default"}
