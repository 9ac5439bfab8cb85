"""The SavedModel contract (SPEC section 5): reloaded in a fresh process without bmvae-tf, the
export must reproduce the Python model, ignore absent modalities and be written atomically."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import tensorflow as tf

from bmvae_tf import schema
from bmvae_tf.errors import UserError
from bmvae_tf.models.base import MultimodalVAE
from tests import synthetic
from bmvae_tf.trainers import config as config_lib
from bmvae_tf.trainers import export
from bmvae_tf.trainers import run_dir

MODEL = {"latent_dim": 4, "hidden_units": [16], "channels": [8, 8, 8], "sequence_width": 8}
SUBSET = [True, False, True]  # "street" absent
BATCH = 5
NUM_SAMPLES = 6
SEEDS = (7, 8)

# Runs in a fresh interpreter: only TensorFlow and NumPy, as a server would.
_RELOAD_SCRIPT = """
import json, sys
import numpy as np
import tensorflow as tf

export_dir, inputs_path, outputs_path, seeds, num = sys.argv[1:]
loaded = tf.saved_model.load(export_dir)
names = [n.decode() for n in loaded.modality_names.numpy()]
manifest = json.loads(loaded.manifest_json.numpy().decode())
assert [m["name"] for m in manifest["modalities"]] == names, (manifest, names)

inputs = np.load(inputs_path)
outputs = {}
for feed in sorted({key.split(".")[0] for key in inputs.files}):
    kwargs = {key.split(".")[1]: tf.constant(inputs[key]) for key in inputs.files
              if key.split(".")[0] == feed}
    for signature in ("encode", "cross_generate", "serving_default"):
        for key, value in loaded.signatures[signature](**kwargs).items():
            outputs[f"{feed}.{signature}.{key}"] = value.numpy()
for seed in map(int, seeds.split(",")):
    result = loaded.signatures["sample"](num=tf.constant(int(num)), seed=tf.constant(seed))
    for key, value in result.items():
        outputs[f"seed{seed}.sample.{key}"] = value.numpy()

leaked = sorted(m for m in sys.modules
                if m.split(".")[0] in ("bmvae_tf", "trainers", "pipeline", "tensorflow_probability"))
