"""Checkpoint files: weights + model config + provenance (model.pt), optimiser/training state (trainer.pt).

A checkpoint is a directory. `load_vae(path)` accepts that directory, its model.pt, or a whole run
directory (it then picks the best checkpoint by held-out loss), and needs no other flags: the model
config travels inside the file, as in nanoGPT.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vaeforge import __version__
from vaeforge.config import ModelConfig
from vaeforge.errors import UserError
from vaeforge.model import VAE

FORMAT = "vaeforge-checkpoint/1"
MODEL_FILE, TRAINER_FILE, META_FILE = "model.pt", "trainer.pt", "meta.json"
CHECKPOINTS_DIR = "checkpoints"


class CheckpointError(UserError):
    """A checkpoint path that is missing, incomplete or not a vaeforge checkpoint."""


@dataclass
class LoadedCheckpoint:
    model: VAE
    path: Path  # the checkpoint directory
    meta: dict[str, Any]  # epoch, step, metrics, data stats, provenance


def save_checkpoint(
    directory: str | Path,
    model: VAE,
    meta: dict[str, Any],
    trainer_state: dict[str, Any] | None = None,
) -> Path:
    """Write model.pt (+ trainer.pt) and meta.json into `directory`; meta.json last marks it complete."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    meta = {**meta, "format": FORMAT, "vaeforge_version": __version__, "model_config": model.config.to_dict()}
    torch.save(
        {"format": FORMAT, "model_config": model.config.to_dict(), "state_dict": model.state_dict()},
        d / MODEL_FILE,
    )
    if trainer_state is not None:
        torch.save(trainer_state, d / TRAINER_FILE)
    tmp = d / (META_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2, default=str))
    os.replace(tmp, d / META_FILE)
    return d


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint directories of a run, oldest first (names sort by epoch, then step)."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if (p / META_FILE).is_file() and (p / MODEL_FILE).is_file())


def read_meta(ckpt_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((ckpt_dir / META_FILE).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"unreadable checkpoint metadata in {ckpt_dir}: {e}") from None


def resolve_checkpoint(path: str | Path, which: str = "best") -> Path:
    """Turn a run dir, checkpoint dir or model.pt path into a checkpoint directory."""
    p = Path(path)
    if p.is_file():
        return p.parent
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    if (p / MODEL_FILE).is_file():
        return p
    ckpts = list_checkpoints(p)
    if not ckpts:
        raise CheckpointError(
            f"no checkpoint in {p}: expected a run directory, a checkpoint directory or model.pt"
        )
    if which == "latest":
        return ckpts[-1]
    scored = [(read_meta(c).get("metrics", {}).get("val_loss"), c) for c in ckpts]
    scored = [(s, c) for s, c in scored if isinstance(s, (int, float))]
    return min(scored, key=lambda sc: sc[0])[1] if scored else ckpts[-1]


def load_vae(
    path: str | Path, which: str = "best", map_location: str | torch.device = "cpu"
) -> LoadedCheckpoint:
    """Rebuild the VAE from any checkpoint path, in eval mode. Raises CheckpointError on bad input."""
    d = resolve_checkpoint(path, which)
    f = Path(path) if Path(path).is_file() else d / MODEL_FILE
    try:
        blob = torch.load(f, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types for a damaged file; all mean the same to a user
        raise CheckpointError(f"corrupt or unreadable checkpoint {f}: {type(e).__name__}") from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise CheckpointError(f"{f} is not a vaeforge checkpoint")
    model = VAE(ModelConfig.from_dict(blob["model_config"]))
    model.load_state_dict(blob["state_dict"])
    meta = read_meta(d) if (d / META_FILE).is_file() else {}
    return LoadedCheckpoint(model.eval(), d, meta)


def load_trainer_state(ckpt_dir: str | Path) -> dict[str, Any]:
    return torch.load(Path(ckpt_dir) / TRAINER_FILE, map_location="cpu", weights_only=False)
