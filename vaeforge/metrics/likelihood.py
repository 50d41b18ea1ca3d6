"""Held-out likelihood and reconstruction of a trained VAE: negative ELBO in nats and bits/dim, MSE, PSNR.

Convention (read before comparing numbers):
    * neg_elbo_nats is the mean over images of recon + KL with beta = 1, whatever beta the model was
      trained with: the true (negative) evidence lower bound, in the units of the training loss.
    * recon is the model's own reconstruction term (vaeforge.model.elbo_loss) on images scaled to [0, 1].
      For recon_loss="mse" it is sum((x - x_hat)^2), which is exactly -log N(x; x_hat, sigma^2 I) with
      sigma^2 = 1/2 minus the constant (D/2) ln(pi), D = H*W*C; that constant is reported as
      `constant_nats`, so neg_elbo_nats + constant_nats is a proper bound on the negative log *density*
      of the [0, 1]-scaled image. For recon_loss="bce" it is the Bernoulli cross-entropy of the
      intensities, which is not a normalised density for non-binary pixels (constant_nats is None).
      Neither is a likelihood of the discrete uint8 image, so these numbers compare between models with
      the same recon_loss on the same data, not with published bits/dim.
    * bits_per_dim = neg_elbo_nats / (D ln 2), with the same caveat.
    * The ELBO uses one posterior sample per image from a generator seeded with `seed` (an unbiased
      estimate, and the same number on every run). MSE and PSNR use the deterministic reconstruction
      through the posterior mean (VAE.reconstruct); PSNR is the mean of per-image PSNRs, as in training.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vaeforge.metrics.features import check_images, image_batch
from vaeforge.model import VAE, elbo_loss, psnr
from vaeforge.runtime import to_model_input


@dataclass
class HeldoutLikelihood:
    n: int
    recon_loss: str  # "mse" or "bce": the convention of recon_nats (see the module docstring)
    neg_elbo_nats: float  # mean per image of recon + KL (beta = 1)
    recon_nats: float
    kl_nats: float
    bits_per_dim: float  # neg_elbo_nats / (H*W*C*ln 2)
    constant_nats: float | None  # (D/2) ln(pi) for mse: add it for a proper Gaussian density bound
    mse: float  # mean squared error per pixel, posterior-mean reconstruction, [0, 1] scale
    psnr_db: float  # mean of per-image PSNR of the same reconstructions

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@torch.no_grad()
def heldout_likelihood(
    model: VAE,
    images: np.ndarray,
    *,
    recon_loss: str = "mse",
    batch_size: int = 256,
    seed: int = 0,
    device: str | torch.device = "cpu",
    labels: np.ndarray | None = None,
) -> HeldoutLikelihood:
    """Negative ELBO, bits/dim, MSE and PSNR of `model` on uint8 (N, H, W, 3) images it did not train on.

    `recon_loss` must be the one the model was trained with (run.json's config.recon_loss); `labels` are
    the images' classes, which a conditional model needs (its bound is then -log p(x | y)).
    """
    check_images(images)
    device = torch.device(device)
    was_training = model.training
    model.eval()  # BatchNorm uses its running statistics: the result must not depend on the batch
    g = torch.Generator(device=device).manual_seed(seed)
    sums = torch.zeros(5, dtype=torch.float64)  # recon, kl, mse, psnr, count
    try:
        for start in range(0, len(images), batch_size):
            x = to_model_input(image_batch(images, start, batch_size), device)
            y = None if labels is None else torch.as_tensor(labels[start : start + batch_size], device=device)
            terms = elbo_loss(x, model(x, generator=g, y=y), beta=1.0, recon_loss=recon_loss)
            mse = (model.reconstruct(x, y).float() - x).pow(2).flatten(1).mean(dim=1)  # (B,)
            sums[:4] += torch.stack([terms.recon, terms.kl, mse, psnr(mse)]).double().sum(dim=1).cpu()
            sums[4] += len(x)
    finally:
        model.train(was_training)
    recon, kl, mse, psnr_db = (float(v) for v in sums[:4] / sums[4])
    dims = int(np.prod(images.shape[1:]))
    return HeldoutLikelihood(
        n=len(images),
        recon_loss=recon_loss,
        neg_elbo_nats=recon + kl,
        recon_nats=recon,
        kl_nats=kl,
        bits_per_dim=(recon + kl) / (dims * math.log(2)),
        constant_nats=0.5 * dims * math.log(math.pi) if recon_loss == "mse" else None,
        mse=mse,
        psnr_db=psnr_db,
    )