assert not leaked, leaked
np.savez(outputs_path, **outputs)
"""


class Run(NamedTuple):
    workdir: str
    manifest: schema.Manifest
    model: MultimodalVAE


# BMVAE_M, and an MS model whose posterior is a Blockwise of shared and private latents.
@pytest.fixture(scope="module", params=["bmvae_m", "mmjsd_ms"])
def run(tmp_path_factory, request) -> Run:
    """A run directory as `bmvae train` leaves it, holding a model with non-initial weights."""
    root = tmp_path_factory.mktemp("export")
    manifest = synthetic.write_dataset(str(root / "data"), num_train=8, num_test=8, shards=1)
    config = config_lib.from_dict({"data": {"dir": str(root / "data")},
                                   "model": {**MODEL, "name": request.param}})
    model = config_lib.build_model(config.model, manifest.modalities)
    run_dir.build_variables(model, manifest)
    rng = np.random.default_rng(0)
    for variable in model.variables:
        # Perturbed so the export cannot match by re-initialising; non-uniform mixture logits
        # also make the choice of present modalities matter.
        variable.assign(variable.numpy() + rng.normal(0.0, 0.5, variable.shape).astype(np.float32))
    paths = run_dir.RunPaths(str(root / "run"))
    os.makedirs(paths.root)
    Path(paths.config).write_text(config_lib.dump_yaml(config))
    run_dir.model_checkpoint(model).save(os.path.join(paths.checkpoints, "ckpt"))
    return Run(paths.root, manifest, model)


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory) -> str:
    output = tmp_path_factory.mktemp("exported") / "saved_model"
    output.mkdir()  # an existing empty directory is allowed and replaced
    return export.export_saved_model(run.workdir, str(output))


def _feeds(manifest: schema.Manifest) -> dict[str, dict[str, np.ndarray]]:
    """subset: street absent, fed zeros; garbage: the same with junk for street; all: everything."""
    rng = np.random.default_rng(1)
    real = {}
    for spec in manifest.modalities:
        if spec.kind == "sequence":
            real[spec.name] = rng.integers(0, spec.vocab_size, (BATCH, *spec.shape)).astype(np.int64)
        else:
            real[spec.name] = rng.uniform(0.0, 1.0, (BATCH, *spec.shape)).astype(np.float32)
    junk = rng.normal(0.0, 1e6, real["street"].shape).astype(np.float32)
    junk.flat[:3] = [np.nan, np.inf, -np.inf]
    subset = {**real, "street": np.zeros_like(real["street"]), "present": np.array(SUBSET)}
    return {"subset": subset,
            "garbage": {**subset, "street": junk},
            "all": {**real, "present": np.ones(len(SUBSET), bool)}}


def _reference(model, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """encode / cross_generate outputs computed eagerly from the model API and the documented seed."""
    inputs = {name: tf.constant(value) for name, value in feed.items() if name != "present"}
    posterior = model.posterior(inputs, tf.constant(feed["present"]))
    z_sample = posterior.sample(seed=tf.constant(export.POSTERIOR_SEED, tf.int32))
    out = {"encode.z_mean": posterior.mean().numpy(), "encode.z_sample": z_sample.numpy()}
    out.update({f"cross_generate.{k}": v.numpy() for k, v in model.generate(z_sample).items()})
    return out


def _assert_matches(actual: np.ndarray, expected: np.ndarray, what: str) -> None:
    assert actual.dtype == expected.dtype, what
    if np.issubdtype(expected.dtype, np.integer):
        np.testing.assert_array_equal(actual, expected, err_msg=what)
    else:
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5, err_msg=what)


def test_reloaded_export_matches_python_model(run, exported, tmp_path):
    feeds = _feeds(run.manifest)
    inputs_path, outputs_path = tmp_path / "inputs.npz", tmp_path / "outputs.npz"
    np.savez(inputs_path, **{f"{feed}.{name}": value
                             for feed, values in feeds.items() for name, value in values.items()})
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run(
        [sys.executable, "-c", _RELOAD_SCRIPT, exported, str(inputs_path), str(outputs_path),
         ",".join(map(str, SEEDS)), str(NUM_SAMPLES)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    outputs = dict(np.load(outputs_path))

    for feed in ("subset", "all"):
        for key, expected in _reference(run.model, feeds[feed]).items():
            _assert_matches(outputs[f"{feed}.{key}"], expected, f"{feed}.{key}")
        for name in run.manifest.modality_names:
            np.testing.assert_array_equal(outputs[f"{feed}.serving_default.{name}"],
                                          outputs[f"{feed}.cross_generate.{name}"])
    garbage = {k.split(".", 1)[1]: v for k, v in outputs.items() if k.startswith("garbage.")}
    subset = {k.split(".", 1)[1]: v for k, v in outputs.items() if k.startswith("subset.")}
    assert garbage.keys() == subset.keys()
    for key in subset:
        np.testing.assert_array_equal(garbage[key], subset[key], err_msg=f"absent input leaked: {key}")
    assert not np.allclose(outputs["all.encode.z_mean"], outputs["subset.encode.z_mean"])

    for seed in SEEDS:
        z = run.model.prior().sample(NUM_SAMPLES, seed=tf.constant([seed, 0], tf.int32))
        for name, expected in run.model.generate(z).items():
            _assert_matches(outputs[f"seed{seed}.sample.{name}"], expected.numpy(),
                            f"seed {seed}: {name}")
    first, second = (outputs[f"seed{seed}.sample.digit"] for seed in SEEDS)
    assert not np.allclose(first, second)


def _saved_model_cli() -> Path:
    """saved_model_cli beside this Python, on PATH, or in the environment TensorFlow lives in."""
    candidates = [Path(sys.executable).parent / "saved_model_cli",
                  Path(shutil.which("saved_model_cli") or "/nonexistent"),
                  Path(tf.__file__).resolve().parents[4] / "bin" / "saved_model_cli"]
    for cli in candidates:
        if cli.exists():
            return cli
    pytest.skip("saved_model_cli is not installed")


def test_saved_model_cli_lists_signatures(run, exported):
    cli = _saved_model_cli()
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run([str(cli), "show", "--dir", exported, "--all"], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    sections = dict(re.findall(r"signature_def\['(\w+)'\]:\n(.*?)Method name",
                               result.stdout, flags=re.S))
    assert set(export.SIGNATURE_NAMES) <= sections.keys(), result.stdout

    def inputs(name: str) -> dict[str, str]:
        return dict(re.findall(r"inputs\['(\w+)'\] tensor_info:\s+dtype: (\w+)", sections[name]))

    names = run.manifest.modality_names
    modality_inputs = {"digit": "DT_FLOAT", "street": "DT_FLOAT", "text": "DT_INT64",
                       "present": "DT_BOOL"}
    assert set(modality_inputs) == {*names, "present"}
    for name in ("encode", "cross_generate", "serving_default"):
        assert inputs(name) == modality_inputs, name
    assert inputs("sample") == {"num": "DT_INT32", "seed": "DT_INT32"}
    assert re.findall(r"outputs\['(\w+)'\]", sections["encode"]) == ["z_mean", "z_sample"]
    for name in ("cross_generate", "sample", "serving_default"):
        assert re.findall(r"outputs\['(\w+)'\]", sections[name]) == names, name


@pytest.mark.parametrize("existing", ["non_empty_dir", "file"])
def test_refuses_to_overwrite(run, tmp_path, existing):
    output = tmp_path / "out"
    if existing == "file":
        output.write_text("keep")
        message = "not a directory"
    else:
        output.mkdir()
        (output / "keep.txt").write_text("keep")
        message = "not empty"
    with pytest.raises(UserError, match=message):
        export.export_saved_model(run.workdir, str(output))
    assert sorted(os.listdir(tmp_path)) == ["out"]
    if existing == "non_empty_dir":
        assert os.listdir(output) == ["keep.txt"]


def test_failed_save_leaves_nothing(run, tmp_path, monkeypatch):
    def save_then_fail(obj, export_dir, signatures=None, options=None):
        os.makedirs(os.path.join(export_dir, "variables"))
        Path(export_dir, "saved_model.pb").write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(tf.saved_model, "save", save_then_fail)
    with pytest.raises(OSError, match="disk full"):
        export.export_saved_model(run.workdir, str(tmp_path / "out"))
    assert os.listdir(tmp_path) == []


@pytest.fixture(scope="module")
def serving(run) -> export.ServingModule:
    return export.ServingModule(run.model, run.manifest)


def test_in_memory_module_matches_model_and_is_deterministic(run, serving):
    feed = _feeds(run.manifest)["subset"]
    kwargs = {name: tf.constant(value) for name, value in feed.items()}
    first = serving.signatures()["encode"](**kwargs)
    second = serving.signatures()["encode"](**kwargs)
    expected = _reference(run.model, feed)
    for key in ("z_mean", "z_sample"):
        _assert_matches(first[key].numpy(), expected[f"encode.{key}"], key)
        np.testing.assert_array_equal(first[key].numpy(), second[key].numpy())


def test_no_present_modality_is_an_error(run, serving):
    feed = {**_feeds(run.manifest)["subset"], "present": np.zeros(len(SUBSET), bool)}
    with pytest.raises(tf.errors.InvalidArgumentError, match="at least one modality"):
        serving.signatures()["encode"](**{name: tf.constant(value) for name, value in feed.items()})


@pytest.mark.parametrize("bad_name", ["my-image", "_private", "present"])
def test_rejects_names_that_cannot_be_signature_keys(bad_name):
    modalities = (schema.ModalitySpec(bad_name, "vector", (3,), likelihood="gaussian"),
                  schema.ModalitySpec("other", "vector", (3,), likelihood="gaussian"))
    manifest = schema.Manifest(name="t", modalities=modalities,
                               splits={"train": schema.SplitInfo(("x",), 1)})
    model = config_lib.build_model(config_lib.ModelConfig(latent_dim=2, hidden_units=[4]), modalities)
    with pytest.raises(UserError, match=re.escape(repr(bad_name))):
        export.ServingModule(model, manifest)


# ---------------------------------------------------------------- serving per row (issue 16 item 5)

ROWS = np.array([[True, False, True], [False, True, True]])  # two rows, different modalities


def _two_rows(manifest: schema.Manifest) -> dict[str, np.ndarray]:
    feed = {name: value[:2] for name, value in _feeds(manifest)["all"].items() if name != "present"}
    # What an absent modality is fed does not matter: junk here.
    feed["street"] = feed["street"].copy()
    feed["street"][0] = 7.0
    feed["digit"] = feed["digit"].copy()
    feed["digit"][1] = -3.0
    return {**feed, "present": ROWS}


def _row_reference(model, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The Python model on the same rows: z_mean of each row from its own [M] subset, the draw
    from the per-row posterior with the documented seed."""
    masked = {name: tf.where(tf.reshape(tf.constant(ROWS[:, m]), [-1] + [1] * (feed[name].ndim - 1)),
                             tf.constant(feed[name]), tf.zeros_like(tf.constant(feed[name])))
              for m, name in enumerate(model.modality_names)}
    z_mean = np.stack([model.posterior(masked, tf.constant(ROWS[b])).mean().numpy()[b] for b in range(2)])
    z_sample = model.posterior(masked, tf.constant(ROWS)).sample(
        seed=tf.constant(export.POSTERIOR_SEED, tf.int32))
    out = {"encode.z_mean": z_mean, "encode.z_sample": z_sample.numpy()}
    out.update({f"cross_generate.{k}": v.numpy() for k, v in model.generate(z_sample).items()})
    return out


