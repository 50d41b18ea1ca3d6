"""k8s/ and the Dockerfile, checked offline: every manifest validates against the KubeRay v1.7.0 CRD schemas
the way the API server would (with kubectl's strict field validation), keeps the KubeRay rules the schema
cannot express, runs entrypoints the real CLI accepts, and uses the image the Dockerfile builds, at the Ray
pinned in constraints.txt.

The CRDs are shared reference data beside the checkout (`<repo>/../shared/kuberay-crds`), never copied in.
"""

from __future__ import annotations

import copy
import functools
import re
from importlib import metadata
from typing import Any

import pytest
import yaml
from entrypoints import REPO, parse_entrypoint
from jsonschema import Draft7Validator

CRDS = REPO.parent / "shared" / "kuberay-crds"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
K8S = REPO / "k8s"
DNS1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
MAX_NAME = {"RayCluster": 53, "RayJob": 47}  # KubeRay: a RayJob's cluster name adds 6 characters
SECRET, CLAIM, MOUNT = "vaeforge-s3", "vaeforge-data", "/mnt/vaeforge"


def _pin(name: str) -> str:
    text = (REPO / "constraints.txt").read_text()
    return re.search(rf"^{re.escape(name)}==(\S+)$", text, re.M).group(1)


def _docs() -> list[tuple[str, dict]]:
    """(id, object) for every document of every manifest under k8s/."""
    found = []
    for path in sorted(K8S.rglob("*.yaml")):
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc is not None:
                found.append((f"{path.relative_to(K8S)}#{i}", doc))
    return found


DOCS = dict(_docs())
RAY_DOCS = {k: v for k, v in DOCS.items() if v.get("apiVersion") == "ray.io/v1"}
RAYJOBS = {k: v for k, v in RAY_DOCS.items() if v["kind"] == "RayJob"}


def _strict(schema: Any) -> Any:
    """The schema with unknown fields forbidden wherever it lists the known ones.

    The API server prunes unknown fields silently, but `kubectl apply` validates strictly by default and
    rejects them; a typo such as `shutdownAfterJobFinish` must fail here too.
    """
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        lists_fields = "properties" in schema and "additionalProperties" not in schema
        if lists_fields and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
        return schema
    return [_strict(v) for v in schema] if isinstance(schema, list) else schema


@functools.cache
def _validator(kind: str) -> Draft7Validator:
    crd = yaml.safe_load((CRDS / CRD_FILES[kind]).read_text())
    assert crd["spec"]["group"] == "ray.io" and crd["spec"]["names"]["kind"] == kind
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return Draft7Validator(_strict(v1["schema"]["openAPIV3Schema"]))


