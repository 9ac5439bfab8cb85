"""Examples per second of the training step (trainers.training.steps.make_train_step) for every model.

Random data of the paper's shapes: MNIST-SVHN (M = 2, Table 3 networks, latent 20, Laplace),
MNIST-SVHN-Text (M = 3, Table 8 networks, Gaussian) and digits (M = 3, configs/digits). Each
(dataset, K) group builds its models, warms each up, then times them in interleaved rounds, so
every BMVAE_M / MMVAE ratio is taken in one run on the same machine state. BMVAE_M decodes M*K
latent samples per example, MMVAE M*M*K (Table 1): the expected ratio approaches M as decoding
dominates the step. A second part times jit_compile on and off, interleaved the same way.

    python bench/train_step.py                              # small: a few minutes on 2 cores
    python bench/train_step.py --batch 128 --steps 20 --rounds 5 --output bench/results/train_step_big.json
"""

from __future__ import annotations

import argparse
import gc
import statistics

import common  # noqa: F401  (puts the repository on the path)
from common import (ALL_MODELS, build_step, dataset_manifest, interleaved, machine, model_config,
                    print_table, random_batch, ratio_of_rounds, timed_steps, write_json)

DATASETS = ("mnist-svhn", "mnist-svhn-text", "digits")
TARGETS = {2: 1.8, 3: 2.6}  # BMVAE_M / MMVAE at M = 2 and M = 3 (issue 7)


def takes_k(model: str) -> bool:
    from bmvae_tf.models import MODELS
    return MODELS[model][0].IMPORTANCE_SAMPLED


def run_group(dataset, models, K, args, jit_compile=False, labels=None):
    manifest = dataset_manifest(dataset)
    batch = random_batch(manifest, args.batch)
    contestants, compile_s, failures = {}, {}, {}
    for model, jit in models:
        name = (labels or {}).get((model, jit), model)
        config = model_config(dataset, model, K, jit_compile=jit, batch_size=args.batch, dreg=args.mmvae_dreg)
        step, _ = build_step(config, manifest)
        try:
            compile_s[name] = timed_steps(step, batch, 1)  # tracing (+ XLA compilation)
        except Exception as e:  # noqa: BLE001  (a model XLA cannot compile is a finding, not a crash)
            failures[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            print(f"  {name} failed: {failures[name]}", flush=True)
            continue
        timed_steps(step, batch, args.warmup)
        contestants[name] = (step, batch)
        tracing = step.experimental_get_tracing_count()
        assert tracing == 1, f"{name}: traced {tracing} times"
    print(f"{dataset} K={K}: timing {list(contestants)}", flush=True)
    rates = interleaved(contestants, args.rounds, args.steps, args.batch)
    del contestants
    gc.collect()
    return rates, compile_s, failures


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="bench/results/train_step.json")
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--models", default=",".join(ALL_MODELS),
                        help="models timed at K=1 (at K>1 only the models with a K)")
    parser.add_argument("--K", default="1,30", help="comma-separated K values")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="steps per model per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mmvae-dreg", action="store_true", help="MMVAE with DReG (Shi et al.'s estimator)")
    parser.add_argument("--jit-datasets", default="digits", help="datasets of the XLA on/off part ('' skips)")
    parser.add_argument("--jit-models", default=",".join(ALL_MODELS))
    parser.add_argument("--jit-K", type=int, default=1)
    args = parser.parse_args(argv)

    results = {"machine": machine(), "args": vars(args), "groups": [], "ratios": [], "jit": []}
    rows = []
    for dataset in filter(None, args.datasets.split(",")):
        for K in (int(k) for k in args.K.split(",")):
            models = [m for m in args.models.split(",") if K == 1 or takes_k(m)]
            rates, compile_s, failures = run_group(dataset, [(m, False) for m in models], K, args)
            assert not failures, failures
            M = len(dataset_manifest(dataset).modalities)
            group = {"dataset": dataset, "M": M, "K": K, "examples_per_second": rates,
                     "first_step_seconds": compile_s}
            results["groups"].append(group)
            for m in models:
                rows.append({"dataset": dataset, "M": M, "K": K, "model": m,
                             "ex/s": statistics.median(rates[m]), "first step s": compile_s[m]})
            if "bmvae_m" in rates and "mmvae" in rates:
                ratio = ratio_of_rounds(rates["bmvae_m"], rates["mmvae"])
                target = TARGETS.get(M)
                results["ratios"].append({"dataset": dataset, "M": M, "K": K, "bmvae_m_over_mmvae": ratio,
                                          "target": target, "met": None if target is None else ratio >= target})
    print()
    print_table(rows, ["dataset", "M", "K", "model", "ex/s", "first step s"])
    print("\nBMVAE_M / MMVAE examples/s (median over rounds of the per-round ratio):")
    print_table(results["ratios"], ["dataset", "M", "K", "bmvae_m_over_mmvae", "target", "met"])

    jit_rows = []
    for dataset in filter(None, args.jit_datasets.split(",")):
        models = [m for m in args.jit_models.split(",")]
        labels = {(m, jit): f"{m}/{'xla' if jit else 'plain'}" for m in models for jit in (False, True)}
        rates, compile_s, failures = run_group(dataset, [(m, jit) for m in models for jit in (False, True)],
                                               args.jit_K, args, labels=labels)
        for m in models:
            if labels[(m, True)] in failures:
                jit_rows.append({"dataset": dataset, "K": args.jit_K, "model": m,
                                 "plain ex/s": statistics.median(rates[labels[(m, False)]]),
                                 "xla ex/s": "fails", "error": failures[labels[(m, True)]]})
                continue
            xla, plain = rates[labels[(m, True)]], rates[labels[(m, False)]]
            row = {"dataset": dataset, "K": args.jit_K, "model": m, "plain ex/s": statistics.median(plain),
                   "xla ex/s": statistics.median(xla), "xla/plain": ratio_of_rounds(xla, plain),
                   "xla first step s": compile_s[labels[(m, True)]]}
            jit_rows.append(row)
    results["jit"] = jit_rows
    if jit_rows:
        print("\njit_compile on vs off:")
        print_table(jit_rows, ["dataset", "K", "model", "plain ex/s", "xla ex/s", "xla/plain", "xla first step s"])
    write_json(args.output, results)
    return results


if __name__ == "__main__":
    main()
