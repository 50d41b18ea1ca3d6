"""The kde sampler: a Gaussian kernel on every training latent, per class, with a fitted bandwidth.

Why: a mixture of a few full-covariance Gaussians per class puts its samples where each class is densest
and smooths away the less typical latents, which a downstream classifier needs as much as the typical
ones. A kernel density estimate keeps every training latent as a centre: a draw picks one training image
of the wanted class at random and moves away from its latent by h * L_c @ noise, where L_c L_c^T is that
class's latent covariance and h the bandwidth. h is the one free parameter, chosen by the likelihood of
held-out latents (a seeded 5% of the fit points, scored against the other 95%), so it is as wide as the
data supports: wide enough that a sample is a new image, not a reconstruction of its centre (evaluate's
memorisation section checks this against the very training images the samples started from).

Draws are deterministic per sample, as with the other samplers: sample i of shard s takes its centre and
its noise from the generator (seed, s, i), and the product L_c @ noise is done in the mixture's exact
fixed point, so a latent is the same bits however the samples are batched.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from vaeforge.errors import UserError
from vaeforge.sampling import SampleStreams, exact_spreads, fixed_point_factors

# Part of the plan and manifest of a kde run: a resumed run must not mix shards drawn two ways.
KDE_TRANSFORM = "kde-fixed-point-v1"
# Candidate bandwidths, in units of each class's latent standard deviations. Held-out likelihood on
# Fashion-MNIST latents (D = 512) peaked at 0.5, with 0.4 and 0.7 within 4% of it.
BANDWIDTHS = (0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.85, 1.0)
DEFAULT_BANDWIDTH = 0.5  # when there are too few points to hold any out
HOLDOUT_FRACTION = 0.05
MIN_HOLDOUT = 20
SCORE_ROWS = 256  # held-out points scored at once: a (256, N) distance block


@dataclass(frozen=True)
class LatentKDE:
    """A per-class (or pooled) Gaussian kernel density over latent vectors.

    points (N, D) float32: the kernel centres, the encoder means of the training images. classes (N,)
    int64: each centre's class, or None for a pooled fit. chol (G, D, D) float64: the Cholesky factor
    of group g's covariance, where the groups are the sorted classes (G = 1 when pooled). source (N,)
    int64: each centre's position in the run's training split, so that evaluate can check the samples
    against the images they started from.
    """

    points: np.ndarray
    classes: np.ndarray | None
    chol: np.ndarray
    bandwidth: float
    source: np.ndarray
    meta: dict  # how it was fitted: points, bandwidth scores, seed, source checkpoint

    transform = KDE_TRANSFORM

    @property
    def per_class(self) -> bool:
        return self.classes is not None

    def class_ids(self) -> list[int]:
        """The classes that own at least one centre (empty for a pooled fit)."""
        return [] if self.classes is None else sorted({int(c) for c in self.classes})

    def sha256(self) -> str:
        """Identity of the fit for manifests: the same data and settings give the same digest."""
        h = hashlib.sha256(KDE_TRANSFORM.encode())
        h.update(np.ascontiguousarray(self.points, dtype=np.float32).tobytes())
        h.update(np.ascontiguousarray(self.chol, dtype=np.float64).tobytes())
        h.update(np.float64(self.bandwidth).tobytes())
        if self.classes is not None:
            h.update(np.ascontiguousarray(self.classes, dtype=np.int64).tobytes())
        return h.hexdigest()

    @cached_property
    def _groups(self) -> dict[int, np.ndarray]:
        """{class (or -1 when pooled): the indices of its centres}; group g is the g-th key in order."""
        if self.classes is None:
            return {-1: np.arange(len(self.points))}
        return {c: np.flatnonzero(self.classes == c) for c in self.class_ids()}

    @cached_property
    def _fixed_point(self) -> tuple[np.ndarray, np.ndarray, int]:
        return fixed_point_factors(self.chol)

    def _draw(
        self, seed: int, shard: int, start: int, n: int, labels: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(centre index (n,), group (n,), noise (n, D) float64) of samples start..start+n-1."""
        keys = list(self._groups)
        if labels is not None and self.per_class:
            unknown = sorted({int(v) for v in np.unique(labels)} - set(keys))
            if unknown:
                raise UserError(
                    f"the fitted kde has no training latent of class {unknown[0]} (classes it has: "
                    f"{', '.join(map(str, keys))}); refit with `vaeforge fit-sampler`"
                )
        d = self.points.shape[1]
        centre, group = np.empty(n, dtype=np.int64), np.empty(n, dtype=np.int64)
        noise = np.empty((n, d), dtype=np.float64)
        streams = SampleStreams(seed, shard)
        for j in range(n):
            g = streams(start + j)
            if labels is None or not self.per_class:  # the whole training distribution
                i = min(int(g.random() * len(self.points)), len(self.points) - 1)
                centre[j] = i
                group[j] = keys.index(int(self.classes[i])) if self.per_class else 0
            else:
                c = int(labels[j])
                ids = self._groups[c]
                centre[j] = ids[min(int(g.random() * len(ids)), len(ids) - 1)]
                group[j] = keys.index(c)
            noise[j] = g.standard_normal(d)
        return centre, group, noise

    def sample(
        self,
        seed: int,
        shard: int,
        start: int,
        n: int,
        temperature: float = 1.0,
        labels: np.ndarray | None = None,
    ) -> np.ndarray:
        """(n, D) float32 latents; with labels (n,) and a per-class fit, sample j is of class labels[j].

        temperature scales the kernel's width (the bandwidth), as it scales the other samplers' spread.
        """
        centre, group, noise = self._draw(seed, shard, start, n, labels)
        z = np.empty((n, self.points.shape[1]), dtype=np.float32)
        scale = temperature * self.bandwidth
        for _, rows, spread in exact_spreads(noise, group, self._fixed_point):
            z[rows] = self.points[centre[rows]].astype(np.float64) + scale * spread
        return z

    def sources(
        self, seed: int, shard: int, start: int, n: int, labels: np.ndarray | None = None
    ) -> np.ndarray:
        """(n,) positions in the run's training split of the images that samples start.. started from."""
        return self.source[self._draw(seed, shard, start, n, labels)[0]]

    def save(self, path: str | Path) -> None:
        extra = {} if self.classes is None else {"classes": np.asarray(self.classes, dtype=np.int64)}
        np.savez(
            path,
            points=np.asarray(self.points, dtype=np.float32),
            chol=self.chol,
            bandwidth=np.float64(self.bandwidth),
            source=np.asarray(self.source, dtype=np.int64),
            meta=np.array(json.dumps(self.meta, sort_keys=True)),
            **extra,
        )

    @classmethod
    def load(cls, path: str | Path) -> LatentKDE:
        with np.load(path, allow_pickle=False) as f:
            classes = f["classes"] if "classes" in f.files else None
            return cls(
                f["points"],
                classes,
                f["chol"],
                float(f["bandwidth"]),
                f["source"],
                json.loads(str(f["meta"])),
            )


