"""`vaeforge generate` driver: deterministic shard plan, Ray actor pool with our own done records, manifest.

Exactly once, locally or on an object store: a worker writes each shard to a local temp file, then
renames it into place (local) or uploads it as one object (remote); only then does the driver write the
shard's done record, .vaeforge/done/NNNNNN.json (atomically: rename or one PUT). A re-run keeps shards
whose record exists and whose file has the recorded size, redoes everything else, and writes
_manifest.json and _SUCCESS last.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import math
import os
import re
import resource
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vaeforge import __version__, storage
from vaeforge.checkpoint import load_vae, local_checkpoint
from vaeforge.cluster import init_ray, joins_cluster
from vaeforge.config import GenerateConfig
from vaeforge.errors import UserError
from vaeforge.generate_worker import ShardTask, ShardWorker
from vaeforge.sampling import LATENT_STREAMS, load_fit, parse_classes, shard_class_quotas
from vaeforge.writers import clean_stale_temps, shard_name

STATE_DIR = ".vaeforge"  # plan.json + done/ (one record per finished shard): what makes a re-run a resume
DONE_DIR = "done"
DONE_NAME = re.compile(r"\d{6}\.json")  # done/NNNNNN.json, one per committed shard
_ANY_SHARD = re.compile(r"-\d{6}\.")  # shards of any --prefix
# Leading underscores: pyarrow, pandas and Ray Data skip such files when they read the directory.
MANIFEST, SUCCESS = "_manifest.json", "_SUCCESS"
Progress = Callable[[dict[str, Any]], None]


@dataclass
class GenerateResult:
    output: str  # a local path or a URI
    shards: int
    images: int
    bytes: int
    seconds: float
    resumed_shards: int
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)  # what stats.json holds

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def time_summary(self) -> str | None:
        """Where the actors' time went, in one line; None when no shard was made by this run."""
        spent = self.stats.get("actor_seconds") or {}
        total = spent.get("total", 0.0)
        if total <= 0:
            return None
        phases = sorted(((v, k) for k, v in spent.items() if k != "total"), reverse=True)
        shares = ", ".join(f"{k} {v / total:.1%}" for v, k in phases)
        return f"{self.stats.get('busy_fraction', 0.0):.1%} busy; of that time: {shares}"


