"""Typed configs of every command (ModelConfig, TrainConfig, ...) and model presets; no torch, no I/O."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from vaeforge.errors import UserError

PRECISIONS = ("auto", "bf16", "fp32")
RECON_LOSSES = ("mse", "bce")
LR_SCHEDULES = ("constant", "cosine")
LR_FLOOR = 0.02  # cosine ends at 2% of --lr, not 0: the last steps still move the weights


def learning_rate(lr: float, schedule: str, step: int, total_steps: int) -> float:
    """The learning rate for global step `step` (0-based) of a `total_steps`-step run."""
    if schedule == "constant" or total_steps <= 1:
        return lr
    t = min(step, total_steps - 1) / (total_steps - 1)
    return lr * (LR_FLOOR + (1 - LR_FLOOR) * 0.5 * (1 + math.cos(math.pi * t)))


@dataclass(frozen=True)
class ModelConfig:
    """The seed design's hyperparameters. The defaults are the seed's `seed64` model."""

    image_size: int = 64  # the seed trains on 64x64 RGB
    channels: int = 3
    # Encoder convs: first stride 1, the rest stride 2, so 64 -> 4 after four halvings.
    enc_filters: tuple[int, ...] = (32, 64, 128, 256, 512)
    # Decoder transposed convs, each stride 2, from 4x4 back to 64x64; a final stride-1 conv maps to RGB.
    dec_filters: tuple[int, ...] = (256, 128, 64, 32)
    kernel_size: int = 5  # the seed's 5x5 kernels: wide enough for global structure at 64x64
    leaky_slope: float = 0.02  # the seed's LeakyReLU slope
    dense_dim: int = 1024  # width of the SELU dense layer on both sides of the latent
    latent_dim: int = 512
    # > 0: a class-conditional VAE (Sohn et al. 2015): a one-hot label joins the encoder's dense input and
    # the decoder's latent input. 0 keeps the seed's unconditional model and its exact parameter counts.
    num_classes: int = 0

    def __post_init__(self) -> None:
        if self.num_classes < 0:
            raise UserError(f"num_classes must be >= 0, got {self.num_classes}")
        halvings = len(self.enc_filters) - 1
        if self.image_size % (2**halvings):
            raise UserError(f"image_size {self.image_size} must be divisible by {2**halvings}")
        if len(self.dec_filters) != halvings:
            raise UserError(f"dec_filters needs {halvings} entries to undo {halvings} stride-2 convs")

    @property
    def bottleneck_size(self) -> int:
        """Spatial size after the encoder convs (4 for seed64)."""
        return self.image_size // 2 ** (len(self.enc_filters) - 1)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in known}
        return cls(**kw)


PRESETS: dict[str, ModelConfig] = {
    # The original design document's VAE: 13,802,688 encoder and 13,283,023 decoder parameters.
    "seed64": ModelConfig(),
    # Same topology, a fraction of the width: trains in seconds on a CPU, for tests and smoke runs.
    "tiny": ModelConfig(
        image_size=64, enc_filters=(8, 8, 16, 16, 32), dec_filters=(16, 16, 8, 8), dense_dim=64, latent_dim=16
    ),
}


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise UserError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}") from None


@dataclass(frozen=True)
class TrainConfig:
    """Everything `vaeforge train` needs; the CLI, jobs/ and tests all build this one object."""

    output: str
    model: ModelConfig = field(default_factory=ModelConfig)
    preset: str = "seed64"
    data: str | None = None  # None: the built-in procedural shapes dataset
    max_samples: int | None = None
    builtin_count: int = 8192  # enough variety for the shapes set; one seed64 epoch is ~1 min on 2 cores
    cache_dir: str | None = None
    val_fraction: float = 0.05  # held-out split for the per-epoch ELBO/PSNR; fixed by `seed`
    epochs: int = 10
    batch_size: int = 64  # global: split evenly across workers
    lr: float = 1e-3  # Adam default that trains this VAE stably with BatchNorm everywhere
    # constant, or cosine: decay from lr to lr * LR_FLOOR over the whole run (--epochs), a pure function of
    # the step, so a resumed run continues on the same curve. Extending --epochs on resume re-stretches it.
    lr_schedule: str = "constant"
    beta: float = 1.0  # weight of the KL term; 1.0 is the true ELBO
    recon_loss: str = "mse"
    # Condition encoder and decoder on the data's class labels (model.num_classes is set from the data).
    conditional: bool = False
    seed: int = 0
    precision: str = "auto"
    workers: int = 1
    use_gpu: bool | None = None  # None: use GPUs when the cluster has them
    cpus_per_worker: float | None = None  # None: share the local cores evenly between workers
    address: str | None = None  # None: RAY_ADDRESS, else start a local Ray
    dashboard: bool = True  # start Ray's dashboard along with a local Ray
    resume: bool = False
    overwrite: bool = False
    max_failures: int = 0  # worker-group restarts Ray Train may do; each restores the latest checkpoint
    # Fit generate's gmm sampler on the best checkpoint when training ends (seconds to minutes on a CPU),
    # so `generate --sampler gmm` works on every finished run without a second command.
    fit_sampler: bool = True
    grid_size: int = 8  # the sample and reconstruction PNGs are grid_size x grid_size
    progress: bool = True

    def __post_init__(self) -> None:
        checks = [
            (self.workers >= 1, f"--workers must be at least 1, got {self.workers}"),
            (self.epochs >= 1, f"--epochs must be at least 1, got {self.epochs}"),
            (self.batch_size >= self.workers, f"--batch-size {self.batch_size} is below --workers"),
            (self.lr > 0, f"--lr must be positive, got {self.lr}"),
            (self.lr_schedule in LR_SCHEDULES, f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}"),
            (self.beta >= 0, f"--beta must be >= 0, got {self.beta}"),
            (0 < self.val_fraction < 1, f"--val-fraction must be in (0, 1), got {self.val_fraction}"),
            (self.precision in PRECISIONS, f"--precision must be one of {', '.join(PRECISIONS)}"),
            (self.recon_loss in RECON_LOSSES, f"--recon-loss must be one of {', '.join(RECON_LOSSES)}"),
            (self.max_samples is None or self.max_samples >= 2, "--max-samples must be at least 2"),
            (not (self.resume and self.overwrite), "--resume and --overwrite contradict each other"),
        ]
        for ok, msg in checks:
            if not ok:
                raise UserError(msg)

    @property
    def per_worker_batch(self) -> int:
        return self.batch_size // self.workers

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        d = dict(d)
        d["model"] = ModelConfig.from_dict(d.get("model", {}))
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


OUTPUT_FORMATS = ("webdataset", "parquet")
IMAGE_FORMATS = ("png", "jpeg", "webp", "npy")
SAMPLERS = ("prior", "gmm", "kde")


def parse_count(text: str | int) -> int:
    """Accept 1e6, 1000000 and 1_000_000 (what people type for dataset sizes)."""
    if isinstance(text, int):
        value = text
    else:
        s = str(text).strip().replace("_", "")
        try:
            value = int(s)
        except ValueError:
            try:
                f = float(s)
            except ValueError:
                raise UserError(f"--count must be a number such as 1e6 or 1_000_000, got {text!r}") from None
            if not f.is_integer():
                raise UserError(f"--count must be a whole number, got {text!r}") from None
            value = int(f)
    if value < 1:
        raise UserError(f"--count must be at least 1, got {text}")
    return value


@dataclass(frozen=True)
class GenerateConfig:
    """Everything `vaeforge generate` needs. Fields marked (plan) decide the bytes written; the rest only
    how fast they are written, so a resume may change them."""

    checkpoint: str
    output: str
    count: int  # (plan)
    format: str = "webdataset"  # (plan)
    image_format: str = "png"  # (plan) lossless and read by every loader
    quality: int = 95  # (plan) jpeg/webp only
    shard_size: int = 10_000  # (plan) ~30-40 MB of PNGs per shard: large enough for streaming readers
    seed: int = 0  # (plan)
    sampler: str = "prior"  # (plan)
    temperature: float = 1.0  # (plan) scales the prior's standard deviation
    # (plan) conditional models: "all" (training proportions), "balanced" or "C:N,C:N"; None = "all"
    classes: str | None = None
    prefix: str = "samples"  # (plan) shard names are {prefix}-{i:06d}.tar / .parquet
    batch_size: int = 256  # decoder batch; 256 keeps a CPU core's caches busy without a large footprint
    # CPU actors; None: one per GPU if there are GPUs, else one single-threaded actor per core, which
    # measured ~0.97 of raw decode speed on 2 cores where one 2-thread actor reached only ~0.75-0.85.
    workers: int | None = None
    use_gpu: bool | None = None
    precision: str = "auto"
    # Encoder threads per actor. None: 2 on a GPU (encoding overlaps the GPU's decoding), 0 on a CPU
    # (encode inline: extra threads there only preempt torch's own threads and stall its barriers).
    encode_threads: int | None = None
    max_retries: int = 3  # attempts per shard beyond the first before the run stops
    address: str | None = None
    dashboard: bool = True  # start Ray's dashboard along with a local Ray
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        checks = [
            (self.count >= 1, f"--count must be at least 1, got {self.count}"),
            (
                self.format in OUTPUT_FORMATS,
                f"unknown --format {self.format!r}; choose {', '.join(OUTPUT_FORMATS)}",
            ),
            (
                self.image_format in IMAGE_FORMATS,
                f"unknown --image-format {self.image_format!r}; choose {', '.join(IMAGE_FORMATS)}",
            ),
            (self.sampler in SAMPLERS, f"unknown --sampler {self.sampler!r}; choose {', '.join(SAMPLERS)}"),
            (1 <= self.quality <= 100, f"--quality must be in 1..100, got {self.quality}"),
            (self.shard_size >= 1, f"--shard-size must be at least 1, got {self.shard_size}"),
            (self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}"),
            (self.workers is None or self.workers >= 1, f"--workers must be at least 1, got {self.workers}"),
            (self.temperature > 0, f"--temperature must be positive, got {self.temperature}"),
            (self.precision in PRECISIONS, f"--precision must be one of {', '.join(PRECISIONS)}"),
            (self.max_retries >= 0, "--max-retries must be >= 0"),
            (self.encode_threads is None or self.encode_threads >= 0, "--encode-threads must be >= 0"),
            (
                "." not in self.prefix and "/" not in self.prefix and self.prefix,
                "--prefix must be a plain name",
            ),
        ]
        for ok, msg in checks:
            if not ok:
                raise UserError(msg)

    @property
    def num_shards(self) -> int:
        return -(-self.count // self.shard_size)

    def plan_dict(self) -> dict[str, Any]:
        """The fields that decide the output bytes: a resume must match them exactly."""
        keys = (
            "count",
            "format",
            "image_format",
            "quality",
            "shard_size",
            "seed",
            "sampler",
            "temperature",
            "prefix",
            "classes",
        )
        return {k: getattr(self, k) for k in keys}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class EvaluateConfig:
    """Everything `vaeforge evaluate` needs."""

    checkpoint: str
    data: str | None = None  # real images to compare with; None: the run's recorded held-out split
    output: str | None = None  # None: <run dir>/eval
    # Samples per sampler and real held-out images compared: 5,000 keeps FID's bias small against its
    # 1,984-dim features while a CPU decodes them in under a minute.
    samples: int = 5000
    max_train: int = 10_000  # training images searched for nearest neighbours and used by the classifiers
    seed: int = 0
    usefulness: bool = True  # TSTR and augmentation (labeled data, conditional model)
    # The sampler whose samples the classifiers train on; None: the labeled one with the lowest FID.
    usefulness_sampler: str | None = None
    classifier_steps: int = 600
    # Scales both samplers' spread as `generate --temperature` does, so that the numbers describe the
    # samples a user will generate.
    temperature: float = 1.0
    # pytorch-fid's InceptionV3 weights file: adds standard FID. None: no Inception (nothing downloads it).
    inception_weights: str | None = None

    def __post_init__(self) -> None:
        if self.samples < 10:
            raise UserError(f"--samples must be at least 10, got {self.samples}")
        if self.max_train < 10:
            raise UserError(f"--max-train must be at least 10, got {self.max_train}")
        if self.classifier_steps < 1:
            raise UserError("--classifier-steps must be at least 1")
        if not self.temperature > 0:
            raise UserError(f"--temperature must be positive, got {self.temperature}")
        if self.usefulness_sampler not in (None, *SAMPLERS):
            raise UserError(
                f"unknown --usefulness-sampler {self.usefulness_sampler!r}; choose {', '.join(SAMPLERS)}"
            )


@dataclass(frozen=True)
class ScoreConfig:
    """Everything `vaeforge score` needs."""

    checkpoint: str
    data: str  # the images to score: a folder, shards, Parquet or builtin, as `train --data` takes
    output: str = "scores.parquet"  # local path or URI; the grid goes beside it as <stem>_top.png
    batch_size: int = 256  # as elsewhere in inference: keeps a CPU core's caches busy, small footprint
    top: int = 16  # most anomalous images printed and drawn: one screen, a 4 x 4 grid of pairs
    seed: int = 0  # with a hash of its pixels, fixes each image's posterior sample
    max_samples: int | None = None  # None: every usable image
    cache_dir: str | None = None  # decoded-image cache; None: the default cache root
    recon_loss: str | None = None  # None: the training run's (run.json), else mse
    # Conditional models: also score each image under every class (one pass per class) to spot
    # mislabeled files. Off saves those passes when there are many classes.
    label_check: bool = True
    use_gpu: bool | None = None  # None: a GPU when there is one

    def __post_init__(self) -> None:
        checks = [
            (self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}"),
            (self.top >= 1, f"--top must be at least 1, got {self.top}"),
            (self.max_samples is None or self.max_samples >= 1, "--max-samples must be at least 1"),
            (
                self.recon_loss is None or self.recon_loss in RECON_LOSSES,
                f"--recon-loss must be one of {', '.join(RECON_LOSSES)}",
            ),
        ]
        for ok, msg in checks:
            if not ok:
                raise UserError(msg)
