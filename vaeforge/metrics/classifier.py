"""Usefulness of synthetic images as training data: a small fixed CNN, TSTR and augmentation gain.

TSTR (train on synthetic, test on real; Esteban et al. 2017) trains the classifier on labelled
synthetic images and tests it on real ones, next to the same classifier trained on real images
(real -> real): the closer the two accuracies, the more of the class-relevant content the generator
reproduces. Augmentation gain trains on a small labelled real subset (10% by default) with and without
the synthetic images added and reports the difference on the real test set; "added" means every step
keeps the real-only classifier's batch and gains a synthetic batch of the same size.

Every classifier here gets the same number of optimiser steps (ClassifierConfig.steps) whatever the size
of its training set, so a comparison measures the data, not a bigger training budget. Everything is
seeded: weight init (under torch.random.fork_rng, so the caller's global RNG is untouched), batch order
and the subset choice, so the same inputs and seed give the same accuracies on the same machine.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vaeforge.metrics.features import check_images, image_batch
from vaeforge.runtime import to_model_input


@dataclass(frozen=True)
class ClassifierConfig:
    steps: int = 600  # Adam steps; fixed per classifier so that datasets, not budgets, are compared
    batch_size: int = 64  # small batches: many updates from the few hundred images of a 10% subset
    lr: float = 1e-2  # cosine-decayed to 0 over `steps`; BatchNorm keeps this large rate stable
    width: int = 32  # channels of the widest conv: ~16 k parameters, a fraction of a second per step on a CPU
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0 or self.width < 1:
            raise ValueError(f"invalid classifier config: {self}")


class SmallCNN(nn.Module):
    """(B, 3, H, W) in [0, 1] -> class logits: four 3x3 conv/BN/ReLU stages, max-pooled, global mean.

    Max pooling rather than strided convs: on the built-in shapes it reached ~0.55 accuracy in 150 steps
    where the strided variant of the same cost stayed near 0.25 (chance 0.17); the first, full-resolution
    stage is narrow (width / 4) because it is the expensive one.
    """

    def __init__(self, num_classes: int, width: int = 32) -> None:
        super().__init__()
        chans = (3, max(1, width // 4), max(1, width // 2), width, width)
        layers: list[nn.Module] = []
        for i in range(4):
            layers += [
                nn.Conv2d(chans[i], chans[i + 1], 3, padding=1, bias=False),
                nn.BatchNorm2d(chans[i + 1]),
            ]
            layers += [nn.ReLU(), nn.MaxPool2d(2)] if i < 3 else [nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x)  # (B, width, H/8, W/8)
        return self.head(h.mean(dim=(2, 3)))  # (B, num_classes)


def _check_labelled(images: np.ndarray, labels: np.ndarray, name: str) -> np.ndarray:
    check_images(images)
    labels = np.asarray(labels)
    if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{name}: need one integer label per image, got shape {labels.shape}")
    if (labels < 0).any():
        raise ValueError(f"{name}: some images are unlabelled (label < 0); usefulness metrics need labels")
    return labels.astype(np.int64)


def _batch_order(n: int, steps: int, batch_size: int, rng: np.random.Generator) -> np.ndarray:
    """Indices for `steps` batches: whole shuffled passes over the data, concatenated. (steps, B)."""
    need = steps * batch_size
    passes = [rng.permutation(n) for _ in range(-(-need // n))]
    return np.concatenate(passes)[:need].reshape(steps, batch_size)


def train_classifier(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    num_classes: int | None = None,
    config: ClassifierConfig = ClassifierConfig(),
    device: str | torch.device = "cpu",
    extra: tuple[np.ndarray, np.ndarray] | None = None,
) -> SmallCNN:
    """Train a SmallCNN on uint8 (N, H, W, 3) images and int labels; returns it in eval mode.

    extra: (images, labels) added to every step as a second batch of the same size, drawn in its own
    seeded order. The first batch of each step is exactly what training without `extra` sees, so the
    difference between the two classifiers is the added data alone (augmentation_gain).
    """
    labels = _check_labelled(images, labels, "training set")
    if extra is not None:
        extra = (extra[0], _check_labelled(extra[0], extra[1], "extra training set"))
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    device = torch.device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = SmallCNN(num_classes, config.width).to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config.steps)
    order = _batch_order(len(images), config.steps, config.batch_size, np.random.default_rng(config.seed))
    extra_order = (
        None
        if extra is None
        else _batch_order(
            len(extra[0]), config.steps, config.batch_size, np.random.default_rng([config.seed, 1])
        )
    )
    model.train()
    for step, idx in enumerate(order):
        idx = np.sort(idx)  # sorted: sequential reads when images is a memory map
        xs, ys = images[idx], labels[idx]
        if extra is not None and extra_order is not None:
            jdx = np.sort(extra_order[step])
            xs, ys = np.concatenate([xs, extra[0][jdx]]), np.concatenate([ys, extra[1][jdx]])
        x = to_model_input(torch.from_numpy(xs), device)
        loss = F.cross_entropy(model(x), torch.from_numpy(ys).to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
    return model.eval()


@torch.no_grad()
def predict(model: nn.Module, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Predicted class of each uint8 image: (N,) int64."""
    check_images(images)
    model.eval()
    device = next(model.parameters()).device
    out = [
        model(to_model_input(image_batch(images, i, batch_size), device)).argmax(dim=1).cpu().numpy()
        for i in range(0, len(images), batch_size)
    ]
    return np.concatenate(out)