def test_loaded_export_serves_per_row_masks(run, exported):
    loaded = tf.saved_model.load(exported)
    feed = _two_rows(run.manifest)
    kwargs = {name: tf.constant(value) for name, value in feed.items()}
    expected = _row_reference(run.model, feed)
    for signature in ("encode", "cross_generate"):
        for key, value in loaded.signatures[signature](**kwargs).items():
            _assert_matches(value.numpy(), expected[f"{signature}.{key}"], f"{signature}.{key}")
    # Row b alone gives the mean it has in the batch; an [M] mask still works for every row.
    z_mean = loaded.signatures["encode"](**kwargs)["z_mean"].numpy()
    for b in range(2):
        alone = {name: value[b:b + 1] for name, value in kwargs.items() if name != "present"}
        row = loaded.signatures["encode"](**alone, present=tf.constant(ROWS[b:b + 1]))["z_mean"].numpy()
        np.testing.assert_allclose(row[0], z_mean[b], rtol=1e-5, atol=1e-6)
        shared = loaded.signatures["encode"](**{**kwargs, "present": tf.constant(ROWS[b])})["z_mean"]
        np.testing.assert_allclose(shared.numpy()[b], z_mean[b], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("present,message", [
    (np.ones([2, 4], bool), "input `present`: must be bool"),
    (np.ones([3, 3], bool), "input `present`: its rows differ"),
    (np.ones([2, 3, 1], bool), "input `present`: must be bool"),
    (np.array([[True, False, False], [False, False, False]]), "every row must mark at least one"),
])
def test_bad_present_is_an_error_naming_it(run, serving, present, message):
    feed = {**_two_rows(run.manifest), "present": present}
    with pytest.raises(tf.errors.InvalidArgumentError, match=re.escape(message)):
        serving.signatures()["encode"](**{name: tf.constant(value) for name, value in feed.items()})


def test_export_ships_vocabulary_and_metadata_assets(run, exported):
    assets = Path(exported) / "assets"
    text = run.manifest.modalities[run.manifest.modality_names.index("text")]
    lines = (assets / export.vocabulary_file("text")).read_text(encoding="utf-8").split("\n")
    assert lines[:-1] == list(text.vocab) and lines[-1] == ""
    metadata = json.loads((assets / export.METADATA_FILE).read_text())
    assert [m["name"] for m in metadata["modalities"]] == run.manifest.modality_names
    assert metadata["present"]["shape"] == ["batch", 3]
    assert metadata["present"]["columns"] == run.manifest.modality_names
    by_name = {m["name"]: m for m in metadata["modalities"]}
    assert by_name["text"]["vocabulary"] == export.vocabulary_file("text")
    assert by_name["text"]["dtype"] == "int64" and by_name["digit"]["dtype"] == "float32"
    assert by_name["digit"]["shape"] == ["batch", *run.manifest.modalities[0].shape]
    assert all("units" in m for m in metadata["modalities"])
    assert metadata["latent_dim"] == run.model.latent_dim
    loaded = tf.saved_model.load(exported)
    assert json.loads(Path(loaded.metadata.asset_path.numpy().decode()).read_text()) == metadata
    assert Path(loaded.vocabularies["text"].asset_path.numpy().decode()).exists()


@pytest.mark.slow
def test_saved_model_cli_runs_two_rows_with_different_masks(run, exported, tmp_path):
    cli = _saved_model_cli()
    feed = _two_rows(run.manifest)
    np.savez(tmp_path / "rows.npz", **{k: v for k, v in feed.items() if k != "present"})
    inputs = ";".join(f"{name}={tmp_path / 'rows.npz'}[{name}]" for name in run.manifest.modality_names)
    present = "present=" + repr(ROWS.tolist())
    out = tmp_path / "out"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run([str(cli), "run", "--dir", exported, "--tag_set", "serve",
                             "--signature_def", "cross_generate", "--inputs", inputs,
                             "--input_exprs", present, "--outdir", str(out)],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = _row_reference(run.model, feed)
    for name in run.manifest.modality_names:
        _assert_matches(np.load(out / f"{name}.npy"), expected[f"cross_generate.{name}"], name)
