"""Two Ray nodes on this machine, one S3 server: `ray job submit` runs jobs/train.py with 2 DDP workers, one
per node, then jobs/generate.py with 2 actors, one per node, both reading and writing s3:// only. The outputs
are read back with the real readers, and the manifest shows shards from both nodes of this cluster.

The cluster is this test's own (not the session's Ray): both `ray start` processes get their own
RAY_TMPDIR, RAY_AUTH_MODE=disabled, free ports for everything Ray would otherwise take a fixed port for
(the dashboard agent's 52365 clashes with other Rays on a shared machine), and the moto S3 variables, so
that workers on either node reach the bucket. Each node has 1 logical CPU and each train worker and each
generate actor asks for 1 CPU on a joined cluster, so the placement is one per node by construction.
Teardown kills exactly the processes that carry this cluster's RAY_TMPDIR (never `ray stop`: it stops
every Ray process of the machine, found by name, whatever RAY_TMPDIR says).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from entrypoints import REPO
from PIL import Image
from test_jobs import _free_ports, _kill_processes_with_env

from vaeforge import storage
from vaeforge.checkpoint import load_vae

RAY = str(Path(sys.executable).parent / "ray")
# Every port a node would otherwise pick on its own, a fixed default included.
NODE_PORTS = (
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "metrics-export-port",
    "runtime-env-agent-port",
    "node-manager-port",
    "object-manager-port",
)
HEAD_PORTS = ("port", "dashboard-port", "ray-client-server-port", *NODE_PORTS)
# No --node-ip-address: Ray maps 127.0.0.1 to the machine's own address anyway (resolve_ip_for_localhost),
# so both nodes register under that address and talk to each other on this machine only.
COMMON = [
    "--num-cpus=1",
    "--num-gpus=0",
    "--object-store-memory=200000000",
    "--min-worker-port=0",  # 0/0: workers bind ports the OS picks, not the shared 10002-19999 range
    "--max-worker-port=0",
    "--disable-usage-stats",
]
IMAGES, COUNT, SHARD = 320, 200, 25
# A raylet gives its dashboard agent ~15 s to report its ports, then aborts (Ray 2.60); on a loaded machine
# the agent's imports alone were seen to take longer, so a failed start is retried on fresh ports.
START_ATTEMPTS = 3


@dataclass
class Cluster:
    dashboard: str  # http://127.0.0.1:PORT, for `ray job submit` and the state API
    env: dict[str, str]  # the environment every command against this cluster runs with
    node_ids: set[str]


def ray_cli(cluster_env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([RAY, *args], env=cluster_env, capture_output=True, text=True, timeout=timeout)


def alive_nodes(dashboard: str, env: dict[str, str]) -> list[dict]:
    done = ray_cli(env, "list", "nodes", "--address", dashboard, "--format", "json", "--detail")
    if done.returncode != 0:
        return []
    try:
        return [n for n in json.loads(done.stdout) if n["state"] == "ALIVE"]
    except ValueError:
        return []


@pytest.fixture
def two_nodes(s3_bucket: str) -> Iterator[Cluster]:
    """A head and one worker node, 1 CPU each, on this machine; the S3 variables are in both nodes' env."""
    ray_tmp = tempfile.mkdtemp(prefix="vfm", dir="/tmp")  # short: Ray's unix socket paths live under it
    venv_bin = str(Path(sys.executable).parent)  # the job's `python` is this interpreter
    env = {
        **os.environ,  # with the AWS_* variables s3_bucket set
        "RAY_TMPDIR": ray_tmp,
        "RAY_AUTH_MODE": "disabled",
        # Ray gives the dashboard 60 s to come up, which a busy 2-core machine was seen to need and more.
        "RAY_DASHBOARD_STARTUP_TIMEOUT_S": "240",
        "VAEFORGE_CACHE": f"{ray_tmp}/cache",  # the workers' copies of the remote checkpoint
        "PATH": f"{venv_bin}:{os.environ['PATH']}",
    }
    env.pop("RAY_ADDRESS", None)
    marker = f"RAY_TMPDIR={ray_tmp}"
    try:
        for attempt in range(1, START_ATTEMPTS + 1):
            started = start_cluster(env)
            if isinstance(started, Cluster):
                break
            _kill_processes_with_env(marker)  # a half-started cluster: start again on fresh ports
            if attempt == START_ATTEMPTS:
                pytest.fail(f"the 2-node cluster did not start in {attempt} attempts; last:\n{started}")
        yield started
    finally:
        _kill_processes_with_env(marker)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def start_cluster(env: dict[str, str]) -> Cluster | str:
    """`ray start` a head and a worker node on free ports; the Cluster, or why it did not start."""
    head_ports = dict(zip(HEAD_PORTS, _free_ports(len(HEAD_PORTS)), strict=True))
    worker_ports = dict(zip(NODE_PORTS, _free_ports(len(NODE_PORTS)), strict=True))
    head = [RAY, "start", "--head", *COMMON, "--include-dashboard=true", "--dashboard-host=127.0.0.1"]
    head += [f"--{k}={v}" for k, v in head_ports.items()]
    worker = [RAY, "start", f"--address=127.0.0.1:{head_ports['port']}", *COMMON]
    worker += [f"--{k}={v}" for k, v in worker_ports.items()]
    dashboard = f"http://127.0.0.1:{head_ports['dashboard-port']}"
    for cmd in (head, worker):
        try:
            done = subprocess.run(
                cmd, env=env, cwd=env["RAY_TMPDIR"], capture_output=True, text=True, timeout=300
            )
        except subprocess.TimeoutExpired as e:
            return f"{' '.join(cmd)}\ntimed out\n{e.stdout}\n{e.stderr}"
        if done.returncode != 0:
            return f"{' '.join(cmd)}\n{done.stdout}\n{done.stderr}"
    deadline = time.monotonic() + 120
    while len(nodes := alive_nodes(dashboard, env)) < 2 and time.monotonic() < deadline:
        time.sleep(2)
    if len(nodes) != 2 or any(n["resources_total"].get("CPU") != 1 for n in nodes):
        return f"expected 2 alive nodes of 1 CPU, got {nodes}"
    return Cluster(dashboard, env, {n["node_id"] for n in nodes})


