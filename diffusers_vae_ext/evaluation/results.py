"""What the evaluation returns: per-metric summaries with 95 % intervals, per-VAE results, the whole run."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class MetricSummary:
    """Mean of a metric over images, the half width of its 95 % t-interval, the std and the count."""

    mean: float
    ci95: float
    std: float
    count: int

    def to_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "ci95": self.ci95, "std": self.std, "count": self.count}


def summarize_metric(values: Iterable[float | None]) -> MetricSummary | None:
    """Mean and 95 % t-interval half width (`t_{0.975, n-1} * s / sqrt(n)`) of the finite values; None if none."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return None
    count = len(finite)
    mean = sum(finite) / count
    if count < 2:
        return MetricSummary(mean, float("nan"), float("nan"), count)
    std = float(np.std(finite, ddof=1))
    try:
        from scipy.stats import t

        quantile = float(t.ppf(0.975, count - 1))
    except ImportError:  # scipy comes with scikit-image; the normal quantile is the large-sample limit
        quantile = 1.959963984540054
    return MetricSummary(mean, quantile * std / math.sqrt(count), std, count)


@dataclass
class VAEResult:
    """Everything measured for one VAE over the set.

    `metrics` maps psnr/ssim/lpips/kl to their summaries (None when not measured); `latent` holds the latent
    statistics, the current and suggested scaling; `half_precision` the `fp16.HalfPrecisionReport`s; `seconds`
    the time spent in the VAE itself;
    `diffusability` the `diffusability.DiffusabilityResult.to_dict()` (plus the sample grid, sample FID and
    plots) or `{"skipped": reason}`, with `--diffusability`.
    """

    label: str
    source: str
    class_name: str
    num_parameters: int
    metrics: dict[str, MetricSummary | None] = field(default_factory=dict)
    rfid: float | None = None
    latent: dict[str, Any] = field(default_factory=dict)
    half_precision: list[Any] = field(default_factory=list)
    seconds: float = 0.0
    diffusability: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "source": self.source,
            "class_name": self.class_name,
            "num_parameters": self.num_parameters,
            "metrics": {k: (v.to_dict() if v else None) for k, v in self.metrics.items()},
            "rfid": self.rfid,
            "latent": self.latent,
            "half_precision": [r.to_dict() for r in self.half_precision],
            "seconds": self.seconds,
            "diffusability": self.diffusability,
        }


@dataclass
class EvalResult:
    """The whole evaluation: per-VAE results, per-image rows, the patch PNGs, skipped images, settings."""

    vaes: list[VAEResult]
    rows: list[dict[str, Any]]
    patches: list[dict[str, Any]]
    skipped: list[dict[str, str]]
    settings: dict[str, Any]
    output_dir: Path
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "settings": self.settings,
            "seconds": self.seconds,
            "vaes": [v.to_dict() for v in self.vaes],
            "skipped": self.skipped,
        }
