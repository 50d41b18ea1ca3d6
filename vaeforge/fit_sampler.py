"""`vaeforge fit-sampler`: fit the latent Gaussian mixture on a run's training split, next to the weights."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from vaeforge import storage
from vaeforge.checkpoint import load_vae
from vaeforge.errors import UserError
from vaeforge.run_data import find_run, load_eval_data
from vaeforge.sampling import GaussianMixture, fit_checkpoint_gmm


def run_fit_sampler(
    checkpoint: str, k: int = 10, seed: int = 0, max_points: int = 20_000, data: str | None = None
) -> tuple[Path, GaussianMixture]:
    """Fit on the training split the run recorded (or on `data` when the run has no run.json).

    Returns:
        (the checkpoint directory the fit was stored in, the fit).
    """
    if k < 1 or max_points < k:
        raise UserError(f"need --k >= 1 and --max-points >= --k, got {k} and {max_points}")
    loaded = load_vae(checkpoint)
    if storage.is_uri(loaded.location):
        raise UserError("fit-sampler writes beside the checkpoint: copy the run to a local directory first")
    torch.set_num_threads(os.cpu_count() or 1)
    ckpt_dir = Path(loaded.path)
    run = find_run(ckpt_dir)
    real = load_eval_data(run, None if run else data, seed, loaded.model.config.image_size)
    labels = real.train_labels if loaded.model.config.num_classes else None
    gmm = fit_checkpoint_gmm(
        ckpt_dir, loaded.model, real.train, k=k, seed=seed, max_points=max_points, labels=labels
    )
    return ckpt_dir, gmm
