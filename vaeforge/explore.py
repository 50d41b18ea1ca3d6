"""Latent-space pictures and edits: interpolations, traversals of the most active dims, attribute vectors.

The seed design names reconstruction, interpolation and attribute modification among a VAE's uses; these
functions turn a model and real images into the (N, H, W, 3) uint8 tiles the report lays out in grids.
"""

from __future__ import annotations

import numpy as np

from vaeforge.inference import decode_latents
from vaeforge.model import VAE


def interpolations(
    model: VAE,
    z_a: np.ndarray,
    z_b: np.ndarray,
    steps: int = 8,
    labels: np.ndarray | None = None,
) -> np.ndarray:
    """Row i walks in a straight line from z_a[i] to z_b[i] in `steps` images: (P * steps, H, W, 3).

    labels: (P,) for a conditional model: each row keeps its start image's class.
    """
    t = np.linspace(0.0, 1.0, steps, dtype=np.float32)[None, :, None]  # (1, S, 1)
    z = (1 - t) * z_a[:, None, :] + t * z_b[:, None, :]  # (P, S, D)
    y = None if labels is None else np.repeat(np.asarray(labels), steps)
    return decode_latents(model, z.reshape(-1, z.shape[-1]), labels=y)


def active_dimensions(means: np.ndarray, k: int, threshold: float = 0.01) -> tuple[np.ndarray, int]:
    """(indices of the k dims whose posterior mean varies most over the data, number of active dims).

    A dimension is active when Var_x(E_q[z_u | x]) > threshold (Burda et al. 2016); inactive ones are
    ignored by the decoder, so traversing them shows nothing.
    """
    var = means.var(axis=0)
    return np.argsort(-var)[:k], int((var > threshold).sum())


def traversals(
    model: VAE,
    base: np.ndarray,
    dims: np.ndarray,
    means: np.ndarray,
    steps: int = 9,
    span: float = 3.0,
    label: int | None = None,
) -> np.ndarray:
    """Row r moves dimension dims[r] of `base` (D,) from -span to +span standard deviations of its data
    spread, all else fixed: (len(dims) * steps, H, W, 3)."""
    std = means.std(axis=0)
    offsets = np.linspace(-span, span, steps, dtype=np.float32)
    z = np.repeat(base[None, :], len(dims) * steps, axis=0).astype(np.float32)
    for r, d in enumerate(dims):
        z[r * steps : (r + 1) * steps, d] = means[:, d].mean() + offsets * std[d]
    y = None if label is None else np.full(len(z), label)
    return decode_latents(model, z, labels=y)


def attribute_vectors(means: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(K, D): for each class, the mean latent of its images minus the mean latent of all labeled images.

    Adding vector c to an image's latent moves it towards class c's look (White 2016, "Sampling
    Generative Networks"); classes with no images get a zero vector.
    """
    labeled = labels >= 0
    overall = means[labeled].mean(axis=0)
    out = np.zeros((num_classes, means.shape[1]), dtype=np.float32)
    for c in range(num_classes):
        members = labels == c
        if members.any():
            out[c] = means[members].mean(axis=0) - overall
    return out


def apply_attribute(
    model: VAE, z: np.ndarray, vector: np.ndarray, strengths: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0)
) -> np.ndarray:
    """Row i is z[i] + s * vector for each strength s: (N * len(strengths), H, W, 3)."""
    s = np.asarray(strengths, dtype=np.float32)[None, :, None]
    moved = z[:, None, :] + s * vector[None, None, :]
    return decode_latents(model, moved.reshape(-1, z.shape[-1]))
