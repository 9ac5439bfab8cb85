"""bench/roofline.py: the analytic FLOP count of a training step equals the count read from the
traced step's graph, and the counts follow the models' decoder passes (Table 1)."""

import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "bench")
sys.path.insert(0, BENCH)

import roofline  # noqa: E402
from common import build_step, dataset_manifest, model_config, random_batch  # noqa: E402


def test_layer_macs_of_the_paper_networks():
    manifest = dataset_manifest("mnist-svhn")
    cfg = model_config("mnist-svhn", "bmvae_m", 1).model
    mnist, svhn = manifest.modalities
    assert roofline.network_layers(mnist, cfg, "encoder") == [784 * 400, 400 * 20, 400 * 20]
    assert roofline.network_layers(mnist, cfg, "decoder") == [20 * 400, 400 * 784]
    # 3x32x32 -> 32x16x16 -> 64x8x8 -> 128x4x4, then two kernel-4 heads to 1x1x20
    assert roofline.network_layers(svhn, cfg, "encoder") == [
        16 * 16 * 16 * 3 * 32, 8 * 8 * 16 * 32 * 64, 4 * 4 * 16 * 64 * 128, 16 * 128 * 20, 16 * 128 * 20]
    assert roofline.network_layers(svhn, cfg, "decoder") == [
        16 * 20 * 128, 4 * 4 * 16 * 128 * 64, 8 * 8 * 16 * 64 * 32, 16 * 16 * 16 * 32 * 3]
    # training: forward, weight gradient and input gradient, less the first layer's input gradient
    assert roofline.training_flops([10, 5], needs_input_grad=False) == 2 * (3 * 15 - 10)
    assert roofline.training_flops([10, 5], needs_input_grad=True) == 2 * 3 * 15


@pytest.mark.parametrize("model, K", [("bmvae_m", 2), ("mmvae", 1)])
def test_analytic_count_equals_the_traced_graph(model, K):
    manifest = dataset_manifest("mnist-svhn")
    config = model_config("mnist-svhn", model, K, batch_size=4)
    step, _ = build_step(config, manifest)
    counted = roofline.graph_flops(step, random_batch(manifest, 4))
    analytic = roofline.analytic_step_flops(manifest, config.model, model, K, 4)
    assert counted["total"] == analytic["total"]
    assert set(counted["by_op_type"]) == {"MatMul", "Conv2D", "Conv2DBackpropInput", "Conv2DBackpropFilter"}
    # the first SVHN conv's input gradient is in the graph but nothing reads it
    assert counted["unused_ops_skipped"] == 2 * 4 * 16 * 16 * 16 * 3 * 32


def test_mmvae_decodes_m_times_more_latents_than_bmvae_m():
    manifest = dataset_manifest("mnist-svhn")
    cfg = model_config("mnist-svhn", "bmvae_m", 30).model
    bm = roofline.analytic_step_flops(manifest, cfg, "bmvae_m", 30, 128)["per_network"]
    mm = roofline.analytic_step_flops(manifest, cfg, "mmvae", 30, 128)["per_network"]
    assert mm["decoder_svhn"] == 2 * bm["decoder_svhn"] and mm["encoder_svhn"] == bm["encoder_svhn"]


def test_layers_timed_alone_add_up_to_their_network():
    manifest = dataset_manifest("mnist-svhn")
    config = model_config("mnist-svhn", "bmvae_m", 1, batch_size=4)
    _, trainer = build_step(config, manifest)
    args = roofline.parse_args(["--batch", "4", "--steps", "1"])
    parts = roofline.layer_contestants(trainer.model, manifest, config.model, args, [4, 8])
    for spec in manifest.modalities:
        for part, rows in (("encoder", 4), ("decoder", 8)):
            layers = roofline.network_layers(spec, config.model, part)
            mine = [c for name, c in parts.items() if name.startswith(f"{part}_{spec.name}/")
                    and name.endswith(f" x{rows}")]
            assert len(mine) == len(layers)
            assert sum(c["flops"] for c in mine) == rows * roofline.training_flops(layers, part == "decoder")
    assert float(tf_sum(next(iter(parts.values()))["fn"]())) != 0.0


def tf_sum(grads):
    import tensorflow as tf
    return tf.add_n([tf.reduce_sum(tf.abs(g)) for g in grads])
