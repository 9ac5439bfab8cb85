"""Held-out log-likelihood and validation loss against wall time for bmvae_m and mmvae on digits.

Both models train with configs/digits/bmvae_m.yaml (same networks, latent size, K, batch and
learning rate; only model.name differs), one after the other, each with trainers.train.train.
Wall time is the sum of the epochs' training seconds (history.jsonl `seconds`; validation is
not counted).

Each model's validation loss is its own objective (BMVAE_M's bound plus lambda_c times the
mixture-weight KL, MMVAE's L_M), so those curves are not on one scale. The measure both share is
the joint log-likelihood log p(x_1:M) of held-out data, estimated with IWAE (--ll-samples draws
from each model's own joint posterior, MultimodalVAE.log_marginal) from every epoch's
checkpoint after training, so the estimate costs no training time. The time to a fixed
log-likelihood uses the lower of the two models' best values (both reach it) unless
--target-ll is given.

    python bench/convergence.py                      # digits dm = 10, 8 epochs each
    python bench/convergence.py --epochs 30 --output bench/results/convergence_big.json
"""

from __future__ import annotations

import argparse
import os
import tempfile

import common
from common import machine, print_table, write_json


def time_to(history: list[dict], reached) -> tuple[float | None, int | None]:
    """(training seconds, epoch) of the first epoch where reached(record) holds."""
    elapsed = 0.0
    for h in history:
        elapsed += h["seconds"]
        if reached(h):
            return elapsed, h["epoch"]
    return None, None


def held_out_log_likelihoods(workdir: str, num_samples: int, examples: int) -> list[float]:
    """Mean IWAE log p(x_1:M) over the first `examples` test records, at every epoch's checkpoint."""
    import tensorflow as tf

    from bmvae_tf import schema
    from bmvae_tf.trainers import config as config_lib, input_pipeline, run_dir

    paths = run_dir.RunPaths(workdir)
    config = run_dir.read_config(paths)
    manifest = schema.read_manifest(config.data.dir)
    model = config_lib.build_model(config.model, manifest.modalities)
    run_dir.build_variables(model, manifest)
    present = tf.ones([len(manifest.modalities)], tf.bool)
    batches = list(input_pipeline.make_dataset(manifest, "test", 250, take=examples))
    log_marginal = tf.function(lambda batch, seed: model.log_marginal(batch, present, num_samples, seed))
    values = []
    for path in tf.train.get_checkpoint_state(paths.checkpoints).all_model_checkpoint_paths:
        run_dir.model_checkpoint(model).restore(path).expect_partial().assert_existing_objects_matched()
        total = sum(float(tf.reduce_sum(log_marginal(b, tf.constant([0, i], tf.int32))))
                    for i, b in enumerate(batches))
        values.append(total / sum(int(b["label"].shape[0]) for b in batches))
    return values


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="bench/results/convergence.json")
    parser.add_argument("--data-root", default="")
    parser.add_argument("--dm", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--models", default="bmvae_m,mmvae")
    parser.add_argument("--K", type=int, default=1)
    parser.add_argument("--target-ll", type=float, default=None)
    parser.add_argument("--ll-samples", type=int, default=50, help="IWAE samples of the log-likelihood")
    parser.add_argument("--ll-examples", type=int, default=1000, help="test records it averages over")
    args = parser.parse_args(argv)

    from bmvae_tf.trainers import config as config_lib, train
    from input_pipeline import build
    results = {"machine": machine(), "args": vars(args), "histories": {}}
    with tempfile.TemporaryDirectory(prefix="bench-conv-") as tmp:
        data_dir = build(os.path.join(args.data_root or tmp, f"digits-dm{args.dm}"), args.dm)
        base = config_lib.load_yaml(os.path.join(common.CONFIGS, "digits", "bmvae_m.yaml"))
        for model in args.models.split(","):
            # Only epoch-end checkpoints, all kept: one log-likelihood per epoch afterwards.
            data = config_lib.merge(base, {"data": {"dir": data_dir},
                                           "model": {"name": model, "K": args.K},
                                           "train": {"epochs": args.epochs, "checkpoint_every_steps": 0,
                                                     "checkpoints_to_keep": args.epochs}})
            print(f"training {model} for {args.epochs} epochs ...", flush=True)
            workdir = os.path.join(tmp, f"run-{model}")
            history = train.train(config_lib.from_dict(data), workdir)
            lls = held_out_log_likelihoods(workdir, args.ll_samples, args.ll_examples)
            assert len(lls) == len(history), (len(lls), len(history))
            for h, ll in zip(history, lls):
                h["test_log_likelihood"] = ll
            results["histories"][model] = history
    histories = results["histories"]
    target = args.target_ll
    if target is None:
        target = min(max(h["test_log_likelihood"] for h in hist) for hist in histories.values())
    rows = []
    for model, hist in histories.items():
        seconds, epoch = time_to(hist, lambda h: h["test_log_likelihood"] >= target)
        rows.append({"model": model, "epochs": len(hist),
                     "s/epoch": sorted(h["seconds"] for h in hist)[len(hist) // 2],
                     "train s": sum(h["seconds"] for h in hist),
                     "best log p(x)": max(h["test_log_likelihood"] for h in hist),
                     "best val loss (own)": min(h["val_loss"] for h in hist),
                     "s to target": seconds, "epochs to target": epoch})
    results["target_log_likelihood"], results["summary"] = target, rows
    print(f"\ntime to a held-out log p(x) of {target:.2f} (IWAE, K = {args.ll_samples}):")
    print_table(rows, ["model", "epochs", "s/epoch", "train s", "best log p(x)", "best val loss (own)",
                       "s to target", "epochs to target"])

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, (ax_ll, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    for model, hist in histories.items():
        times = [sum(h["seconds"] for h in hist[:i + 1]) for i in range(len(hist))]
        ax_ll.plot(times, [h["test_log_likelihood"] for h in hist], marker="o", label=model)
        ax_loss.plot(times, [h["val_loss"] for h in hist], marker="o", label=model)
    ax_ll.axhline(target, color="gray", linestyle="--", linewidth=1, label=f"target {target:.1f}")
    ax_ll.set_ylabel(f"held-out log p(x), IWAE K={args.ll_samples}")
    ax_loss.set_ylabel("validation loss (each model's own objective)")
    for ax in (ax_ll, ax_loss):
        ax.set_xlabel("training wall time (s)")
        ax.legend()
    figure.suptitle("digits: convergence against wall time")
    figure.tight_layout()
    png = os.path.splitext(args.output)[0] + ".png"
    os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
    figure.savefig(png)
    print(f"wrote {png}")
    results["plot"] = png
    write_json(args.output, results)
    return results


if __name__ == "__main__":
    main()
