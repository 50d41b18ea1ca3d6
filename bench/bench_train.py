"""Training throughput of the seed64 VAE, all measured in one run: (a) a plain PyTorch loop, (b) `vaeforge
train` with 1 Ray worker, (c) with 2 workers; in fp32 and bf16. Prints images/s and the ratios.

    .venv/bin/python bench/bench_train.py [--images 1536] [--epochs 3] [--precisions fp32,bf16]

(b) and (c) go through the same `run_training` the CLI calls. Their "train" rate is the training phase of
the last epoch (the loop's own timer); their "epoch" rate is wall time between epoch ends seen by the
driver, so it includes validation, pictures and the checkpoint write. bf16 is skipped, with a note, on
CPUs without native bf16 (there autocast emulates it and is ~30x slower than fp32).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch

from vaeforge.config import TrainConfig, get_preset
from vaeforge.data import generate_shapes
from vaeforge.model import VAE, elbo_loss
from vaeforge.runtime import autocast, bf16_is_fast, make_optimizer, to_model_input


def plain_loop(images: np.ndarray, precision: str, batch: int, steps: int, threads: int) -> float:
    """(a): the same model, loss, optimiser and input path, no Ray, no DDP, no validation."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    device = torch.device("cpu")
    model = VAE(get_preset("seed64")).to(memory_format=torch.channels_last)
    opt = make_optimizer(model.parameters(), 1e-3)
    rng = np.random.default_rng(0)

    def step() -> None:
        idx = np.sort(rng.choice(len(images), batch, replace=False))
        x = to_model_input(torch.from_numpy(images[idx]), device)
        with autocast(precision, device):
            out = model(x)
        loss = elbo_loss(x, out).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):  # warm-up: oneDNN picks kernels on the first calls
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - t0)


def optimizer_step_ms(fused: bool, threads: int, repeats: int = 10) -> float:
    """One Adam step over the seed64 model's parameters: the multi-tensor default against the fused step
    that training uses (vaeforge.runtime.make_optimizer)."""
    torch.set_num_threads(threads)
    model = VAE(get_preset("seed64"))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt = make_optimizer(model.parameters(), 1e-3) if fused else torch.optim.Adam(model.parameters(), 1e-3)
    for _ in range(3):
        opt.step()
    t0 = time.perf_counter()
    for _ in range(repeats):
        opt.step()
    return (time.perf_counter() - t0) / repeats * 1000


def vaeforge_train(
    workers: int, precision: str, n_images: int, epochs: int, batch: int
) -> tuple[float, float]:
    """(b)/(c): `vaeforge train` through run_training; returns (train-phase img/s, whole-epoch img/s)."""
    from vaeforge.train import run_training

    ends: list[float] = []

    def on_event(event: dict) -> None:
        if event["kind"] == "epoch":
            ends.append(time.perf_counter())

    with tempfile.TemporaryDirectory(prefix="vf-bench-") as tmp:
        cfg = TrainConfig(
            output=os.path.join(tmp, "run"),
            model=get_preset("seed64"),
            workers=workers,
            epochs=epochs,
            batch_size=batch,
            precision=precision,
            max_samples=n_images,
            builtin_count=n_images,
            cache_dir=os.path.join(tmp, "cache"),
            val_fraction=0.04,
        )
        result = run_training(cfg, on_event)
    last = result.history[-1]
    steps_per_epoch = (n_images - round(n_images * 0.04)) // batch
    per_epoch = [b - a for a, b in zip(ends, ends[1:], strict=False)]
    epoch_rate = steps_per_epoch * batch / float(np.median(per_epoch)) if per_epoch else float("nan")
    return last["train_images_per_s"], epoch_rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=1536, help="built-in images per epoch (incl. 4%% held out)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--plain-steps", type=int, default=20)
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--force-bf16", action="store_true", help="run bf16 even where it is emulated")
    args = ap.parse_args()

    cores = os.cpu_count() or 1
    default_ms, fused_ms = optimizer_step_ms(False, cores), optimizer_step_ms(True, cores)
    print(
        f"Adam step, seed64, {cores} threads: multi-tensor {default_ms:.1f} ms, fused {fused_ms:.1f} ms"
        f" (fused/default {fused_ms / default_ms:.2f})",
        flush=True,
    )

    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    images, _ = generate_shapes(args.images, 64, seed=0)
    rows: dict[str, dict[str, float]] = {}
    for precision in args.precisions.split(","):
        if precision == "bf16" and not bf16_is_fast(torch.device("cpu")) and not args.force_bf16:
            print(f"bf16: skipped, this CPU ({torch.backends.cpu.get_cpu_capability()}) has no native bf16")
            continue
        r = rows[precision] = {}
        r["a_plain"] = plain_loop(images, precision, args.batch, args.plain_steps, cores)
        r["b_train"], r["b_epoch"] = vaeforge_train(1, precision, args.images, args.epochs, args.batch)
        r["c_train"], r["c_epoch"] = vaeforge_train(2, precision, args.images, args.epochs, args.batch)
        print(f"{precision}: " + "  ".join(f"{k} {v:.1f} img/s" for k, v in r.items()), flush=True)
    ray.shutdown()

    print("\nseed64, batch", args.batch, "on", cores, "cores")
    print(
        f"{'precision':<10}{'(a) plain':>12}{'(b) 1 worker':>14}{'(b) epoch':>11}{'(c) 2 workers':>15}"
        f"{'(b)/(a)':>9}{'(b)ep/(a)':>11}{'(c)/(a)':>9}"
    )
    for precision, r in rows.items():
        print(
            f"{precision:<10}{r['a_plain']:>12.1f}{r['b_train']:>14.1f}{r['b_epoch']:>11.1f}{r['c_train']:>15.1f}"
            + "".join(
                f"{r[k] / r['a_plain']:>{w}.3f}" for k, w in (("b_train", 9), ("b_epoch", 11), ("c_train", 9))
            )
        )
    if "fp32" in rows and "bf16" in rows:
        for key, name in (("a_plain", "(a)"), ("b_train", "(b)")):
            print(f"bf16/fp32 {name}: {rows['bf16'][key] / rows['fp32'][key]:.2f}x")


if __name__ == "__main__":
    main()
