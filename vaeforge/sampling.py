"""Latent samplers: the N(0, I) prior with a temperature, and a Gaussian mixture fitted to encoder means.

Every sample's randomness comes from its own generator seeded by (seed, shard, index), so any sample can
be regenerated from its metadata alone, whatever the batching or the worker that ran its shard.

Why a fitted mixture: a VAE's aggregate posterior rarely fills N(0, I); prior draws that land in the holes
between its clusters decode to blurry in-between images. Fitting a density to where the encoder actually
puts the training images and sampling from that ("ex-post density estimation", Ghosh et al. 2020, "From
Variational to Deterministic Autoencoders") gives sharper, more typical samples at no training cost.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vaeforge.checkpoint import KDE_FILE
from vaeforge.checkpoint import SAMPLER_FILE as GMM_FILE
from vaeforge.errors import UserError

# The mixture's fixed-point product (GaussianMixture.sample): factor entries become integers of at most
# 2^CHOL_BITS, noise is clipped to +-NOISE_CLIP (a standard normal passes 16 with probability ~1e-57).
CHOL_BITS = 20
NOISE_CLIP = 16.0
# Part of the plan and manifest of a mixture run: a resumed run must not mix shards of two transforms.
GMM_TRANSFORM = "fixed-point-v1"


# Sample i of a shard owns the 2^STREAM_BITS draws of the shard's PCG64 stream that start at i * 2^STREAM_BITS
# (a latent needs about D draws, D << 2^32; the period is 2^128). Part of every plan and manifest: a resumed
# run must not mix shards drawn two ways.
STREAM_BITS = 32
LATENT_STREAMS = "pcg64-advance-v1"


class SampleStreams:
    """The generators of one shard's samples, each fixed by (seed, shard, index) alone.

    One seeded PCG64 per shard, jumped ahead to the sample's own block of draws: a jump is a few
    multiplications in C, where seeding a generator per sample (SeedSequence hashing, ~20 us) cost more than
    drawing its 512 normals. So any sample regenerates from its metadata without its neighbours.
    """

    def __init__(self, seed: int, shard: int) -> None:
        self._bits = np.random.PCG64(np.random.SeedSequence([seed, shard]))
        self._origin = self._bits.state
        self._gen = np.random.Generator(self._bits)

    def __call__(self, index: int) -> np.random.Generator:
        """Sample `index`'s generator. The object is reused: draw from it before the next call."""
        self._bits.state = self._origin
        self._bits.advance(index << STREAM_BITS)
        return self._gen


def sample_generator(seed: int, shard: int, index: int) -> np.random.Generator:
    """The generator that owns all the randomness of one sample (a fresh one; see SampleStreams)."""
    return SampleStreams(seed, shard)(index)


def prior_latents(seed: int, shard: int, start: int, n: int, dim: int, temperature: float) -> np.ndarray:
    """(n, dim) float32 draws from N(0, temperature^2 I); sample j uses generator (seed, shard, start + j)."""
    z = np.empty((n, dim), dtype=np.float32)
    streams = SampleStreams(seed, shard)
    for j in range(n):
        streams(start + j).standard_normal(dim, dtype=np.float32, out=z[j])
    return z * np.float32(temperature)


def seeded_subset(n: int, want: int, seed: int, salt: int) -> np.ndarray:
    """Sorted positions of a subset of `want` of n drawn by (seed, salt); all of them when n <= want."""
    if n <= want:
        return np.arange(n)
    return np.sort(np.random.default_rng([seed, salt]).choice(n, want, replace=False))


