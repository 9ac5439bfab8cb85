"""Where MultiVae's training step spends its time: torch.profiler over a few steps of one model.

    OMP_WAIT_POLICY=PASSIVE bench/peers/.venv/bin/python bench/peers/profile_multivae.py --model mmvae --K 30 \
        --output bench/results/peers_multivae_profile_k30.json

The model, batch and step are multivae_worker.py's (the ones side_by_side.py times); prints the
operators by self CPU time, then the top ones by input shape, and writes both to --output.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("mmvae", "mvae"), default="mmvae")
    parser.add_argument("--K", type=int, default=30)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", help="a JSON file for the tables")
    args = parser.parse_args()
    sys.argv = [sys.argv[0], "--threads", str(args.threads)]  # the worker parses its own flags
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import multivae_worker as worker
    from torch.profiler import ProfilerActivity, profile
    contestant = worker.Contestant({
        "model": args.model, "K": args.K, "batch": args.batch, "learning_rate": 1e-3, "amsgrad": True,
        "loss": "dreg_looser", "learn_prior": args.model == "mmvae", "likelihood_scale": 0.75,
        "rescale_factors": {"mnist": 3072 / 784, "svhn": 1.0}})
    contestant.steps(2)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        contestant.steps(args.steps)
    print(f"MultiVae {args.model} K={args.K} batch {args.batch}, {args.steps} step(s), "
          f"{args.threads} threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    by_operator, by_shape = prof.key_averages(), prof.key_averages(group_by_input_shape=True)
    print(by_operator.table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=45))
    print(by_shape.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=35,
                         max_shapes_column_width=80))
    if args.output:
        total = sum(e.self_cpu_time_total for e in by_operator)
        with open(args.output, "w") as f:
            json.dump({"args": vars(args), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                       "self_cpu_seconds_total": total / 1e6,
                       "by_operator": top(by_operator, total, 20),
                       "by_operator_and_shape": top(by_shape, total, 12)},
                      f, indent=2)
            f.write("\n")


def top(events, total: float, n: int) -> list[dict]:
    """The n operators with the most self CPU time: name, share, seconds, calls, input shapes."""
    rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:n]
    return [{"name": e.key, "self_cpu_share": e.self_cpu_time_total / total,
             "self_cpu_seconds": e.self_cpu_time_total / 1e6, "calls": e.count,
             "input_shapes": str(e.input_shapes) if e.input_shapes else None} for e in rows]


if __name__ == "__main__":
    main()
