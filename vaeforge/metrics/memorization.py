"""Memorisation check: how close generated samples come to training images, against a held-out baseline.

For every generated sample we take the distance to its nearest training image. On its own that number
means little (a dataset of near-identical images makes every distance small), so it is compared with
the same distance for real held-out images, which the model never saw: a generator that learned the
distribution rather than the examples produces samples about as far from the training set as fresh
real images are. A generator that copies produces samples much closer than that.

Space: the caller passes vectors; `vaeforge evaluate` passes the FEATURE_SPACE embedding
(vaeforge.metrics.features), not raw pixels. Pixel L2 is dominated by background colour and brightness
and ranks a one-pixel shift of an image as far away as a different image, while the multi-scale
pooled features are shift-tolerant and weigh shape and texture too; the same features also serve
FID/PRDC, so one extraction serves both. Pixels (flattened uint8 as float) still work when an
exact-copy audit is wanted; the threshold below is relative, so it adapts to either space.

Near-duplicate threshold: a generated sample is a near-duplicate when its nearest-training distance is
below `threshold_scale` (default 0.5) times the 5th percentile of the held-out->train distances: closer
to a training image than half the distance at which only 1 in 20 *real unseen* images sits. An exact
copy (distance ~0) is always flagged; a sample as novel as a typical held-out image never is.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from vaeforge.metrics.neighbours import as_features, nearest

BASELINE_PERCENTILE = 5.0  # reported for both distributions and the anchor of the threshold
THRESHOLD_SCALE = 0.5  # near-duplicate: closer than half the baseline's 5th percentile


@dataclass
class MemorizationReport:
    feature_space: str  # the space the distances were measured in ("pixels" or a feature-space id)
    n_generated: int
    n_train: int
    n_holdout: int
    generated_p05: float  # 5th percentile of generated -> nearest-train distances
    holdout_p05: float  # 5th percentile of holdout -> nearest-train distances (the baseline)
    generated_median: float
    holdout_median: float
    ratio_p05: float | None  # generated_p05 / holdout_p05, well below 1 is a warning; None if holdout_p05 = 0
    threshold: float  # THRESHOLD_SCALE * holdout_p05
    near_duplicates: int  # generated samples closer than `threshold` to some training image
    near_duplicate_fraction: float
    # The closest (generated index, train index, distance) triples, closest first, for a report to show.
    closest_pairs: list[tuple[int, int, float]]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def memorization(
    generated: np.ndarray,
    train: np.ndarray,
    holdout: np.ndarray,
    *,
    feature_space: str,
    threshold_scale: float = THRESHOLD_SCALE,
    top: int = 16,
) -> MemorizationReport:
    """Nearest-training-image distances of generated vs held-out samples, and the near-duplicates.

    Args:
        generated, train, holdout: (N, D) vectors in one space; holdout must share no image with train.
        feature_space: the name of that space, recorded in the report.
        threshold_scale: near-duplicate threshold as a multiple of the holdout's 5th percentile.
        top: how many closest generated/train pairs to return.
    """
    generated, train = as_features(generated, "generated"), as_features(train, "train")
    holdout = as_features(holdout, "holdout")
    gen_d, gen_j = nearest(generated, train)
    hold_d, _ = nearest(holdout, train)
    gen_p05 = float(np.percentile(gen_d, BASELINE_PERCENTILE))
    hold_p05 = float(np.percentile(hold_d, BASELINE_PERCENTILE))
    threshold = threshold_scale * hold_p05
    flagged = int((gen_d < threshold).sum())
    order = np.argsort(gen_d, kind="stable")[:top]
    return MemorizationReport(
        feature_space=feature_space,
        n_generated=len(generated),
        n_train=len(train),
        n_holdout=len(holdout),
        generated_p05=gen_p05,
        holdout_p05=hold_p05,
        generated_median=float(np.median(gen_d)),
        holdout_median=float(np.median(hold_d)),
        ratio_p05=gen_p05 / hold_p05 if hold_p05 > 0 else None,
        threshold=threshold,
        near_duplicates=flagged,
        near_duplicate_fraction=flagged / len(generated),
        closest_pairs=[(int(i), int(gen_j[i]), float(gen_d[i])) for i in order],
    )
