"""One generation worker: loads the decoder once, turns shard tasks into committed shard files. No Ray here.

generate.py wraps this class in a Ray actor; tests and benchmarks can drive it directly.
"""

from __future__ import annotations

import contextlib
import os
import resource
import time
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from vaeforge import storage
from vaeforge.checkpoint import load_vae
from vaeforge.config import GenerateConfig
from vaeforge.encode import EncoderPool, encode_batch, extension
from vaeforge.model import inference_decoder
from vaeforge.runtime import autocast, claim_cpu, resolve_precision, to_uint8_hwc
from vaeforge.sampling import make_sampler, shard_labels
from vaeforge.writers import clean_dead_staging, make_writer

LATENT_SPAN = 2048  # samples whose latents are drawn in one sampler call (see _latent_batches)
MIN_DECODE_ROWS = 16  # smaller batches are padded to this many rows (see ShardWorker.decode)
FAILURE_ENV = "VAEFORGE_INJECT_FAILURE"  # "SHARD[:TIMES][:crash]" for fault-injection tests


@dataclass(frozen=True)
class ShardTask:
    index: int
    count: int
    path: str  # final path of the shard file
    attempt: int = 0
    class_counts: tuple[int, ...] | None = None  # a conditional model's samples per class in this shard


def sample_key(shard: int, index: int) -> str:
    """Keys carry no dots (WebDataset splits on the first one) and sort in generation order."""
    return f"{shard:06d}_{index:06d}"


