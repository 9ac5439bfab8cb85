"""The training loop, in the manner of Orbit (tensorflow/models orbit, official/core).

- `trainer.Trainer`: one run's model, optimizer, counters, step functions and checkpoints.
- `steps`: the per-replica optimisation step under `strategy.run`, the evaluation step, and
  the forward passes that log the model's loss terms.
- `loop.run_training`: the controller; runs epochs of a Trainer and composes the helpers:
  `history` (history.jsonl, progress.jsonl, TensorBoard's epoch scalars), `summaries`
  (TensorBoard: loss terms, learning rate, per-epoch images; the HParams session `bmvae
  evaluate` writes), `nonfinite` (the NaN/Inf guard), `early_stopping` and `progress` (bar or
  log lines with steady-state rates).
- `inputs`: what the loop reads (each epoch's batches, the validation set).
- `strategy`: the tf.distribute strategy, made once at the entry point.
- `lock`: RUN/train.lock, one training per run directory (an OS file lock; a marker on gs://).
- `cluster`: a multi-worker run waits for its peers up to `train.cluster_timeout_s`, then exits 2.
- `global_state`: op determinism and the dtype policy, set for a run and restored after it.

`bmvae_tf.trainers.train` is the entry point the CLI calls.
"""
