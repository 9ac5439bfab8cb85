"""`bmvae evaluate`: the metrics of a trained run (SPEC section 3), one module per family.

- `evaluate`: the orchestrator, `evaluate(workdir)` -> RUN/metrics.json, plots and report; its
  `STAGES` list is where a metric is registered.
- `context`: `EvalContext`, what every stage shares (model, data, eval config, seed, and the
  classifiers and split encodings, made once on first use).
- `metrics`: `Metrics`, the typed record metrics.json is written from and read back into.
- `subsets`: masking absent modalities, subset keys, and `run_subsets`, the one per-subset loop.
- `encodings`: one pass over a split: posterior means of every subset, cross-generated classes.
- `classifiers`: the coherence classifiers, trained on real data and cached in RUN/classifiers.
- metric families: `probes` (latent accuracy and the linear probe), `coherence` (cross coherence,
  classifier accuracy), `random_coherence` (prior and ex-post GMM), `likelihood` (IWAE
  log-likelihoods), `cca` (CCA coherence of image-caption data), `robustness` (MultiBench).

The names below are what other parts of the product (`bmvae analyze`) use.
"""

from bmvae_tf.trainers.evaluation.encodings import SplitLatents, encode_split
from bmvae_tf.trainers.evaluation.metrics import Metrics
from bmvae_tf.trainers.evaluation.probes import latent_accuracy
from bmvae_tf.trainers.evaluation.subsets import mask_inputs

__all__ = ["Metrics", "SplitLatents", "encode_split", "latent_accuracy", "mask_inputs"]
