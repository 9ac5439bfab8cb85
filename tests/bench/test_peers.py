"""bench/peers: the layer tables MultiVae's networks are built from are our networks, layer for
layer; the MultiVae build request matches our configs; the ratio summary. No torch needed."""

import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "bench")
for path in (BENCH, os.path.join(BENCH, "peers")):
    if path not in sys.path:
        sys.path.insert(0, path)

import layer_tables  # noqa: E402
import ratios  # noqa: E402


def test_the_tables_are_table_3():
    nets = layer_tables.networks()
    assert list(nets) == ["mnist", "svhn"]
    assert layer_tables.layers_of(nets["mnist"]["encoder"]) == [
        ("dense", 784, 400, "relu"), ("dense", 400, 20, None), ("dense", 400, 20, None)]
    assert layer_tables.layers_of(nets["mnist"]["decoder"]) == [("dense", 20, 400, "relu"), ("dense", 400, 784, None)]
    assert [layer[2] for layer in nets["svhn"]["encoder"]["trunk"]] == [32, 64, 128]
    assert [layer[2] for layer in nets["svhn"]["decoder"]["layers"]] == [128, 64, 32, 3]


def test_the_conv_sides_go_32_16_8_4_1_and_back():
    enc, dec = layer_tables.svhn_encoder(), layer_tables.svhn_decoder()
    sides = [32]
    for layer in [*enc["trunk"], enc["heads"]]:
        sides.append(layer_tables.conv_side(sides[-1], layer))
    assert sides == [32, 16, 8, 4, 1]
    sides = [1]
    for layer in dec["layers"]:
        sides.append(layer_tables.conv_side(sides[-1], layer))
    assert sides == [1, 4, 8, 16, 32]


def test_parameter_counts_by_hand():
    # 784*400+400 + 2*(400*20+20); 20*400+400 + 400*784+784
    assert layer_tables.parameter_count(layer_tables.mnist_encoder()) == 330040
    assert layer_tables.parameter_count(layer_tables.mnist_decoder()) == 322784
    assert layer_tables.total_parameters(learn_prior=False) == 1106947
    assert layer_tables.total_parameters(learn_prior=True) == 1106947 + 20


def _our_weight_shapes(layer, inputs):
    layer(inputs)
    return [tuple(w.shape) for w in layer.weights]


def test_our_networks_have_the_tables_weights_in_order():
    import tensorflow as tf
    from common import dataset_manifest
    from bmvae_tf import networks
    mnist, svhn = dataset_manifest("mnist-svhn").modalities
    nets = layer_tables.networks()
    for spec, kind in ((mnist, "mlp"), (svhn, "cnn")):
        table = nets[spec.name]
        encoder = networks.build_encoder(spec, 20, kind)
        decoder = networks.build_decoder(spec, kind)
        want = [s for layer in layer_tables.layers_of(table["encoder"]) for s in layer_tables.weight_shapes(layer)]
        assert _our_weight_shapes(encoder, tf.zeros([2, *spec.shape])) == want, spec.name
        want = [s for layer in layer_tables.layers_of(table["decoder"]) for s in layer_tables.weight_shapes(layer)]
        assert _our_weight_shapes(decoder, tf.zeros([2, 20])) == want, spec.name
        assert tuple(table["decoder"]["output_shape"]) == tuple(spec.shape)


@pytest.mark.parametrize("name, K, learn_prior, amsgrad, loss", [
    ("mmvae_k30", 30, True, True, "dreg_looser"), ("mmvae_k1", 1, True, True, "dreg_looser"),
    ("mvae", 1, False, False, "dreg_looser")])
def test_the_multivae_request_matches_our_config(name, K, learn_prior, amsgrad, loss):
    import side_by_side as run
    from common import dataset_manifest
    manifest = dataset_manifest("mnist-svhn")
    args = run.parse_args(["--mmvae-loss", "dreg"])
    config = run.our_config(name, args.batch, args.mmvae_loss)
    spec = run.peer_spec(name, config, manifest, args)
    assert (spec["K"], spec["batch"], spec["learn_prior"], spec["amsgrad"], spec["loss"]) == (
        K, 128, learn_prior, amsgrad, loss)
    assert spec["learning_rate"] == config.train.learning_rate == 1e-3
    assert spec["likelihood_scale"] == config.model.likelihood_scale == 0.75
    assert spec["rescale_factors"] == {"mnist": pytest.approx(3072 / 784), "svhn": 1.0}
    assert config.model.latent_dim == layer_tables.LATENT
    assert config.model.networks == {"mnist": "mlp", "svhn": "cnn"}
    if name.startswith("mmvae"):
        assert (config.model.name, config.model.K, config.model.posterior, config.model.mmvae.dreg) == (
            "mmvae", K, "laplace", True)
    else:
        assert (config.model.name, config.model.posterior, config.model.learn_prior) == ("mvae", "gaussian", False)


def test_ratio_summary():
    row = ratios.summarise("mmvae_k30", [300.0, 200.0, 330.0], [100.0, 100.0, 110.0])
    assert row["ratio"] == 3.0 and (row["ratio_min"], row["ratio_max"]) == (2.0, 3.0)
    assert row["rounds"] == 3 and row["target"] == 1.5 and row["met"] is True
    assert row["ours_examples_per_second"] == 300.0 and row["multivae_examples_per_second"] == 100.0
    assert ratios.summarise("mvae", [100.0], [100.0])["met"] is False
    assert ratios.summarise("other", [1.0], [1.0])["met"] is None
    with pytest.raises(ValueError):
        ratios.round_ratios([1.0, 2.0], [1.0])
    with pytest.raises(ValueError):
        ratios.rate(128, 0.0)


def test_loss_per_example_puts_both_sides_on_the_batch_mean():
    import side_by_side as run
    times = {"ours": [{"loss": 10.0}, {"loss": 12.0}, {"loss": 11.0}],
             "multivae": [{"loss": 1280.0}, {"loss": 1408.0}, {"loss": 1536.0}]}
    assert run.loss_per_example("mmvae_k30", times, 128) == {"ours": 11.0, "multivae": 11.0}
    assert run.loss_per_example("mvae", times, 128) == {"ours": 11.0, "multivae": 1408.0}


def test_the_torchvision_stub_answers_what_multivae_imports():
    import importlib.util
    name = "peers_torchvision_stub"
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(BENCH, "peers", "stubs", "torchvision", "__init__.py"))
    stub = importlib.util.module_from_spec(spec)
    sys.modules[name] = stub
    try:
        spec.loader.exec_module(stub)
        assert stub.STUB is True
        # what multivae imports at module level: names of submodules, called at import time
        transforms = sys.modules[f"{name}.transforms"]
        to_tensor = transforms.ToTensor()
        assert "ToTensor" in repr(to_tensor)
        assert "download_and_extract_archive" in repr(sys.modules[f"{name}.datasets.utils"].download_and_extract_archive)

        class Dataset(sys.modules[f"{name}.datasets"].MNIST):  # subclassing a placeholder still works
            pass
        assert Dataset.__mro__[-1] is object
        # dunders stay missing (inspect and pickle probe them; answering them broke torch's import)
        with pytest.raises(AttributeError):
            transforms.__file__
        with pytest.raises(AttributeError):
            to_tensor.__wrapped__
    finally:
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[key]
