"""Real-vs-generated distribution metrics on feature matrices: FID, KID, precision/recall, density/coverage.

Everything is numpy float64 and takes (N, D) feature matrices, so it works in any feature space; the
caller names that space (`feature_space=`) and the name travels with the numbers, because a FID in one
space says nothing about a FID in another.

References:
    FID: Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
        Equilibrium". KID: Binkowski et al. 2018, "Demystifying MMD GANs" (unbiased MMD^2, cubic
        polynomial kernel, averaged over random subsets). Precision/recall: Kynkaanniemi et al. 2019,
        "Improved Precision and Recall Metric for Assessing Generative Models" (k = 3).
        Density/coverage: Naeem et al. 2020, "Reliable Fidelity and Diversity Metrics for Generative
        Models" (k = 5).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from vaeforge.metrics.neighbours import BLOCK_BYTES, as_features, distance_blocks, knn_radii


def _pair(real: np.ndarray, fake: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    real, fake = as_features(real, "real"), as_features(fake, "fake")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature sizes differ: real {real.shape[1]}, fake {fake.shape[1]}")
    return real, fake


# ---------------------------------------------------------------- FID


def gaussian_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of a feature matrix, float64."""
    x = as_features(x, "features")
    if len(x) < 2:
        raise ValueError("a covariance needs at least 2 samples")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix; tiny negative eigenvalues (rounding) become 0."""
    w, v = np.linalg.eigh((a + a.T) * 0.5)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Squared Frechet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2).

    d = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)). S1 S2 is not symmetric, but it is similar
    to M = S1^(1/2) S2 S1^(1/2), which is symmetric PSD and has the same eigenvalues, so the trace term is
    sum(sqrt(eig(M))) from two symmetric eigendecompositions: no complex sqrtm, no scipy, stable when
    the covariances are singular (fewer samples than dimensions).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"mismatched shapes: {mu1.shape}, {sigma1.shape}, {mu2.shape}, {sigma2.shape}")
    root1 = _psd_sqrt(sigma1)
    m = root1 @ sigma2 @ root1
    eig = np.linalg.eigvalsh((m + m.T) * 0.5)
    trace_sqrt = np.sqrt(np.clip(eig, 0.0, None)).sum()
    diff = mu1 - mu2
    d = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt
    return max(float(d), 0.0)  # a true distance is >= 0; rounding may leave -1e-12 for equal inputs


def frechet_from_samples(a: np.ndarray, b: np.ndarray) -> float:
    """The same distance computed in sample space, exact and much cheaper when the sets are smaller than D.

    With S = F F^T for F = centred samples^T / sqrt(n - 1) (D x n), the non-zero eigenvalues of S1 S2 are
    those of (F1^T F2)(F1^T F2)^T, so tr((S1 S2)^(1/2)) is the sum of the singular values of the
    (n1 x n2) matrix F1^T F2: no D x D decomposition at all.
    """
    ca, cb = a - a.mean(axis=0), b - b.mean(axis=0)  # (n1, D), (n2, D)
    cross = (ca @ cb.T) / math.sqrt((len(a) - 1) * (len(b) - 1))  # (n1, n2) = F1^T F2
    trace_sqrt = np.linalg.svd(cross, compute_uv=False).sum()
    diff = a.mean(axis=0) - b.mean(axis=0)
    tr_a, tr_b = np.einsum("ij,ij->", ca, ca) / (len(a) - 1), np.einsum("ij,ij->", cb, cb) / (len(b) - 1)
    return max(float(diff @ diff + tr_a + tr_b - 2.0 * trace_sqrt), 0.0)


def fid(real: np.ndarray, fake: np.ndarray) -> float:
    """FID between two feature matrices (the Frechet distance of their fitted Gaussians).

    Picks whichever exact route is cheaper: sample space (an n1 x n2 SVD) for sets smaller than the
    feature size, else the D x D eigendecompositions of frechet_distance.
    """
    real, fake = _pair(real, fake)
    if min(len(real), len(fake)) < 2:
        raise ValueError("FID needs at least 2 samples in each set")
    n1, n2, d = len(real), len(fake), real.shape[1]
    if n1 * n2 * min(n1, n2) < d**3:
        return frechet_from_samples(real, fake)
    return frechet_distance(*gaussian_stats(real), *gaussian_stats(fake))


# ---------------------------------------------------------------- KID


def _poly_kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """k(x, y) = (x.y / D + 1)^3, the kernel of Binkowski et al."""
    return (a @ b.T / a.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 of two samples under the cubic polynomial kernel (can be slightly negative)."""
    m, n = len(x), len(y)
    kxx, kyy, kxy = _poly_kernel(x, x), _poly_kernel(y, y), _poly_kernel(x, y)
    # Within-set terms leave out the diagonal k(x_i, x_i): that is what makes the estimate unbiased.
    t_xx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    t_yy = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(t_xx + t_yy - 2.0 * kxy.mean())