class ShardWorker:
    """Decodes latents in batches, encodes on a thread pool while the next batch decodes, writes one shard."""

    def __init__(self, checkpoint: str, cfg: GenerateConfig, threads: int, checkpoint_id: str) -> None:
        claim_cpu(threads)
        if storage.is_uri(cfg.output):
            clean_dead_staging()  # shards staged for upload by an actor killed on this node earlier
        self.device = torch.device(
            "cuda" if torch.cuda.is_available() and cfg.use_gpu is not False else "cpu"
        )
        loaded = load_vae(checkpoint, map_location=self.device)
        # BatchNorm folded and LeakyReLU fused into the convs: the same images to rounding, faster on a
        # CPU (model.inference_decoder; bench/bench_decoder.py measures it)
        self.decoder = inference_decoder(loaded.model.decoder).to(
            self.device, memory_format=torch.channels_last
        )
        self.latent_dim = loaded.model.config.latent_dim
        # An unconditional model's labels (from a per-class mixture) choose z, never reach the decoder.
        self.conditional = loaded.model.config.num_classes > 0
        self.class_names = list(loaded.meta.get("data", {}).get("classes") or [])
        self.sampler = make_sampler(cfg.sampler, loaded.path, self.latent_dim, cfg.temperature)
        self.cfg, self.checkpoint_id = cfg, checkpoint_id
        self.precision = resolve_precision(cfg.precision, self.device)
        n_encoders = (
            cfg.encode_threads if cfg.encode_threads is not None else 2 * (self.device.type == "cuda")
        )
        self.encoders = EncoderPool(n_encoders) if n_encoders else None
        self.node_id = "local"  # the Ray actor subclass in generate.py records its node

    def info(self) -> dict[str, Any]:
        return {
            "device": str(self.device),
            "precision": self.precision,
            "node_id": self.node_id,
            "pid": os.getpid(),
        }

    def peak_rss_mb(self) -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB

    @torch.inference_mode()
    def decode(self, z: np.ndarray, labels: np.ndarray | None = None) -> np.ndarray:
        """(B, D) latents (+ (B,) labels for a conditional model) -> (B, H, W, 3) uint8.

        Fewer than MIN_DECODE_ROWS latents are padded to that many (copies of the last) and the copies
        dropped: oneDNN picks other fp32 kernels for batches of 1-3, whose last-bit differences flip a
        pixel's rounding now and then, and a shard's last batch, or one sample regenerated alone, must
        give the bytes a full batch gives.
        """
        n = len(z)
        if 0 < n < MIN_DECODE_ROWS:
            rows = np.minimum(np.arange(MIN_DECODE_ROWS), n - 1)  # 0, 1, ..., n-1, n-1, n-1
            z = z[rows]
            labels = None if labels is None else labels[rows]
        y = None if labels is None else torch.from_numpy(labels).to(self.device)
        with autocast(self.precision, self.device):
            images = self.decoder(torch.from_numpy(z).to(self.device), y)
        return to_uint8_hwc(images[:n]).numpy()

    def run(self, task: ShardTask) -> dict[str, Any]:
        """Write shard `task` under a temp name and commit it atomically; returns its ShardInfo as a dict."""
        _maybe_fail(task)
        cfg = self.cfg
        ext = extension(cfg.image_format)
        writer = make_writer(cfg.format, task.path, image_ext=ext)
        labels = None if task.class_counts is None else shard_labels(task.class_counts)
        clock = PhaseClock()
        try:
            pending = None  # (start, labels, future) of the batch being encoded while the next one decodes
            for start, z, y in clock.iterate("latents", self._latent_batches(task, labels)):
                with clock("decode"):
                    images = self.decode(z, y if self.conditional else None)
                with clock("encode"):  # inline encoding, or only the hand-off to the encoder threads
                    future = self._encode(images)
                if pending is not None:
                    with clock("write"):  # includes waiting for the encoder threads, if any
                        self._write(writer, task, *pending)
                pending = (start, y, future)
            if pending is not None:
                with clock("write"):
                    self._write(writer, task, *pending)
            with clock("commit"):
                info = writer.commit()
        except BaseException:
            writer.abort()
            raise
        # Device and precision are provenance: bf16 and fp32, or a GPU and a CPU, round differently, so
        # byte-identity across a resume holds for the same device kind and precision, and this says which.
        return {
            **asdict(info),
            "index": task.index,
            "node_id": self.node_id,
            "device": self.device.type,
            "precision": self.precision,
            "attempt": task.attempt,
            # observability for stats.json, dropped from the done records by the driver
            "seconds": clock.seconds(),
            "span": (clock.started, time.time()),  # wall clock, to place the shard in the run's window
        }

    def _latent_batches(
        self, task: ShardTask, labels: np.ndarray | None
    ) -> Iterator[tuple[int, np.ndarray, np.ndarray | None]]:
        """(start, latents, labels) per decode batch of the shard.

        Latents are drawn LATENT_SPAN samples at a time and cut into batches: the mixture sampler's cost
        per sample halves from 256 to 2,048 samples a call (its factors are read once per component per
        call). Each sample's latent depends only on (seed, shard, index[, label]), so the span changes no
        bytes; it bounds the memory (2,048 x 512 float32 is 4 MB).
        """
        bs = self.cfg.batch_size
        span = max(bs, LATENT_SPAN // bs * bs)  # whole batches
        for s0 in range(0, task.count, span):
            m = min(span, task.count - s0)
            ys = None if labels is None else labels[s0 : s0 + m]
            zs = self.sampler(self.cfg.seed, task.index, s0, m, ys)
            for b in range(0, m, bs):
                yield s0 + b, zs[b : b + bs], None if ys is None else ys[b : b + bs]

    def _encode(self, images: np.ndarray) -> Any:
        """Hand the batch to the encoder threads, or encode it right here when there are none."""
        if self.encoders is not None:
            return self.encoders.submit_batch(images, self.cfg.image_format, self.cfg.quality)
        done: Future[list[bytes]] = Future()
        done.set_result(encode_batch(images, self.cfg.image_format, self.cfg.quality))
        return done

    def _write(
        self, writer: Any, task: ShardTask, start: int, labels: np.ndarray | None, future: Any
    ) -> None:
        for j, data in enumerate(future.result()):
            i = start + j
            label = None if labels is None else int(labels[j])
            meta = {
                "seed": self.cfg.seed,
                "shard": task.index,
                "index": i,
                "sampler": self.cfg.sampler,
                "temperature": self.cfg.temperature,
                "checkpoint": self.checkpoint_id,
                "label": label,
            }
            if label is not None and label < len(self.class_names):
                meta["class"] = self.class_names[label]
            writer.write(sample_key(task.index, i), data, meta)


class PhaseClock:
    """Wall seconds a shard spends in each phase of the pipeline, and in all of it ("total").

    Summed over shards into stats.json, so that a slow run says where its time went (decode against
    everything else) without a profiler. A handful of perf_counter calls per batch.
    """

    def __init__(self) -> None:
        self._t0, self.started = time.perf_counter(), time.time()
        self._spent: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self._spent[phase] = self._spent.get(phase, 0.0) + time.perf_counter() - t

    def iterate(self, phase: str, items: Iterator[Any]) -> Iterator[Any]:
        """Yield from `items`, charging the time spent producing each item to `phase`."""
        while True:
            with self(phase):
                item = next(items, _END)
            if item is _END:
                return
            yield item

    def seconds(self) -> dict[str, float]:
        return {**self._spent, "total": time.perf_counter() - self._t0}


_END = object()


def _maybe_fail(task: ShardTask) -> None:
    """Fault injection for tests: fail shard N for its first TIMES attempts, by raising or by crashing."""
    spec = os.environ.get(FAILURE_ENV)
    if not spec:
        return
    parts = spec.split(":")
    shard, times = int(parts[0]), int(parts[1]) if len(parts) > 1 and parts[1] else 10**9
    if task.index == shard and task.attempt < times:
        if "crash" in parts[2:]:
            os._exit(1)  # a dying actor, as an OOM kill or a lost node looks to the driver
        raise RuntimeError(f"injected failure in shard {shard} (attempt {task.attempt})")
