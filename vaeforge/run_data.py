"""A training run's recorded data: find run.json from a checkpoint and reload the same images and split.

Used by evaluate and fit-sampler, so that both see exactly the images training saw, split the same way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vaeforge.config import TrainConfig
from vaeforge.data import load_images
from vaeforge.errors import UserError

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


def load_eval_data(run: dict[str, Any] | None, data: str | None, seed: int, image_size: int) -> EvalData:
    """The run's recorded data and split; `data` (--data) replaces the held-out side (e.g. a real test set).

    Without a run, `data` is split in half by `seed`: one half stands in for the training images.
    """
    if run is None and data is None:
        raise UserError("this checkpoint has no run.json beside it; pass --data with real images to compare")
    from vaeforge.train import load_data, split_indices  # the same loader and split as training

    train = train_labels = None
    names: list[str] = []
    if run is not None:
        tcfg = TrainConfig.from_dict(run["config"])
        rec = load_data(tcfg)
        train_idx, val_idx = split_indices(len(rec.images), tcfg)
        train, train_labels, names = rec.images[train_idx], rec.labels[train_idx], rec.class_names
        holdout, holdout_labels = rec.images[val_idx], rec.labels[val_idx]
        source = "the run's held-out split"
    if data is not None:
        other = load_images(data, image_size=image_size)
        holdout, holdout_labels, source = other.images, other.labels, data
        if names and other.class_names and other.class_names != names:
            holdout_labels = relabel(other.labels, other.class_names, names)
        names = names or other.class_names
    if train is None:  # no run: the given data serves as both sides, split in half by the seed
        order = np.random.default_rng([seed, 3]).permutation(len(holdout))
        half = len(order) // 2
        train, train_labels = holdout[np.sort(order[:half])], holdout_labels[np.sort(order[:half])]
        holdout, holdout_labels = holdout[np.sort(order[half:])], holdout_labels[np.sort(order[half:])]
    return EvalData(train, train_labels, holdout, holdout_labels, names, source)


def relabel(labels: np.ndarray, names: list[str], target: list[str]) -> np.ndarray:
    """Class indices into `names` as indices into `target`, matched by name; -1 where `target` lacks one."""
    index = {n: i for i, n in enumerate(target)}
    return np.array([index.get(names[i], -1) if i >= 0 else -1 for i in labels], dtype=np.int64)
