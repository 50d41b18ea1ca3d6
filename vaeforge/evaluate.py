"""`vaeforge evaluate`: likelihood, sample quality, memorisation and usefulness of a checkpoint.

Writes metrics.json and a self-contained report.html. Runs in one process (no Ray): a few thousand
samples decode in seconds to a minute, and every number is reproducible from the seed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vaeforge import __version__
from vaeforge.checkpoint import load_vae
from vaeforge.config import EvaluateConfig, TrainConfig
from vaeforge.data import load_images
from vaeforge.errors import UserError
from vaeforge.inference import decode_latents, encode_means
from vaeforge.metrics.classifier import ClassifierConfig, augmentation_gain, tstr
from vaeforge.metrics.distribution import distribution_metrics
from vaeforge.metrics.features import FEATURE_SPACE, extract_features
from vaeforge.metrics.likelihood import heldout_likelihood
from vaeforge.metrics.memorization import memorization
from vaeforge.model import VAE
from vaeforge.sampling import gmm_path, load_gmm, prior_latents

Progress = Callable[[str], None]
RUN_FILE = "run.json"


@dataclass
class EvalData:
    """Real images: the run's training split (memorisation, classifiers) and a held-out set (the rest)."""

    train: np.ndarray
    train_labels: np.ndarray
    holdout: np.ndarray
    holdout_labels: np.ndarray
    class_names: list[str]
    holdout_source: str

    @property
    def labeled(self) -> bool:
        return (
            bool(len(self.class_names))
            and (self.train_labels >= 0).all()
            and (self.holdout_labels >= 0).all()
        )


@dataclass
class EvaluateResult:
    output: Path
    metrics: dict[str, Any]


def find_run(checkpoint_dir: Path) -> dict[str, Any] | None:
    """run.json of the training run a checkpoint came from (<run>/checkpoints/<ckpt>/), if it is there."""
    for parent in (checkpoint_dir, *checkpoint_dir.parents[:2]):
        path = parent / RUN_FILE
        if path.is_file():
            try:
                return {**json.loads(path.read_text()), "dir": str(parent)}
            except ValueError:
                raise UserError(f"{path} is damaged; pass --data to evaluate against other images") from None
    return None


def load_eval_data(cfg: EvaluateConfig, run: dict[str, Any] | None, image_size: int) -> EvalData:
    """The run's recorded data and split; --data replaces the held-out side (e.g. a real test set)."""
    from vaeforge.train import load_data, split_indices  # the same loader and split as training

    train = train_labels = None
    names: list[str] = []
    if run is not None:
        tcfg = TrainConfig.from_dict(run["config"])
        data = load_data(tcfg)
        train_idx, val_idx = split_indices(len(data.images), tcfg)
        train, train_labels, names = data.images[train_idx], data.labels[train_idx], data.class_names
        holdout, holdout_labels, source = (
            data.images[val_idx],
            data.labels[val_idx],
            "the run's held-out split",
        )
    if cfg.data is not None:
        other = load_images(cfg.data, image_size=image_size)
        holdout, holdout_labels, source = other.images, other.labels, cfg.data
        if names and other.class_names and other.class_names != names:
            holdout_labels = _relabel(other.labels, other.class_names, names)
        names = names or other.class_names
    if run is None and cfg.data is None:
        raise UserError("this checkpoint has no run.json beside it; pass --data with real images to compare")
    if train is None:  # no run: the given data serves as both sides, split in half by the seed
        order = np.random.default_rng([cfg.seed, 3]).permutation(len(holdout))
        half = len(order) // 2
        train, train_labels = holdout[np.sort(order[:half])], holdout_labels[np.sort(order[:half])]
        holdout, holdout_labels = holdout[np.sort(order[half:])], holdout_labels[np.sort(order[half:])]
    return EvalData(train, train_labels, holdout, holdout_labels, names, source)


def _relabel(labels: np.ndarray, names: list[str], target: list[str]) -> np.ndarray:
    index = {n: i for i, n in enumerate(target)}
    return np.array([index.get(names[i], -1) if i >= 0 else -1 for i in labels], dtype=np.int64)


def _subset(n_have: int, n_want: int, seed: int, salt: int) -> np.ndarray:
    if n_have <= n_want:
        return np.arange(n_have)
    return np.sort(np.random.default_rng([seed, salt]).choice(n_have, n_want, replace=False))


