"""`vaeforge generate` throughput against the raw decoder, measured in one run, plus flat-memory checks.

    .venv/bin/python bench/bench_generate.py [--count N] [--checkpoint RUN_OR_CKPT]

Prints, for the seed64 decoder at one precision, batch size and thread layout:
  raw decoder-forward images/s (the upper bound), PNG-encode-alone images/s, end-to-end images/s of
  `vaeforge generate` for webdataset/png and parquet/png, and the ratio end-to-end / raw (target >= 0.95),
  where raw is the mean of the raw runs just before and just after that end-to-end run. Both decode
  with model.inference_decoder (BatchNorm folded, LeakyReLU fused), as generate's workers do. The ratio
  runs use --no-dashboard; a third run shows webdataset/png with Ray's dashboard on, for its cost.
  Under each end-to-end run a breakdown from its stats.json says what the ratio is made of: how busy
  the actors were, the share of their shard time in each phase, and their decode rate against raw;
  then how the machine's CPU was shared while the actors ran (from /proc): the actors, generate's driver,
  the Ray processes it started, everything that was running before it, and idle.
  --repeats N runs the three end-to-end runs N times (each followed by a raw run): median ratios.
The thread layout is generate's default on a CPU: one 1-thread actor per core. "Raw" runs the bare
decoder in that same layout (one 1-thread process per core, concurrently) and sums their rates.
Then peak RSS of the driver and of the actors at count 2e4 and 2e5 (the tiny preset, so 2e5 stays quick:
memory is decided by the pipeline's structure, not the model width), which must be flat.
Without --checkpoint a randomly initialised seed64 checkpoint is used: speed does not depend on weights.
--sampler gmm generates from a full-covariance mixture of 30 components (10 classes x 3, as a per-class
fit of Fashion-MNIST has) stored beside that checkpoint; its speed does not depend on the fit either.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vaeforge.checkpoint import load_vae, save_checkpoint
from vaeforge.config import get_preset
from vaeforge.encode import encode_image
from vaeforge.model import VAE, inference_decoder
from vaeforge.runtime import autocast, resolve_precision, to_uint8_hwc
from vaeforge.sampling import GaussianMixture, gmm_path


def make_checkpoint(directory: Path, preset: str) -> str:
    torch.manual_seed(0)
    return str(save_checkpoint(directory, VAE(get_preset(preset)).eval(), {"epoch": 0, "metrics": {}}))


def add_mixture(checkpoint: str, latent_dim: int, k: int = 30) -> None:
    """A random full-covariance mixture stored where fit-sampler would put it: sampling cost, not quality."""
    rng = np.random.default_rng(0)
    chol = np.tril(rng.standard_normal((k, latent_dim, latent_dim)) * 0.02) + 0.5 * np.eye(latent_dim)
    means = rng.standard_normal((k, latent_dim))
    GaussianMixture(np.full(k, 1 / k), means, chol, {"bench": True}).save(gmm_path(checkpoint))


def raw_decode(
    checkpoint: str, batch: int, threads: int, precision: str, seconds: float, start: Any, rates: Any
) -> None:
    """Decoder forward + uint8 conversion only: what generation could reach with free encoding and I/O.

    Decodes from `start` (a barrier shared with the other raw processes) for `seconds`, and puts its
    images/s on `rates`.
    """
    torch.set_num_threads(threads)
    model = load_vae(checkpoint).model
    dec = inference_decoder(model.decoder).to(memory_format=torch.channels_last)  # as generate's workers
    device = torch.device("cpu")
    z = torch.randn(batch, model.config.latent_dim)
    with torch.inference_mode(), autocast(precision, device):
        to_uint8_hwc(dec(z))  # warm-up
        start.wait()
        t0, n = time.perf_counter(), 0
        while time.perf_counter() - t0 < seconds:
            to_uint8_hwc(dec(z))
            n += batch
    rates.put(n / (time.perf_counter() - t0))


def raw_decode_layout(checkpoint: str, batch: int, procs: int, precision: str, seconds: float) -> float:
    """raw_decode in `procs` concurrent 1-thread processes, the layout generate's CPU actors use.

    The processes start decoding together and time the same window, so each is measured while the others
    compete for memory bandwidth and caches, as actors are; separately started ones would each get some
    uncontended time and overstate the bound.
    """
    ctx = multiprocessing.get_context("spawn")
    start, rates = ctx.Barrier(procs), ctx.Queue()
    workers = [
        ctx.Process(target=raw_decode, args=(checkpoint, batch, 1, precision, seconds, start, rates))
        for _ in range(procs)
    ]
    for w in workers:
        w.start()
    got: list[float] = []
    while len(got) < procs:
        try:
            got.append(rates.get(timeout=5))
        except queue.Empty:
            if any(w.exitcode not in (None, 0) for w in workers):
                for w in workers:
                    w.kill()
                raise SystemExit("a raw decoder process failed; see its traceback above") from None
    for w in workers:
        w.join()
    return sum(got)


def png_alone(n: int) -> float:
    img = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    t0 = time.perf_counter()
    for _ in range(n):
        encode_image(img, "png")
    return n / (time.perf_counter() - t0)


def shard_size(count: int, actors: int, most: int = 10_000) -> int:
    """Shards of at most `most` images, as many per actor: with 3 shards on 2 actors, one actor would sit
    out the last shard and the run would measure the imbalance instead of the pipeline."""
    per_actor = -(-count // (actors * most))
    return -(-count // (actors * per_actor))


def end_to_end(
    checkpoint: str,
    fmt: str,
    count: int,
    batch: int,
    precision: str,
    tmp: Path,
    dashboard: bool = False,
    sampler: str = "prior",
) -> dict:
    """`vaeforge generate` in a subprocess, as users run it; img/s from its own timer, peak RSS from /proc."""
    out = tmp / f"gen-{fmt}-{count}"
    cmd = [
        sys.executable,
        "-m",
        "vaeforge",
        "generate",
        "--checkpoint",
        checkpoint,
        "--count",
        str(count),
        "--format",
        fmt,
        "--output",
        str(out),
        "--batch-size",
        str(batch),
        "--precision",
        precision,
        "--shard-size",
        str(shard_size(count, os.cpu_count() or 1)),
        "--overwrite",
        "--dashboard" if dashboard else "--no-dashboard",
        "--sampler",
        sampler,
    ]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    t0 = time.perf_counter()
    before = set(cpu_seconds())
    # One stream: progress goes to stderr, the summary to stdout
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, marks, actor_pids = [], {}, set()

    def watch() -> None:  # an actor's title names its class only while it works, so look often
        while proc.poll() is None:
            actor_pids.update(pid for pid, (_, cmd) in cpu_seconds().items() if "ShardWorker" in cmd)
            time.sleep(0.5)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    for line in proc.stdout:  # marks: the machine's CPU when the actors start and when the run is done
        lines.append(line)
        if line.startswith(("workers:", "done:")):
            marks[line.split(":")[0]] = (cpu_seconds(), time.perf_counter())
    proc.wait()
    watcher.join()
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"generate failed:\n{''.join(lines)[-3000:]}")
    speed = [ln for ln in lines if ln.split()[:1] == ["speed"]][0]
    stats = json.loads((out / ".vaeforge" / "stats.json").read_text())  # written by every generate run
    cpu = machine_cpu(marks["workers"], marks["done"], before, proc.pid, actor_pids)
    return {"ips": float(speed.split()[1].replace(",", "")), "wall": wall, "machine_cpu": cpu, **stats}


def cpu_seconds() -> dict[int, tuple[float, str]]:
    """(user + system CPU seconds, command line) of every process on the machine, from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # gone meanwhile
        fields = stat[stat.rindex(")") + 2 :].split()
        out[int(pid)] = ((int(fields[11]) + int(fields[12])) / tick, cmd)
    return out


