"""Fit the latent samplers (gmm and kde) on a run's training split and store them beside the weights.

`vaeforge fit-sampler` runs this on demand, and `vaeforge train` at its end (unless --no-fit-sampler),
so that `generate --sampler gmm|kde` works on every finished run. Local or remote (s3://...) checkpoints.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vaeforge import storage
from vaeforge.checkpoint import LoadedCheckpoint, load_vae
from vaeforge.errors import UserError
from vaeforge.run_data import find_run, load_eval_data
from vaeforge.sampling import FIT_FILES, FITTED, PER_CLASS_K, POOLED_K, fit_class_gmm, fit_gmm, seeded_subset
from vaeforge.sampling_kde import fit_kde

# The kde keeps every training latent as a kernel centre (2 KB each at D = 512): more centres are more
# variety, and encoding is the only cost, so it takes the whole training split up to this cap.
KDE_MAX_POINTS = 200_000


def store_fit(fit: Any, name: str, checkpoint: str) -> str:
    """Write the fit beside the checkpoint's weights, whole or not at all; returns its location."""
    filename = FIT_FILES[name]
    target = storage.join(checkpoint, filename)
    if storage.is_uri(checkpoint):
        with tempfile.TemporaryDirectory(prefix="vaeforge-fit-") as tmp:
            local = os.path.join(tmp, filename)
            fit.save(local)
            storage.upload_file(local, target)  # one object: a reader never sees half a fit
        return target
    tmp = Path(checkpoint) / (filename + ".tmp.npz")
    fit.save(tmp)
    tmp.replace(target)  # a reader never sees half a fit
    return target


def fit_latent_samplers(
    model: torch.nn.Module,
    images: np.ndarray,
    labels: np.ndarray | None = None,
    k: int | None = None,
    seed: int = 0,
    max_points: int = 20_000,
    per_class: bool | None = None,
    index: np.ndarray | None = None,
    kinds: tuple[str, ...] = FITTED,
) -> dict[str, Any]:
    """Fit the samplers `kinds` on the encoder means of images[index] (a run's training split). No I/O.

    Args:
        labels: (N,) the images' labels (-1: unlabeled). A conditional model's encoder needs them; a
            per-class fit groups by them.
        k: mixture components, pooled or per class; None: POOLED_K or PER_CLASS_K.
        max_points: the mixture's seeded subset, which caps EM's cost (it grows with N * k * D^2);
            20,000 points is ~40 per parameter-dimension for D=512 and a few minutes on a CPU. The kde
            takes every point up to KDE_MAX_POINTS.
        per_class: one mixture (and one kernel covariance) per class; None: per class whenever every
            image has a label.
        index: fit on images[index] only, without copying the rest; kde sources are positions in it.

    Returns:
        {"gmm": GaussianMixture, "kde": LatentKDE} for the kinds asked.

    Raises:
        UserError: per_class=True without labels.
    """
    from vaeforge.inference import encode_means

    index = np.arange(len(images)) if index is None else np.asarray(index)
    labels = None if labels is None else np.asarray(labels)[index]
    labeled = labels is not None and len(labels) > 0 and bool((labels >= 0).all())
    per_class = labeled if per_class is None else per_class
    if per_class and not labeled:
        raise UserError("--per-class needs labels for every training image; this run's data has none")
    gmm_pos = seeded_subset(len(index), max_points, seed, 11)  # the mixture's subset, as it always was
    kde_pos = seeded_subset(len(index), KDE_MAX_POINTS, seed, 12) if "kde" in kinds else gmm_pos[:0]
    pos = np.union1d(gmm_pos if "gmm" in kinds else gmm_pos[:0], kde_pos)
    cond = model.config.num_classes > 0
    means = encode_means(model, images[index[pos]], labels=labels[pos] if cond else None)
    at = {p: i for i, p in enumerate(pos.tolist())}
    fits: dict[str, Any] = {}
    if "gmm" in kinds:
        rows = np.array([at[p] for p in gmm_pos.tolist()], dtype=np.int64)
        if per_class:
            fits["gmm"] = fit_class_gmm(means[rows], labels[gmm_pos], k=k or PER_CLASS_K, seed=seed)
        else:
            fits["gmm"] = fit_gmm(means[rows], k=k or POOLED_K, seed=seed)
    if "kde" in kinds:
        rows = np.array([at[p] for p in kde_pos.tolist()], dtype=np.int64)
        fits["kde"] = fit_kde(means[rows], labels[kde_pos] if per_class else None, kde_pos, seed=seed)
    return fits


def fit_and_store(
    loaded: LoadedCheckpoint,
    images: np.ndarray,
    labels: np.ndarray | None,
    k: int | None = None,
    seed: int = 0,
    max_points: int = 20_000,
    per_class: bool | None = None,
    index: np.ndarray | None = None,
    kinds: tuple[str, ...] = FITTED,
) -> dict[str, tuple[str, Any]]:
    """Fit on `images` (+ labels; only images[index] when given) with the loaded checkpoint's encoder and
    store each fit beside it.

    Returns:
        {name: (where the fit was stored, the fit)}.
    """
    where = loaded.location or str(loaded.path)
    torch.set_num_threads(os.cpu_count() or 1)
    if loaded.model.config.num_classes and labels is None:
        raise UserError(f"{where} is a conditional model but its training images have no labels")
    n_train = len(images) if index is None else len(index)
    fits = fit_latent_samplers(loaded.model, images, labels, k, seed, max_points, per_class, index, kinds)
    out = {}
    for name, fit in fits.items():
        fit.meta.update(checkpoint=where, train_n=n_train)
        out[name] = (store_fit(fit, name, where), fit)
    return out


def run_fit_sampler(
    checkpoint: str,
    k: int | None = None,
    seed: int = 0,
    max_points: int = 20_000,
    data: str | None = None,
    per_class: bool | None = None,
    kinds: tuple[str, ...] = FITTED,
) -> dict[str, tuple[str, Any]]:
    """`vaeforge fit-sampler`: fit on the training split the run recorded (or on `data` when the run has
    no run.json). k None: the default for the kind of fit; per_class None: per class when the training
    images are labeled.

    Returns:
        {name: (where the fit was stored, the fit)}.
    """
    if (k is not None and k < 1) or max_points < (k or 1):
        raise UserError(f"need --k >= 1 and --max-points >= --k, got {k} and {max_points}")
    loaded = load_vae(checkpoint)
    run = find_run(Path(loaded.path)) if not storage.is_uri(loaded.location) else None
    real = load_eval_data(run, None if run else data, seed, loaded.model.config.image_size)
    labels = real.train_labels if real.labeled else None
    return fit_and_store(loaded, real.train, labels, k, seed, max_points, per_class, kinds=kinds)
