"""Shared fixtures: one local Ray instance for every Ray test, one S3-compatible server (moto) for every
remote-storage test, each started on first use and stopped at the end; fault injection for generate."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator

import pytest
from own_ray import kill_ray

S3_BUCKET = "vaeforge-test"
# Runs in its own process: an Arrow S3 call that blocks holding the GIL (a stream's destructor does)
# would starve a server thread in the same process until the request times out.
_MOTO_SERVER = """
import logging, sys
from moto.server import ThreadedMotoServer
logging.getLogger("werkzeug").setLevel(logging.ERROR)
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
sys.stdin.read()  # until the test session closes our stdin
server.stop()
"""


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """Start ONE local Ray for the whole session; vaeforge.train.init_ray reuses an initialised Ray.

    Twice the cores in logical CPUs (4 on the 2-core CI machine): one train worker asks for every local
    core, so this leaves room for Ray Train's controller and helper actors and the progress queue
    (RAY-NOTES: CPU starvation hangs silently).
    The temp dir is short because Ray's unix sockets live under it (sun_path holds ~107 bytes).

    The dashboard is ON, and every process of this Ray is pinned to it (RAY_API_SERVER_ADDRESS), as
    vaeforge.cluster.init_ray pins its own local Rays: Ray Train V2's PlacementGroupCleaner asks the state
    API whether the controller is alive, and unpinned it may ask another Ray on this machine (a training
    run beside the tests), find no such controller and remove the live run's placement group: the worker
    dies mid-training ("Destroying worker since its placement group was removed").
    """
    import ray

    from vaeforge.cluster import DASHBOARD_PORT, free_port

    tmp = tempfile.mkdtemp(prefix="vft", dir="/tmp")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_AUTH_MODE", "disabled")  # no token file; every process of this cluster agrees
        env.setenv("RAY_TMPDIR", tmp)
        env.delenv("RAY_ADDRESS", raising=False)  # never join a cluster that happens to be around
        port = free_port(DASHBOARD_PORT)
        ray.init(
            num_cpus=max(4, 2 * (os.cpu_count() or 1)),
            include_dashboard=True,
            dashboard_port=port,
            runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}},
            log_to_driver=False,
            _temp_dir=tmp,
        )
        try:
            yield
        finally:
            ray.shutdown()
            shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def s3_bucket() -> Iterator[str]:
    """moto's S3 server on loopback with one empty bucket; yields "s3://BUCKET".

    The AWS_* variables stay set for the rest of the session. They are set after the shared Ray may have
    started, so Ray's workers see them only if vaeforge forwards them (runtime_env), as it must on a
    real cluster too. AWS_EC2_METADATA_DISABLED keeps the AWS SDK from probing the instance metadata
    address for credentials.
    """
    import pyarrow.fs as pafs

    server = subprocess.Popen(
        [sys.executable, "-c", _MOTO_SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        port = int(server.stdout.readline())  # type: ignore[union-attr]
        endpoint = f"http://127.0.0.1:{port}"
        with pytest.MonkeyPatch.context() as env:
            for name in ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_REGION"):
                env.delenv(name, raising=False)
            env.setenv("AWS_ENDPOINT_URL", endpoint)
            env.setenv("AWS_ACCESS_KEY_ID", "testing")
            env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
            env.setenv("AWS_DEFAULT_REGION", "us-east-1")
            env.setenv("AWS_EC2_METADATA_DISABLED", "true")
            fs = pafs.S3FileSystem(
                endpoint_override=endpoint,
                access_key="testing",
                secret_key="testing",
                region="us-east-1",
                allow_bucket_creation=True,
            )
            fs.create_dir(S3_BUCKET)
            yield f"s3://{S3_BUCKET}"
    finally:
        server.stdin.close()  # type: ignore[union-attr]
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.fixture
def s3_prefix(s3_bucket: str, request: pytest.FixtureRequest) -> str:
    """A fresh prefix in the test bucket for one test: s3://BUCKET/TEST-NAME-RANDOM."""
    return f"{s3_bucket}/{request.node.name.replace('[', '-').strip(']')}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def inject_failure(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], None]:
    """Make VAEFORGE_INJECT_FAILURE reach the actors of the *shared* Ray.

    Ray workers inherit the raylet's environment, fixed when the shared Ray started, so setting the
    variable in this process now reaches no actor (checked: a task reads None). Ray's per-actor
    runtime_env carries it instead; the driver passes the actor resources from _worker_plan to
    `.options(...)`, so wrapping that adds the env var without touching the product's control flow.
    """
    import vaeforge.generate as generate_mod
    from vaeforge.generate_worker import FAILURE_ENV

    def inject(spec: str) -> None:
        real = generate_mod._worker_plan

        def plan(cfg: object) -> tuple:
            n, resources, threads = real(cfg)  # type: ignore[arg-type]
            return n, {**resources, "runtime_env": {"env_vars": {FAILURE_ENV: spec}}}, threads

        monkeypatch.setattr(generate_mod, "_worker_plan", plan)

    return inject


@pytest.fixture
def own_ray_env() -> Iterator[dict[str, str]]:
    """Environment for a `python -m vaeforge` subprocess that starts a Ray of its own, apart from the shared
    one; on teardown, kills whatever is left of that Ray by pid (never `ray stop`, which stops every Ray)."""
    ray_tmp = tempfile.mkdtemp(prefix="vfg", dir="/tmp")  # short: Ray's socket paths live under it
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_TMPDIR": ray_tmp}
    from vaeforge.generate_worker import FAILURE_ENV

    for name in ("RAY_ADDRESS", FAILURE_ENV):
        env.pop(name, None)
    try:
        yield env
    finally:
        kill_ray(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)