def fixed_point_factors(chol: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """(chol as integers in float64, per-factor power-of-two exponents, noise exponent) for (K, D, D) factors.

    Every entry of the integer factors is at most 2^CHOL_BITS in magnitude, and the noise is quantised to
    2^-noise_exp with |noise| <= NOISE_CLIP, so that every partial sum of a product row stays below 2^53
    and float64 arithmetic on them is exact in any order (see GaussianMixture.sample).
    """
    k, d = chol.shape[0], chol.shape[1]
    chol = np.asarray(chol, dtype=np.float64)
    biggest = np.abs(chol).reshape(k, -1).max(axis=1)
    exps = np.floor(CHOL_BITS - np.log2(np.maximum(biggest, np.finfo(np.float64).tiny))).astype(int)
    chol_q = np.rint(np.ldexp(chol, exps[:, None, None]))
    # d * 2^CHOL_BITS * NOISE_CLIP * 2^noise_exp <= 2^52: the sum of |products| of one row fits
    noise_exp = 52 - CHOL_BITS - int(np.ceil(np.log2(d))) - int(np.log2(NOISE_CLIP))
    return chol_q, exps, noise_exp


def exact_spreads(
    noise: np.ndarray, factor: np.ndarray, fixed: tuple[np.ndarray, np.ndarray, int]
) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """[(factor id c, rows, chol[c] @ noise[rows] as (m, D) float64)] for each factor in use.

    noise (n, D) float64 standard normals; factor (n,) which factor each row uses; fixed from
    fixed_point_factors. One matrix product per factor, exact, so a row's result does not depend on which
    other rows share its product.
    """
    chol_q, exps, noise_exp = fixed
    noise_q = np.rint(np.ldexp(np.clip(noise, -NOISE_CLIP, NOISE_CLIP), noise_exp))
    out = []
    for c in np.unique(factor):
        rows = np.flatnonzero(factor == c)
        out.append((int(c), rows, np.ldexp(noise_q[rows] @ chol_q[c].T, -(int(exps[c]) + noise_exp))))
    return out


@dataclass(frozen=True)
class GaussianMixture:
    """A fitted full-covariance Gaussian mixture over latent vectors, pooled or one per class.

    weights (K,), means (K, D) and the Cholesky factors (K, D, D) of the covariances, all float64.
    classes (K,) int64 names the class each component was fitted on (a per-class fit), or is None (a
    pooled fit). In a per-class fit the weights are P(class) * P(component | class), so drawing without a
    label samples the whole training distribution, and drawing with label c samples that class alone.
    """

    weights: np.ndarray
    means: np.ndarray
    chol: np.ndarray
    meta: dict  # how it was fitted: k, seed, iterations, n points, log-likelihood, source checkpoint
    classes: np.ndarray | None = None

    transform = GMM_TRANSFORM

    @property
    def k(self) -> int:
        return len(self.weights)

    @property
    def per_class(self) -> bool:
        return self.classes is not None

    def class_ids(self) -> list[int]:
        """The classes that own at least one component (empty for a pooled fit)."""
        return [] if self.classes is None else sorted({int(c) for c in self.classes})

    def sha256(self) -> str:
        """Identity of the fit for manifests: the same data and settings give the same digest."""
        h = hashlib.sha256()
        for a in (self.weights, self.means, self.chol):
            h.update(np.ascontiguousarray(a, dtype=np.float64).tobytes())
        if self.classes is not None:  # a pooled fit keeps the digest it always had
            h.update(np.ascontiguousarray(self.classes, dtype=np.int64).tobytes())
        return h.hexdigest()

    def _cdfs(self, labels: np.ndarray | None) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """{label: (component ids, cumulative weights)}; key -1 is the whole mixture."""
        wanted = {-1} if labels is None else {int(v) for v in np.unique(labels)}
        out = {}
        for c in wanted:
            ids = np.arange(self.k) if c < 0 else np.flatnonzero(self.classes == c)
            if len(ids) == 0:
                raise UserError(
                    f"the fitted mixture has no component for class {c} (classes with components: "
                    f"{', '.join(map(str, self.class_ids()))}); refit with `vaeforge fit-sampler`"
                )
            out[c] = (ids, np.cumsum(self.weights[ids]))
        return out

    @cached_property
    def _fixed_point(self) -> tuple[np.ndarray, np.ndarray, int]:
        return fixed_point_factors(self.chol)

    def sample(
        self,
        seed: int,
        shard: int,
        start: int,
        n: int,
        temperature: float = 1.0,
        labels: np.ndarray | None = None,
    ) -> np.ndarray:
        """(n, D) float32 latents; sample j draws its component and its noise from its own generator.

        labels (n,): with a per-class fit, sample j draws from class labels[j]'s components only. A
        pooled fit ignores labels, as the prior does. temperature scales each component's spread around
        its mean, as it scales the prior's.

        The D x D product chol[c] @ noise is the cost (a 2 MB factor read per sample at D = 512, ~110 us
        a sample as one matrix-vector product each). It is done as one matrix product per component
        over all of that component's samples, in fixed point: factors and noise are rounded to integers
        (relative error ~1e-6, far below what float32 latents keep) whose products and sums float64 holds
        exactly, so a sample's latent is the same bits however the samples are grouped, batched or
        threaded by BLAS, and it still regenerates alone from (seed, shard, index[, label]).
        """
        if not self.per_class:
            labels = None
        cdfs = self._cdfs(labels)
        d = self.means.shape[1]
        comp = np.empty(n, dtype=np.int64)
        noise = np.empty((n, d), dtype=np.float64)
        streams = SampleStreams(seed, shard)
        for j in range(n):
            g = streams(start + j)
            ids, cdf = cdfs[-1 if labels is None else int(labels[j])]
            pick = min(int(np.searchsorted(cdf, g.random() * cdf[-1], side="right")), len(ids) - 1)
            comp[j] = ids[pick]
            noise[j] = g.standard_normal(d)
        z = np.empty((n, d), dtype=np.float32)
        for c, rows, spread in exact_spreads(noise, comp, self._fixed_point):
            z[rows] = self.means[c] + temperature * spread
        return z

    def save(self, path: str | Path) -> None:
        extra = {} if self.classes is None else {"classes": np.asarray(self.classes, dtype=np.int64)}
        np.savez(
            path,
            weights=self.weights,
            means=self.means,
            chol=self.chol,
            meta=np.array(json.dumps(self.meta, sort_keys=True)),
            **extra,
        )

    @classmethod
    def load(cls, path: str | Path) -> GaussianMixture:
        with np.load(path, allow_pickle=False) as f:
            classes = f["classes"] if "classes" in f.files else None
            return cls(f["weights"], f["means"], f["chol"], json.loads(str(f["meta"])), classes)


def _kmeans_pp(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: spread initial means over the data, deterministically for a given generator."""
    idx = [int(torch.randint(len(x), (1,), generator=gen))]
    d2 = ((x - x[idx[0]]) ** 2).sum(1)
    for _ in range(1, k):
        idx.append(int(torch.multinomial(d2 / d2.sum(), 1, generator=gen)))
        d2 = torch.minimum(d2, ((x - x[idx[-1]]) ** 2).sum(1))
    return x[idx].clone()


def _log_resp(x: torch.Tensor, w: torch.Tensor, mu: torch.Tensor, chol: torch.Tensor) -> torch.Tensor:
    """(N, K) log w_k + log N(x | mu_k, L_k L_k^T)."""
    n, d = x.shape
    out = torch.empty(n, len(w), dtype=x.dtype)
    for c in range(len(w)):
        diff = (x - mu[c]).T  # (D, N)
        sol = torch.linalg.solve_triangular(chol[c], diff, upper=False)  # L^-1 (x - mu)
        logdet = 2 * torch.log(torch.diagonal(chol[c])).sum()
        out[:, c] = torch.log(w[c]) - 0.5 * ((sol**2).sum(0) + logdet + d * np.log(2 * np.pi))
    return out


def fit_gmm(
    x: np.ndarray, k: int = 10, seed: int = 0, max_iter: int = 100, tol: float = 1e-4, reg: float = 1e-4
) -> GaussianMixture:
    """Fit a full-covariance Gaussian mixture with EM, deterministically.

    Args:
        x: (N, D) points, e.g. the encoder means of the training images.
        k: components; capped at N.
        seed: seeds k-means++ initialisation, the only random step.
        max_iter, tol: EM stops when the mean log-likelihood per point improves by less than tol.
        reg: added to each covariance's diagonal, relative to the data's mean variance, so that
            components stay positive definite when D is large against the points they own.

    Returns:
        The fitted mixture; meta records the settings, iterations and final mean log-likelihood.
    """
    xt = torch.as_tensor(np.asarray(x), dtype=torch.float64)
    n, d = xt.shape
    k = max(1, min(k, n))
    gen = torch.Generator().manual_seed(seed)
    eye = torch.eye(d, dtype=torch.float64) * (reg * float(xt.var(0).mean()) + 1e-12)
    mu = _kmeans_pp(xt, k, gen)
    cov0 = torch.cov(xt.T).reshape(d, d) + eye
    chol = torch.linalg.cholesky(cov0).expand(k, d, d).clone()
    w = torch.full((k,), 1.0 / k, dtype=torch.float64)
    prev, ll, iterations = -np.inf, -np.inf, 0
    while iterations < max_iter:
        iterations += 1
        lr = _log_resp(xt, w, mu, chol)
        norm = torch.logsumexp(lr, 1, keepdim=True)
        ll = float(norm.mean())
        r = torch.exp(lr - norm)  # (N, K) responsibilities
        nk = r.sum(0) + 1e-10
        w, mu = nk / n, (r.T @ xt) / nk[:, None]
        for c in range(k):
            diff = xt - mu[c]
            cov = (r[:, c, None] * diff).T @ diff / nk[c] + eye
            chol[c] = torch.linalg.cholesky(cov)
        if ll - prev < tol:
            break
        prev = ll
    meta = {"k": k, "seed": seed, "iterations": iterations, "points": n, "mean_loglik": ll, "reg": reg}
    return GaussianMixture(w.numpy(), mu.numpy(), chol.numpy(), meta)


def fit_class_gmm(
    x: np.ndarray, labels: np.ndarray, k: int = 3, seed: int = 0, **em: float
) -> GaussianMixture:
    """One mixture of up to k components per class, fitted with fit_gmm on that class's points only.

    Why per class: a pooled mixture puts a component wherever the encoder means cluster, and those
    clusters cross class lines, so a pooled draw decoded under label c often shows another class. Fitting
    each class separately samples z from q(z | c), the region the encoder really maps class c to.

    Args:
        x: (N, D) points; labels: (N,) their classes (negative labels are left out).
        k: components per class, capped at that class's points.
        seed: as for fit_gmm; class c uses seed + c, so classes do not share initial draws.
        em: max_iter, tol, reg, passed to fit_gmm.

    Returns:
        The concatenated mixture with `classes` set; weights are class share * within-class weight.
    """
    labels = np.asarray(labels)
    present = sorted(int(c) for c in np.unique(labels) if c >= 0)
    if not present:
        raise UserError("a per-class mixture needs labeled images; these have none")
    parts, per_class = [], {}
    for c in present:
        xc = x[labels == c]
        g = fit_gmm(xc, k=k, seed=seed + c, **em)
        parts.append((c, g, len(xc) / int((labels >= 0).sum())))
        per_class[str(c)] = {"k": g.k, "points": len(xc), "iterations": g.meta["iterations"]}
    weights = np.concatenate([share * g.weights for _, g, share in parts])
    means = np.concatenate([g.means for _, g, _ in parts])
    chol = np.concatenate([g.chol for _, g, _ in parts])
    classes = np.concatenate([np.full(g.k, c, dtype=np.int64) for c, g, _ in parts])
    mean_ll = sum(share * g.meta["mean_loglik"] for _, g, share in parts)
    meta = {
        "k": int(len(weights)),
        "k_per_class": k,
        "per_class": per_class,
        "seed": seed,
        "points": int(sum(p["points"] for p in per_class.values())),
        "mean_loglik": float(mean_ll),
        "reg": parts[0][1].meta["reg"],
        "iterations": max(p["iterations"] for p in per_class.values()),
    }
    return GaussianMixture(weights, means, chol, meta, classes)


# (seed, shard, start, n, labels) -> (n, latent_dim) float32 latents for samples start..start+n-1 of that
# shard; labels (n,) or None: a per-class mixture draws each sample from its class, other samplers ignore it
LatentSampler = Callable[[int, int, int, int, "np.ndarray | None"], np.ndarray]


FIT_FILES = {"gmm": GMM_FILE, "kde": KDE_FILE}  # the fitted samplers, stored beside the weights
FITTED = tuple(FIT_FILES)


def fit_path(checkpoint_dir: str | Path, name: str = "gmm") -> Path:
    return Path(checkpoint_dir) / FIT_FILES[name]


def gmm_path(checkpoint_dir: str | Path) -> Path:
    return fit_path(checkpoint_dir, "gmm")


def load_fit(checkpoint_dir: str | Path, name: str) -> Any:
    """The fitted sampler `name` ("gmm": GaussianMixture, "kde": LatentKDE) stored with this checkpoint.

    Raises:
        UserError: when none was fitted; the message says how to fit one.
    """
    from vaeforge.sampling_kde import LatentKDE

    path = fit_path(checkpoint_dir, name)
    what = {"gmm": "a fitted mixture", "kde": "a fitted kernel density"}[name]
    if not path.is_file():
        raise UserError(
            f"--sampler {name} needs {what} and {checkpoint_dir} has none; "
            "run `vaeforge fit-sampler --checkpoint RUN_DIR` first"
        )
    try:
        return (GaussianMixture if name == "gmm" else LatentKDE).load(path)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{path} is damaged ({e}); re-run `vaeforge fit-sampler`") from None


def load_gmm(checkpoint_dir: str | Path) -> GaussianMixture:
    """The mixture fitted for this checkpoint (see load_fit)."""
    return load_fit(checkpoint_dir, "gmm")


def make_sampler(name: str, checkpoint_dir: str | Path, latent_dim: int, temperature: float) -> LatentSampler:
    """The sampler `generate --sampler NAME` uses; "gmm" and "kde" load the fit stored with the checkpoint."""
    if name == "prior":
        return lambda seed, shard, start, n, labels=None: prior_latents(
            seed, shard, start, n, latent_dim, temperature
        )
    if name in FIT_FILES:
        fit = load_fit(checkpoint_dir, name)
        if fit_latent_dim(fit) != latent_dim:
            raise UserError(f"the {name} fit in {checkpoint_dir} does not match the model's latent size")
        return lambda seed, shard, start, n, labels=None: fit.sample(
            seed, shard, start, n, temperature, labels
        )
    raise UserError(f"unknown sampler {name!r}; choose prior, {', '.join(FITTED)}")


def fit_latent_dim(fit: Any) -> int:
    return (fit.means if isinstance(fit, GaussianMixture) else fit.points).shape[1]


POOLED_K, PER_CLASS_K = 10, 3  # default components: a pooled fit, or each class of a per-class fit


# ------------------------------------------------------------------ class plans for conditional models


def parse_classes(
    spec: str, num_classes: int, class_counts: list[int] | None, count: int | None
) -> list[int]:
    """Samples per class for `generate --classes SPEC`.

    Args:
        spec: "balanced" (equal shares of --count), "all" (--count in the training data's class
            proportions; equal when the checkpoint did not record them) or "C:N,C:N" (exact counts, e.g.
            "3:10000,7:5000", to fill up rare classes; --count is then their sum).
        num_classes: the conditional model's classes.
        class_counts: training images per class, as the checkpoint recorded them.
        count: --count; None only with explicit counts.

    Raises:
        UserError: on a malformed spec, an unknown class or a --count that contradicts explicit counts.
    """
    if spec in ("balanced", "all"):
        if count is None:
            raise UserError(f"--classes {spec} needs --count")
        weights = np.ones(num_classes)
        if spec == "all" and class_counts and len(class_counts) == num_classes and sum(class_counts) > 0:
            weights = np.asarray(class_counts, dtype=float)
        return _largest_remainder(count, weights)
    totals = [0] * num_classes
    try:
        for part in spec.split(","):
            c, n = (int(v.replace("_", "")) for v in part.split(":"))
            if not 0 <= c < num_classes or n < 0:
                raise UserError(f"--classes {part!r}: class must be in 0..{num_classes - 1}, count >= 0")
            totals[c] += n
    except ValueError:
        raise UserError(
            f"--classes must be all, balanced or CLASS:COUNT,... (e.g. 3:10000), got {spec!r}"
        ) from None
    if sum(totals) == 0 or (count is not None and count != sum(totals)):
        raise UserError(f"--classes {spec} asks for {sum(totals):,} samples but --count is {count:,}")
    return totals


def explicit_total(spec: str | None) -> int | None:
    """The sum of an explicit "C:N,C:N" spec (what --count defaults to), None for other specs."""
    if spec is None or spec in ("all", "balanced"):
        return None
    try:
        return sum(int(part.split(":")[1].replace("_", "")) for part in spec.split(","))
    except (IndexError, ValueError):
        raise UserError(
            f"--classes must be all, balanced or CLASS:COUNT,... (e.g. 3:10000), got {spec!r}"
        ) from None


def _largest_remainder(total: int, weights: np.ndarray) -> list[int]:
    """Split `total` in proportion to `weights` into integers that sum to it exactly (Hamilton's method)."""
    ideal = total * weights / weights.sum()
    out = np.floor(ideal).astype(np.int64)
    order = np.argsort(-(ideal - out), kind="stable")  # ties: lower class index first
    out[order[: total - int(out.sum())]] += 1
    return out.tolist()


def shard_class_quotas(totals: list[int], shard_sizes: list[int]) -> list[tuple[int, ...]]:
    """Per-shard samples of each class: rows sum to the shard sizes, columns to the class totals, exactly.

    Each shard takes its proportional share of what is still unassigned (floors, then the largest
    remainders), so every shard mixes the classes like the whole run does: a loader's shuffle buffer
    then never sees a one-class stretch.
    """
    remaining, left = np.asarray(totals, dtype=np.int64), int(sum(totals))
    out = []
    for size in shard_sizes:
        ideal = size * remaining / left if left else np.zeros(len(remaining))
        quota = np.minimum(np.floor(ideal).astype(np.int64), remaining)
        order = np.argsort(-(ideal - quota), kind="stable")
        extra = [c for c in order if quota[c] < remaining[c]][: size - int(quota.sum())]
        quota[extra] += 1
        out.append(tuple(int(q) for q in quota))
        remaining, left = remaining - quota, left - size
    return out


def shard_labels(quota: tuple[int, ...]) -> np.ndarray:
    """(sum(quota),) int64 labels of one shard's samples, interleaved evenly (Sainte-Lague order):
    item k of class c sits at fractional position (k + 0.5) / quota[c], ties by class index."""
    pos = np.concatenate([(np.arange(q) + 0.5) / q for q in quota if q]) if any(quota) else np.empty(0)
    cls = np.concatenate([np.full(q, c) for c, q in enumerate(quota) if q]) if any(quota) else np.empty(0)
    return cls[np.lexsort((cls, pos))].astype(np.int64)