def submit(cluster: Cluster, script: str, *args: str, timeout: float = 300) -> str:
    """`ray job submit --working-dir . -- python jobs/SCRIPT ARGS`: its logs, or a failure showing them."""
    job_id = f"vaeforge-multinode-{uuid.uuid4().hex[:8]}"
    cmd = [RAY, "job", "submit", "--address", cluster.dashboard, "--submission-id", job_id]
    cmd += ["--working-dir", ".", "--", "python", f"jobs/{script}", *args]
    try:
        done = subprocess.run(cmd, cwd=REPO, env=cluster.env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        logs = ray_cli(cluster.env, "job", "logs", "--address", cluster.dashboard, job_id).stdout
        pytest.fail(f"{script} did not finish in {timeout} s; job logs:\n{logs}\n{e.stdout}\n{e.stderr}")
    status = ray_cli(cluster.env, "job", "status", "--address", cluster.dashboard, job_id)
    ok = done.returncode == 0 and "succeeded" in status.stdout.lower()
    assert ok, f"{script} failed (rc {done.returncode}):\n{done.stdout}\n{done.stderr}\n{status.stdout}"
    return done.stdout


def train_worker_nodes(cluster: Cluster) -> list[str]:
    """The node of every Ray Train worker actor this cluster ran (the state API keeps dead actors)."""
    args = ["list", "actors", "--address", cluster.dashboard, "--format", "json", "--detail"]
    done = ray_cli(cluster.env, *args, "--filter", "class_name=RayTrainWorker", "--limit", "100")
    assert done.returncode == 0, done.stdout + done.stderr
    return [a["node_id"] for a in json.loads(done.stdout)]


def upload_parquet(location: str, n: int) -> None:
    """n small noisy PNGs in two labelled tints, as one Parquet object (image bytes + label)."""
    rng = np.random.default_rng(0)
    labels = [i % 2 for i in range(n)]
    images = []
    for label in labels:
        tint = (200, 60, 60) if label else (60, 60, 200)
        rgb = np.clip(rng.normal(tint, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format="PNG")
        images.append(buf.getvalue())
    out = io.BytesIO()
    pq.write_table(pa.table({"image": images, "label": labels}), out)
    storage.write_bytes(location, out.getvalue())


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_train_and_generate_jobs_span_two_nodes_on_s3(
    two_nodes: Cluster, s3_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import webdataset

    monkeypatch.setenv("VAEFORGE_CACHE", str(tmp_path / "cache"))  # this process's copy of the checkpoint
    data = storage.join(s3_prefix, "data", "train.parquet")
    run, shards = storage.join(s3_prefix, "run"), storage.join(s3_prefix, "shards")
    upload_parquet(data, IMAGES)

    train = ["--preset", "tiny", "--epochs", "1", "--batch-size", "16", "--data", data, "--output", run]
    train += ["--workers", "2", "--precision", "fp32"]
    submit(two_nodes, "train.py", *train)
    workers = train_worker_nodes(two_nodes)  # DDP spans both nodes: one 1-CPU rank per 1-CPU node
    assert sorted(workers) == sorted(two_nodes.node_ids), (workers, two_nodes.node_ids)
    loaded = load_vae(run)  # the best checkpoint, through a local copy of the s3 objects
    assert loaded.location.startswith(storage.join(run, "checkpoints", "epoch0001_step")), loaded.location
    z = torch.zeros(2, loaded.model.config.latent_dim)
    assert loaded.model.decoder(z).shape == (2, 3, 64, 64)
    rows = [json.loads(r) for r in storage.read_text(storage.join(run, "metrics.jsonl")).splitlines()]
    assert [r["epoch"] for r in rows] == [1] and np.isfinite(rows[0]["val_loss"]), rows

    gen = ["--checkpoint", run, "--output", shards, "--count", str(COUNT), "--shard-size", str(SHARD)]
    gen += ["--workers", "2", "--precision", "fp32"]
    submit(two_nodes, "generate.py", *gen)

    assert storage.read_bytes(storage.join(shards, "_SUCCESS")) == b""
    manifest = json.loads(storage.read_text(storage.join(shards, "_manifest.json")))
    listed = manifest["shards"]
    assert len(listed) == COUNT // SHARD and sum(s["count"] for s in listed) == COUNT
    assert manifest["checkpoint"] == loaded.location
    copy = tmp_path / "shards"
    for s in listed:
        storage.download(storage.join(shards, s["path"]), copy / s["path"])
        blob = (copy / s["path"]).read_bytes()
        assert len(blob) == s["bytes"] and hashlib.sha256(blob).hexdigest() == s["sha256"], s["path"]
    samples = list(webdataset.WebDataset([str(copy / s["path"]) for s in listed], shardshuffle=False))
    assert len(samples) == COUNT and len({s["__key__"] for s in samples}) == COUNT
    for sample in samples:
        image = Image.open(io.BytesIO(sample["png"]))
        assert image.size == (64, 64) and image.mode == "RGB", sample["__key__"]

    # Work ran on both nodes: one 1-CPU actor per 1-CPU node, each shard records its actor's node.
    nodes = {s["node_id"] for s in listed}
    assert len(nodes) == 2 and nodes == two_nodes.node_ids, (nodes, two_nodes.node_ids)