def checkpoint_identity(checkpoint: str) -> tuple[str, str]:
    """(checkpoint directory, sha256 of its model.pt): the provenance every sample and the manifest carry."""
    location, model_file = local_checkpoint(checkpoint, "best")
    h = hashlib.sha256()
    with open(model_file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return location, h.hexdigest()


def plan_shards(cfg: GenerateConfig, class_totals: list[int] | None = None) -> list[ShardTask]:
    """Shard i holds samples 0..count_i-1; every shard is full but the last. With class totals (a
    conditional model), each shard also gets its exact share of every class."""
    sizes = [min(cfg.shard_size, cfg.count - i * cfg.shard_size) for i in range(cfg.num_shards)]
    quotas = shard_class_quotas(class_totals, sizes) if class_totals else [None] * len(sizes)
    return [
        ShardTask(i, size, storage.join(cfg.output, shard_name(cfg.prefix, i, cfg.format)), class_counts=q)
        for i, (size, q) in enumerate(zip(sizes, quotas, strict=True))
    ]


def class_totals(
    cfg: GenerateConfig, num_classes: int, meta: dict[str, Any], fit: Any | None
) -> list[int] | None:
    """Samples per class, or None when the samples carry no labels.

    A conditional model always labels its samples (--classes defaults to "all"). An unconditional model
    labels them only when asked with --classes, and then needs a per-class fit (`fit`, the mixture or
    kde that --sampler gmm|kde uses): z drawn from class c's part of it is what makes the image a c,
    since the decoder never sees the label.
    """
    data = meta.get("data", {})
    if num_classes == 0:
        if cfg.classes is None:
            return None
        if fit is None or not fit.per_class:
            raise UserError(
                "--classes needs a conditional model (vaeforge train --conditional), or --sampler gmm "
                "or kde fitted per class (vaeforge fit-sampler --per-class)"
            )
        num_classes = max(len(data.get("classes") or []), max(fit.class_ids()) + 1)
    totals = parse_classes(cfg.classes or "all", num_classes, data.get("class_counts"), cfg.count)
    if fit is not None and fit.per_class:
        missing = [c for c, n in enumerate(totals) if n and c not in fit.class_ids()]
        if missing:
            raise UserError(
                f"--classes asks for class {missing[0]}, which the fitted {cfg.sampler} has no part for; "
                "refit with `vaeforge fit-sampler` on data that has it"
            )
    return totals


def sampler_identity(fit: Any | None) -> dict[str, Any]:
    """What the sampler adds to the plan: a fitted sampler decides the bytes as much as the weights do."""
    streams = {"latent_streams": LATENT_STREAMS}
    if fit is None:
        return streams
    return {
        **streams,
        "sampler_sha256": fit.sha256(),
        "sampler_fit": fit.meta,
        "sampler_transform": fit.transform,
    }


def _plan_record(cfg: GenerateConfig, sha: str, sampler: dict[str, Any]) -> dict[str, Any]:
    return {"vaeforge_version": __version__, "checkpoint_sha256": sha, **sampler, **cfg.plan_dict()}


def prepare_output(cfg: GenerateConfig, sha: str, sampler: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """Apply the output-dir rules; returns the done records of shards already finished (empty if fresh)."""
    out = cfg.output
    storage.require_bucket(out)
    if storage.kind(out) == "file":
        raise UserError(f"--output {out} is a file; give a directory")
    state = storage.join(out, STATE_DIR)
    plan = _plan_record(cfg, sha, sampler)
    if not storage.is_empty(out):
        previous = _read_json(storage.join(state, "plan.json"))
        if cfg.overwrite:
            _remove_run(out, cfg)
        elif previous is None:
            raise UserError(f"{out} is not empty and holds no vaeforge generate run; pick another --output")
        elif previous != plan:
            changed = sorted(k for k in plan if previous.get(k) != plan[k])
            raise UserError(
                f"{out} holds a run with a different {', '.join(changed)}; pass --overwrite to replace it"
            )
    storage.makedirs(storage.join(state, DONE_DIR))
    _write_json(storage.join(state, "plan.json"), plan)
    if not storage.is_uri(out):
        clean_stale_temps(out)  # remote outputs stage on the workers' disks, cleaned by each worker
    return _read_done(out)


def _remove_run(out: str, cfg: GenerateConfig) -> None:
    """--overwrite removes what a generate run writes, nothing else of the user's."""
    for e in storage.iter_files(out, recursive=False):
        if (
            e.name in (MANIFEST, SUCCESS)
            or e.name.startswith(f"{cfg.prefix}-")
            or ".tmp" in e.name
            or _ANY_SHARD.search(e.name)
        ):
            storage.delete(e.location)
    storage.delete_tree(storage.join(out, STATE_DIR))


def _read_json(location: str) -> dict[str, Any] | None:
    try:
        return json.loads(storage.read_text(location))
    except (OSError, ValueError):
        return None


def _write_json(location: str, data: dict[str, Any]) -> None:
    storage.write_bytes(location, json.dumps(data, indent=2, sort_keys=True).encode())


def _done_location(out: str, index: int) -> str:
    return storage.join(out, STATE_DIR, DONE_DIR, f"{index:06d}.json")


def _read_done(out: str) -> dict[int, dict[str, Any]]:
    """Done records whose shard is in `out` with the recorded size; any other shard is redone.

    Records name shards relative to `out`, and the sizes come from listing `out` itself: a run that was
    moved or copied must not count shards that exist only where it was first written.
    """
    sizes = {e.name: e.size for e in storage.iter_files(out, recursive=False)}
    done: dict[int, dict[str, Any]] = {}
    for entry in storage.list_files(storage.join(out, STATE_DIR, DONE_DIR)):
        if not DONE_NAME.fullmatch(entry.name):
            # A record a killed driver wrote but never renamed into place (storage.write_bytes' temp).
            # Its shard is redone and recorded under its own name; the temp itself goes.
            storage.delete(entry.location)
            continue
        rec = _read_json(entry.location)
        if rec is not None and sizes.get(rec.get("path")) == rec.get("bytes"):
            done[rec["index"]] = rec
    return done


class DoneRecords:
    """One small record per committed shard, written only after the shard itself is in place.

    Object stores cannot append, so there is no ledger file: each record is its own object (or file,
    renamed into place), and a shard without one is simply not done.
    """

    def __init__(self, out: str, done: dict[int, dict[str, Any]]) -> None:
        self.out, self.done = out, dict(done)

    def record(self, info: dict[str, Any]) -> None:
        rec = {**info, "path": storage.basename(info["path"])}
        _write_json(_done_location(self.out, rec["index"]), rec)
        self.done[rec["index"]] = rec


def run_generate(cfg: GenerateConfig, progress: Progress | None = None) -> GenerateResult:
    """Everything `vaeforge generate` does after option parsing."""
    notify = progress or (lambda event: None)
    cfg = dataclasses.replace(cfg, output=storage.absolute(cfg.output))
    ckpt_dir, sha = checkpoint_identity(cfg.checkpoint)
    loaded = load_vae(ckpt_dir)  # fail here, with one line, rather than in every actor
    fit = None if cfg.sampler == "prior" else load_fit(str(loaded.path), cfg.sampler)
    totals = class_totals(cfg, loaded.model.config.num_classes, loaded.meta, fit)
    sampler = sampler_identity(fit)
    done = prepare_output(cfg, sha, sampler)
    tasks = plan_shards(cfg, totals)
    todo = [t for t in tasks if t.index not in done]
    if todo:  # the shard set is about to change: nothing may claim completeness until the manifest is new
        for name in (SUCCESS, MANIFEST):
            storage.delete(storage.join(cfg.output, name))
    notify(
        {
            "kind": "plan",
            "shards": len(tasks),
            "count": cfg.count,
            "done": len(done),
            "output": cfg.output,
            "images_done": sum(done[i]["count"] for i in done),
        }
    )
    t0 = time.perf_counter()
    records = DoneRecords(cfg.output, done)
    stats: dict[str, Any] = {"actor_peak_mb": 0.0}
    if todo:
        _run_pool(cfg, ckpt_dir, sha[:16], todo, records, notify, stats)
    wall = time.perf_counter() - t0
    seconds = stats.get("generate_seconds", wall)
    _write_manifest(cfg, ckpt_dir, sha, sampler, tasks, records.done)
    made = sum(records.done[t.index]["count"] for t in todo)
    result = GenerateResult(
        cfg.output, len(tasks), made, sum(r["bytes"] for r in records.done.values()), seconds, len(done)
    )
    # Observability, kept out of the manifest so that the manifest stays byte-reproducible.
    stats.update(
        images=made, seconds=seconds, images_per_s=result.images_per_s, driver_peak_mb=_peak_rss_mb()
    )
    _write_json(storage.join(cfg.output, STATE_DIR, "stats.json"), stats)
    return dataclasses.replace(result, stats=stats)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _write_manifest(
    cfg: GenerateConfig, ckpt_dir: str, sha: str, sampler: dict, tasks: list[ShardTask], done: dict
) -> None:
    shards = [
        {
            k: done[t.index].get(k)
            for k in ("index", "path", "count", "bytes", "sha256", "node_id", "device", "precision")
        }
        for t in tasks
    ]
    # paths are relative (done records hold names): the directory can be moved or synced elsewhere
    manifest = {
        "vaeforge_version": __version__,
        "checkpoint": ckpt_dir,
        "checkpoint_sha256": sha,
        **sampler,
        "config": cfg.plan_dict(),
        "seed": cfg.seed,
        "count": cfg.count,
        "format": cfg.format,
        "image_format": cfg.image_format,
        "shards": shards,
    }
    _write_json(storage.join(cfg.output, MANIFEST), manifest)
    storage.write_bytes(storage.join(cfg.output, SUCCESS), b"")


def _worker_plan(cfg: GenerateConfig) -> tuple[int, dict[str, Any], int]:
    """(number of actors, actor resources, torch threads per actor)."""
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0))
    use_gpu = cfg.use_gpu if cfg.use_gpu is not None else gpus > 0
    if use_gpu:
        # A joined cluster may have no GPU yet because its GPU group autoscales from zero (KubeRay): pending
        # GPU actors are what makes it scale up, so there --workers says how many to ask for.
        if gpus < 1 and not (cfg.workers and joins_cluster(cfg.address)):
            hint = (
                "; on a cluster that adds GPU nodes on demand, also pass --workers N"
                if joins_cluster(cfg.address)
                else ""
            )
            raise UserError(f"--gpus was given but the Ray cluster has no GPU{hint}")
        return cfg.workers or gpus, {"num_gpus": 1, "num_cpus": 1}, 1
    cores = int(ray.cluster_resources().get("CPU", os.cpu_count() or 1))
    n = cfg.workers or cores
    share = max(cores / n, 0.5) if not joins_cluster(cfg.address) else 1.0
    return n, {"num_cpus": min(share, cores)}, max(1, int(share))