def machine_cpu(
    start: tuple, end: tuple, before: set[int], driver: int, actors: set[int]
) -> dict[str, float]:
    """Shares of the machine's CPU between the two marks: generate's actors, its driver, the Ray processes
    it started, processes that were running before it (anything else on the machine), and idle."""
    (first, t0), (last, t1) = start, end
    budget = (t1 - t0) * (os.cpu_count() or 1)
    shares = dict.fromkeys(("actors", "driver", "ray", "others"), 0.0)
    for pid, (cpu, _) in last.items():
        used = cpu - first.get(pid, (0.0, ""))[0]
        group = (
            "others" if pid in before
            else "driver" if pid == driver
            else "actors" if pid in actors
            else "ray"
        )  # fmt: skip
        shares[group] += used / budget
    shares["idle"] = max(0.0, 1 - sum(shares.values()))
    return shares


def breakdown(r: dict) -> str:
    """Where the end-to-end run's actor time went, from its stats.json: what the ratio is made of.

    ratio ~= busy x decode share x (decode rate inside the actors / raw rate).
    """
    sec, n = r["actor_seconds"], r["images"]
    phases = ", ".join(
        f"{k} {sec[k] / sec['total']:.1%}" for k in ("decode", "latents", "encode", "write", "commit")
    )
    in_actors = n * r["actors"] / sec["decode"]  # the actors' summed decode rate (they share the work)
    machine = ", ".join(f"{k} {v:.1%}" for k, v in r["machine_cpu"].items())
    return (
        f"busy {r['busy_fraction']:.3f} (start lag {r['start_lag_s']:.1f}s, tail {r['tail_s']:.1f}s "
        f"of {r['seconds']:.1f}s); shard time: {phases}; "
        f"decode in actors {in_actors:.1f} img/s\n  machine CPU while the actors ran: {machine}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--count",
        type=int,
        default=None,
        help="Images per end-to-end run (default: 20,000 in fp32, 100,000 in bf16, ~80 s of generation "
        "either way, so Ray and actor start-up stay a small part of the run, as at --count 1e6).",
    )
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--sampler", choices=("prior", "gmm"), default="prior")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--raw-seconds", type=float, default=40.0, help="Length of each raw decoder run.")
    ap.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="Rounds of the three end-to-end runs, each followed by a raw run; prints the median ratios.",
    )
    args = ap.parse_args()
    threads = os.cpu_count() or 1
    precision = resolve_precision(args.precision, torch.device("cpu"))
    if args.count is None:
        args.count = 100_000 if precision == "bf16" else 20_000
    if args.count < 20_000:
        raise SystemExit("--count must be at least 20,000 (the issue's floor for this measurement)")
    with tempfile.TemporaryDirectory(prefix="vf-genbench-") as t:
        tmp = Path(t)
        ckpt = args.checkpoint or make_checkpoint(tmp / "seed64", "seed64")
        if args.sampler == "gmm" and not args.checkpoint:
            add_mixture(ckpt, get_preset("seed64").latent_dim)
        png = png_alone(5000)
        print(
            f"seed64 decoder, {precision}, batch {args.batch}, {threads} x 1-thread processes/actors,",
            f"{args.sampler} sampler",
        )
        print(f"PNG encode alone (1 thr)          {png:9.1f} img/s")
        # The machine is shared, so its speed drifts over minutes: each end-to-end run is compared with raw
        # runs measured right before and right after it, and the ratio uses their mean.
        raw = raw_decode_layout(ckpt, args.batch, threads, precision, args.raw_seconds)
        print(f"raw decoder forward               {raw:9.1f} img/s")
        # The ratio runs leave Ray's dashboard off: it is monitoring, not generation, and on 2 cores its
        # processes take ~2.5% of the CPU. The last run shows what it costs with the dashboard on.
        runs = [("webdataset", False), ("parquet", False), ("webdataset", True)]
        ratios: dict[str, list[float]] = {}
        for _ in range(args.repeats):
            for fmt, dashboard in runs:
                r = end_to_end(ckpt, fmt, args.count, args.batch, precision, tmp, dashboard, args.sampler)
                after = raw_decode_layout(ckpt, args.batch, threads, precision, args.raw_seconds)
                label = f"{fmt}/png" + (" + dashboard" if dashboard else "")
                ratio = r["ips"] / ((raw + after) / 2)
                ratios.setdefault(label, []).append(ratio)
                print(
                    f"generate {label:<24} {r['ips']:9.1f} img/s",
                    f"  ratio to raw {ratio:.3f}" + ("" if dashboard else " (target >= 0.95)"),
                )
                print(f"  {breakdown(r)}")
                print(f"raw decoder forward               {after:9.1f} img/s")
                raw = after
        if args.repeats > 1:
            print(f"\nmedian ratio over {args.repeats} repeats:")
            for label, values in ratios.items():
                print(f"  {label:<24} {float(np.median(values)):.3f}  ({min(values):.3f}-{max(values):.3f})")
        if args.skip_memory:
            return
        tiny = make_checkpoint(tmp / "tiny", "tiny")
        print("\npeak RSS (MB), tiny preset, webdataset/png:")
        for count in (20_000, 200_000):  # the 2e4 against 2e5
            r = end_to_end(tiny, "webdataset", count, args.batch, precision, tmp)
            print(
                f"  count {count:>9,}: driver {r['driver_peak_mb']:7.1f}",
                f"actors max {r['actor_peak_mb']:7.1f}",
            )


if __name__ == "__main__":
    main()
