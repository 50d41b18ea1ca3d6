"""`vaeforge generate` driver: deterministic shard plan, Ray actor pool with our own shard ledger, manifest.

Exactly once: a worker writes each shard under a temp name, fsyncs and renames it; only then does the
driver append it to the ledger (fsynced). A re-run keeps ledgered shards whose files are intact, redoes
everything else, and writes _manifest.json and _SUCCESS last.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import resource
import shutil
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vaeforge import __version__
from vaeforge.checkpoint import MODEL_FILE, load_vae, resolve_checkpoint
from vaeforge.cluster import init_ray, joins_cluster
from vaeforge.config import GenerateConfig
from vaeforge.errors import UserError
from vaeforge.generate_worker import ShardTask, ShardWorker, shard_exists
from vaeforge.writers import clean_stale_temps, shard_name

STATE_DIR = ".vaeforge"  # plan.json + ledger.jsonl: what makes a re-run a resume
# Leading underscores: pyarrow, pandas and Ray Data skip such files when they read the directory.
MANIFEST, SUCCESS = "_manifest.json", "_SUCCESS"
Progress = Callable[[dict[str, Any]], None]


@dataclass
class GenerateResult:
    output: Path
    shards: int
    images: int
    bytes: int
    seconds: float
    resumed_shards: int

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def checkpoint_identity(checkpoint: str) -> tuple[str, str]:
    """(checkpoint directory, sha256 of its model.pt): the provenance every sample and the manifest carry."""
    d = resolve_checkpoint(checkpoint, "best")
    h = hashlib.sha256()
    with open(d / MODEL_FILE, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return str(d), h.hexdigest()


def plan_shards(cfg: GenerateConfig) -> list[ShardTask]:
    """Shard i holds samples 0..count_i-1; every shard is full but the last."""
    out = Path(cfg.output)
    return [
        ShardTask(
            i,
            min(cfg.shard_size, cfg.count - i * cfg.shard_size),
            str(out / shard_name(cfg.prefix, i, cfg.format)),
        )
        for i in range(cfg.num_shards)
    ]


def _plan_record(cfg: GenerateConfig, sha: str) -> dict[str, Any]:
    return {"vaeforge_version": __version__, "checkpoint_sha256": sha, **cfg.plan_dict()}


def prepare_output(cfg: GenerateConfig, sha: str) -> dict[int, dict[str, Any]]:
    """Apply the output-dir rules; returns the ledger of shards already done (empty for a fresh run)."""
    out = Path(cfg.output)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {out} is a file; give a directory")
    state = out / STATE_DIR
    plan = _plan_record(cfg, sha)
    if out.is_dir() and any(out.iterdir()):
        previous = _read_json(state / "plan.json")
        if cfg.overwrite:
            _remove_run(out, cfg)
        elif previous is None:
            raise UserError(f"{out} is not empty and holds no vaeforge generate run; pick another --output")
        elif previous != plan:
            changed = sorted(k for k in plan if previous.get(k) != plan[k])
            raise UserError(
                f"{out} holds a run with a different {', '.join(changed)}; pass --overwrite to replace it"
            )
    state.mkdir(parents=True, exist_ok=True)
    _write_json(state / "plan.json", plan)
    clean_stale_temps(out)
    return _read_ledger(state / "ledger.jsonl")


def _remove_run(out: Path, cfg: GenerateConfig) -> None:
    """--overwrite removes what a generate run writes, nothing else of the user's."""
    for p in out.iterdir():
        if (
            p.name in (STATE_DIR, MANIFEST, SUCCESS)
            or p.name.startswith(f"{cfg.prefix}-")
            or ".tmp" in p.name
        ):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    for p in out.glob("*-[0-9][0-9][0-9][0-9][0-9][0-9].*"):  # shards of an earlier --prefix
        p.unlink()


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_ledger(path: Path) -> dict[int, dict[str, Any]]:
    """Ledger lines are appended after each commit; a torn last line (killed mid-append) is ignored.

    Shards are looked up by name in the directory being resumed, not at the recorded path: a run that
    was moved or copied must not count shards that exist only where it was first written.
    """
    done: dict[int, dict[str, Any]] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            rec["path"] = str(path.parent.parent / Path(rec["path"]).name)
            if shard_exists(rec["path"], rec["bytes"]):
                done[rec["index"]] = rec
    return done


class Ledger:
    """Append-only record of committed shards; each line is fsynced before the shard counts as done."""

    def __init__(self, path: Path, done: dict[int, dict[str, Any]]) -> None:
        self.path, self.done = path, dict(done)
        # Rewrite with only the verified entries, so a redone shard never appears twice.
        with open(path, "w") as f:
            f.writelines(json.dumps(done[i], sort_keys=True) + "\n" for i in sorted(done))
            f.flush()
            os.fsync(f.fileno())
        self.f = open(path, "a")  # noqa: SIM115 - held open for the whole run, closed in close()

    def record(self, info: dict[str, Any]) -> None:
        self.f.write(json.dumps(info, sort_keys=True) + "\n")
        self.f.flush()
        os.fsync(self.f.fileno())
        self.done[info["index"]] = info

    def close(self) -> None:
        self.f.close()


