"""`vaeforge evaluate`: likelihood, sample quality, memorisation and usefulness of a checkpoint.

Writes metrics.json and a self-contained report.html. Runs in one process (no Ray): a few thousand
samples decode in seconds to a minute, and every number is reproducible from the seed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vaeforge import __version__
from vaeforge.checkpoint import load_vae
from vaeforge.config import EvaluateConfig
from vaeforge.errors import UserError
from vaeforge.inference import decode_latents, reconstruct
from vaeforge.metrics.classifier import ClassifierConfig, augmentation_gain, tstr
from vaeforge.metrics.distribution import distribution_metrics, fid
from vaeforge.metrics.features import FEATURE_SPACE, extract_features
from vaeforge.metrics.inception import InceptionEmbedding, load_inception
from vaeforge.metrics.likelihood import heldout_likelihood
from vaeforge.metrics.memorization import memorization
from vaeforge.model import VAE
from vaeforge.run_data import EvalData, find_run, load_eval_data
from vaeforge.sampling import FITTED, fit_path, load_fit, prior_latents, seeded_subset

Progress = Callable[[str], None]


@dataclass
class EvaluateResult:
    output: Path
    metrics: dict[str, Any]


def sample_labels(model: VAE, fit: Any | None, n: int) -> np.ndarray:
    """The labels of evaluate's n samples, -1 where the samples have none.

    Labels cycle over the classes (balanced) for a conditional model, and for any model whose mixture
    or kde was fitted per class: z is then drawn from that class's part of the fit, so even an
    unconditional model's samples carry a label that TSTR can test.
    """
    k = model.config.num_classes
    classes = list(range(k)) if k else (fit.class_ids() if fit is not None else [])
    return np.asarray(classes)[np.arange(n) % len(classes)] if classes else np.full(n, -1)


def draw_samples(
    model: VAE,
    sampler: str,
    ckpt_dir: Path,
    n: int,
    seed: int,
    temperature: float = 1.0,
    fit: Any | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """n samples of `sampler` and their labels (see sample_labels); `fit` saves loading it again."""
    if fit is None and sampler != "prior":
        fit = load_fit(ckpt_dir, sampler)
    labels = sample_labels(model, fit, n)
    if fit is None:
        z = prior_latents(seed, 0, 0, n, model.config.latent_dim, temperature)
    else:
        z = fit.sample(seed, 0, 0, n, temperature=temperature, labels=labels if (labels >= 0).all() else None)
    return decode_latents(model, z, labels=labels if model.config.num_classes else None), labels


def sample_sources(model: VAE, fit: Any, n: int, seed: int, n_train: int) -> np.ndarray:
    """Positions in the run's training split of the images evaluate's n kde samples started from (empty
    for other samplers, or when the fit was made on another training split)."""
    if not hasattr(fit, "sources") or fit.meta.get("train_n") != n_train:
        return np.empty(0, dtype=np.int64)
    labels = sample_labels(model, fit, n)
    return fit.sources(seed, 0, 0, n, labels=labels if (labels >= 0).all() else None)


def run_evaluate(cfg: EvaluateConfig, progress: Progress | None = None) -> EvaluateResult:
    """Everything `vaeforge evaluate` does after option parsing."""
    say = progress or (lambda msg: None)
    torch.set_num_threads(os.cpu_count() or 1)
    loaded = load_vae(cfg.checkpoint)
    model, ckpt_dir = loaded.model.eval(), Path(loaded.path)
    inception = None
    if cfg.inception_weights:  # load it now: a bad file must fail before the long computation
        device = "cuda" if torch.cuda.is_available() else "cpu"
        inception = load_inception(cfg.inception_weights, device)
        say(f"InceptionV3 weights loaded (sha256 {inception.weights_sha256[:16]}...), running on {device}")
    fitted = [name for name in FITTED if fit_path(ckpt_dir, name).is_file()]
    if cfg.usefulness_sampler not in (None, "prior", *fitted):  # before minutes of work, not after
        raise UserError(
            f"--usefulness-sampler {cfg.usefulness_sampler}: {ckpt_dir} has no such fit "
            f"(samplers here: {', '.join(['prior', *fitted])}); run `vaeforge fit-sampler` first"
        )
    run = find_run(ckpt_dir)
    out = Path(cfg.output) if cfg.output else Path(run["dir"] if run else ckpt_dir) / "eval"
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {out} is a file; give a directory")
    say("loading the real images")
    data = load_eval_data(run, cfg.data, cfg.seed, model.config.image_size)
    hold = data.holdout[seeded_subset(len(data.holdout), cfg.samples, cfg.seed, 1)]
    hold_labels = data.holdout_labels[seeded_subset(len(data.holdout), cfg.samples, cfg.seed, 1)]
    train_sel = seeded_subset(len(data.train), cfg.max_train, cfg.seed, 2)
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
        "temperature": cfg.temperature,
    }
    if not conditional or (hold_labels >= 0).all():
        say("held-out likelihood")
        y = hold_labels if conditional else None
        lk = heldout_likelihood(model, hold, recon_loss=recon_loss, seed=cfg.seed, labels=y)
        metrics["likelihood"] = {**lk.to_dict(), "conditional_on_label": conditional}
    say("features of the real images")
    real_f = extract_features(hold)
    real_inc = _inception_features(inception, hold, "the real images", say) if inception else None
    fits = {name: load_fit(ckpt_dir, name) for name in fitted}
    samplers = ["prior", *fits]
    reference, ref_f, metrics["memorization_reference"] = _memorization_reference(
        model, fits, data.train, train, train_sel, cfg
    )
    samples: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    metrics["samplers"] = {}
    for name in samplers:
        say(f"{cfg.samples:,} samples from the {name} sampler")
        fit = fits.get(name)
        images, labels = draw_samples(model, name, ckpt_dir, cfg.samples, cfg.seed, cfg.temperature, fit)
        feats = extract_features(images)
        dist = distribution_metrics(real_f, feats, feature_space=FEATURE_SPACE, seed=cfg.seed)
        mem = memorization(feats, ref_f, real_f, feature_space=FEATURE_SPACE)
        metrics["samplers"][name] = {"distribution": dist.to_dict(), "memorization": mem.to_dict()}
        if inception is not None:
            fake_inc = _inception_features(inception, images, f"the {name} samples", say)
            metrics["samplers"][name]["inception"] = _inception_fid(inception, real_inc, fake_inc)
        samples[name] = (images, labels)
    best = min(samplers, key=lambda s: metrics["samplers"][s]["distribution"]["fid"])
    metrics["best_sampler"] = best
    # Usefulness needs labeled samples: the best sampler by FID among those whose samples have labels.
    labeled = [s for s in samplers if (samples[s][1] >= 0).all()]
    use_with = min(labeled, key=lambda s: metrics["samplers"][s]["distribution"]["fid"]) if labeled else best
    use_with = cfg.usefulness_sampler or use_with
    metrics["usefulness"] = _usefulness(
        cfg,
        data,
        train,
        train_labels,
        hold,
        hold_labels,
        lambda: _matched(model, use_with, fits.get(use_with), samples[use_with], len(train), cfg, say),
        lambda: reconstruct(model, train, labels=train_labels if conditional else None),
        say,
    )
    metrics["usefulness"]["sampler"] = use_with
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "metrics.json", metrics)
    say("pictures")
    from vaeforge.evaluate_report import build_report

    page = build_report(model, metrics, data, hold, hold_labels, reference, samples, cfg.seed)
    tmp = out / "report.html.tmp"
    tmp.write_text(page)
    tmp.replace(out / "report.html")
    return EvaluateResult(out, metrics)


def _memorization_reference(
    model: VAE,
    fits: dict[str, Any],
    train_all: np.ndarray,
    train: np.ndarray,
    train_sel: np.ndarray,
    cfg: EvaluateConfig,
) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """(images, features, counts) of the training images every sample is checked against.

    evaluate's training subset, plus every training image a kde sample started from: a kde sample sits
    near its centre's latent, so the image it could copy is that one, and a subset that happened to
    leave it out would hide the copy. The held-out baseline is measured against the same set.
    """
    extra = np.empty(0, dtype=np.int64)
    for fit in fits.values():
        extra = np.union1d(extra, sample_sources(model, fit, cfg.samples, cfg.seed, len(train_all)))
    extra = np.setdiff1d(extra, train_sel)
    images = np.concatenate([train, train_all[extra]]) if len(extra) else train
    counts = {"train_subset": len(train), "sample_sources": len(extra), "n": len(images)}
    return images, extract_features(images), counts


def _matched(
    model: VAE,
    sampler: str,
    fit: Any | None,
    sample: tuple[np.ndarray, np.ndarray],
    n_real: int,
    cfg: EvaluateConfig,
    say: Progress,
) -> tuple[np.ndarray, np.ndarray]:
    """As many samples as real training images, so that TSTR compares two training sets of one size
    (Ravuri & Vinyals 2019 match them too): with fewer, a synthetic set would lose to the real one for
    its size alone. The first `--samples` of them are the ones the quality metrics saw."""
    images, labels = sample
    if len(images) >= n_real or (labels < 0).any():
        return images[:n_real], labels[:n_real]
    say(f"{n_real:,} samples from the {sampler} sampler for usefulness, as many as the real training set")
    return draw_samples(model, sampler, Path(), n_real, cfg.seed, cfg.temperature, fit)


def _inception_features(net: InceptionEmbedding, images: np.ndarray, what: str, say: Progress) -> np.ndarray:
    """pytorch-fid features of `images`, saying how far it got about every 500 images (slow on a CPU)."""
    say(f"InceptionV3 features of {what} ({len(images):,} images at 299x299)")
    said = 0

    def tick(done: int, total: int) -> None:
        nonlocal said
        if done - said >= 500 and done < total:  # a line per ~500 images, not one per batch
            said = done
            say(f"  InceptionV3 {done:,}/{total:,}")

    return net(images, progress=tick)


def _inception_fid(net: InceptionEmbedding, real: np.ndarray, fake: np.ndarray) -> dict[str, Any]:
    return {
        "fid": fid(real, fake),
        "feature_space": net.version,
        "weights_sha256": net.weights_sha256,
        "device": str(net.device),  # a GPU's features differ from a CPU's by float rounding
        "n_real": len(real),
        "n_fake": len(fake),
    }


def _usefulness(
    cfg: EvaluateConfig,
    data: EvalData,
    train: np.ndarray,
    train_labels: np.ndarray,
    hold: np.ndarray,
    hold_labels: np.ndarray,
    draw: Callable[[], tuple[np.ndarray, np.ndarray]],
    round_trip: Callable[[], np.ndarray],
    say: Progress,
) -> dict[str, Any]:
    """TSTR and augmentation gain, or why they could not be measured; `draw` gives the labeled samples
    and `round_trip` the reconstructions of `train`, both called only once the data is known to be
    labeled (they may decode thousands of images)."""
    if not cfg.usefulness:
        return {"skipped": "--no-usefulness"}
    if not data.labeled:
        return {"skipped": "the data has no labels"}
    images, labels = draw()
    if (labels < 0).any():
        return {
            "skipped": "the samples have no labels: train with --conditional, or fit the sampler "
            "per class (`vaeforge fit-sampler --per-class`)"
        }
    clf = ClassifierConfig(steps=cfg.classifier_steps, seed=cfg.seed)
    say("usefulness: reconstructing the real training images")
    recon = round_trip()
    say("usefulness: train-on-synthetic/test-on-real, on real and on reconstructions")
    t = tstr(images, labels, train, train_labels, hold, hold_labels, config=clf, reconstructions=recon)
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
