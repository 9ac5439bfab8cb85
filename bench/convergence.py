"""Validation loss against wall time for bmvae_m and mmvae on digits, and the time to a loss.

Both models train with configs/digits/bmvae_m.yaml (same networks, latent size, K, batch and
learning rate; only model.name differs), one after the other, each with trainers.train.train.
Wall time is the sum of the epochs' training seconds (history.jsonl `seconds`; validation is
not counted). Each model's validation loss is its own objective (the negative of its bound on
the validation split; BMVAE_M's adds lambda_c times the mixture-weight KL), so the fixed loss
is one both reach: by default the larger of the two best validation losses.

    python bench/convergence.py                      # digits dm = 10, 8 epochs each
    python bench/convergence.py --epochs 30 --output bench/results/convergence_big.json
"""

from __future__ import annotations

import argparse
import os
import tempfile

import common
from common import machine, print_table, write_json


def time_to_loss(history: list[dict], target: float) -> float | None:
    elapsed = 0.0
    for h in history:
        elapsed += h["seconds"]
        if h["val_loss"] is not None and h["val_loss"] <= target:
            return elapsed
    return None


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="bench/results/convergence.json")
    parser.add_argument("--data-root", default="")
    parser.add_argument("--dm", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--models", default="bmvae_m,mmvae")
    parser.add_argument("--K", type=int, default=1)
    parser.add_argument("--target-loss", type=float, default=None)
    args = parser.parse_args(argv)

    from trainers import config as config_lib, train
    from input_pipeline import build
    results = {"machine": machine(), "args": vars(args), "histories": {}}
    with tempfile.TemporaryDirectory(prefix="bench-conv-") as tmp:
        data_dir = build(os.path.join(args.data_root or tmp, f"digits-dm{args.dm}"), args.dm)
        base = config_lib.load_yaml(os.path.join(common.CONFIGS, "digits", "bmvae_m.yaml"))
        for model in args.models.split(","):
            data = config_lib.merge(base, {"data": {"dir": data_dir},
                                           "model": {"name": model, "K": args.K},
                                           "train": {"epochs": args.epochs}})
            print(f"training {model} for {args.epochs} epochs ...", flush=True)
            history = train.train(config_lib.from_dict(data), os.path.join(tmp, f"run-{model}"))
            results["histories"][model] = history
    histories = results["histories"]
    target = args.target_loss
    if target is None:
        target = max(min(h["val_loss"] for h in hist) for hist in histories.values())
    rows = []
    for model, hist in histories.items():
        rows.append({"model": model, "epochs": len(hist), "train s": sum(h["seconds"] for h in hist),
                     "best val loss": min(h["val_loss"] for h in hist),
                     "s to target": time_to_loss(hist, target),
                     "epochs to target": next((h["epoch"] for h in hist if h["val_loss"] <= target), None)})
    results["target_loss"], results["summary"] = target, rows
    print(f"\ntime to validation loss {target:.2f}:")
    print_table(rows, ["model", "epochs", "train s", "best val loss", "s to target", "epochs to target"])

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, ax = plt.subplots(figsize=(6, 4))
    for model, hist in histories.items():
        elapsed, times = 0.0, []
        for h in hist:
            elapsed += h["seconds"]
            times.append(elapsed)
        ax.plot(times, [h["val_loss"] for h in hist], marker="o", label=model)
    ax.axhline(target, color="gray", linestyle="--", linewidth=1, label=f"target {target:.1f}")
    ax.set_xlabel("training wall time (s)")
    ax.set_ylabel("validation loss (own objective)")
    ax.set_title("digits: validation loss vs wall time")
    ax.legend()
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
