"""The typed record of RUN/metrics.json (SPEC section 3).

`bmvae evaluate` fills a `Metrics` stage by stage and writes it with `write`; the run report and
`bmvae compare` read it back with `Metrics.from_json`, so a field is named in one place. The JSON
keys and values are exactly the fields: subset keys "a+b", coherence keys "t|a+b", conditional
likelihood keys "T|S" (both subset keys); a label-based metric is None on unlabelled data, with the
reason in `skipped`; `num_examples` says how many examples (and samples) each number rests on.
Likelihoods are unweighted (the training likelihood weights never enter them), in nats.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping

import tensorflow as tf

from bmvae_tf import atomic
from bmvae_tf.errors import UserError

# Written only when set: SPEC 3 lists cca_coherence for CUB alone; examples_fully_observed is
# set by every evaluation and absent from files written before it existed.
_OPTIONAL = frozenset({"cca_coherence", "examples_fully_observed"})
# Keys older metrics.json files lack, read as their default ("split": they scored test).
_DEFAULTED = frozenset({"split"})


@dataclasses.dataclass
class Metrics:
    """One evaluation of a trained run. Fields in the order metrics.json lists them."""

    model: str
    dataset: str
    modalities: list[str]
    epochs: int
    seconds_per_epoch: float | None
    split: str = "test"  # the split scored: test, or validation (`bmvae evaluate --split`)
    # Rows of the scored split with every modality present: the rows evaluation reads (of a
    # dataset with missing rows; all of them otherwise). None in files written before it existed.
    examples_fully_observed: int | None = None
    latent_accuracy: dict[str, float] | None = None  # {subset: test accuracy of the linear probe}
    coherence: dict[str, float] | None = None  # {"t|S": cross coherence}
    random_coherence: float | None = None  # prior latents
    random_coherence_gmm: float | None = None  # latents of the ex-post GMM
    log_likelihood: dict[str, float | None] | None = None  # {subset: IWAE estimate of log p(x_S), nats}
    joint_log_likelihood: float | None = None  # log p(x_1..M) from the joint posterior, nats
    conditional_log_likelihood: dict[str, float | None] | None = None  # {"T|S": log p(x_T | x_S), nats}
    likelihood_estimators: dict[str, str] | None = None  # {likelihood metric: how it is estimated}
    robustness: dict[str, Any] | None = None  # `robustness.RobustnessResult.to_json()`
    mixture_weights: list[list[float]] | None = None  # [D][M], BMVAE models only
    classifier_accuracy: dict[str, float] | None = None  # {modality: accuracy on real test data}
    num_examples: dict[str, Any] = dataclasses.field(default_factory=dict)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)  # {metric: why it is None}
    cca_coherence: dict[str, float] | None = None  # {"ground_truth", "image->caption", ...}

    def to_json(self) -> dict:
        """The metrics.json object (plain dicts and lists, in field order)."""
        out = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        for name in _OPTIONAL:
            if out[name] is None:
                del out[name]
        return out

    def write(self, path: str) -> None:
        atomic.write_text(path, json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def from_json(cls, source: str | Mapping) -> Metrics:
        """A Metrics from a metrics.json path or its parsed object.

        Raises:
          UserError: naming the file, when it is not JSON, not an object, or not a metrics.json
            of this version (missing or unknown keys).
        """
        where = source if isinstance(source, str) else "metrics"
        data = _read(source) if isinstance(source, str) else source
        if not isinstance(data, Mapping):
            raise UserError(f"{where}: expected a JSON object of metrics, got {type(data).__name__}")
        names = [field.name for field in dataclasses.fields(cls)]
        missing = [n for n in names if n not in data and n not in _OPTIONAL | _DEFAULTED]
        unknown = [k for k in data if k not in names]
        if missing or unknown:
            problems = ([f"missing {', '.join(map(repr, missing))}"] if missing else []) + \
                       ([f"unknown {', '.join(map(repr, unknown))}"] if unknown else [])
            raise UserError(f"{where}: not a metrics.json of this bmvae version ({'; '.join(problems)}); "
                            f"run `bmvae evaluate` again")
        return cls(**dict(data))

    def count(self, key: str):
        """num_examples[key]: what the metric `key` rests on, or None."""
        return self.num_examples.get(key)


def _read(path: str):
    try:
        with tf.io.gfile.GFile(path) as f:
            return json.loads(f.read())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
