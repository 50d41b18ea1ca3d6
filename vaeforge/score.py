"""`vaeforge score`: each image's negative ELBO under a checkpoint, to find outliers and mislabeled files.

Writes a Parquet table, one row per image, most anomalous first, and a PNG grid of the top images each
beside its reconstruction. Runs in one process (no Ray).

Conventions (the units are those of metrics/likelihood.py):
    * score is the negative ELBO in nats, recon + KL with beta = 1, with the recon_loss the model was
      trained with. It uses one posterior sample per image, whose noise comes from a generator seeded with
      (seed, a hash of the image's pixels). An image's score therefore depends only on the model, its
      pixels, its label and the seed: not on the batch size, the order or what else is scored.
    * recon_mse is the mean squared error per pixel ([0, 1] scale) of the reconstruction through the
      posterior mean.
    * A conditional model scores each image under its own label. With label_check it also scores the
      image under every class, with the same noise, and reports best_label (the class with the lowest
      score: the most likely class under equal class priors) and label_margin (own score minus best).
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from vaeforge import __version__, storage
from vaeforge.checkpoint import load_vae
from vaeforge.config import ScoreConfig
from vaeforge.data import ImageSet, load_images
from vaeforge.errors import UserError
from vaeforge.grids import interleave, make_grid
from vaeforge.inference import reconstruct
from vaeforge.model import VAE, VAEOutput, elbo_loss
from vaeforge.run_data import find_run, relabel
from vaeforge.runtime import to_model_input

Progress = Callable[[str], None]
ROBUST_Z = 3.0  # outlier threshold: median + 3 robust standard deviations (1.4826 * MAD)


@dataclass
class Scores:
    """Per-image results in input order."""

    score: np.ndarray  # (N,) float64, negative ELBO in nats
    kl: np.ndarray  # (N,) float64 nats
    recon_mse: np.ndarray  # (N,) float64
    best_label: np.ndarray | None = None  # (N,) int64; conditional models with the label check only
    label_margin: np.ndarray | None = None  # (N,) float64 nats, >= 0


@dataclass
class ScoreResult:
    output: str
    grid: str
    table: pa.Table  # what was written: most anomalous first
    median: float
    threshold: float
    outliers: int  # images scoring above the threshold
    recon_loss: str
    label_check: bool  # best_label / label_margin were computed
    mismatches: int  # images whose best label is not their own
    skipped: dict[str, int]  # unreadable inputs by reason (they have no score)


def _noise(batch: np.ndarray, seed: int, dim: int) -> torch.Tensor:
    """(B, dim) standard normal noise, each row from a generator seeded by (seed, a hash of its image)."""
    eps = np.empty((len(batch), dim), dtype=np.float32)
    for i, image in enumerate(batch):
        digest = hashlib.blake2b(np.ascontiguousarray(image).tobytes(), digest_size=8).digest()
        rng = np.random.default_rng([seed, int.from_bytes(digest, "little")])
        eps[i] = rng.standard_normal(dim, dtype=np.float32)
    return torch.from_numpy(eps)


def _neg_elbo(
    model: VAE, x: torch.Tensor, y: torch.Tensor | None, eps: torch.Tensor, recon_loss: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(negative ELBO (B,), KL (B,), posterior mean (B, D)) with the given noise, beta = 1."""
    posterior = model.encoder(x, y)
    z = posterior.sample(noise=eps)  # (B, D)
    terms = elbo_loss(x, VAEOutput(posterior, model.decoder.logits(z, y)), beta=1.0, recon_loss=recon_loss)
    return terms.recon + terms.kl, terms.kl, posterior.mode()


