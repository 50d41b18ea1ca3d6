"""Chunked Euclidean distances and k-nearest-neighbour radii, so 10k x 10k sets never build a full matrix."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

# Bytes of one float64 distance block. 64 MiB keeps 10k x 10k comparisons at ~80 rows per block while
# each block's matrix product is still large enough for BLAS to run near full speed.
BLOCK_BYTES = 64 * 2**20


def as_features(x: np.ndarray, name: str) -> np.ndarray:
    """Check a (N, D) feature matrix and return it as C-contiguous float64."""
    x = np.asarray(x)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"{name} must be a non-empty (N, D) feature matrix, got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.number) or not np.isfinite(x).all():
        raise ValueError(f"{name} must hold finite numbers")
    return np.ascontiguousarray(x, dtype=np.float64)


def distance_blocks(
    a: np.ndarray, b: np.ndarray, block_bytes: int = BLOCK_BYTES
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (start, D) with D[i, j] = ||a[start + i] - b[j]||, a block of rows of `a` at a time.

    Uses ||a||^2 + ||b||^2 - 2 a.b (one matrix product per block); rounding can push an exact zero
    slightly negative, so squared distances are clipped at 0 before the square root.
    """
    rows = max(1, block_bytes // (8 * len(b)))
    b_sq = np.einsum("ij,ij->i", b, b)  # (Nb,)
    for start in range(0, len(a), rows):
        chunk = a[start : start + rows]  # (r, D)
        sq = np.einsum("ij,ij->i", chunk, chunk)[:, None] + b_sq[None, :] - 2.0 * (chunk @ b.T)  # (r, Nb)
        yield start, np.sqrt(np.maximum(sq, 0.0, out=sq), out=sq)


def knn_radii(x: np.ndarray, ks: tuple[int, ...], block_bytes: int = BLOCK_BYTES) -> dict[int, np.ndarray]:
    """Distance from each row of x to its k-th nearest *other* row, for each k in ks: {k: (N,)}.

    A point is its own nearest neighbour at distance 0, so the k-th other neighbour sits at sorted
    position k (0-based) of its distance row.
    """
    if max(ks) >= len(x):
        raise ValueError(f"k={max(ks)} nearest neighbours need more than {max(ks)} samples, got {len(x)}")
    radii = {k: np.empty(len(x)) for k in ks}
    for start, d in distance_blocks(x, x, block_bytes):
        part = np.partition(d, list(ks), axis=1)  # (r, N): the entries at positions ks are in place
        for k in ks:
            radii[k][start : start + len(d)] = part[:, k]
    return radii


def nearest(
    queries: np.ndarray, reference: np.ndarray, block_bytes: int = BLOCK_BYTES
) -> tuple[np.ndarray, np.ndarray]:
    """For each query row, the distance to and index of its nearest reference row: ((Nq,), (Nq,) int64)."""
    dist = np.empty(len(queries))
    index = np.empty(len(queries), dtype=np.int64)
    for start, d in distance_blocks(queries, reference, block_bytes):
        j = d.argmin(axis=1)
        index[start : start + len(d)] = j
        dist[start : start + len(d)] = d[np.arange(len(d)), j]
    return dist, index
