"""Ray Train driver for `vaeforge train`: output-dir rules, data, Ray start-up, TorchTrainer, progress."""

from __future__ import annotations

import dataclasses
import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from typing import Any

import numpy as np

from vaeforge import __version__, storage
from vaeforge.checkpoint import (
    CHECKPOINTS_DIR,
    TRAINER_FILE,
    checkpoint_locations,
    load_vae,
    resolve_checkpoint,
)
from vaeforge.cluster import init_ray, joins_cluster
from vaeforge.config import ModelConfig, TrainConfig
from vaeforge.data import ImageSet, load_images
from vaeforge.errors import UserError

RUN_FILE = "run.json"
RUN_ARTIFACTS = (RUN_FILE, "metrics.jsonl", "samples", CHECKPOINTS_DIR)
Progress = Callable[[dict[str, Any]], None]


@dataclass
class TrainResult:
    output: str  # locations: local paths or URIs
    best_checkpoint: str
    latest_checkpoint: str
    history: list[dict[str, Any]]
    # {name: (location, fit)} of the samplers fitted at the end (gmm: GaussianMixture, kde: LatentKDE)
    samplers: dict[str, tuple[str, Any]] | None = None


FIT_POINTS = 20_000  # training images the end-of-run mixture fit encodes, as fit-sampler's default


def package_versions() -> dict[str, str]:
    names = ("torch", "ray", "pyarrow", "webdataset", "pillow", "typer", "numpy")
    versions = {"vaeforge": __version__, "python": ".".join(map(str, os.sys.version_info[:3]))}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "missing"
    return versions