@torch.inference_mode()
def score_images(
    model: VAE,
    images: np.ndarray,
    labels: np.ndarray | None = None,
    *,
    recon_loss: str = "mse",
    seed: int = 0,
    batch_size: int = 256,
    label_check: bool = True,
) -> Scores:
    """Score uint8 (N, H, W, 3) images; `labels` (N,) are required by a conditional model."""
    model.eval()  # BatchNorm uses its running statistics: no image's score depends on its batch
    device = next(model.parameters()).device
    n, k = len(images), model.config.num_classes
    if k and (labels is None or (np.asarray(labels) < 0).any()):
        raise ValueError("a conditional model needs a label for every image")
    out = np.empty((3, n), dtype=np.float64)  # score, kl, recon_mse
    per_class = np.empty((n, k), dtype=np.float64) if k and label_check else None
    for start in range(0, n, batch_size):
        batch = np.array(images[start : start + batch_size])  # a writable copy: a cache hit is read-only
        rows = slice(start, start + len(batch))
        x = to_model_input(torch.from_numpy(batch), device)  # (B, 3, H, W)
        eps = _noise(batch, seed, model.config.latent_dim).to(device)
        y = torch.as_tensor(labels[rows], dtype=torch.long, device=device) if k else None
        score, kl, mean = _neg_elbo(model, x, y, eps, recon_loss)
        mse = (model.decoder(mean, y) - x).pow(2).flatten(1).mean(dim=1)  # (B,)
        out[:, rows] = torch.stack([score, kl, mse]).double().cpu().numpy()
        if per_class is not None:
            for c in range(k):  # the same noise under every label: differences come from the label only
                yc = torch.full((len(batch),), c, dtype=torch.long, device=device)
                per_class[rows, c] = _neg_elbo(model, x, yc, eps, recon_loss)[0].double().cpu().numpy()
    result = Scores(score=out[0], kl=out[1], recon_mse=out[2])
    if per_class is not None:  # margins from the per-class passes alone: exactly 0 when the own label wins
        own = per_class[np.arange(n), np.asarray(labels)]
        best = per_class.min(axis=1)
        result.best_label = np.where(own == best, labels, per_class.argmin(axis=1)).astype(np.int64)
        result.label_margin = own - best
    return result


def robust_threshold(scores: np.ndarray) -> tuple[float, float]:
    """(median, median + ROBUST_Z * 1.4826 * MAD): 1.4826 * MAD estimates the standard deviation of
    normal data, and outliers barely move it, unlike the mean and standard deviation."""
    median = float(np.median(scores))
    mad = float(np.median(np.abs(scores - median)))
    return median, median + ROBUST_Z * 1.4826 * mad


def _nullable(values: np.ndarray, valid: np.ndarray, kind: pa.DataType) -> pa.Array:
    return pa.array(values, type=kind, mask=~valid)


def score_table(
    data: ImageSet, labels: np.ndarray, names: list[str], s: Scores, threshold: float
) -> pa.Table:
    """The rows for `data` sorted by score, highest (most anomalous) first; ties keep the input order."""
    order = np.argsort(-s.score, kind="stable")
    dims = int(np.prod(data.images.shape[1:]))
    lab = labels[order]
    has = lab >= 0
    cols: dict[str, pa.Array] = {
        "rank": pa.array(np.arange(1, len(order) + 1, dtype=np.int64)),
        "path": pa.array([data.keys[i] for i in order], pa.string()),
        "score": pa.array(s.score[order]),
        "bits_per_dim": pa.array(s.score[order] / (dims * math.log(2))),
        "recon_mse": pa.array(s.recon_mse[order]),
        "kl": pa.array(s.kl[order]),
        "outlier": pa.array(s.score[order] > threshold),
        "label": _nullable(lab, has, pa.int64()),
        "class": pa.array([names[i] if i >= 0 else None for i in lab], pa.string()),
    }
    checked = s.best_label is not None and s.label_margin is not None
    best = s.best_label[order] if checked else np.full(len(order), -1)
    cols["best_label"] = _nullable(best, best >= 0, pa.int64())
    cols["best_class"] = pa.array([names[i] if i >= 0 else None for i in best], pa.string())
    margin = s.label_margin[order] if checked else np.zeros(len(order))
    cols["label_margin"] = _nullable(margin, best >= 0, pa.float64())
    cols["label_mismatch"] = _nullable(best != lab, best >= 0, pa.bool_())
    return pa.table(cols)


def model_labels(model: VAE, data: ImageSet, run: dict | None) -> tuple[np.ndarray, list[str]]:
    """The images' labels as the model's class indices, and the class names (the training run's if known).

    Raises:
        UserError: a conditional model and images without a label, or classes the model never saw.
    """
    k, source = model.config.num_classes, data.report.get("source", "the data")
    labels, names = data.labels, list(data.class_names)
    if k == 0:
        return labels, names
    if not names or (labels < 0).all():
        raise UserError(
            f"this model is conditional on {k} classes and {source} has no labels; score labeled images "
            "(class sub-folders, .cls files or a label column)"
        )
    trained = list((run or {}).get("data", {}).get("classes") or [])
    if len(trained) == k:
        labels, names = (relabel(labels, names, trained), trained) if names != trained else (labels, names)
    elif len(names) != k:
        raise UserError(f"the model was trained on {k} classes but {source} has {len(names)}: {names}")
    missing = np.flatnonzero(labels < 0)
    if len(missing):
        raise UserError(
            f"a conditional model scores each image under its label: {len(missing)} images have none or a "
            f"class the model was not trained on, e.g. {data.keys[missing[0]]}"
        )
    return labels, names


