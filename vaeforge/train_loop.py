"""The per-worker training loop that Ray Train runs on every rank: DDP steps, validation, checkpoints."""

from __future__ import annotations

import io
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from vaeforge import storage
from vaeforge.checkpoint import MODEL_FILE, load_trainer_state, save_checkpoint
from vaeforge.config import TrainConfig, learning_rate
from vaeforge.grids import interleave, make_grid
from vaeforge.model import VAE, elbo_loss, psnr
from vaeforge.runtime import (
    autocast,
    claim_cpu,
    make_optimizer,
    resolve_precision,
    restore_optimizer,
    to_model_input,
    to_uint8_hwc,
)

PROGRESS_EVERY_S = 1.0  # how often rank 0 sends a progress event to the driver


@dataclass
class LoopState:
    """Where training stands; saved in every checkpoint so a resume continues at the same epoch and step."""

    epoch: int = 1  # 1-based epoch to run next
    step: int = 0  # steps already done inside `epoch`
    global_step: int = 0
    best_val_loss: float = float("inf")
    history: list[dict[str, Any]] = field(default_factory=list)  # one metrics row per finished epoch


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled order of the training set for one epoch: a pure function of (seed, epoch).

    Being a function rather than RNG state is what lets a resumed run skip the first `step` batches
    and see exactly the batches the interrupted run would have seen next.
    """
    return np.random.default_rng([seed, epoch]).permutation(n)


def noise_generator(device: torch.device, *key: int) -> torch.Generator:
    """Reparameterisation noise keyed by (seed, purpose, rank, step): reproducible after a resume."""
    g = torch.Generator(device=device)
    g.manual_seed(int(np.random.default_rng(list(key)).integers(2**62)))
    return g


def _restore(model: VAE, opt: torch.optim.Optimizer, resume_from: str | None) -> LoopState:
    """Load weights, optimiser and loop state from Ray's latest checkpoint (a restart) or --resume's.

    Either may be remote: as_directory() downloads it to a temp dir (a local one is used in place).
    """
    ckpt = ray.train.get_checkpoint()
    if ckpt is None and resume_from is not None:
        fs, path = storage.filesystem(resume_from)
        ckpt = ray.train.Checkpoint(path, filesystem=fs)
    if ckpt is None:
        return LoopState()
    with ckpt.as_directory() as d:
        blob = torch.load(Path(d) / MODEL_FILE, map_location="cpu", weights_only=True)
        model.load_state_dict(blob["state_dict"])
        trainer = load_trainer_state(d)
    restore_optimizer(opt, trainer["optimizer"])
    return LoopState(**trainer["loop_state"])


def _labels(
    labels: np.ndarray, idx: np.ndarray, cfg: TrainConfig, device: torch.device
) -> torch.Tensor | None:
    """The batch's class labels for a conditional model, None for the seed's unconditional one."""
    return torch.from_numpy(labels[idx]).to(device) if cfg.model.num_classes else None


def _batch_indices(
    order: np.ndarray, train_idx: np.ndarray, step: int, cfg: TrainConfig, rank: int
) -> np.ndarray:
    b = cfg.per_worker_batch
    start = step * cfg.batch_size + rank * b
    return np.sort(train_idx[order[start : start + b]])  # sorted: sequential reads from the image array


@torch.no_grad()
def _validate(
    model: VAE, images: np.ndarray, labels: np.ndarray, val_idx: np.ndarray, cfg: TrainConfig, ctx: dict
) -> dict[str, float]:
    """Held-out ELBO, MSE and PSNR, each rank on its slice, summed across ranks."""
    model.eval()
    rank, world, device = ctx["rank"], ctx["world"], ctx["device"]
    mine = val_idx[rank::world]
    sums = torch.zeros(5, dtype=torch.float64)  # loss, recon, kl, mse, psnr
    g = noise_generator(device, cfg.seed, 1, rank)  # same noise every epoch: epochs compare fairly
    for i in range(0, len(mine), 256):
        x = to_model_input(torch.from_numpy(images[mine[i : i + 256]]), device)
        y = _labels(labels, mine[i : i + 256], cfg, device)
        with autocast(ctx["precision"], device):
            out = model(x, generator=g, y=y)
        t = elbo_loss(x, out, cfg.beta, cfg.recon_loss)
        per_image = torch.stack([t.recon + cfg.beta * t.kl, t.recon, t.kl, t.mse, psnr(t.mse)])
        sums += per_image.double().sum(dim=1).cpu()
    count = torch.tensor([float(len(mine))], dtype=torch.float64)
    if world > 1:
        both = torch.cat([sums, count]).to(device)
        dist.all_reduce(both)
        sums, count = both[:5].cpu(), both[5:].cpu()
    model.train()
    names = ("val_loss", "val_recon", "val_kl", "val_mse", "val_psnr")
    return {k: float(v) for k, v in zip(names, (sums / count.clamp_min(1)).tolist(), strict=True)}


def _write_pictures(
    model: VAE,
    images: np.ndarray,
    labels: np.ndarray,
    val_idx: np.ndarray,
    cfg: TrainConfig,
    ctx: dict,
    epoch: int,
) -> None:
    """Rank 0: a grid of prior samples (fixed latents, so epochs compare) and a reconstruction grid.

    A conditional model's sample grid has one class per row.
    """
    model.eval()
    device, n, k = ctx["device"], cfg.grid_size**2, cfg.model.num_classes
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    z = torch.randn(n, cfg.model.latent_dim, generator=g, device=device)
    y = (torch.arange(n, device=device) // cfg.grid_size) % k if k else None
    with torch.no_grad(), autocast(ctx["precision"], device):
        samples = to_uint8_hwc(model.decoder(z, y)).numpy()
        real = images[val_idx[: n // 2]]
        x = to_model_input(torch.from_numpy(real), device)
        recon = to_uint8_hwc(model.reconstruct(x, _labels(labels, val_idx[: n // 2], cfg, device))).numpy()
    model.train()
    out = storage.join(cfg.output, "samples")
    storage.makedirs(out)
    grids = {
        "samples": make_grid(samples, cfg.grid_size),
        "recon": make_grid(interleave(real, recon), cfg.grid_size),
    }
    for kind, grid in grids.items():
        png = io.BytesIO()
        grid.save(png, format="PNG")
        storage.write_bytes(storage.join(out, f"{kind}_epoch{epoch:04d}.png"), png.getvalue())


def _write_metrics(cfg: TrainConfig, history: list[dict[str, Any]]) -> None:
    """Rank 0 rewrites metrics.jsonl from the checkpointed history, so a resume never duplicates rows."""
    text = "".join(json.dumps(row) + "\n" for row in history)
    storage.write_bytes(storage.join(cfg.output, "metrics.jsonl"), text.encode())


def _checkpoint(
    model: VAE, opt: torch.optim.Optimizer, state: LoopState, ctx: dict
) -> tuple[ray.train.Checkpoint, str, dict[str, Any]]:
    """Rank 0 writes the checkpoint; returns it, its directory name and how ray.train.report stores it.

    Local storage: straight into Ray's run directory, so 310 MB are written once, not saved and copied.
    Remote storage: staged in a local temp dir that Ray uploads before report() returns, then deletes.
    """
    name = f"epoch{state.epoch - 1:04d}_step{state.global_step:09d}"
    ray_storage = ray.train.get_context().get_storage()
    local = isinstance(ray_storage.storage_filesystem, pafs.LocalFileSystem)
    directory = (
        Path(ray_storage.experiment_fs_path) / name if local else Path(tempfile.mkdtemp(prefix="vf-ckpt-"))
    )
    meta = {"epoch": state.epoch - 1, "global_step": state.global_step, "metrics": state.history[-1]}
    meta["data"] = ctx["data_stats"]
    trainer_state = {"optimizer": opt.state_dict(), "loop_state": state.__dict__}
    save_checkpoint(directory, model, meta, trainer_state)
    if local:
        checkpoint = ray.train.Checkpoint(str(directory), filesystem=ray_storage.storage_filesystem)
        return checkpoint, name, {"checkpoint_upload_mode": ray.train.CheckpointUploadMode.NO_UPLOAD}
    upload = {
        "checkpoint_upload_mode": ray.train.CheckpointUploadMode.SYNC,
        "delete_local_checkpoint_after_upload": True,
    }
    return ray.train.Checkpoint.from_directory(str(directory)), name, upload


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Entry point Ray Train calls on every worker."""
    cfg = TrainConfig.from_dict(config["train"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    claim_cpu(config["threads"])  # Ray sets OMP_NUM_THREADS to the CPU share and nice 15; be explicit
    device = ray.train.torch.get_device()
    ctx = {
        "rank": rank,
        "world": world,
        "device": device,
        "precision": resolve_precision(cfg.precision, device),
    }
    ctx["data_stats"] = config["data_stats"]
    images, labels, train_idx, val_idx = ray.get(
        [config["images"], config["labels"], config["train_idx"], config["val_idx"]]
    )
    progress = config.get("progress") if rank == 0 else None

    torch.manual_seed(cfg.seed)  # identical init on every rank; DDP also broadcasts rank 0's weights
    model = VAE(cfg.model).to(device, memory_format=torch.channels_last)
    opt = make_optimizer(model.parameters(), cfg.lr)
    state = _restore(model, opt, config.get("resume_from"))
    ddp = ray.train.torch.prepare_model(model, move_to_device=False)
    steps_per_epoch = len(train_idx) // cfg.batch_size
    if rank == 0 and progress is not None:
        progress.put(
            {
                "kind": "start",
                "precision": ctx["precision"],
                "device": str(device),
                "world": world,
                "steps_per_epoch": steps_per_epoch,
                "epoch": state.epoch,
                "step": state.step,
                "epochs": cfg.epochs,
                "global_step": state.global_step,
            }
        )

    while state.epoch <= cfg.epochs:
        order = epoch_order(len(train_idx), cfg.seed, state.epoch)
        sums, n_steps, t0, last_sent = torch.zeros(3, dtype=torch.float64), 0, time.perf_counter(), 0.0
        while state.step < steps_per_epoch:
            idx = _batch_indices(order, train_idx, state.step, cfg, rank)
            x = to_model_input(torch.from_numpy(images[idx]), device)
            g = noise_generator(device, cfg.seed, 0, rank, state.global_step)
            with autocast(ctx["precision"], device):
                out = ddp(x, generator=g, y=_labels(labels, idx, cfg, device))
            terms = elbo_loss(x, out, cfg.beta, cfg.recon_loss)
            lr = learning_rate(cfg.lr, cfg.lr_schedule, state.global_step, cfg.epochs * steps_per_epoch)
            for group in opt.param_groups:
                group["lr"] = lr
            opt.zero_grad(set_to_none=True)
            terms.loss.backward()
            opt.step()
            state.step += 1
            state.global_step += 1
            n_steps += 1
            sums += torch.stack(
                [terms.loss.detach(), terms.recon.mean().detach(), terms.kl.mean().detach()]
            ).double()
            now = time.perf_counter()
            if progress is not None and (
                now - last_sent >= PROGRESS_EVERY_S or state.step == steps_per_epoch
            ):
                last_sent = now
                progress.put(
                    {
                        "kind": "step",
                        "epoch": state.epoch,
                        "step": state.step,
                        "loss": float(terms.loss.detach()),
                        "images_per_s": n_steps * cfg.batch_size / (now - t0),
                    }
                )
        train_seconds = time.perf_counter() - t0
        row = {"epoch": state.epoch, "global_step": state.global_step}
        means = (sums / max(n_steps, 1)).tolist()
        row.update(train_loss=means[0], train_recon=means[1], train_kl=means[2])
        row["lr"] = opt.param_groups[0]["lr"]
        row["train_images_per_s"] = n_steps * cfg.batch_size / train_seconds if n_steps else 0.0
        row.update(_validate(model, images, labels, val_idx, cfg, ctx))
        row["epoch_seconds"] = time.perf_counter() - t0
        state.history.append(row)
        state.best_val_loss = min(state.best_val_loss, row["val_loss"])
        state.epoch, state.step = state.epoch + 1, 0
        checkpoint, name, how = None, None, {}
        if rank == 0:
            _write_pictures(model, images, labels, val_idx, cfg, ctx, row["epoch"])
            _write_metrics(cfg, state.history)
            checkpoint, name, how = _checkpoint(model, opt, state, ctx)
            if progress is not None:
                progress.put({"kind": "epoch", **row})
        ray.train.report(
            {k: v for k, v in row.items() if isinstance(v, (int, float))},
            checkpoint=checkpoint,
            checkpoint_dir_name=name,
            **how,
        )
