"""Shared fixtures: one local Ray instance for every Ray test, started on first use, shut down at the end."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """Start ONE local Ray for the whole session; vaeforge.train.init_ray reuses an initialised Ray.

    Twice the cores in logical CPUs (4 on the 2-core CI machine): one train worker asks for every local
    core, so this leaves room for Ray Train's controller and helper actors and the progress queue
    (RAY-NOTES: CPU starvation hangs silently).
    The temp dir is short because Ray's unix sockets live under it (sun_path holds ~107 bytes).

    The dashboard is ON (on the first free port from 8265): Ray Train V2's PlacementGroupCleaner asks
    the state API whether the controller is alive. Without our own dashboard that API still points at
    127.0.0.1:8265, so on a machine where another Ray serves a dashboard there, the cleaner finds no
    such controller, takes it for dead and removes the live run's placement group: the worker dies
    mid-training ("Destroying worker since its placement group was removed").
    """
    import ray

    tmp = tempfile.mkdtemp(prefix="vft", dir="/tmp")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_AUTH_MODE", "disabled")  # no token file; every process of this cluster agrees
        env.setenv("RAY_TMPDIR", tmp)
        env.delenv("RAY_ADDRESS", raising=False)  # never join a cluster that happens to be around
        ray.init(
            num_cpus=max(4, 2 * (os.cpu_count() or 1)),
            include_dashboard=True,
            log_to_driver=False,
            _temp_dir=tmp,
        )
        try:
            yield
        finally:
            ray.shutdown()
            shutil.rmtree(tmp, ignore_errors=True)
