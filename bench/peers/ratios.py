"""The ratios of the peer benchmark (bench/peers/side_by_side.py), from per-round rates. Pure Python (tests need no torch, no TF)."""

from __future__ import annotations

import statistics

# Issue 18: our rate over MultiVae's, at least this (contestant -> target).
TARGETS = {"mmvae_k30": 1.5, "mmvae_k1": 1.2, "mvae": 1.2}


def round_ratios(ours: list[float], theirs: list[float]) -> list[float]:
    """Our rate over theirs, round by round (each pair timed side by side)."""
    if len(ours) != len(theirs) or not ours:
        raise ValueError(f"need one rate of each per round, got {len(ours)} and {len(theirs)}")
    return [a / b for a, b in zip(ours, theirs)]


def summarise(name: str, ours: list[float], theirs: list[float]) -> dict:
    """Median per-round ratio, its range, the median rates and the target verdict."""
    ratios = round_ratios(ours, theirs)
    median = statistics.median(ratios)
    target = TARGETS.get(name)
    return {"contestant": name, "ratio": median, "ratio_min": min(ratios), "ratio_max": max(ratios),
            "rounds": len(ratios), "ours_examples_per_second": statistics.median(ours),
            "multivae_examples_per_second": statistics.median(theirs),
            "target": target, "met": None if target is None else median >= target}


def rate(examples: int, seconds: float) -> float:
    if seconds <= 0:
        raise ValueError(f"a timing of {seconds} s")
    return examples / seconds