def grid_location(output: str) -> str:
    """<output stem>_top.png beside the output."""
    name = storage.basename(output)
    stem = name.rsplit(".", 1)[0] if "." in name else name
    return storage.join(storage.parent(output), f"{stem}_top.png")


def _check_output(output: str) -> None:
    if storage.kind(output) == "dir":
        raise UserError(f"--output {output} is a directory; give a file name such as {output}/scores.parquet")


def _write(location: str, data: bytes) -> None:
    """Replace `location` atomically (a reader sees the old file or the new one); OS errors as one line."""
    try:
        storage.write_bytes(location, data)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise  # the CLI's disk-full message
        raise UserError(f"cannot write {location}: {e.strerror or e}") from None


def _parquet_bytes(table: pa.Table, meta: dict) -> bytes:
    table = table.replace_schema_metadata({"vaeforge": json.dumps(meta)})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def _grid_png(model: VAE, images: np.ndarray, labels: np.ndarray | None) -> bytes:
    """The given images, each followed by its reconstruction through the posterior mean."""
    recons = reconstruct(model, images, labels=labels)
    pairs_per_row = max(1, math.ceil(math.sqrt(len(images))))
    buf = io.BytesIO()
    grid = make_grid(interleave(images, recons), ncols=2 * pairs_per_row, background=128)  # grey: white and
    grid.save(buf, "PNG")  # black images both stand out
    return buf.getvalue()


def _device(use_gpu: bool | None) -> torch.device:
    if use_gpu and not torch.cuda.is_available():
        raise UserError("--gpus was given but torch sees no GPU")
    return torch.device("cuda" if (use_gpu is not False and torch.cuda.is_available()) else "cpu")


def run_score(cfg: ScoreConfig, progress: Progress | None = None) -> ScoreResult:
    """Everything `vaeforge score` does after option parsing."""
    say = progress or (lambda msg: None)
    _check_output(cfg.output)
    torch.set_num_threads(os.cpu_count() or 1)
    loaded = load_vae(cfg.checkpoint)
    model = loaded.model.to(_device(cfg.use_gpu)).eval()
    run = find_run(Path(loaded.path))
    recon_loss = cfg.recon_loss or (run or {}).get("config", {}).get("recon_loss") or "mse"
    say(f"loading the images of {cfg.data}")
    data = load_images(
        cfg.data, image_size=model.config.image_size, max_samples=cfg.max_samples, cache_dir=cfg.cache_dir
    )
    labels, names = model_labels(model, data, run)
    conditional = model.config.num_classes > 0
    check = conditional and cfg.label_check
    passes = f" under each of {model.config.num_classes} classes" if check else ""
    say(f"scoring {len(data.images):,} images{passes} ({recon_loss} reconstruction term, beta 1)")
    scores = score_images(
        model,
        data.images,
        labels if conditional else None,
        recon_loss=recon_loss,
        seed=cfg.seed,
        batch_size=cfg.batch_size,
        label_check=cfg.label_check,
    )
    median, threshold = robust_threshold(scores.score)
    table = score_table(data, labels, names, scores, threshold)
    meta = {
        "vaeforge_version": __version__,
        "checkpoint": loaded.location or str(loaded.path),
        "data": cfg.data,
        "recon_loss": recon_loss,
        "seed": cfg.seed,
        "median": median,
        "threshold": threshold,
        "classes": names,
    }
    _write(cfg.output, _parquet_bytes(table, meta))
    top = np.argsort(-scores.score, kind="stable")[: cfg.top]
    grid = grid_location(cfg.output)
    _write(grid, _grid_png(model, np.asarray(data.images[top]), labels[top] if conditional else None))
    mismatches = int(np.sum(scores.best_label != labels)) if scores.best_label is not None else 0
    return ScoreResult(
        output=cfg.output,
        grid=grid,
        table=table,
        median=median,
        threshold=threshold,
        outliers=int(np.sum(scores.score > threshold)),
        recon_loss=recon_loss,
        label_check=scores.best_label is not None,
        mismatches=mismatches,
        skipped=dict(data.report.get("skipped", {})),
    )