def crd_errors(doc: dict) -> list[str]:
    """Every way `doc` breaks its kind's v1 schema, as 'path: message' lines (empty when valid)."""
    if not CRDS.is_dir():
        pytest.skip(f"KubeRay CRDs not found at {CRDS}: they live in the shared folder beside the checkout")
    errors = _validator(doc["kind"]).iter_errors(doc)
    return sorted(f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


def cluster_specs(doc: dict) -> dict:
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


def pod_specs(doc: dict) -> list[dict]:
    spec = cluster_specs(doc)
    return [spec["headGroupSpec"]["template"]["spec"]] + [
        g["template"]["spec"] for g in spec["workerGroupSpecs"]
    ]


# ------------------------------------------------------------------------------ schema (the API server)


def test_k8s_holds_the_expected_manifests() -> None:
    kinds = sorted((k, v["kind"]) for k, v in DOCS.items())
    assert kinds == [
        ("pvc/pvc.yaml#0", "PersistentVolumeClaim"),
        ("pvc/rayjob-pipeline.yaml#0", "RayJob"),
        ("raycluster.yaml#0", "RayCluster"),
        ("rayjob-generate.yaml#0", "RayJob"),
        ("rayjob-pipeline.yaml#0", "RayJob"),
        ("rayjob-train.yaml#0", "RayJob"),
        ("s3-secret.example.yaml#0", "Secret"),
    ]


@pytest.mark.parametrize("name", sorted(RAY_DOCS))
def test_manifest_validates_against_the_kuberay_crd(name: str) -> None:
    assert crd_errors(RAY_DOCS[name]) == []


def _set(*path: str | int, value: Any) -> Any:
    """A mutation of rayjob-train.yaml: set the field at `path` (keys, list indices); None deletes it."""

    def mutate(doc: dict) -> None:
        node = doc
        for p in path[:-1]:
            node = node[p]
        if value is None:
            del node[path[-1]]
        else:
            node[path[-1]] = value

    return mutate


CLUSTER = ("spec", "rayClusterSpec")
WORKER = (*CLUSTER, "workerGroupSpecs", 0)
LIMITS = (*WORKER, "template", "spec", "containers", 0, "resources", "limits")


@pytest.mark.parametrize(
    ("mutation", "expected"),
    [
        (_set(*WORKER, "maxReplicas", value="eight"), "'eight' is not of type 'integer'"),
        (_set(*CLUSTER, "autoscalerOptions", "upscalingMode", value="Eager"), "'Eager' is not one of"),
        (_set("spec", "shutdownAfterJobFinish", value=True), "'shutdownAfterJobFinish' was unexpected"),
        (_set(*CLUSTER, "headGroupSpec", "rayStartParams", "num-cpus", value=0), "0 is not of type 'string'"),
        (_set(*LIMITS, "nvidia.com/gpu", value=[1]), "is not valid under any of the given schemas"),
        (_set(*WORKER, "template", value=None), "'template' is a required property"),
        (_set("spec", "backoffLimit", value="2"), "'2' is not of type 'integer'"),
    ],
    ids=[
        "wrong type",
        "unknown enum",
        "unknown field",
        "number for string",
        "bad quantity",
        "missing",
        "string",
    ],
)
def test_the_schema_check_rejects_a_broken_manifest(mutation: Any, expected: str) -> None:
    doc = copy.deepcopy(RAYJOBS["rayjob-train.yaml#0"])
    mutation(doc)
    errors = crd_errors(doc)
    assert any(expected in e for e in errors), errors


# ------------------------------------------------------------- KubeRay's own rules, beyond the schema


@pytest.mark.parametrize("name", sorted(RAY_DOCS))
def test_manifest_keeps_kuberays_rules(name: str) -> None:
    """What KubeRay's validation (ValidateRayJobSpec, ValidateRayClusterSpec) or Kubernetes would reject."""
    doc = RAY_DOCS[name]
    assert (
        DNS1035.fullmatch(doc["metadata"]["name"]) and len(doc["metadata"]["name"]) <= MAX_NAME[doc["kind"]]
    )
    spec = doc["spec"]
    if doc["kind"] == "RayJob":
        assert ("rayClusterSpec" in spec) != ("clusterSelector" in spec)  # exactly one
        assert not spec.get("ttlSecondsAfterFinished") or spec.get("shutdownAfterJobFinishes")
        assert spec.get("backoffLimit", 0) >= 0 and spec["entrypoint"].strip()
    cluster = cluster_specs(doc)
    assert cluster["enableInTreeAutoscaling"] is True
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        assert not (
            group.get("resources") and {"num-cpus", "num-gpus", "memory"} & set(group["rayStartParams"])
        )
    for group in cluster["workerGroupSpecs"]:
        assert 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]
    for pod in pod_specs(doc):
        for c in pod["containers"]:
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][part]), (c["name"], part)
            # Kubernetes: an extended resource's request must equal its limit.
            gpus = {p: c["resources"][p].get("nvidia.com/gpu") for p in ("requests", "limits")}
            assert gpus["requests"] == gpus["limits"]


@pytest.mark.parametrize("name", sorted(RAY_DOCS))
def test_manifest_runs_the_dockerfile_image_at_the_pinned_ray(name: str) -> None:
    version = metadata.version("vaeforge")  # pyproject.toml's, as installed
    doc = RAY_DOCS[name]
    assert cluster_specs(doc)["rayVersion"] == _pin("ray")
    images = {c["image"] for pod in pod_specs(doc) for c in pod["containers"]}
    assert images == {f"vaeforge:{version}"}


def test_gpu_workers_autoscale_from_zero() -> None:
    (gpu,) = cluster_specs(DOCS["raycluster.yaml#0"])["workerGroupSpecs"]
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) == 1 and gpu["minReplicas"] == 0 and gpu["maxReplicas"] >= 4
    head = cluster_specs(DOCS["raycluster.yaml#0"])["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"]["limits"]  # a CPU head


def _without_storage(spec: Any) -> Any:
    """The cluster spec minus how storage is wired (S3 secret or shared volume)."""
    if isinstance(spec, dict):
        drop = {"envFrom", "volumes", "volumeMounts", "securityContext"}
        return {k: _without_storage(v) for k, v in spec.items() if k not in drop}
    return [_without_storage(v) for v in spec] if isinstance(spec, list) else spec


def test_rayjobs_embed_the_standing_clusters_spec() -> None:
    """One cluster definition: the RayJobs copy raycluster.yaml's spec; the PVC variant differs in storage."""
    standing = DOCS["raycluster.yaml#0"]["spec"]
    for name, job in RAYJOBS.items():
        if name.startswith("pvc/"):
            assert _without_storage(job["spec"]["rayClusterSpec"]) == _without_storage(standing), name
        else:
            assert job["spec"]["rayClusterSpec"] == standing, name


# ------------------------------------------------------------------------------- what the jobs run


@pytest.mark.parametrize("name", sorted(RAYJOBS))
def test_rayjob_entrypoint_parses_with_the_cli(name: str) -> None:
    entrypoint = RAYJOBS[name]["spec"]["entrypoint"]
    # It passes through two shells (the submitter's bash, then the driver's sh): keep it free of quoting.
    assert re.fullmatch(r"[\w ./:=,+-]+", entrypoint), entrypoint
    command, configs = parse_entrypoint(entrypoint)
    assert name.endswith(f"rayjob-{command}.yaml#0")
    for cfg in configs if isinstance(configs, tuple) else (configs,):
        # The GPU group starts at zero nodes: only an explicit --gpus asks the autoscaler for any.
        assert cfg.use_gpu is True
    if command == "generate":
        assert configs.workers  # how many GPU actors to ask for: none is up to count when the job starts