def _run_pool(
    cfg: GenerateConfig,
    ckpt: str,
    ckpt_id: str,
    todo: list[ShardTask],
    records: DoneRecords,
    notify: Progress,
    stats: dict,
) -> None:
    """Keep every actor busy with one shard at a time; replace dead actors; retry failed shards.

    A shard counts as done only once its record is written, after its worker returned: the driver, not
    Ray's ActorPool, keeps that account, so a dead actor's shard is redone.
    """
    import ray

    info = init_ray(cfg.address, 1.0, cfg.dashboard)
    notify({"kind": "ray", **info})
    n_actors, resources, threads = _worker_plan(cfg)
    actor_cls = ray.remote(max_restarts=0)(_RayShardWorker).options(**_with_storage_env(resources))

    spawned: list[Any] = []

    def spawn() -> Any:
        spawned.append(actor_cls.remote(ckpt, cfg, threads, ckpt_id))
        return spawned[-1]

    queue, running = deque(todo), {}
    spent: dict[str, float] = {}  # seconds per pipeline phase, over all shards (generate_worker.PhaseClock)
    spans: dict[Any, tuple[float, float]] = {}  # actor -> (first shard start, last shard end), wall clock
    idle = [spawn() for _ in range(min(n_actors, len(todo)))]
    pool_size = len(idle)
    try:
        try:
            first = ray.get(idle[0].info.remote())
        except ray.exceptions.RayActorError as e:  # e.g. the checkpoint does not load on a worker node
            raise UserError(f"a generate worker died while starting: {str(e).splitlines()[0]}") from None
        notify({"kind": "workers", "n": len(idle), "threads": threads, **first})
        t0 = time.perf_counter()  # throughput counts from the first ready actor: start-up is not generation
        wall0 = time.time()
        while queue or running:
            while queue and idle:
                actor, task = idle.pop(), queue.popleft()
                running[actor.run.remote(task)] = (actor, task)
            ready, _ = ray.wait(list(running), num_returns=1)
            actor, task = running.pop(ready[0])
            try:
                result = ray.get(ready[0])
            except ray.exceptions.RayActorError:
                ray.kill(actor, no_restart=True)
                idle.append(spawn())  # a dead actor (OOM, lost node) is replaced; its shard is redone
                queue.appendleft(_retry(task, cfg, "its worker died"))
                continue
            except ray.exceptions.RayTaskError as e:
                _raise_if_disk_full(e, task, cfg)
                idle.append(actor)
                queue.appendleft(_retry(task, cfg, str(e.cause) if e.cause else type(e).__name__))
                continue
            idle.append(actor)
            for phase, sec in result.pop("seconds", {}).items():
                spent[phase] = spent.get(phase, 0.0) + sec
            first, last = spans.get(actor, (math.inf, 0.0))
            begun, ended = result.pop("span", (math.inf, 0.0))
            spans[actor] = (min(first, begun), max(last, ended))
            records.record(result)
            notify({"kind": "shard", **result})
        stats["generate_seconds"] = time.perf_counter() - t0
        # Where the actors' time went, summed over shards; busy_fraction = shard time / (actors x window):
        # what is missing from 1 is start-up lag of later actors, the tail, and dispatch between shards.
        stats["actor_seconds"] = spent
        stats["actors"] = pool_size
        stats["busy_fraction"] = spent.get("total", 0.0) / (pool_size * stats["generate_seconds"])
        if spans:  # the latest first shard start and the earliest last shard end, against the window
            stats["start_lag_s"] = max(a for a, _ in spans.values()) - wall0
            stats["tail_s"] = wall0 + stats["generate_seconds"] - min(b for _, b in spans.values())
        stats["actor_peak_mb"] = max(ray.get([a.peak_rss_mb.remote() for a in idle]), default=0.0)
    finally:
        for a in spawned:
            ray.kill(a, no_restart=True)


