"""What a user sees when the commands run on a cluster: a GPU plan that works on a cluster whose GPU nodes
are added on demand.
"""

from __future__ import annotations

import re

import pytest

import vaeforge.generate as generate_mod
from vaeforge.config import GenerateConfig
from vaeforge.errors import UserError


@pytest.mark.parametrize(
    ("joined", "workers", "expected"),
    [
        (True, 4, (4, {"num_gpus": 1, "num_cpus": 1}, 1)),
        (True, None, "no GPU; on a cluster that adds GPU nodes on demand, also pass --workers N"),
        (False, 4, "--gpus was given but the Ray cluster has no GPU"),
    ],
)
def test_gpu_actors_on_a_cluster_whose_gpu_nodes_come_on_demand(
    monkeypatch: pytest.MonkeyPatch, joined: bool, workers: int | None, expected: tuple | str
) -> None:
    """KubeRay's GPU group starts at zero replicas: pending GPU actors are what makes the autoscaler add
    nodes, so on a joined cluster `--gpus --workers N` must ask for N of them rather than refuse."""
    import ray

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0})  # a CPU head, no GPU node yet
    if joined:
        monkeypatch.setenv("RAY_ADDRESS", "10.0.0.7:6379")
    else:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = GenerateConfig(checkpoint="run", output="out", count=10, use_gpu=True, workers=workers)
    if isinstance(expected, tuple):
        assert generate_mod._worker_plan(cfg) == expected
    else:
        with pytest.raises(UserError, match=re.escape(expected)):
            generate_mod._worker_plan(cfg)
