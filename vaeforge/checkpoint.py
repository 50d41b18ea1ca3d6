"""Checkpoint files: weights + model config + provenance (model.pt), optimiser/training state (trainer.pt).

A checkpoint is a directory. `load_vae(path)` accepts that directory, its model.pt, or a whole run
directory (it then picks the best checkpoint by held-out loss), local or behind a URI (s3://...), and
needs no other flags: the model config travels inside the file, as in nanoGPT. Remote checkpoints are
read from a local copy cached by URI, size and mtime.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vaeforge import __version__, storage
from vaeforge.config import ModelConfig
from vaeforge.errors import UserError
from vaeforge.model import VAE

FORMAT = "vaeforge-checkpoint/1"
MODEL_FILE, TRAINER_FILE, META_FILE = "model.pt", "trainer.pt", "meta.json"
SAMPLER_FILE = "sampler_gmm.npz"  # the latent mixture `vaeforge fit-sampler` stores beside the weights
KDE_FILE = "sampler_kde.npz"  # the latent kernel density it stores there too
CHECKPOINTS_DIR = "checkpoints"


class CheckpointError(UserError):
    """A checkpoint path that is missing, incomplete or not a vaeforge checkpoint."""


@dataclass
class LoadedCheckpoint:
    model: VAE
    path: Path  # the checkpoint directory on this machine (for a URI: its cached copy)
    meta: dict[str, Any]  # epoch, step, metrics, data stats, provenance
    location: str = ""  # the checkpoint directory as given: a local path or a URI


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


def checkpoint_locations(run_dir: str | Path) -> list[str]:
    """Complete checkpoint directories of a local or remote run, oldest first (names sort by epoch, step).

    One recursive listing: on an object store that is one LIST, not a request per checkpoint.
    """
    root = storage.join(run_dir, CHECKPOINTS_DIR)
    base = (root if storage.is_uri(root) else os.path.expanduser(root)).rstrip("/")
    files: dict[str, set[str]] = defaultdict(set)
    for entry in storage.iter_files(root):
        files[storage.parent(entry.location)].add(entry.name)
    return sorted(
        d for d, names in files.items() if storage.parent(d) == base and {META_FILE, MODEL_FILE} <= names
    )


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint directories of a local run, oldest first."""
    return [Path(d) for d in checkpoint_locations(str(run_dir))]


def read_meta(ckpt_dir: str | Path) -> dict[str, Any]:
    location = storage.join(ckpt_dir, META_FILE)
    try:
        return json.loads(storage.read_text(location))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"unreadable checkpoint metadata in {ckpt_dir}: {e}") from None


def _resolve(path: str | Path, which: str) -> tuple[str, str]:
    """(checkpoint directory location, weights file name) for a run dir, checkpoint dir or weights file."""
    location = os.fspath(path)
    found = storage.kind(location)
    if found == "file":
        return storage.parent(storage.absolute(location)), storage.basename(location)
    if found is None:
        storage.require_bucket(location)
        raise CheckpointError(f"checkpoint not found: {location}")
    if storage.info(storage.join(location, MODEL_FILE)) is not None:
        return location, MODEL_FILE
    ckpts = checkpoint_locations(location)
    if not ckpts:
        raise CheckpointError(
            f"no checkpoint in {location}: expected a run directory, a checkpoint directory or model.pt"
        )
    if which == "latest":
        return ckpts[-1], MODEL_FILE
    scored = [(read_meta(c).get("metrics", {}).get("val_loss"), c) for c in ckpts]
    scored = [(s, c) for s, c in scored if isinstance(s, (int, float))]
    return (min(scored, key=lambda sc: sc[0])[1] if scored else ckpts[-1]), MODEL_FILE


def resolve_checkpoint(path: str | Path, which: str = "best") -> str:
    """Turn a run dir, checkpoint dir or model.pt location into a checkpoint directory location."""
    return _resolve(path, which)[0]


def local_checkpoint(path: str | Path, which: str = "best") -> tuple[str, Path]:
    """(checkpoint directory location, local path of its weights file; beside it meta.json if any).

    A local checkpoint is used where it is; a remote one is downloaded once into the cache.
    """
    location, weights = _resolve(path, which)
    return location, _cached_copy(location, (weights, META_FILE, SAMPLER_FILE, KDE_FILE)) / weights


def _cached_copy(directory: str, names: tuple[str, ...]) -> Path:
    """A local directory holding `names` from `directory`: the directory itself when it is local, else a
    cached download keyed by the location and each file's size and mtime (a rewritten file misses).

    Concurrent callers on one node (several actors) each download into a temp dir and rename it into
    place; the first rename wins and the others drop their copy.
    """
    if not storage.is_uri(directory):
        return Path(directory)
    entries = [storage.info(storage.join(directory, n)) for n in names]
    present = [e for e in entries if e is not None]
    stamp = "\n".join([directory, *(f"{e.name}\0{e.size}\0{e.mtime_ns}" for e in present)])
    key = hashlib.sha256(stamp.encode()).hexdigest()[:32]
    target = storage.default_cache_dir() / "remote" / key / storage.basename(directory)
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        for e in present:
            storage.download(e.location, tmp / e.name)
        with contextlib.suppress(OSError):  # lost the race: the winner's copy is identical
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_vae(
    path: str | Path, which: str = "best", map_location: str | torch.device = "cpu"
) -> LoadedCheckpoint:
    """Rebuild the VAE from any checkpoint location, in eval mode. Raises CheckpointError on bad input."""
    location, f = local_checkpoint(path, which)
    try:
        blob = torch.load(f, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types for a damaged file; all mean the same to a user
        raise CheckpointError(f"corrupt or unreadable checkpoint {f}: {type(e).__name__}") from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise CheckpointError(f"{f} is not a vaeforge checkpoint")
    model = VAE(ModelConfig.from_dict(blob["model_config"]))
    model.load_state_dict(blob["state_dict"])
    d = f.parent
    meta = read_meta(d) if (d / META_FILE).is_file() else {}
    return LoadedCheckpoint(model.eval(), d, meta, location)


def load_trainer_state(ckpt_dir: str | Path) -> dict[str, Any]:
    return torch.load(Path(ckpt_dir) / TRAINER_FILE, map_location="cpu", weights_only=False)