def _whitened(x: torch.Tensor, chol: torch.Tensor) -> torch.Tensor:
    """(N, D) L^-1 x for each row x."""
    return torch.linalg.solve_triangular(chol, x.T, upper=False).T


def _holdout_mask(groups: list[np.ndarray], n: int, seed: int) -> np.ndarray:
    """A seeded HOLDOUT_FRACTION of the points, never the last point of a group."""
    mask = np.random.default_rng([seed, 13]).random(n) < HOLDOUT_FRACTION
    for ids in groups:
        if mask[ids].all():
            mask[ids[0]] = False
    return mask


def bandwidth_scores(
    x: torch.Tensor, groups: list[np.ndarray], chol: torch.Tensor, held: np.ndarray
) -> dict[float, float]:
    """{h: mean log-density of the held-out points under the kde of the others, kernel h^2 Sigma_g}."""
    d = x.shape[1]
    per_point = {h: [] for h in BANDWIDTHS}
    for g, ids in enumerate(groups):
        test, base = ids[held[ids]], ids[~held[ids]]
        if len(test) == 0:
            continue
        wt, wb = _whitened(x[test], chol[g]), _whitened(x[base], chol[g])
        logdet = float(2 * torch.log(torch.diagonal(chol[g])).sum())
        for s in range(0, len(wt), SCORE_ROWS):
            d2 = torch.cdist(wt[s : s + SCORE_ROWS], wb).square()  # (T, B) squared Mahalanobis distances
            for h in BANDWIDTHS:
                ll = torch.logsumexp(-0.5 * d2 / h**2, 1) - np.log(len(base))
                per_point[h].append(ll - d * np.log(h) - 0.5 * logdet - 0.5 * d * np.log(2 * np.pi))
    return {h: float(torch.cat(v).mean()) for h, v in per_point.items()}