def _paths(name: str) -> list[Any]:
    """The configs of a RayJob's entrypoint."""
    _, configs = parse_entrypoint(RAYJOBS[name]["spec"]["entrypoint"])
    return list(configs) if isinstance(configs, tuple) else [configs]


@pytest.mark.parametrize("name", sorted(RAYJOBS))
def test_rayjob_paths_are_on_shared_storage(name: str) -> None:
    """Every node reads and writes the same data: S3, or the PVC mounted on every pod."""
    root = f"{MOUNT}/" if name.startswith("pvc/") else "s3://vaeforge/"
    for cfg in _paths(name):
        for path in (cfg.output, getattr(cfg, "data", None), getattr(cfg, "checkpoint", None)):
            assert path is None or path.startswith(root), path


def test_generate_job_reads_what_the_train_job_writes() -> None:
    (train_cfg,), (gen_cfg,) = _paths("rayjob-train.yaml#0"), _paths("rayjob-generate.yaml#0")
    p_train, p_gen = _paths("rayjob-pipeline.yaml#0")
    assert gen_cfg.checkpoint == train_cfg.output == p_train.output == p_gen.checkpoint
    assert gen_cfg.output == p_gen.output


def test_storage_the_pods_use_is_defined() -> None:
    """The S3 Secret and the PVC have the shape Kubernetes expects and the names the pods refer to."""
    secret, claim = DOCS["s3-secret.example.yaml#0"], DOCS["pvc/pvc.yaml#0"]
    assert (secret["apiVersion"], secret["metadata"]["name"], secret["type"]) == ("v1", SECRET, "Opaque")
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"} <= set(secret["stringData"])
    assert all(isinstance(v, str) for v in secret["stringData"].values())
    assert (claim["apiVersion"], claim["metadata"]["name"]) == ("v1", CLAIM)
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # every node writes checkpoints and shards
    assert re.fullmatch(r"\d+(Ki|Mi|Gi|Ti)", claim["spec"]["resources"]["requests"]["storage"])
    for name, doc in RAY_DOCS.items():
        for pod in pod_specs(doc):
            c = pod["containers"][0]
            if name.startswith("pvc/"):
                assert pod["volumes"] == [{"name": CLAIM, "persistentVolumeClaim": {"claimName": CLAIM}}]
                assert c["volumeMounts"] == [{"name": CLAIM, "mountPath": MOUNT}]
            else:
                assert c["envFrom"] == [{"secretRef": {"name": SECRET}}], name


# --------------------------------------------------------------------------------------- Dockerfile


def _dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) per Dockerfile instruction, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_dockerfile_base_image_has_the_pinned_ray() -> None:
    (base,) = [args for op, args in _dockerfile() if op == "FROM"]
    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py3(\d+)", base)
    assert m, f"expected a rayproject/ray:VERSION-pyXY image, got {base}"
    assert m.group(1) == _pin("ray"), "the image's Ray must be the one constraints.txt pins"
    requires = metadata.metadata("vaeforge")["Requires-Python"]
    assert int(m.group(2)) >= int(re.fullmatch(r">=3\.(\d+)", requires).group(1))


def test_dockerfile_installs_only_through_constraints() -> None:
    steps = _dockerfile()
    installs = [i for i, (op, args) in enumerate(steps) if op == "RUN" and "pip install" in args]
    assert installs, "the Dockerfile installs nothing"
    for i in installs:
        for command in re.split(r"&&|;", steps[i][1]):
            if "pip install" in command:
                assert "-c constraints.txt" in command, command
    copied = [i for i, (op, args) in enumerate(steps) if op == "COPY" and "constraints.txt" in args.split()]
    assert copied and copied[0] < installs[0], "constraints.txt must be in the image before the first install"


def test_image_holds_what_the_rayjobs_run() -> None:
    """The RayJobs run `python jobs/NAME.py` in the WORKDIR, where KubeRay starts Ray: jobs/ must be there,
    and .dockerignore must let everything the Dockerfile copies into the build context."""
    steps = _dockerfile()
    (workdir,) = [args for op, args in steps if op == "WORKDIR"]
    copies = [args.split()[-2:] for op, args in steps if op == "COPY"]
    assert ["jobs", "./jobs"] in copies and workdir.startswith("/home/ray/")
    allowed = [
        line[1:].rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines() if line[:1] == "!"
    ]
    sources = {
        src for op, args in steps if op == "COPY" for src in args.split()[:-1] if not src.startswith("--")
    }
    assert sources <= set(allowed), sources - set(allowed)
    assert (REPO / ".dockerignore").read_text().splitlines()[2] == "*"  # everything else stays out