def accuracy(model: nn.Module, images: np.ndarray, labels: np.ndarray, batch_size: int = 512) -> float:
    """Share of images whose predicted class equals the label."""
    labels = _check_labelled(images, labels, "test set")
    return float((predict(model, images, batch_size) == labels).mean())


@dataclass
class TSTRResult:
    tstr_accuracy: float  # trained on synthetic, tested on real test
    real_accuracy: float  # trained on real train, tested on the same real test
    ratio: float  # tstr / real: 1.0 means the synthetic set teaches as much as the real one
    n_synth: int
    n_real_train: int
    n_test: int
    num_classes: int
    chance: float  # share of the most frequent class in the test set
    steps: int
    seed: int
    # trained on the model's reconstructions of the real training images: what samples could teach if
    # the sampler found every real image's latent, so real - recon is the decoder's share of the gap
    # and recon - tstr the sampler's. None when no reconstructions were given.
    recon_accuracy: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _num_classes(*label_sets: np.ndarray) -> int:
    return int(max(int(np.max(labels)) for labels in label_sets)) + 1


def _check_sets(
    synth: np.ndarray,
    synth_labels: np.ndarray,
    real_train: np.ndarray,
    real_train_labels: np.ndarray,
    real_test: np.ndarray,
    real_test_labels: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """The three labelled sets TSTR and augmentation compare, checked, and their shared class count."""
    synth_labels = _check_labelled(synth, synth_labels, "synthetic set")
    real_train_labels = _check_labelled(real_train, real_train_labels, "real training set")
    real_test_labels = _check_labelled(real_test, real_test_labels, "real test set")
    return (
        synth_labels,
        real_train_labels,
        real_test_labels,
        _num_classes(synth_labels, real_train_labels, real_test_labels),
    )


def _chance(labels: np.ndarray) -> float:
    return float(np.bincount(labels).max() / len(labels))


def tstr(
    synth: np.ndarray,
    synth_labels: np.ndarray,
    real_train: np.ndarray,
    real_train_labels: np.ndarray,
    real_test: np.ndarray,
    real_test_labels: np.ndarray,
    *,
    config: ClassifierConfig = ClassifierConfig(),
    device: str | torch.device = "cpu",
    reconstructions: np.ndarray | None = None,
) -> TSTRResult:
    """Train-on-synthetic/test-on-real accuracy beside real/real accuracy, same classifier and budget.

    reconstructions: the real training images after a round trip through the model, in the same order
    (so with the same labels); a third classifier trains on them (recon_accuracy).
    """
    synth_labels, real_train_labels, real_test_labels, k = _check_sets(
        synth, synth_labels, real_train, real_train_labels, real_test, real_test_labels
    )
    if reconstructions is not None:
        check_images(reconstructions)
        if reconstructions.shape != real_train.shape:
            raise ValueError(
                f"reconstructions: need one per real training image, shape {real_train.shape}, "
                f"got {reconstructions.shape}"
            )

    def trained_on(images: np.ndarray, labels: np.ndarray) -> float:
        model = train_classifier(images, labels, num_classes=k, config=config, device=device)
        return accuracy(model, real_test, real_test_labels)

    acc_synth = trained_on(synth, synth_labels)
    acc_real = trained_on(real_train, real_train_labels)
    acc_recon = None if reconstructions is None else trained_on(reconstructions, real_train_labels)
    return TSTRResult(
        tstr_accuracy=acc_synth,
        real_accuracy=acc_real,
        ratio=acc_synth / acc_real if acc_real > 0 else float("nan"),
        n_synth=len(synth),
        n_real_train=len(real_train),
        n_test=len(real_test),
        num_classes=k,
        chance=_chance(real_test_labels),
        steps=config.steps,
        seed=config.seed,
        recon_accuracy=acc_recon,
    )


def stratified_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of `fraction` of each class (at least one image per class), chosen with `seed`."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    rng = np.random.default_rng([seed, 1])
    picks = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        picks.append(rng.permutation(members)[: max(1, round(fraction * len(members)))])
    return np.sort(np.concatenate(picks))


@dataclass
class AugmentationResult:
    subset_accuracy: float  # trained on `fraction` of the real labels only
    augmented_accuracy: float  # the same real batches, each step joined by a synthetic batch as large
    gain: float  # augmented - subset, in accuracy points (0.05 = five percentage points)
    fraction: float
    n_subset: int
    n_synth: int
    n_test: int
    steps: int
    seed: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def augmentation_gain(
    synth: np.ndarray,
    synth_labels: np.ndarray,
    real_train: np.ndarray,
    real_train_labels: np.ndarray,
    real_test: np.ndarray,
    real_test_labels: np.ndarray,
    *,
    fraction: float = 0.1,
    config: ClassifierConfig = ClassifierConfig(),
    device: str | torch.device = "cpu",
) -> AugmentationResult:
    """Accuracy on real test of a classifier on `fraction` of the real labels, without and with synthetic."""
    synth_labels, real_train_labels, real_test_labels, k = _check_sets(
        synth, synth_labels, real_train, real_train_labels, real_test, real_test_labels
    )
    idx = stratified_subset(real_train_labels, fraction, config.seed)
    sub_x, sub_y = real_train[idx], real_train_labels[idx]
    base = train_classifier(sub_x, sub_y, num_classes=k, config=config, device=device)
    # Same steps, same real batches, plus a synthetic batch of the same size each step: the real labels
    # are never crowded out (pooling 5,000 samples with 1,000 real images would leave the real subset
    # one step in six), so the gain measures what the synthetic images add.
    aug = train_classifier(
        sub_x, sub_y, num_classes=k, config=config, device=device, extra=(synth, synth_labels)
    )
    acc_base = accuracy(base, real_test, real_test_labels)
    acc_aug = accuracy(aug, real_test, real_test_labels)
    return AugmentationResult(
        subset_accuracy=acc_base,
        augmented_accuracy=acc_aug,
        gain=acc_aug - acc_base,
        fraction=fraction,
        n_subset=len(idx),
        n_synth=len(synth),
        n_test=len(real_test),
        steps=config.steps,
        seed=config.seed,
    )