def run_generate(cfg: GenerateConfig, progress: Progress | None = None) -> GenerateResult:
    """Everything `vaeforge generate` does after option parsing."""
    notify = progress or (lambda event: None)
    cfg = dataclasses.replace(cfg, output=str(Path(cfg.output).expanduser().resolve()))
    ckpt_dir, sha = checkpoint_identity(cfg.checkpoint)
    load_vae(ckpt_dir)  # fail here, with one line, rather than in every actor
    done = prepare_output(cfg, sha)
    tasks = plan_shards(cfg)
    todo = [t for t in tasks if t.index not in done]
    if todo:  # the shard set is about to change: nothing may claim completeness until the manifest is new
        for name in (SUCCESS, MANIFEST):
            (Path(cfg.output) / name).unlink(missing_ok=True)
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
    ledger = Ledger(Path(cfg.output) / STATE_DIR / "ledger.jsonl", done)
    stats: dict[str, Any] = {"actor_peak_mb": 0.0}
    try:
        if todo:
            _run_pool(cfg, ckpt_dir, sha[:16], todo, ledger, notify, stats)
    finally:
        ledger.close()
    wall = time.perf_counter() - t0
    seconds = stats.get("generate_seconds", wall)
    _write_manifest(cfg, ckpt_dir, sha, tasks, ledger.done)
    made = sum(ledger.done[t.index]["count"] for t in todo)
    result = GenerateResult(
        Path(cfg.output), len(tasks), made, sum(r["bytes"] for r in ledger.done.values()), seconds, len(done)
    )
    # Observability, kept out of the manifest so that the manifest stays byte-reproducible.
    stats.update(
        images=made, seconds=seconds, images_per_s=result.images_per_s, driver_peak_mb=_peak_rss_mb()
    )
    _write_json(Path(cfg.output) / STATE_DIR / "stats.json", stats)
    return result


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _write_manifest(cfg: GenerateConfig, ckpt_dir: str, sha: str, tasks: list[ShardTask], done: dict) -> None:
    shards = [
        {k: done[t.index][k] for k in ("index", "path", "count", "bytes", "sha256", "node_id")} for t in tasks
    ]
    for s in shards:
        s["path"] = Path(s["path"]).name  # relative: the directory can be moved or synced elsewhere
    manifest = {
        "vaeforge_version": __version__,
        "checkpoint": ckpt_dir,
        "checkpoint_sha256": sha,
        "config": cfg.plan_dict(),
        "seed": cfg.seed,
        "count": cfg.count,
        "format": cfg.format,
        "image_format": cfg.image_format,
        "shards": shards,
    }
    out = Path(cfg.output)
    _write_json(out / MANIFEST, manifest)
    (out / SUCCESS).write_text("")


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
    ledger: Ledger,
    notify: Progress,
    stats: dict,
) -> None:
    """Keep every actor busy with one shard at a time; replace dead actors; retry failed shards."""
    import ray

    info = init_ray(cfg.address, 1.0)
    notify({"kind": "ray", **info})
    n_actors, resources, threads = _worker_plan(cfg)
    actor_cls = ray.remote(max_restarts=0)(_RayShardWorker).options(**resources)

    spawned: list[Any] = []

    def spawn() -> Any:
        spawned.append(actor_cls.remote(ckpt, cfg, threads, ckpt_id))
        return spawned[-1]

    queue, running = deque(todo), {}
    idle = [spawn() for _ in range(min(n_actors, len(todo)))]
    notify({"kind": "workers", "n": len(idle), "threads": threads, **ray.get(idle[0].info.remote())})
    t0 = time.perf_counter()  # throughput counts from the first ready actor: Ray start-up is not generation
    try:
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
            ledger.record(result)
            notify({"kind": "shard", **result})
        stats["generate_seconds"] = time.perf_counter() - t0
        stats["actor_peak_mb"] = max(ray.get([a.peak_rss_mb.remote() for a in idle]), default=0.0)
    finally:
        for a in spawned:
            ray.kill(a, no_restart=True)


class _RayShardWorker(ShardWorker):
    """ShardWorker as a Ray actor: the same work, plus the node id every shard's provenance records."""

    def __init__(self, *args: Any) -> None:
        import ray

        super().__init__(*args)
        self.node_id = ray.get_runtime_context().get_node_id()


def _retry(task: ShardTask, cfg: GenerateConfig, why: str) -> ShardTask:
    if task.attempt >= cfg.max_retries:
        raise UserError(
            f"shard {task.index} ({Path(task.path).name}) failed {task.attempt + 1} times, last: {why}; "
            "completed shards are kept, fix the cause and re-run the same command to resume"
        )
    return dataclasses.replace(task, attempt=task.attempt + 1)


def _raise_if_disk_full(e: Exception, task: ShardTask, cfg: GenerateConfig) -> None:
    cause = getattr(e, "cause", None)
    if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
        raise UserError(
            f"disk full while writing shard {task.index} to {cfg.output}; completed shards are kept and "
            "nothing partial is marked done: free space and re-run the same command to resume"
        )