def fit_kde(
    x: np.ndarray,
    labels: np.ndarray | None,
    source: np.ndarray,
    seed: int = 0,
    reg: float = 1e-4,
    bandwidth: float | None = None,
) -> LatentKDE:
    """A kde on the points x (N, D), per class when labels (N,) are given, with the bandwidth that gives
    held-out latents the highest likelihood (or `bandwidth` when given).

    Args:
        source: (N,) each point's position in the run's training split, stored with the fit.
        reg: added to each covariance's diagonal, relative to the mean within-class variance, so that
            a class with fewer points than dimensions still has a full-rank kernel.
    """
    xt = torch.as_tensor(np.asarray(x), dtype=torch.float64)
    n, d = xt.shape
    keys = [-1] if labels is None else sorted(int(c) for c in np.unique(labels))
    if labels is not None and min(keys) < 0:
        raise UserError("a per-class kde needs a label for every training image")
    groups = [np.arange(n)] if labels is None else [np.flatnonzero(labels == c) for c in keys]
    eye = torch.eye(d, dtype=torch.float64) * (reg * _within_variance(xt, groups) + 1e-12)
    chol = torch.stack([torch.linalg.cholesky(_covariance(xt[ids]) + eye) for ids in groups])
    held = _holdout_mask(groups, n, seed)
    scores: dict[float, float] = {}
    if bandwidth is None and held.sum() >= MIN_HOLDOUT:
        scores = bandwidth_scores(xt, groups, chol, held)
        bandwidth = max(scores, key=scores.get)
    chosen = DEFAULT_BANDWIDTH if bandwidth is None else float(bandwidth)
    meta = {
        "kind": "kde",
        "points": n,
        "per_class": {str(c): len(ids) for c, ids in zip(keys, groups, strict=True)}
        if labels is not None
        else None,
        "bandwidth": chosen,
        "bandwidth_selection": (
            "held-out likelihood"
            if scores
            else ("given" if bandwidth is not None else "default: too few points")
        ),
        "heldout_loglik": {f"{h:g}": v for h, v in scores.items()},
        "heldout_points": int(held.sum()) if scores else 0,
        "seed": seed,
        "reg": reg,
    }
    classes = None if labels is None else np.asarray(labels, dtype=np.int64)
    return LatentKDE(
        np.asarray(x, dtype=np.float32),
        classes,
        chol.numpy(),
        chosen,
        np.asarray(source, dtype=np.int64),
        meta,
    )


def _covariance(x: torch.Tensor) -> torch.Tensor:
    """(D, D) covariance of the rows of x; zero for a single row."""
    if len(x) < 2:
        return torch.zeros(x.shape[1], x.shape[1], dtype=x.dtype)
    return torch.cov(x.T).reshape(x.shape[1], x.shape[1])


def _within_variance(x: torch.Tensor, groups: list[np.ndarray]) -> float:
    """Mean per-dimension variance of the points around their own group's mean (all points' when that
    is zero, e.g. one point per group)."""
    sq = sum(float(((x[ids] - x[ids].mean(0)) ** 2).sum()) for ids in groups)
    within = sq / (len(x) * x.shape[1])
    return within if within > 0 else float(x.var(0).mean()) if len(x) > 1 else 1.0