def kid(
    real: np.ndarray, fake: np.ndarray, subset_size: int = 1000, subsets: int = 100, seed: int = 0
) -> tuple[float, float]:
    """KID as (mean, std) of the unbiased MMD^2 over `subsets` random subsets of each set.

    Subsets are drawn without replacement from an explicit np.random.Generator(PCG64(seed)); the size is
    capped at the smaller set, so small sets still give an answer (with a larger spread).
    """
    real, fake = _pair(real, fake)
    size = min(subset_size, len(real), len(fake))
    if size < 2:
        raise ValueError("KID needs at least 2 samples in each set")
    rng = np.random.Generator(np.random.PCG64(seed))
    values = [
        mmd2_unbiased(
            real[rng.choice(len(real), size, replace=False)], fake[rng.choice(len(fake), size, replace=False)]
        )
        for _ in range(subsets)
    ]
    return float(np.mean(values)), float(np.std(values))


# ---------------------------------------------------------------- precision, recall, density, coverage


@dataclass
class PRDC:
    precision: float  # share of generated samples inside the real manifold (fidelity)
    recall: float  # share of real samples inside the generated manifold (diversity)
    density: float  # how many real neighbourhoods hold a generated sample, on average / k (can exceed 1)
    coverage: float  # share of real samples whose neighbourhood holds a generated sample


def prdc(
    real: np.ndarray, fake: np.ndarray, k_pr: int = 3, k_dc: int = 5, block_bytes: int = BLOCK_BYTES
) -> PRDC:
    """Precision and recall (k-NN balls, k_pr) and density and coverage (k_dc) in one pass over real x fake.

    A sample lies in a set's manifold when it is within some member's distance to that member's k-th
    nearest neighbour in its own set. Three chunked distance passes: real x real, fake x fake (the
    radii) and fake x real (all four counts).
    """
    real, fake = _pair(real, fake)
    real_r = knn_radii(real, (k_pr, k_dc), block_bytes)
    fake_r = knn_radii(fake, (k_pr,), block_bytes)[k_pr]
    in_real = np.zeros(len(fake), dtype=bool)  # precision: fake j inside some real ball (k_pr)
    density_hits = 0  # density: (fake j, real i) pairs with fake j inside real ball i (k_dc)
    real_covered = np.zeros(len(real), dtype=bool)  # recall: real i inside some fake ball (k_pr)
    real_nearest_fake = np.full(len(real), np.inf)  # coverage: nearest fake to each real
    for start, d in distance_blocks(fake, real, block_bytes):  # d: (r fakes, N real)
        stop = start + len(d)
        in_real[start:stop] = (d <= real_r[k_pr][None, :]).any(axis=1)
        density_hits += int((d <= real_r[k_dc][None, :]).sum())
        real_covered |= (d <= fake_r[start:stop, None]).any(axis=0)
        np.minimum(real_nearest_fake, d.min(axis=0), out=real_nearest_fake)
    return PRDC(
        precision=float(in_real.mean()),
        recall=float(real_covered.mean()),
        density=density_hits / (k_dc * len(fake)),
        coverage=float((real_nearest_fake <= real_r[k_dc]).mean()),
    )


# ---------------------------------------------------------------- all of them


@dataclass
class DistributionMetrics:
    feature_space: str  # e.g. "vaeforge-randconv-v1": numbers compare only within one space
    n_real: int
    n_fake: int
    fid: float
    kid_mean: float
    kid_std: float
    precision: float
    recall: float
    density: float
    coverage: float
    k_pr: int
    k_dc: int
    kid_subset_size: int
    kid_subsets: int
    seed: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def distribution_metrics(
    real: np.ndarray,
    fake: np.ndarray,
    *,
    feature_space: str,
    k_pr: int = 3,
    k_dc: int = 5,
    kid_subset_size: int = 1000,
    kid_subsets: int = 100,
    seed: int = 0,
) -> DistributionMetrics:
    """FID, KID, precision, recall, density and coverage of `fake` against `real` features."""
    real, fake = _pair(real, fake)
    kid_mean, kid_std = kid(real, fake, kid_subset_size, kid_subsets, seed)
    p = prdc(real, fake, k_pr, k_dc)
    return DistributionMetrics(
        feature_space=feature_space,
        n_real=len(real),
        n_fake=len(fake),
        fid=fid(real, fake),
        kid_mean=kid_mean,
        kid_std=kid_std,
        precision=p.precision,
        recall=p.recall,
        density=p.density,
        coverage=p.coverage,
        k_pr=k_pr,
        k_dc=k_dc,
        kid_subset_size=min(kid_subset_size, len(real), len(fake)),
        kid_subsets=kid_subsets,
        seed=seed,
    )
