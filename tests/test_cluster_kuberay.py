"""cluster/kuberay/, checked offline: the RayCluster and RayJob against KubeRay v1.7.0's CRD schemas, and in Python
what those schemas cannot say.

The schemas (``../shared/kuberay/``, see its README) are the CRDs' openAPIV3Schema. The API server prunes fields it
does not know without a word, so a misspelled field (``ttlSecondsAfterFinish``) would simply vanish: the schemas
are closed here (:func:`closed`), and a field the schema does not list is an error, except under
``x-kubernetes-preserve-unknown-fields``. The Python rules (:func:`problems`) cover what the operator checks or
what this project needs: minReplicas <= replicas <= maxReplicas, GPU limits on the GPU group, a TTL only with
shutdownAfterJobFinishes, the entrypoint and its config, token authentication wired to one Secret, no dashboard
exposed beyond the cluster, no inline AWS keys, and the manifests agreeing with the image, the lock and each other.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
KUBERAY = ROOT / "cluster" / "kuberay"
CRDS = ROOT.parent / "shared" / "kuberay"
GPU = "nvidia.com/gpu"
AWS_SECRET_NAMES = re.compile(r"^AWS_(ACCESS_KEY_ID|SECRET_ACCESS_KEY|SESSION_TOKEN)$")
AWS_KEY_ID = re.compile(r"\b(AKIA|ASIA)[A-Z0-9]{16}\b")
URL_PASSWORD = re.compile(r"://[^/\s:@]+:[^/\s@]+@")  # scheme://user:password@host
# The root metadata is an open object in the CRD (the API server checks ObjectMeta itself): the fields used here.
OBJECT_META = {"type": "object", "properties": {
    "name": {"type": "string"}, "namespace": {"type": "string"}, "generateName": {"type": "string"},
    "labels": {"type": "object", "additionalProperties": {"type": "string"}},
    "annotations": {"type": "object", "additionalProperties": {"type": "string"}}}}


def _manifest(name: str) -> dict:
    return yaml.safe_load((KUBERAY / name).read_text())


def _lock_ray_version() -> str:
    match = re.search(r"^ray(\[[^\]]*\])?==(\S+)$", (ROOT / "requirements.lock").read_text(), re.M)
    assert match, "requirements.lock pins ray"
    return match.group(2)


# ---- the strict schema ------------------------------------------------------------------------------------


def closed(node: dict) -> dict:
    """A copy of an OpenAPI v3 schema in which every object schema that does not set additionalProperties or
    x-kubernetes-preserve-unknown-fields allows only the fields it lists (what the API server keeps)."""
    node = dict(node)
    if "properties" in node:
        node["properties"] = {name: closed(sub) for name, sub in node["properties"].items()}
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            node[key] = closed(node[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in node:
            node[key] = [closed(sub) for sub in node[key]]
    if node.get("type") == "object" and "additionalProperties" not in node \
            and not node.get("x-kubernetes-preserve-unknown-fields"):
        node["additionalProperties"] = False
    return node


def _crd_schema(kind: str, *, strict: bool = True) -> dict:
    path = CRDS / f"ray.io_{kind.lower()}s.v1.schema.json"
    if not path.is_file():
        missing = f"{path} is absent: KubeRay's CRD schemas live in ../shared/kuberay on developer machines and CI"
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):  # under CI a missing prerequisite fails
            pytest.fail(f"CI is set and {missing}")
        pytest.skip(missing)
    schema = json.loads(path.read_text())["openAPIV3Schema"]
    if not strict:
        return schema
    schema = copy.deepcopy(schema)
    schema["properties"]["metadata"] = OBJECT_META
    return closed(schema)


def schema_errors(manifest: dict, *, strict: bool = True) -> list[str]:
    """Every schema violation of a RayCluster or RayJob manifest, as 'path: message' lines."""
    import jsonschema

    validator = jsonschema.Draft4Validator(_crd_schema(manifest["kind"], strict=strict))
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in sorted(validator.iter_errors(manifest), key=lambda e: list(map(str, e.absolute_path)))]


def test_closed_keeps_preserve_unknown_fields_open_and_closes_the_rest():
    import jsonschema

    schema = closed({"type": "object", "properties": {
        "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True,
                 "properties": {"a": {"type": "string"}}},
        "map": {"type": "object", "additionalProperties": {"type": "string"}},
        "typed": {"type": "object", "properties": {"b": {"type": "integer"}}}}})
    jsonschema.validate({"free": {"a": "x", "anything": 1}, "map": {"k": "v"}, "typed": {"b": 1}}, schema)
    for bad in ({"typed": {"b": 1, "c": 2}}, {"other": 1}, {"map": {"k": 1}}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_the_manifests_validate_against_kuberays_crd_schemas(name):
    manifest = _manifest(name)
    assert manifest["apiVersion"] == "ray.io/v1"
    assert schema_errors(manifest) == []


def _rename(manifest: dict, path: list, new_key: str) -> dict:
    manifest = copy.deepcopy(manifest)
    node = manifest
    for step in path[:-1]:
        node = node[step]
    node[new_key] = node.pop(path[-1])
    return manifest


TYPOS = [
    ("raycluster.yaml", ["spec", "enableInTreeAutoscaling"], "enableInTreeAutoScaling"),
    ("raycluster.yaml", ["spec", "workerGroupSpecs", 0, "maxReplicas"], "maxReplica"),
    ("raycluster.yaml", ["spec", "headGroupSpec", "template", "spec", "containers", 0, "resources"], "resource"),
    ("raycluster.yaml", ["metadata", "labels"], "lables"),
    ("rayjob.yaml", ["spec", "shutdownAfterJobFinishes"], "shutdownAfterJobFinish"),
    ("rayjob.yaml", ["spec", "ttlSecondsAfterFinished"], "ttlSecondsAfterFinish"),
    ("rayjob.yaml", ["spec", "rayClusterSpec", "workerGroupSpecs", 0, "template", "spec", "tolerations"], "toleration"),
]


@pytest.mark.parametrize(("name", "path", "typo"), TYPOS, ids=[t[2] for t in TYPOS])
def test_a_misspelled_field_fails_the_strict_schema(name, path, typo):
    bad = _rename(_manifest(name), path, typo)
    errors = schema_errors(bad)
    assert any(repr(typo) in e for e in errors), errors


def test_the_crds_own_schema_lets_a_misspelled_field_through():
    """Why the schema is closed: as published, the CRD accepts the typo (and the API server would drop it)."""
    bad = _rename(_manifest("rayjob.yaml"), ["spec", "ttlSecondsAfterFinished"], "ttlSecondsAfterFinish")
    assert schema_errors(bad, strict=False) == []


# ---- what the schema cannot say ----------------------------------------------------------------------------


def _ray_containers(cluster_spec: dict) -> dict[str, dict]:
    """{group: its Ray container (the first, by KubeRay's convention)}, the head as "head"."""
    groups = {"head": cluster_spec["headGroupSpec"]}
    groups.update({g["groupName"]: g for g in cluster_spec.get("workerGroupSpecs", [])})
    return {name: g["template"]["spec"]["containers"][0] for name, g in groups.items()}


def _gpus(container: dict, kind: str = "limits") -> int:
    return int(container.get("resources", {}).get(kind, {}).get(GPU, 0))


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def _walk(node, path: str = ""):
    """(path, node) for every node of a manifest, a RayJob's runtimeEnvYAML opened too."""
    yield path, node
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "runtimeEnvYAML" and isinstance(value, str):
                value = yaml.safe_load(value)
            yield from _walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, item in enumerate(node):
            yield from _walk(item, f"{path}[{i}]")


def credential_problems(manifest: dict) -> list[str]:
    """Credentials written into the manifest: an AWS secret as an env entry's value or a runtime env variable, an
    AWS key id or a URL's password anywhere. They come from the ServiceAccount (IRSA) or a Secret (secretKeyRef)."""
    p = []
    for path, node in _walk(manifest):
        if isinstance(node, str) and AWS_KEY_ID.search(node):
            p.append(f"{path}: an AWS access key id inline")
        if isinstance(node, str) and URL_PASSWORD.search(node):
            p.append(f"{path}: a password inline in a URL: put it in a Secret")
        if isinstance(node, dict):
            if AWS_SECRET_NAMES.match(str(node.get("name", ""))) and "value" in node:
                p.append(f"{path}: {node['name']} inline: use the ServiceAccount (IRSA) or a Secret")
            p += [f"{path}.{k}: AWS credentials inline: use the ServiceAccount (IRSA) or a Secret"
                  for k, v in node.items() if AWS_SECRET_NAMES.match(str(k)) and isinstance(v, str)]
    return p


def cluster_problems(spec: dict, where: str) -> list[str]:
    """Rules for a RayCluster spec (also a RayJob's rayClusterSpec) that the CRD schema cannot express."""
    p = []
    if spec.get("enableInTreeAutoscaling") is not True:
        p.append(f"{where}: enableInTreeAutoscaling must be true (the autoscaler scales the GPU group)")
    if spec.get("rayVersion") != _lock_ray_version():
        p.append(f"{where}: rayVersion {spec.get('rayVersion')!r} is not the lock's ray {_lock_ray_version()}")
    auth = spec.get("authOptions", {})
    if auth.get("mode") != "token" or not auth.get("secretName"):
        p.append(f"{where}: authOptions must be mode: token with the Secret named in secretName")
    head = spec["headGroupSpec"]
    if head.get("serviceType", "ClusterIP") != "ClusterIP" or head.get("enableIngress"):
        p.append(f"{where}: the head must stay inside the cluster (serviceType ClusterIP, no ingress)")
    if head.get("rayStartParams", {}).get("dashboard-host") in ("0.0.0.0", "::"):
        p.append(f"{where}: dashboard-host 0.0.0.0 set explicitly")
    containers = _ray_containers(spec)
    if _gpus(containers["head"]) or _gpus(containers["head"], "requests"):
        p.append(f"{where}: the head asks for GPUs (a CPU head runs the drivers)")
    if len({c["image"] for c in containers.values()}) != 1:
        p.append(f"{where}: the head and the workers run different images")
    for group, container in containers.items():
        env = _env(container)
        if env.get("RAY_AUTH_MODE", {}).get("value") != "token":
            p.append(f"{where}: {group}: RAY_AUTH_MODE=token missing")
        ref = env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef", {})
        if ref != {"name": auth.get("secretName"), "key": "auth_token"}:
            p.append(f"{where}: {group}: RAY_AUTH_TOKEN must come from the Secret {auth.get('secretName')!r}, "
                     "key auth_token")
        if _gpus(container, "requests") not in (0, _gpus(container)):
            p.append(f"{where}: {group}: GPU requests differ from limits (Kubernetes requires them equal)")
    gpu_groups = []
    for g in spec.get("workerGroupSpecs", []):
        name, low, high = g["groupName"], g.get("minReplicas"), g.get("maxReplicas")
        if low is None or high is None:
            p.append(f"{where}: {name}: set minReplicas and maxReplicas explicitly")
            continue
        if not 0 <= low <= g.get("replicas", low) <= high or high < 1:
            p.append(f"{where}: {name}: needs 0 <= minReplicas ({low}) <= replicas ({g.get('replicas')}) "
                     f"<= maxReplicas ({high}), and maxReplicas >= 1")
        if _gpus(containers[name]):
            gpu_groups.append(g)
    if not gpu_groups:
        p.append(f"{where}: no worker group has {GPU} limits")
    return p


def job_problems(job: dict) -> list[str]:
    spec, p = job["spec"], []
    if spec.get("shutdownAfterJobFinishes") is not True or int(spec.get("ttlSecondsAfterFinished", 0)) <= 0:
        p.append("the RayJob must set shutdownAfterJobFinishes: true and a ttlSecondsAfterFinished > 0")
    if "clusterSelector" in spec or "rayClusterSpec" not in spec:
        p.append("the RayJob must create its own cluster (rayClusterSpec, no clusterSelector) to tear it down")
    else:
        p += cluster_problems(spec["rayClusterSpec"], "rayClusterSpec")
    argv = shlex.split(spec.get("entrypoint", ""))
    config = ROOT / argv[argv.index("--config") + 1] if "--config" in argv[:-1] else None
    if argv[:3] != ["python", "-m", "jobs.pipeline"] or config is None:
        p.append(f"the entrypoint must run python -m jobs.pipeline --config <file>, got {argv}")
    elif not config.is_file():
        p.append(f"the entrypoint's config {config.relative_to(ROOT)} does not exist")
    elif not str(yaml.safe_load(config.read_text())["run"].get("storage", "")).startswith("s3://"):
        p.append(f"{config.relative_to(ROOT)} must keep checkpoints on S3 (run.storage: s3://...): the cluster goes")
    working_dir = str(yaml.safe_load(spec.get("runtimeEnvYAML") or "{}").get("working_dir", ""))
    if working_dir.startswith("/") and spec.get("submissionMode", "K8sJobMode") != "K8sJobMode":
        p.append("a local working_dir is uploaded by the submitter pod: submissionMode must be K8sJobMode")
    return p


def problems(manifest: dict) -> list[str]:
    """Every rule :func:`cluster_problems`, :func:`job_problems` and :func:`credential_problems` find broken."""
    p = job_problems(manifest) if manifest["kind"] == "RayJob" else cluster_problems(manifest["spec"], "spec")
    return p + credential_problems(manifest)


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_the_manifests_keep_the_rules_the_schema_cannot_express(name):
    assert problems(_manifest(name)) == []


def _set(manifest: dict, path: list, value) -> dict:
    manifest = copy.deepcopy(manifest)
    node = manifest
    for step in path[:-1]:
        node = node[step]
    if value is _DELETE:
        del node[path[-1]]
    elif isinstance(node, list) and path[-1] == len(node):
        node.append(value)
    else:
        node[path[-1]] = value
    return manifest


_DELETE = object()
WORKER = ["spec", "workerGroupSpecs", 0]
WORKER_C = [*WORKER, "template", "spec", "containers", 0]
HEAD_C = ["spec", "headGroupSpec", "template", "spec", "containers", 0]
JOB_WORKER_C = ["spec", "rayClusterSpec", "workerGroupSpecs", 0, "template", "spec", "containers", 0]
BREAKAGES = [
    ("raycluster.yaml", [*WORKER, "minReplicas"], 9, "minReplicas (9) <= replicas"),
    ("raycluster.yaml", [*WORKER, "maxReplicas"], _DELETE, "set minReplicas and maxReplicas explicitly"),
    ("raycluster.yaml", [*WORKER_C, "resources", "limits", GPU], _DELETE, f"no worker group has {GPU} limits"),
    ("raycluster.yaml", [*HEAD_C, "resources", "limits", GPU], "1", "the head asks for GPUs"),
    ("raycluster.yaml", ["spec", "enableInTreeAutoscaling"], False, "enableInTreeAutoscaling must be true"),
    ("raycluster.yaml", ["spec", "headGroupSpec", "rayStartParams"], {"dashboard-host": "0.0.0.0"}, "dashboard-host"),
    ("raycluster.yaml", ["spec", "headGroupSpec", "serviceType"], "LoadBalancer", "inside the cluster"),
    ("raycluster.yaml", ["spec", "authOptions"], _DELETE, "authOptions must be mode: token"),
    ("raycluster.yaml", [*WORKER_C, "env", 0, "value"], "disabled", "gpu: RAY_AUTH_MODE=token missing"),
    ("raycluster.yaml", [*WORKER_C, "env", 1, "valueFrom", "secretKeyRef", "name"], "other",
     "must come from the Secret"),
    ("raycluster.yaml", ["spec", "rayVersion"], "2.9.0", "is not the lock's ray"),
    ("raycluster.yaml", [*WORKER_C, "env", 2], {"name": "AWS_SECRET_ACCESS_KEY", "value": "x" * 40},
     "AWS_SECRET_ACCESS_KEY inline"),
    ("rayjob.yaml", [*JOB_WORKER_C, "env", 2], {"name": "X", "value": "AKIAIOSFODNN7EXAMPLE"}, "AWS access key id"),
    ("rayjob.yaml", ["spec", "runtimeEnvYAML"], "env_vars:\n  AWS_ACCESS_KEY_ID: AKIAIOSFODNN7EXAMPLE\n", "inline"),
    ("rayjob.yaml", ["spec", "runtimeEnvYAML"], "env_vars:\n  MLFLOW_TRACKING_URI: http://me:hunter2@mlflow:5000\n",
     "a password inline in a URL"),
    ("rayjob.yaml", ["spec", "shutdownAfterJobFinishes"], False, "shutdownAfterJobFinishes: true"),
    ("rayjob.yaml", ["spec", "ttlSecondsAfterFinished"], _DELETE, "ttlSecondsAfterFinished > 0"),
    ("rayjob.yaml", ["spec", "entrypoint"], "python -m jobs.distill --config configs/distilbert-base.yaml",
     "jobs.pipeline"),
    ("rayjob.yaml", ["spec", "entrypoint"], "python -m jobs.pipeline --config configs/nope.yaml", "does not exist"),
    ("rayjob.yaml", ["spec", "entrypoint"], "python -m jobs.pipeline --config configs/tiny.yaml", "checkpoints on S3"),
    ("rayjob.yaml", ["spec", "submissionMode"], "HTTPMode", "K8sJobMode"),
    ("rayjob.yaml", [*JOB_WORKER_C, "resources", "requests", GPU], "2", "GPU requests differ from limits"),
]


@pytest.mark.parametrize(("name", "path", "value", "expected"), BREAKAGES, ids=[b[3] for b in BREAKAGES])
def test_each_rule_catches_its_breakage(name, path, value, expected):
    found = problems(_set(_manifest(name), path, value))
    assert any(expected in line for line in found), found


# ---- the manifests agree with each other, the image, the lock and the config --------------------------------


def test_the_rayjobs_cluster_is_the_rayclusters_spec():
    assert _manifest("rayjob.yaml")["spec"]["rayClusterSpec"] == _manifest("raycluster.yaml")["spec"]


def test_the_gpu_group_fits_the_configs_training_workers():
    scaling = yaml.safe_load((ROOT / "configs" / "distilbert-base.yaml").read_text())["scaling"]
    spec = _manifest("raycluster.yaml")["spec"]
    containers = _ray_containers(spec)
    gpu = [g for g in spec["workerGroupSpecs"] if _gpus(containers[g["groupName"]])]
    assert sum(g["maxReplicas"] * _gpus(containers[g["groupName"]]) for g in gpu) >= scaling["num_workers"]
    for g in gpu:  # one training worker per GPU, each with its CPUs
        container = containers[g["groupName"]]
        assert float(container["resources"]["limits"]["cpu"]) >= scaling["cpus_per_worker"] * _gpus(container)


def test_the_pods_use_the_irsa_service_account_and_the_image_from_the_dockerfile():
    account = _manifest("serviceaccount.yaml")
    assert account["kind"] == "ServiceAccount"
    role = account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
    assert re.fullmatch(r"arn:aws:iam::\d{12}:role/[\w+=,.@-]+", role), role
    spec = _manifest("raycluster.yaml")["spec"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    assert {g["template"]["spec"].get("serviceAccountName") for g in groups} == {account["metadata"]["name"]}

    dockerfile = (KUBERAY / "Dockerfile").read_text()
    base = re.search(r"^FROM rayproject/ray:(\S+)$", dockerfile, re.M).group(1)
    assert base.split("-")[0] == _lock_ray_version(), base
    workdir = re.search(r"^WORKDIR (\S+)$", dockerfile, re.M).group(1)
    runtime_env = yaml.safe_load(_manifest("rayjob.yaml")["spec"]["runtimeEnvYAML"])
    assert runtime_env["working_dir"] == workdir
    assert {"jobs", "pipeline", "configs"} <= set(re.findall(r"^COPY \S+ (\w+) ", dockerfile, re.M))


def _uv_options(command: str) -> list[str]:
    """A `uv pip install` command's options, less the interpreter's and the lock's paths (as tests/test_install.py)."""
    argv = shlex.split(command)
    argv = argv[argv.index("install") + 1:]
    skip = {i + 1 for i, a in enumerate(argv) if a in ("--python", "-r")}
    return sorted(a for i, a in enumerate(argv) if i not in skip and a not in ("--python", "-r"))


def test_the_image_installs_the_lock_as_the_cluster_yaml_does():
    run = re.search(r"^RUN (.+?)(?<!\\)$", (KUBERAY / "Dockerfile").read_text(), re.M | re.S).group(1)
    image = [c for c in run.replace("\\\n", " ").split("&&") if "uv pip install" in c and "requirements.lock" in c]
    setup = yaml.safe_load((ROOT / "cluster" / "aws-gpu.yaml").read_text())["setup_commands"]
    cluster = [c for c in setup if "uv pip install" in c and "requirements.lock" in c]
    assert len(image) == 1 and len(cluster) == 1, (image, cluster)
    assert _uv_options(image[0]) == _uv_options(cluster[0]), (image, cluster)