def draw_samples(
    model: VAE, sampler: str, ckpt_dir: Path, n: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """n samples and their labels (balanced over classes for a conditional model, -1 otherwise)."""
    d = model.config.latent_dim
    z = (
        prior_latents(seed, 0, 0, n, d, 1.0)
        if sampler == "prior"
        else load_gmm(ckpt_dir).sample(seed, 0, 0, n)
    )
    k = model.config.num_classes
    labels = np.arange(n) % k if k else np.full(n, -1)
    return decode_latents(model, z, labels=labels if k else None), labels


def run_evaluate(cfg: EvaluateConfig, progress: Progress | None = None) -> EvaluateResult:
    """Everything `vaeforge evaluate` does after option parsing."""
    say = progress or (lambda msg: None)
    torch.set_num_threads(os.cpu_count() or 1)
    loaded = load_vae(cfg.checkpoint)
    model, ckpt_dir = loaded.model.eval(), Path(loaded.path)
    run = find_run(ckpt_dir)
    out = Path(cfg.output) if cfg.output else Path(run["dir"] if run else ckpt_dir) / "eval"
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {out} is a file; give a directory")
    say("loading the real images")
    data = load_eval_data(cfg, run, model.config.image_size)
    hold = data.holdout[_subset(len(data.holdout), cfg.samples, cfg.seed, 1)]
    hold_labels = data.holdout_labels[_subset(len(data.holdout), cfg.samples, cfg.seed, 1)]
    train_sel = _subset(len(data.train), cfg.max_train, cfg.seed, 2)
    train, train_labels = data.train[train_sel], data.train_labels[train_sel]
    conditional = model.config.num_classes > 0
    recon_loss = run["config"].get("recon_loss", "mse") if run else "mse"

    metrics: dict[str, Any] = {
        "vaeforge_version": __version__,
        "checkpoint": str(ckpt_dir),
        "feature_space": FEATURE_SPACE,
        "holdout": {"source": data.holdout_source, "n": len(hold)},
        "train_n": len(train),
        "seed": cfg.seed,
    }
    if not conditional:
        say("held-out likelihood")
        metrics["likelihood"] = heldout_likelihood(
            model, hold, recon_loss=recon_loss, seed=cfg.seed
        ).to_dict()
    say("features of the real images")
    real_f, train_f = extract_features(hold), extract_features(train)
    samplers = ["prior"] + (["gmm"] if gmm_path(ckpt_dir).is_file() else [])
    samples: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    metrics["samplers"] = {}
    for name in samplers:
        say(f"{cfg.samples:,} samples from the {name} sampler")
        images, labels = draw_samples(model, name, ckpt_dir, cfg.samples, cfg.seed)
        feats = extract_features(images)
        dist = distribution_metrics(real_f, feats, feature_space=FEATURE_SPACE, seed=cfg.seed)
        mem = memorization(feats, train_f, real_f, feature_space=FEATURE_SPACE)
        metrics["samplers"][name] = {"distribution": dist.to_dict(), "memorization": mem.to_dict()}
        samples[name] = (images, labels)
    best = min(samplers, key=lambda s: metrics["samplers"][s]["distribution"]["fid"])
    metrics["best_sampler"] = best
    metrics["usefulness"] = _usefulness(cfg, data, train, train_labels, hold, hold_labels, samples[best], say)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "metrics.json", metrics)
    say("pictures")
    from vaeforge.evaluate_report import build_report

    page = build_report(model, metrics, data, hold, hold_labels, train, samples, cfg.seed)
    tmp = out / "report.html.tmp"
    tmp.write_text(page)
    tmp.replace(out / "report.html")
    return EvaluateResult(out, metrics)


def _usefulness(
    cfg: EvaluateConfig,
    data: EvalData,
    train: np.ndarray,
    train_labels: np.ndarray,
    hold: np.ndarray,
    hold_labels: np.ndarray,
    sample: tuple[np.ndarray, np.ndarray],
    say: Progress,
) -> dict[str, Any]:
    """TSTR and augmentation gain, or why they could not be measured."""
    if not cfg.usefulness:
        return {"skipped": "--no-usefulness"}
    if not data.labeled:
        return {"skipped": "the data has no labels"}
    images, labels = sample
    if (labels < 0).any():
        return {
            "skipped": "the model is unconditional, so its samples have no labels (train with --conditional)"
        }
    clf = ClassifierConfig(steps=cfg.classifier_steps, seed=cfg.seed)
    say("usefulness: train-on-synthetic/test-on-real")
    t = tstr(images, labels, train, train_labels, hold, hold_labels, config=clf)
    say("usefulness: augmenting 10% of the real labels")
    a = augmentation_gain(images, labels, train, train_labels, hold, hold_labels, config=clf)
    return {"tstr": t.to_dict(), "augmentation": a.to_dict()}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_jsonable))
    tmp.replace(path)


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot serialise {type(value).__name__}")


def timestamp() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def latent_means(model: VAE, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return encode_means(model, images, labels=labels if model.config.num_classes else None)