def prepare_output(cfg: TrainConfig) -> dict[str, Any] | None:
    """Apply the output-dir rules before any work is done; returns the previous run.json on --resume."""
    out = cfg.output
    storage.require_bucket(out)  # a missing bucket fails now, not after the data is decoded
    if storage.kind(out) == "file":
        raise UserError(f"--output {out} is a file; give a directory")
    run_file = storage.join(out, RUN_FILE)
    has_run = storage.info(run_file) is not None or storage.kind(storage.join(out, CHECKPOINTS_DIR)) == "dir"
    if cfg.resume:
        if not has_run:
            raise UserError(f"nothing to resume in {out}: it holds no vaeforge run")
        try:
            previous = json.loads(storage.read_text(run_file))
            model = ModelConfig.from_dict(previous["config"]["model"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(
                f"cannot resume {out}: its {RUN_FILE} is missing or damaged ({type(e).__name__}); "
                "pass --overwrite to start a new run there"
            ) from None
        if dataclasses.replace(model, num_classes=0) != dataclasses.replace(cfg.model, num_classes=0):
            raise UserError(f"{out} was trained with a different model config; resume with the same --preset")
        return previous
    if has_run and not cfg.overwrite:
        raise UserError(f"{out} holds another run; pass --resume to continue it or --overwrite to replace it")
    if has_run:
        for name in RUN_ARTIFACTS:  # only what vaeforge wrote; anything else of the user's stays
            p = storage.join(out, name)
            storage.delete_tree(p) if storage.kind(p) == "dir" else storage.delete(p)
    return None


def split_indices(n: int, cfg: TrainConfig) -> tuple[np.ndarray, np.ndarray]:
    """Held-out split fixed by the seed; a resumed run gets the same split."""
    n_val = max(1, round(n * cfg.val_fraction))
    order = np.random.default_rng([cfg.seed, 7]).permutation(n)
    train_idx, val_idx = np.sort(order[n_val:]), np.sort(order[:n_val])
    if len(train_idx) < cfg.batch_size:
        raise UserError(
            f"only {len(train_idx)} training images after the held-out split, fewer than --batch-size "
            f"{cfg.batch_size}; lower --batch-size or add data"
        )
    return train_idx, val_idx


def load_data(cfg: TrainConfig) -> ImageSet:
    return load_images(
        cfg.data,
        image_size=cfg.model.image_size,
        max_samples=cfg.max_samples,
        cache_dir=cfg.cache_dir,
        builtin_count=cfg.builtin_count,
        seed=cfg.seed,
    )


def with_classes(cfg: TrainConfig, data: ImageSet) -> TrainConfig:
    """A conditional run's model learns the data's classes; every image needs a label."""
    if not cfg.conditional:
        return cfg
    if not data.class_names:
        raise UserError(f"--conditional needs labeled data and {data.report['source']} has no labels")
    unlabeled = int((data.labels < 0).sum())
    if unlabeled:
        raise UserError(f"--conditional needs a label for every image; {unlabeled} images have none")
    model = dataclasses.replace(cfg.model, num_classes=len(data.class_names))
    return dataclasses.replace(cfg, model=model)


def write_run_file(cfg: TrainConfig, data: ImageSet, split: dict[str, int], previous: dict | None) -> None:
    storage.makedirs(cfg.output)
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    run = {
        "config": cfg.to_dict(),
        "versions": package_versions(),
        "data": data.report,
        "split": split,
        "started": previous.get("started", now) if previous else now,
        "resumed": [*(previous or {}).get("resumed", []), now] if previous else [],
    }
    storage.write_bytes(storage.join(cfg.output, RUN_FILE), json.dumps(run, indent=2, default=str).encode())


def _scaling(cfg: TrainConfig) -> tuple[Any, int]:
    """ScalingConfig plus the torch thread count per worker."""
    import ray
    from ray.train import ScalingConfig

    use_gpu = cfg.use_gpu if cfg.use_gpu is not None else ray.cluster_resources().get("GPU", 0) >= 1
    cpus = cfg.cpus_per_worker
    if cpus is None:  # share the local cores; 2 workers on 2 cores get one core each
        cpus = max(1.0, (os.cpu_count() or 1) // cfg.workers) if not joins_cluster(cfg.address) else 1.0
        if cfg.workers > (os.cpu_count() or 1):
            cpus = (os.cpu_count() or 1) / cfg.workers  # fractional: oversubscribed but never starved
    scaling = ScalingConfig(num_workers=cfg.workers, use_gpu=use_gpu, resources_per_worker={"CPU": cpus})
    return scaling, max(1, int(cpus))


def run_training(cfg: TrainConfig, progress: Progress | None = None) -> TrainResult:
    """Everything `vaeforge train` does after option parsing."""
    # Ray workers run in their own working directory: every local path they see must be absolute.
    cfg = dataclasses.replace(cfg, output=storage.absolute(cfg.output))
    previous = prepare_output(cfg)
    notify = progress or (lambda event: None)
    notify({"kind": "data", "source": cfg.data or "builtin"})
    data = load_data(cfg)
    cfg = with_classes(cfg, data)
    train_idx, val_idx = split_indices(len(data.images), cfg)
    split = {"train": len(train_idx), "val": len(val_idx)}
    write_run_file(cfg, data, split, previous)
    notify({"kind": "data_ready", "report": data.report, "split": split})

    import ray

    ray_info = init_ray(cfg.address, cfg.workers * (cfg.cpus_per_worker or 1.0), cfg.dashboard)
    notify({"kind": "ray", **ray_info})
    data_stats = {
        **split,
        "images": len(data.images),
        "classes": data.class_names,
        # what `generate --classes all` reproduces: the training data's class proportions
        "class_counts": np.bincount(data.labels[data.labels >= 0], minlength=len(data.class_names)).tolist(),
        "source": data.report["source"],
    }
    loop_config = {
        "train": cfg.to_dict(),
        # One copy in the object store; every worker on a node maps the same shared memory.
        "images": ray.put(np.ascontiguousarray(data.images)),
        "labels": ray.put(data.labels),
        "train_idx": ray.put(train_idx),
        "val_idx": ray.put(val_idx),
        "data_stats": data_stats,
        "resume_from": _latest(cfg) if previous else None,
    }
    history = _fit(cfg, loop_config, notify)
    out = cfg.output
    best = resolve_checkpoint(out, "best")
    samplers = None
    if cfg.fit_sampler:
        from vaeforge.fit_sampler import KDE_MAX_POINTS, fit_and_store

        images = {"gmm": min(len(train_idx), FIT_POINTS), "kde": min(len(train_idx), KDE_MAX_POINTS)}
        notify({"kind": "fit_sampler", "checkpoint": best, "images": images})
        labels = data.labels if (data.labels[train_idx] >= 0).all() else None
        samplers = fit_and_store(
            load_vae(best), data.images, labels, seed=cfg.seed, max_points=FIT_POINTS, index=train_idx
        )
    return TrainResult(out, best, resolve_checkpoint(out, "latest"), history, samplers)


def _latest(cfg: TrainConfig) -> str | None:
    """The newest complete checkpoint that can be resumed from (it has the optimiser state too)."""
    resumable = [
        c for c in checkpoint_locations(cfg.output) if storage.info(storage.join(c, TRAINER_FILE)) is not None
    ]
    return resumable[-1] if resumable else None


def _run_config(cfg: TrainConfig) -> Any:
    """Ray Train's RunConfig: checkpoints go to <output>/checkpoints, local or remote."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    if storage.is_uri(cfg.output):
        # Our filesystem, not Ray's from_uri: it carries the endpoint and keys (storage._s3_filesystem).
        fs, path = storage.filesystem(cfg.output)
        where: dict[str, Any] = {"storage_path": path, "storage_filesystem": fs}
    else:
        where = {"storage_path": cfg.output}
    env = storage.forwarded_env()  # see storage.FORWARDED_ENV: workers may not share our environment
    return RunConfig(
        name=CHECKPOINTS_DIR,
        **where,
        # Ray keeps the best by held-out loss, and always the latest.
        checkpoint_config=CheckpointConfig(
            num_to_keep=1, checkpoint_score_attribute="val_loss", checkpoint_score_order="min"
        ),
        failure_config=FailureConfig(max_failures=cfg.max_failures),
        worker_runtime_env={"env_vars": env} if env else None,
    )


def _fit(cfg: TrainConfig, loop_config: dict[str, Any], notify: Progress) -> list[dict[str, Any]]:
    """Run the TorchTrainer in a thread while this thread relays the workers' progress events."""
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Queue

    from vaeforge.train_loop import train_loop_per_worker

    scaling, threads = _scaling(cfg)
    queue = Queue(actor_options={"num_cpus": 0})
    loop_config.update(progress=queue, threads=threads)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=scaling,
        run_config=_run_config(cfg),
    )
    box: dict[str, Any] = {}

    def fit() -> None:
        try:
            box["result"] = trainer.fit()
        except BaseException as e:  # handed to the main thread, which re-raises it
            box["error"] = e

    thread = threading.Thread(target=fit, name="vaeforge-fit", daemon=True)
    thread.start()
    history: list[dict[str, Any]] = []
    while True:
        alive = thread.is_alive()
        # One actor call for all waiting events, and never a blocking get: a Ctrl-C that interrupts a
        # blocking queue.get leaves its call to time out inside the actor, and Ray then logs that
        # unretrieved Empty as an "Unhandled error" traceback over the one-line "interrupted" message.
        ready = queue.qsize()
        for event in queue.get_nowait_batch(ready) if ready else []:
            if event["kind"] == "epoch":
                history.append(event)
            notify(event)
        if not alive:
            break  # the fit had ended before this drain, so nothing more can arrive
        if not ready:
            thread.join(timeout=0.5)
    thread.join()
    if "error" in box:
        raise box["error"]
    return history
