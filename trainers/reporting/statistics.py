"""Statistics over seeds for `bmvae compare`: the mean and standard deviation of a number over a
model's runs, and the test that decides whether two models differ.

The test is a two-sided paired t-test over seed-matched runs (`scipy.stats.ttest_rel`): model A's
run with seed s is paired with model B's run with seed s, so both saw the same data order and
initialisation stream, and the test is on the per-seed differences. A difference is *significant*
when p < ALPHA (0.05), uncorrected for the number of comparisons (the p-values are reported, so a
reader can apply Holm or Bonferroni). With fewer than two seed-matched pairs, or differences that
are all equal, there is no test and nothing is marked.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import numpy as np
from scipy import stats

ALPHA = 0.05
TEST = "two-sided paired t-test over seed-matched runs (scipy.stats.ttest_rel)"


@dataclasses.dataclass(frozen=True)
class Summary:
    """A number over the runs of one model: how many runs had it, their mean and sample
    standard deviation (ddof=1; None for a single run)."""

    n: int
    mean: float | None
    sd: float | None


def summarise(values: Sequence[float | None]) -> Summary:
    """The Summary of the known (not None, finite) values."""
    known = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not known:
        return Summary(0, None, None)
    sd = float(np.std(known, ddof=1)) if len(known) > 1 else None
    return Summary(len(known), float(np.mean(known)), sd)


@dataclasses.dataclass(frozen=True)
class PairedTest:
    """A - B over the seeds both have: the seeds, the mean and sd of the differences, and the
    paired t-test's two-sided p (None when there is no test)."""

    seeds: tuple[int, ...]
    mean: float | None
    sd: float | None
    p: float | None

    def significant(self, alpha: float = ALPHA) -> bool:
        return self.p is not None and self.p < alpha


def paired_test(a: Mapping[int, float | None], b: Mapping[int, float | None]) -> PairedTest:
    """The paired t-test of A - B over the seeds with a known value in both ({seed: value})."""
    seeds = tuple(sorted(s for s in a if s in b and _known(a[s]) and _known(b[s])))
    if not seeds:
        return PairedTest(seeds, None, None, None)
    diffs = np.array([a[s] - b[s] for s in seeds], dtype=np.float64)
    sd = float(np.std(diffs, ddof=1)) if len(diffs) > 1 else None
    p = None
    # Equal differences (up to rounding: 0.9 - 0.8 != 0.8 - 0.7 in floats) have no spread to test.
    if len(diffs) > 1 and not np.allclose(diffs, diffs[0], rtol=1e-9, atol=1e-12):
        p = float(stats.ttest_rel([a[s] for s in seeds], [b[s] for s in seeds]).pvalue)
    return PairedTest(seeds, float(np.mean(diffs)), sd, p)


def _known(value) -> bool:
    return value is not None and math.isfinite(value)
