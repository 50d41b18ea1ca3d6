"""The sections of evaluate's report.html: samples, reconstructions, latent pictures, neighbours, metrics."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from vaeforge.explore import active_dimensions, apply_attribute, attribute_vectors, interpolations, traversals
from vaeforge.grids import interleave
from vaeforge.inference import encode_means, reconstruct
from vaeforge.model import VAE
from vaeforge.report import Figure, Metric, Section, render_report

if TYPE_CHECKING:
    from vaeforge.evaluate import EvalData

DEFINITIONS = {
    "neg_elbo_nats": "held-out negative ELBO per image in nats (recon + KL, beta=1); lower is better",
    "bits_per_dim": "the same bound per pixel channel in bits: nats / (H*W*C*ln 2); lower is better",
    "mse": "mean squared pixel error of posterior-mean reconstructions on [0, 1]; lower is better",
    "psnr_db": "peak signal-to-noise ratio of those reconstructions in dB; higher is better",
    "fid": "Frechet distance between Gaussian fits of real and sample features; lower is better, 0 = same",
    "inception_fid": "standard FID: the same distance in pytorch-fid's InceptionV3 pool3 features (2048-d, "
    "299x299); compares with published FIDs only at equal sample counts and image sizes; lower is better",
    "kid_mean": "unbiased squared MMD with a cubic polynomial kernel on the features; lower, ~0 = same",
    "precision": "share of samples inside the real data's k=3 nearest-neighbour manifold: fidelity",
    "recall": "share of real images inside the samples' k=3 manifold: diversity",
    "density": "how many real k=5 neighbourhoods contain each sample, averaged (~1 when matched)",
    "coverage": "share of real images whose k=5 neighbourhood contains at least one sample",
    "generated_p05": "5th percentile of sample -> nearest training image distance (features)",
    "holdout_p05": "the same for held-out real images: the baseline for 'new but close'",
    "near_duplicates": "samples closer to a training image than half the baseline's 5th percentile",
    "tstr_accuracy": "classifier trained on samples only, tested on real held-out images",
    "real_accuracy": "the same classifier and budget trained on the real training split",
    "recon_accuracy": "trained on the model's reconstructions of that split: real minus this is the "
    "decoder's share of the TSTR gap, this minus TSTR the sampler's",
    "subset_accuracy": "classifier trained on 10% of the real labels",
    "augmented_accuracy": "the same 10% plus every sample",
    "gain": "augmented minus subset accuracy; positive means the samples help",
}


def _rows(prefix: str, values: dict[str, Any], keys: tuple[str, ...]) -> list[Metric]:
    return [Metric(f"{prefix}{k}", values.get(k), DEFINITIONS[k]) for k in keys if k in values]


def metric_rows(metrics: dict[str, Any]) -> list[Metric]:
    rows = _rows("", metrics.get("likelihood", {}), ("neg_elbo_nats", "bits_per_dim", "mse", "psnr_db"))
    for name, m in metrics["samplers"].items():
        d, mem = m["distribution"], m["memorization"]
        rows += _rows(f"{name}: ", d, ("fid",))
        if "inception" in m:
            rows.append(Metric(f"{name}: inception_fid", m["inception"]["fid"], DEFINITIONS["inception_fid"]))
        rows += _rows(f"{name}: ", d, ("kid_mean", "precision", "recall", "density", "coverage"))
        rows += _rows(f"{name}: ", mem, ("generated_p05", "holdout_p05", "near_duplicates"))
    use = metrics["usefulness"]
    if "skipped" in use:
        rows.append(Metric("usefulness", "not measured", use["skipped"]))
    else:
        rows += _rows("", use["tstr"], ("tstr_accuracy", "real_accuracy", "recon_accuracy"))
        rows += _rows("augmentation ", use["augmentation"], ("subset_accuracy", "augmented_accuracy", "gain"))
    return rows


def _sample_sections(samples: dict[str, tuple[np.ndarray, np.ndarray]], data: EvalData) -> list[Section]:
    figs = [Figure(images[:64], 8, f"{name} sampler") for name, (images, _) in samples.items()]
    out = [Section("Samples", "The first 64 samples of each sampler, same seed.", figs)]
    images, labels = next(iter(samples.values()))
    if (labels >= 0).any():
        per_class = []
        for c, name in enumerate(data.class_names):
            per_class.append(Figure(images[labels == c][:8], 8, f"class {c}: {name}"))
        out.append(
            Section("Samples per class", "Eight samples of each class (conditional model).", per_class)
        )
    return out


def _latent_sections(model: VAE, hold: np.ndarray, hold_labels: np.ndarray, seed: int) -> list[Section]:
    cond = model.config.num_classes > 0
    labels = hold_labels if cond else None
    recon = reconstruct(model, hold[:32], labels=None if labels is None else labels[:32])
    means = encode_means(model, hold[:512], labels=None if labels is None else labels[:512])
    rng = np.random.default_rng([seed, 5])
    a, b = rng.choice(len(means), 6, replace=False), rng.choice(len(means), 6, replace=False)
    steps = interpolations(model, means[a], means[b], 8, None if labels is None else labels[a])
    rows = np.concatenate([hold[a, None], steps.reshape(6, 8, *steps.shape[1:]), hold[b, None]], axis=1)
    dims, active = active_dimensions(means, 6)
    trav = traversals(model, means[0], dims, means, 9, label=None if labels is None else int(labels[0]))
    return [
        Section(
            "Reconstructions",
            "Held-out images, each followed by its reconstruction.",
            [Figure(interleave(hold[:32], recon), 8, "real, reconstruction, real, ...")],
        ),
        Section(
            "Interpolations",
            "Straight lines between the latents of two held-out images (at both ends).",
            [Figure(rows.reshape(-1, *hold.shape[1:]), 10, "real A, 8 decoded steps, real B")],
        ),
        Section(
            "Latent traversals",
            f"The 6 most active of {active} active dimensions, -3 to +3 std.",
            [Figure(trav, 9, "one dimension per row: " + ", ".join(map(str, dims)))],
        ),
    ]


def _neighbour_section(metrics: dict, samples: dict, train: np.ndarray) -> Section:
    best = metrics["best_sampler"]
    pairs = metrics["samplers"][best]["memorization"]["closest_pairs"][:16]
    images = samples[best][0]
    tiles = np.stack([t for i, j, _ in pairs for t in (images[i], train[j])]) if pairs else images[:0]
    caption = "sample, its nearest training image; distances " + ", ".join(f"{d:.3g}" for *_, d in pairs)
    return Section(
        "Nearest neighbours", f"The {best} samples closest to a training image.", [Figure(tiles, 8, caption)]
    )


def _attribute_section(model: VAE, data: EvalData, hold: np.ndarray) -> Section | None:
    if model.config.num_classes or not data.labeled:
        return None  # a conditional model edits class through its label; unlabeled data has no attributes
    sel = slice(0, 2000)  # images and labels from the same array: `train` is evaluate's own subset
    means = encode_means(model, data.train[sel])
    vectors = attribute_vectors(means, data.train_labels[sel], len(data.class_names))
    base = encode_means(model, hold[:3])
    figs = [
        Figure(apply_attribute(model, base, vectors[c]), 5, f"towards {name}: strength 0, 0.5, 1, 1.5, 2")
        for c, name in enumerate(data.class_names[:10])
    ]
    return Section("Attribute vectors", "Held-out images moved along class mean minus overall mean.", figs)


def build_report(
    model: VAE,
    metrics: dict[str, Any],
    data: EvalData,
    hold: np.ndarray,
    hold_labels: np.ndarray,
    train: np.ndarray,
    samples: dict[str, tuple[np.ndarray, np.ndarray]],
    seed: int,
) -> str:
    sections = _sample_sections(samples, data) + _latent_sections(model, hold, hold_labels, seed)
    sections.append(_neighbour_section(metrics, samples, train))
    attr = _attribute_section(model, data, hold)
    if attr is not None:
        sections.append(attr)
    meta = {
        "checkpoint": metrics["checkpoint"],
        "held-out images": f"{metrics['holdout']['n']:,} from {metrics['holdout']['source']}",
        "feature space": metrics["feature_space"],
        "sampler temperature": f"{metrics['temperature']:g}",
        "vaeforge": metrics["vaeforge_version"],
    }
    inception = [m["inception"] for m in metrics["samplers"].values() if "inception" in m]
    if inception:
        meta["inception_fid weights (sha256)"] = inception[0]["weights_sha256"]
    return render_report("vaeforge evaluation", meta, metric_rows(metrics), sections)