def _with_storage_env(options: dict[str, Any]) -> dict[str, Any]:
    """Actor options plus the driver's storage credentials / endpoint (see storage.FORWARDED_ENV): an actor
    on another node, or on a Ray started before they were set, would not see them otherwise."""
    env = storage.forwarded_env()
    if not env:
        return options
    runtime_env = dict(options.get("runtime_env") or {})
    runtime_env["env_vars"] = {**env, **runtime_env.get("env_vars", {})}
    return {**options, "runtime_env": runtime_env}


class _RayShardWorker(ShardWorker):
    """ShardWorker as a Ray actor: the same work, plus the node id every shard's provenance records."""

    def __init__(self, *args: Any) -> None:
        import ray

        super().__init__(*args)
        self.node_id = ray.get_runtime_context().get_node_id()


def _retry(task: ShardTask, cfg: GenerateConfig, why: str) -> ShardTask:
    if task.attempt >= cfg.max_retries:
        raise UserError(
            f"shard {task.index} ({storage.basename(task.path)}) failed {task.attempt + 1} times, "
            f"last: {why}; "
            "completed shards are kept, fix the cause and re-run the same command to resume"
        )
    return dataclasses.replace(task, attempt=task.attempt + 1)


def _raise_if_disk_full(e: Exception, task: ShardTask, cfg: GenerateConfig) -> None:
    cause = getattr(e, "cause", None)
    if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
        # a remote output is staged on the worker's own disk first: that is the disk that filled up
        where = f"a worker's temp dir ({cause.filename})" if storage.is_uri(cfg.output) else cfg.output
        raise UserError(
            f"disk full while writing shard {task.index} to {where}; completed shards are kept and "
            "nothing partial is marked done: free space and re-run the same command to resume"
        )
