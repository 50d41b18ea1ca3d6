"""Evaluation metrics for `vaeforge evaluate`: feature space, distribution metrics, memorisation, likelihood,
usefulness. Pure library code (numpy + torch): no Ray, no Typer, no I/O.

    features.py      the fixed, versioned random-conv embedding (FEATURE_SPACE) of uint8 images
    neighbours.py    chunked distances and k-NN radii
    distribution.py  FID, KID, precision/recall, density/coverage on feature matrices
    inception.py     pytorch-fid's InceptionV3 (standard FID's features) from a user-supplied weights file
    memorization.py  nearest-training-image distances against a held-out baseline
    likelihood.py    held-out negative ELBO (nats, bits/dim), MSE and PSNR of a VAE
    classifier.py    a small fixed CNN, TSTR and augmentation gain
"""

from vaeforge.metrics.classifier import (
    AugmentationResult,
    ClassifierConfig,
    SmallCNN,
    TSTRResult,
    accuracy,
    augmentation_gain,
    predict,
    train_classifier,
    tstr,
)
from vaeforge.metrics.distribution import (
    PRDC,
    DistributionMetrics,
    distribution_metrics,
    fid,
    frechet_distance,
    kid,
    prdc,
)
from vaeforge.metrics.features import FEATURE_DIM, FEATURE_SPACE, RandConvEmbedding, extract_features
from vaeforge.metrics.likelihood import HeldoutLikelihood, heldout_likelihood
from vaeforge.metrics.memorization import MemorizationReport, memorization

__all__ = [
    "FEATURE_DIM",
    "FEATURE_SPACE",
    "PRDC",
    "AugmentationResult",
    "ClassifierConfig",
    "DistributionMetrics",
    "HeldoutLikelihood",
    "MemorizationReport",
    "RandConvEmbedding",
    "SmallCNN",
    "TSTRResult",
    "accuracy",
    "augmentation_gain",
    "distribution_metrics",
    "extract_features",
    "fid",
    "frechet_distance",
    "heldout_likelihood",
    "kid",
    "memorization",
    "prdc",
    "predict",
    "train_classifier",
    "tstr",
]
