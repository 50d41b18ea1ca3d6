"""Latent sampling cost per sample, in one run: the prior with a generator seeded per sample (as it was)
against one jumped-ahead stream per shard (sampling.SampleStreams), and the mixture's per-sample float64
product against the fixed-point product that GaussianMixture.sample uses, and the kde sampler
(sampling_kde.LatentKDE: a training latent picked per sample, then the same fixed-point product) beside it.

    .venv/bin/python bench/bench_sampler.py [--dim 512] [--k 30] [--n 2048] [--rounds 5] [--points 57000]

The mixture is random with full-covariance factors (speed does not depend on the fit); 30 components is a
per-class fit of 10 classes x 3; the kde has --points random centres in 10 classes (Fashion-MNIST's
57,000 training latents) and draws per class, as generate does for a conditional model. "per-sample"
is the previous implementation: each sample's own generator, then chol[c] @ noise as one matrix-vector
product. Both use the same generator draws, and the script
checks that they agree to 1e-4 before timing. Prints the median us/sample of `--rounds` alternating
rounds, and the speed-up of the fixed-point product. One thread: generate's CPU actors run with one.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy loads BLAS, as in a 1-CPU Ray actor

import numpy as np  # noqa: E402

from vaeforge.sampling import GaussianMixture, prior_latents, sample_generator  # noqa: E402
from vaeforge.sampling_kde import LatentKDE  # noqa: E402


def per_sample(gmm: GaussianMixture, seed: int, shard: int, start: int, n: int) -> np.ndarray:
    """The mixture sampler as it was: one float64 matrix-vector product per sample."""
    cdf = np.cumsum(gmm.weights)
    z = np.empty((n, gmm.means.shape[1]), dtype=np.float32)
    for j in range(n):
        g = sample_generator(seed, shard, start + j)
        c = min(int(np.searchsorted(cdf, g.random() * cdf[-1], side="right")), gmm.k - 1)
        z[j] = gmm.means[c] + gmm.chol[c] @ g.standard_normal(gmm.means.shape[1])
    return z


def seeded_prior(seed: int, shard: int, start: int, n: int, dim: int) -> np.ndarray:
    """The prior as it was: a generator seeded from (seed, shard, index) for every sample."""
    z = np.empty((n, dim), dtype=np.float32)
    for j in range(n):
        z[j] = np.random.default_rng([seed, shard, start + j]).standard_normal(dim, dtype=np.float32)
    return z


def timed(fn, n: int) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dim", type=int, default=512, help="Latent size (seed64: 512).")
    ap.add_argument("--k", type=int, default=30)
    ap.add_argument("--n", type=int, default=2048, help="Samples per call (generate's workers draw 2,048).")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--points", type=int, default=57_000, help="kde centres.")
    args = ap.parse_args()
    d, k, n = args.dim, args.k, args.n
    rng = np.random.default_rng(0)
    chol = np.tril(rng.standard_normal((k, d, d)) * 0.02) + 0.5 * np.eye(d)
    gmm = GaussianMixture(np.full(k, 1 / k), rng.standard_normal((k, d)), chol, {})
    ref, fast = per_sample(gmm, 0, 1, 0, 64), gmm.sample(0, 1, 0, 64)
    err = float(np.abs(ref - fast).max())
    if err > 1e-4:
        raise SystemExit(f"the two mixture samplers disagree by {err:.2e}")
    classes = np.arange(args.points) % 10
    kde_chol = chol[:10]
    kde = LatentKDE(rng.standard_normal((args.points, d)).astype(np.float32), classes, kde_chol, 0.5,
                    np.arange(args.points), {})  # fmt: skip
    labels = np.arange(n) % 10
    names = ("prior, seeded per sample", "prior, shard stream", "mixture, per-sample", "mixture, fixed-point",
             "kde, fixed-point")  # fmt: skip
    rows: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.rounds):
        rows["prior, seeded per sample"].append(timed(lambda r=r: seeded_prior(0, r, 0, n, d), n))
        rows["prior, shard stream"].append(timed(lambda r=r: prior_latents(0, r, 0, n, d, 1.0), n))
        rows["mixture, per-sample"].append(timed(lambda r=r: per_sample(gmm, 0, r, 0, n), n))
        rows["mixture, fixed-point"].append(timed(lambda r=r: gmm.sample(0, r, 0, n), n))
        rows["kde, fixed-point"].append(timed(lambda r=r: kde.sample(0, r, 0, n, labels=labels), n))
    med = {name: float(np.median(v)) for name, v in rows.items()}
    print(f"latent dim {d}, {k} components, {n} samples a call, median of {args.rounds} rounds, 1 thread")
    for name, us in med.items():
        print(f"  {name:<26} {us:8.1f} us/sample  (rounds {min(rows[name]):.1f}-{max(rows[name]):.1f})")
    streams = med["prior, seeded per sample"] / med["prior, shard stream"]
    print(f"  shard-stream speed-up      {streams:.2f}x")
    print(f"  fixed-point speed-up       {med['mixture, per-sample'] / med['mixture, fixed-point']:.2f}x")
    print(f"  max |difference|           {err:.1e} (float32 latents)")
    print(f"  kde / mixture cost         {med['kde, fixed-point'] / med['mixture, fixed-point']:.2f}x")


if __name__ == "__main__":
    main()
