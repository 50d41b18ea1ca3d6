"""Fit the latent Gaussian mixture on a run's training split and store it beside the weights.

`vaeforge fit-sampler` runs this on demand, and `vaeforge train` at its end (unless --no-fit-sampler),
so that `generate --sampler gmm` works on every finished run. Local or remote (s3://...) checkpoints.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from vaeforge import storage
from vaeforge.checkpoint import SAMPLER_FILE, LoadedCheckpoint, load_vae
from vaeforge.errors import UserError
from vaeforge.run_data import find_run, load_eval_data
from vaeforge.sampling import GaussianMixture, fit_latent_gmm


def store_gmm(gmm: GaussianMixture, checkpoint: str) -> str:
    """Write the fit beside the checkpoint's weights, whole or not at all; returns its location."""
    target = storage.join(checkpoint, SAMPLER_FILE)
    if storage.is_uri(checkpoint):
        with tempfile.TemporaryDirectory(prefix="vaeforge-gmm-") as tmp:
            local = os.path.join(tmp, SAMPLER_FILE)
            gmm.save(local)
            storage.upload_file(local, target)  # one object: a reader never sees half a fit
        return target
    tmp = Path(checkpoint) / (SAMPLER_FILE + ".tmp.npz")
    gmm.save(tmp)
    tmp.replace(target)  # a reader never sees half a fit
    return target


def fit_and_store(
    loaded: LoadedCheckpoint,
    images: np.ndarray,
    labels: np.ndarray | None,
    k: int | None = None,
    seed: int = 0,
    max_points: int = 20_000,
    per_class: bool | None = None,
    index: np.ndarray | None = None,
) -> tuple[str, GaussianMixture]:
    """Fit on `images` (+ labels; only images[index] when given) with the loaded checkpoint's encoder and
    store the fit beside it.

    Returns:
        (where the fit was stored, the fit).
    """
    where = loaded.location or str(loaded.path)
    torch.set_num_threads(os.cpu_count() or 1)
    if loaded.model.config.num_classes and labels is None:
        raise UserError(f"{where} is a conditional model but its training images have no labels")
    gmm = fit_latent_gmm(loaded.model, images, labels, k, seed, max_points, per_class, index)
    gmm.meta.update(checkpoint=where)
    return store_gmm(gmm, where), gmm


def run_fit_sampler(
    checkpoint: str,
    k: int | None = None,
    seed: int = 0,
    max_points: int = 20_000,
    data: str | None = None,
    per_class: bool | None = None,
) -> tuple[str, GaussianMixture]:
    """`vaeforge fit-sampler`: fit on the training split the run recorded (or on `data` when the run has
    no run.json). k None: the default for the kind of fit; per_class None: per class when the training
    images are labeled.

    Returns:
        (where the fit was stored, the fit).
    """
    if (k is not None and k < 1) or max_points < (k or 1):
        raise UserError(f"need --k >= 1 and --max-points >= --k, got {k} and {max_points}")
    loaded = load_vae(checkpoint)
    run = find_run(Path(loaded.path)) if not storage.is_uri(loaded.location) else None
    real = load_eval_data(run, None if run else data, seed, loaded.model.config.image_size)
    labels = real.train_labels if real.labeled else None
    return fit_and_store(loaded, real.train, labels, k, seed, max_points, per_class)
