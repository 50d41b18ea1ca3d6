"""Batched inference over uint8 image arrays: posterior means, decoded latents and reconstructions.

Shared by fit-sampler, evaluate and the report, so that all of them see images exactly as training did.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from vaeforge.model import VAE
from vaeforge.runtime import to_model_input, to_uint8_hwc


def _batches(images: np.ndarray, batch_size: int) -> Iterator[tuple[int, np.ndarray]]:
    for start in range(0, len(images), batch_size):
        yield start, images[start : start + batch_size]


def _device(model: VAE) -> torch.device:
    return next(model.parameters()).device


def _labels(model: VAE, labels: np.ndarray | None, start: int, n: int) -> torch.Tensor | None:
    """The batch's labels for a conditional model; None for an unconditional one."""
    if model.config.num_classes == 0:
        return None
    if labels is None:
        raise ValueError("a conditional model needs the images' labels")
    return torch.as_tensor(np.asarray(labels[start : start + n]), dtype=torch.long, device=_device(model))


@torch.inference_mode()
def encode_means(
    model: VAE, images: np.ndarray, batch_size: int = 256, labels: np.ndarray | None = None
) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, latent_dim) float32 posterior means: where the encoder puts each image."""
    model.eval()
    out = np.empty((len(images), model.config.latent_dim), dtype=np.float32)
    for start, batch in _batches(images, batch_size):
        x = to_model_input(torch.from_numpy(np.asarray(batch)), _device(model))
        posterior = model.encoder(x, _labels(model, labels, start, len(batch)))
        out[start : start + len(batch)] = posterior.mode().float().cpu().numpy()
    return out


@torch.inference_mode()
def decode_latents(
    model: VAE, z: np.ndarray, batch_size: int = 256, labels: np.ndarray | None = None
) -> np.ndarray:
    """(N, latent_dim) latents (+ (N,) labels for a conditional model) -> (N, H, W, 3) uint8 images."""
    model.eval()
    out = []
    for start, batch in _batches(np.asarray(z, dtype=np.float32), batch_size):
        y = _labels(model, labels, start, len(batch))
        out.append(to_uint8_hwc(model.decoder(torch.from_numpy(batch).to(_device(model)), y)).numpy())
    size = model.config.image_size
    return np.concatenate(out) if out else np.empty((0, size, size, 3), np.uint8)


@torch.inference_mode()
def reconstruct(
    model: VAE, images: np.ndarray, batch_size: int = 256, labels: np.ndarray | None = None
) -> np.ndarray:
    """(N, H, W, 3) uint8 -> their reconstructions from the posterior means, (N, H, W, 3) uint8."""
    z = encode_means(model, images, batch_size, labels)
    return decode_latents(model, z, batch_size, labels)
