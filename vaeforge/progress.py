"""Live progress for people: a rich bar on a terminal, plain periodic lines in logs (`ray job logs`, CI)."""

from __future__ import annotations

import os
import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

PLAIN_EVERY_S = 10.0  # without a terminal, one line this often keeps logs readable


def wants_live(console: Console) -> bool:
    """A redrawing bar only where a person watches a real terminal; plain lines everywhere else.

    rich counts a stream as a terminal whenever FORCE_COLOR is set, as CI systems and log collectors often do
    to keep colours. Colours are harmless in `ray job logs`; a bar redrawn in place is not, so this asks the
    stream itself. TTY_INTERACTIVE=1 or 0 (rich's own switch) overrides.
    """
    override = os.environ.get("TTY_INTERACTIVE")
    if override in ("0", "1"):
        return override == "1"
    isatty = getattr(console.file, "isatty", None)
    try:
        return bool(isatty is not None and isatty()) and console.is_interactive
    except ValueError:  # a closed stream (end of a pytest run) is no terminal
        return False


class _Display:
    """Shared plumbing: events are dicts with a "kind", handled by `_on_<kind>`; unknown kinds are ignored."""

    def __init__(self, console: Console | None = None, live: bool | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.live = wants_live(self.console) if live is None else live
        self.progress: Progress | None = None
        self.task = None
        self.last_plain = 0.0

    def __call__(self, event: dict[str, Any]) -> None:
        handler = getattr(self, f"_on_{event['kind']}", None)
        if handler is not None:
            handler(event)

    def _print(self, text: str) -> None:
        (self.progress.console if self.progress else self.console).print(
            text, highlight=False, soft_wrap=True
        )

    def _on_ray(self, e: dict[str, Any]) -> None:
        where = "local Ray" if e["address"] == "local" else f"Ray at {e['address']}"
        self._print(f"ray: {where}" + (f", dashboard {e['dashboard']}" if e.get("dashboard") else ""))

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


class TrainDisplay(_Display):
    """Consumes the training driver's events and shows them."""

    def __init__(self, console: Console | None = None, live: bool | None = None) -> None:
        super().__init__(console, live)
        self.epochs = self.steps = 0

    def _on_data(self, e: dict[str, Any]) -> None:
        self._print(f"data: decoding {e['source']} (cached after the first run)")

    def _on_data_ready(self, e: dict[str, Any]) -> None:
        r = e["report"]
        skipped = ", ".join(f"{n} {why}" for why, n in r["skipped"].items()) or "none"
        cache = "cache hit" if r.get("cache", {}).get("hit") else f"decoded in {r['decode_seconds']:.1f}s"
        classes = f"{len(r['classes'])} classes" if r["labeled"] else "unlabeled"
        self._print(
            f"data: {r['images']} images ({classes}; skipped: {skipped}; {cache}); "
            f"train {e['split']['train']}, held out {e['split']['val']}"
        )

    def _on_start(self, e: dict[str, Any]) -> None:
        self.epochs, self.steps = e["epochs"], e["steps_per_epoch"]
        resumed = f", resuming at epoch {e['epoch']} step {e['step']}" if e["global_step"] else ""
        self._print(
            f"train: {e['world']} worker(s) on {e['device']}, {e['precision']}, "
            f"{self.steps} steps/epoch{resumed}"
        )
        if self.live:
            self.progress = Progress(
                TextColumn("[bold]epoch {task.fields[epoch]}/{task.fields[epochs]}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[ips]:>7.1f} img/s  loss {task.fields[loss]:.2f}"),
                TimeRemainingColumn(),
                console=self.console,
            )
            self.progress.start()
            self.task = self.progress.add_task(
                "train",
                total=self.steps,
                completed=e["step"],
                epoch=e["epoch"],
                epochs=self.epochs,
                ips=0.0,
                loss=float("nan"),
            )

    def _on_step(self, e: dict[str, Any]) -> None:
        if self.progress is not None:
            self.progress.update(
                self.task, completed=e["step"], epoch=e["epoch"], ips=e["images_per_s"], loss=e["loss"]
            )
        elif time.monotonic() - self.last_plain >= PLAIN_EVERY_S:
            self.last_plain = time.monotonic()
            self._print(
                f"epoch {e['epoch']}/{self.epochs} step {e['step']}/{self.steps} "
                f"{e['images_per_s']:.1f} img/s loss {e['loss']:.2f}"
            )

    def _on_epoch(self, e: dict[str, Any]) -> None:
        self._print(
            f"epoch {e['epoch']}/{self.epochs}: train loss {e['train_loss']:.2f} | held-out ELBO loss "
            f"{e['val_loss']:.2f}, MSE {e['val_mse']:.4f}, PSNR {e['val_psnr']:.2f} dB | "
            f"{e['train_images_per_s']:.1f} img/s"
        )

    def _on_fit_sampler(self, e: dict[str, Any]) -> None:
        self._print(
            f"sampler: fitting the gmm mixture on {e['images']['gmm']:,} and the kde on "
            f"{e['images']['kde']:,} training latents of {e['checkpoint']}"
        )


class GenerateDisplay(_Display):
    """Consumes `vaeforge generate` events: shards done, images, images/s and ETA."""

    def __init__(self, console: Console | None = None, live: bool | None = None) -> None:
        super().__init__(console, live)
        self.shards = self.count = self.done = self.images = self.images_before = 0
        self.t0 = time.monotonic()

    def _on_plan(self, e: dict[str, Any]) -> None:
        self.shards, self.count, self.done = e["shards"], e["count"], e["done"]
        self.images = self.images_before = e["images_done"]
        resumed = f", {e['done']} already complete (resuming)" if e["done"] else ""
        self._print(f"generate: {e['count']:,} images in {e['shards']} shards into {e['output']}{resumed}")

    def _on_workers(self, e: dict[str, Any]) -> None:
        self._print(
            f"workers: {e['n']} actor(s) on {e['device']}, {e['precision']}, {e['threads']} thread(s) each"
        )
        self.t0 = time.monotonic()
        if self.live:
            self.progress = Progress(
                TextColumn("[bold]shards"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total}"),
                TextColumn("{task.fields[images]:>12,} images {task.fields[ips]:>8.1f} img/s"),
                TimeRemainingColumn(),
                console=self.console,
            )
            self.progress.start()
            self.task = self.progress.add_task(
                "gen", total=self.shards, completed=self.done, images=self.images, ips=0.0
            )

    def _on_shard(self, e: dict[str, Any]) -> None:
        self.done += 1
        self.images += e["count"]
        ips = (self.images - self.images_before) / max(time.monotonic() - self.t0, 1e-9)
        if self.progress is not None:
            self.progress.update(self.task, completed=self.done, images=self.images, ips=ips)
        elif time.monotonic() - self.last_plain >= PLAIN_EVERY_S or self.done == self.shards:
            self.last_plain = time.monotonic()
            eta = (self.count - self.images) / ips if ips > 0 else float("nan")
            self._print(
                f"shards {self.done}/{self.shards}, {self.images:,} images, {ips:.1f} img/s, ETA {eta:.0f}s"
            )
