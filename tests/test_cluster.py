"""cluster/aws-gpu.yaml and its IAM policies, checked offline: Ray's own validation (what `ray up` runs before
touching AWS); the dashboard on 127.0.0.1, token auth on every `ray start`, an instance profile on every node type and
no world-open security group, also through Ray's own AWS bootstrap code on a mocked EC2 (moto); spot before
on-demand in Ray's autoscaler-v2 scheduler; and cluster/iam-s3-policy.json against every S3 request the pipeline's
storage code and Ray Train's make for configs/distilbert-base.yaml's prefixes, recorded on a real S3 server (moto).
"""

from __future__ import annotations

import copy
import fnmatch
import io
import json
import re
import threading
import time
from pathlib import Path
from urllib.parse import parse_qs, unquote
from xml.etree import ElementTree

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
CONFIG = ROOT / "configs" / "distilbert-base.yaml"
S3_POLICY = CLUSTER / "iam-s3-policy.json"
HEAD_POLICY = CLUSTER / "iam-head-policy.json"
SG_PLACEHOLDER = "sg-REPLACE-ME"
USER_CIDR = "203.0.113.7/32"  # a documentation address (RFC 5737), as a user's /32
WORLD = ("0.0.0.0/0", "::/0")
FAKE_KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}  # moto's, for the mocked AWS


def _cluster() -> dict:
    return yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())


def _validate(cfg: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = prepare_config(copy.deepcopy(cfg))
    validate_config(cfg)
    return cfg


def _commands(cfg: dict) -> list[str]:
    """Every shell command the launcher runs on a node, the per-node-type lists included."""
    keys = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
            "head_start_ray_commands", "worker_start_ray_commands")
    cmds = [c for k in keys for c in cfg.get(k, [])]
    for node_type in cfg["available_node_types"].values():
        cmds += [c for k in keys for c in node_type.get(k, [])]
    return cmds


def _gpu_types(cfg: dict) -> dict:
    return {n: t for n, t in cfg["available_node_types"].items()
            if n != cfg["head_node_type"] and t["node_config"]["InstanceType"].startswith(("g", "p"))}


def _policy(path: Path) -> list[dict]:
    return json.loads(path.read_text())["Statement"]


def test_aws_gpu_cluster_passes_rays_own_validation():
    cfg = _validate(_cluster())
    types = cfg["available_node_types"]
    head = cfg["head_node_type"]
    gpu_types = _gpu_types(cfg)
    assert gpu_types, "at least one GPU worker type"
    assert all(t["min_workers"] == 0 and t["max_workers"] >= 1 for t in gpu_types.values())
    assert not types[head]["node_config"]["InstanceType"].startswith(("g", "p")), "a CPU head"
    setup = " ".join(cfg["setup_commands"])
    assert "--torch-backend cu" in setup and "requirements.lock" in setup


def test_validation_catches_a_broken_cluster_file():
    cfg = _cluster()
    cfg["head_node_type"] = "no-such-type"
    with pytest.raises(ValueError, match="`head_node_type` must be one of `available_node_types`"):
        _validate(cfg)


def test_the_dashboard_listens_on_the_heads_loopback_only():
    cmds = _commands(_cluster())
    heads = [c for c in cmds if re.search(r"\bray start\b.*--head\b", c)]
    assert len(heads) == 1, heads
    assert re.findall(r"--dashboard-host[= ](\S+)", heads[0]) == ["127.0.0.1"], heads[0]
    assert not [c for c in cmds if "0.0.0.0" in c], "no command binds every interface"


def test_every_ray_start_turns_token_authentication_on_with_the_submitters_token():
    cfg = _cluster()
    starts = [c for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2, starts
    for cmd in starts:  # the variable must be in the environment of `ray start` itself, not set after it
        assert re.search(r"(^|[;&|]\s*|export\s+)RAY_AUTH_MODE=token\b[^;]*?\bray start\b", cmd), cmd
    # Every node gets the token of the machine that runs `ray up` (where `ray job submit` then finds it).
    remote = f"/home/{cfg['auth']['ssh_user']}/.ray/auth_token"
    assert cfg["file_mounts"].get(remote) == "~/.ray/auth_token", cfg["file_mounts"]


def test_every_node_type_names_its_instance_profile_and_the_head_may_pass_only_the_workers():
    cfg = _cluster()
    types = cfg["available_node_types"]
    profiles = {n: t["node_config"].get("IamInstanceProfile", {}).get("Name") for n, t in types.items()}
    assert all(profiles.values()), f"every node type names a profile (Ray's default is the head's only): {profiles}"
    head = profiles.pop(cfg["head_node_type"])
    assert head not in profiles.values(), "the workers do not get the head's EC2 rights"
    # docs/scaling.md names each role as its profile; the head may hand exactly those roles to the instances it starts.
    passable = {s["Resource"].rsplit("/", 1)[1] for s in _policy(HEAD_POLICY) if s["Action"] == ["iam:PassRole"]}
    assert passable == set(profiles.values()), (passable, profiles)


def test_the_head_may_terminate_only_this_clusters_instances():
    cfg = _cluster()
    statements = _policy(HEAD_POLICY)
    assert not [a for s in statements for a in s["Action"] if a.endswith(":*") or a == "*"], "no wildcard actions"
    destructive = [s for s in statements if {"ec2:TerminateInstances", "ec2:StopInstances"} & set(s["Action"])]
    assert destructive
    for s in destructive:  # Ray tags every instance it launches with ray-cluster-name
        assert s["Condition"] == {"StringEquals": {"ec2:ResourceTag/ray-cluster-name": cfg["cluster_name"]}}, s


def test_every_node_type_names_its_security_group_so_ray_creates_none():
    """Ray's launcher creates a group for each node type without SecurityGroupIds, and that group admits SSH from
    0.0.0.0/0 (provider.security_group.IpPermissions only add rules to it)."""
    cfg = _cluster()
    missing = [n for n, t in cfg["available_node_types"].items() if not t["node_config"].get("SecurityGroupIds")]
    assert not missing, f"node types left to Ray's default security group: {missing}"
    extra = cfg["provider"].get("security_group", {}).get("IpPermissions", [])
    assert not [r for p in extra for r in p.get("IpRanges", []) + p.get("Ipv6Ranges", [])
                if r.get("CidrIp", r.get("CidrIpv6")) in WORLD]


# ---- Ray's own AWS bootstrap against a mocked EC2 ----------------------------------------------------------


@pytest.fixture
def mocked_aws(monkeypatch):
    moto = pytest.importorskip("moto")
    from ray.autoscaler._private.aws import utils as aws_utils

    for key, value in {**FAKE_KEYS, "AWS_DEFAULT_REGION": "us-west-2"}.items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_ENDPOINT_URL", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    with moto.mock_aws():
        aws_utils.resource_cache.cache_clear()  # Ray caches boto3 resources per region
        aws_utils.client_cache.cache_clear()
        yield
    aws_utils.resource_cache.cache_clear()
    aws_utils.client_cache.cache_clear()


def _documented_security_group(ec2, vpc_id: str) -> str:
    """The group docs/scaling.md has the user create: SSH from their CIDR, all traffic between the cluster's nodes."""
    sg = ec2.create_security_group(GroupName="distil-gpu-ssh", Description="distil", VpcId=vpc_id)["GroupId"]
    ec2.authorize_security_group_ingress(GroupId=sg, IpPermissions=[
        {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": USER_CIDR}]},
        {"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": sg}]},
    ])
    return sg


def _bootstrap_network(cfg: dict) -> dict:
    """Ray's own subnet and security-group steps of `ray up` (ray.autoscaler._private.aws.config)."""
    from ray.autoscaler._private.aws import config as aws_config
    from ray.autoscaler._private.util import prepare_config

    cfg = prepare_config(copy.deepcopy(cfg))
    return aws_config._configure_security_group(aws_config._configure_subnet(cfg))


def _ingress(ec2, cfg: dict) -> list[tuple[int | None, str]]:
    ids = sorted({g for t in cfg["available_node_types"].values() for g in t["node_config"]["SecurityGroupIds"]})
    return [(p.get("FromPort"), r["CidrIp"]) for g in ec2.describe_security_groups(GroupIds=ids)["SecurityGroups"]
            for p in g["IpPermissions"] for r in p.get("IpRanges", [])]


def test_rays_bootstrap_keeps_the_users_group_and_opens_ssh_to_their_cidr_only(mocked_aws):
    import boto3

    ec2 = boto3.client("ec2")
    vpc = ec2.describe_vpcs(Filters=[{"Name": "isDefault", "Values": ["true"]}])["Vpcs"][0]["VpcId"]
    sg = _documented_security_group(ec2, vpc)
    before = {g["GroupId"] for g in ec2.describe_security_groups()["SecurityGroups"]}
    cfg = _cluster()
    for node_type in cfg["available_node_types"].values():  # docs/scaling.md's step: the group's id for the placeholder
        assert node_type["node_config"]["SecurityGroupIds"] == [SG_PLACEHOLDER]
        node_type["node_config"]["SecurityGroupIds"] = [sg]
    cfg = _bootstrap_network(cfg)
    assert {g["GroupId"] for g in ec2.describe_security_groups()["SecurityGroups"]} == before, "Ray created a group"
    assert _ingress(ec2, cfg) == [(22, USER_CIDR)]


def test_a_provider_security_group_alone_would_still_open_ssh_to_the_world(mocked_aws):
    """Why every node type names its group: Ray's default group gets SSH from 0.0.0.0/0 whatever the provider's
    security_group adds. The same check as above, on that alternative, finds the open port."""
    import boto3

    cfg = _cluster()
    cfg["provider"]["security_group"] = {"GroupName": "distil-gpu-cidr", "IpPermissions": [
        {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": USER_CIDR}]}]}
    for node_type in cfg["available_node_types"].values():
        del node_type["node_config"]["SecurityGroupIds"]
    ingress = _ingress(boto3.client("ec2"), _bootstrap_network(cfg))
    assert (22, "0.0.0.0/0") in ingress and (22, USER_CIDR) in ingress, ingress


def test_ray_up_stops_before_launching_while_the_group_placeholder_is_unset(mocked_aws, capsys):
    """Ray's check raises an AssertionError without a message (cli_logger.doassert) after printing which check
    fired: that print says it is the security-group lookup, not another of Ray's bootstrap assertions."""
    with pytest.raises(AssertionError):
        _bootstrap_network(_cluster())
    out, err = capsys.readouterr()
    assert "Failed to detect a security group with id equal to any of the configured SecurityGroupIds" in out + err


def test_the_iam_policies_are_valid_and_create_the_named_profiles(mocked_aws):
    """docs/scaling.md's IAM commands, through boto3 against moto, which validates each policy document's grammar."""
    import boto3

    iam = boto3.client("iam")
    trust = {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}]}
    cfg = _cluster()
    profiles = {t["node_config"]["IamInstanceProfile"]["Name"] for t in cfg["available_node_types"].values()}
    head = cfg["available_node_types"][cfg["head_node_type"]]["node_config"]["IamInstanceProfile"]["Name"]
    for role in sorted(profiles):
        iam.create_role(RoleName=role, AssumeRolePolicyDocument=json.dumps(trust))
        iam.put_role_policy(RoleName=role, PolicyName="distil-s3", PolicyDocument=S3_POLICY.read_text())
        iam.create_instance_profile(InstanceProfileName=role)
        iam.add_role_to_instance_profile(InstanceProfileName=role, RoleName=role)
    iam.put_role_policy(RoleName=head, PolicyName="distil-autoscaler", PolicyDocument=HEAD_POLICY.read_text())
    for role in profiles:
        assert iam.get_instance_profile(InstanceProfileName=role)["InstanceProfile"]["Roles"][0]["RoleName"] == role
    from botocore.exceptions import ClientError

    with pytest.raises(ClientError, match="MalformedPolicyDocument"):  # the validation does bite
        iam.put_role_policy(RoleName=head, PolicyName="broken", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3GetObject", "Resource": "*"}]}))


# ---- spot first, on-demand as the fallback ----------------------------------------------------------------


def test_the_autoscaler_launches_spot_first_and_on_demand_when_spot_launches_fail():
    """Ray's autoscaler v2 (what `ray up` runs since Ray 2.50) on this file's node types, asked for the training
    workers of configs/distilbert-base.yaml. A failed spot launch sets gpu_spot's availability to 0."""
    from ray.autoscaler.v2.instance_manager.config import AutoscalingConfig
    from ray.autoscaler.v2.scheduler import ResourceDemandScheduler, SchedulingRequest
    from ray.autoscaler.v2.utils import ResourceRequestUtil
    from ray.core.generated.autoscaler_pb2 import ResourceRequestByCount

    cfg = _cluster()
    gpu_types = _gpu_types(cfg)
    market = {n: t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") for n, t in gpu_types.items()}
    spot = [n for n, m in market.items() if m == "spot"]
    on_demand = [n for n, m in market.items() if m is None]
    assert len(spot) == 1 and len(on_demand) == 1, gpu_types
    assert len({t["node_config"]["InstanceType"] for t in gpu_types.values()}) == 1, "one shape, two markets"
    for name in gpu_types:  # what `ray up` fills in from DescribeInstanceTypes for a g5.12xlarge
        cfg["available_node_types"][name]["resources"] = {"CPU": 48, "GPU": 4}
    node_types = AutoscalingConfig(cfg, skip_content_hash=True).get_node_type_configs()
    scaling = yaml.safe_load(CONFIG.read_text())["scaling"]
    worker = ResourceRequestUtil.make({"CPU": scaling["cpus_per_worker"], "GPU": 1})
    demand = [ResourceRequestByCount(request=worker, count=scaling["num_workers"])]

    def launches(availability: dict) -> dict:
        reply = ResourceDemandScheduler().schedule(SchedulingRequest(
            disable_launch_config_check=True, node_type_configs=node_types, resource_requests=demand,
            cloud_resource_availabilities=availability, recoverable_resource_availabilities=availability))
        return {launch.instance_type: launch.count for launch in reply.to_launch}

    gpus_needed = -(-scaling["num_workers"] // 4)
    assert launches({}) == {spot[0]: gpus_needed}
    assert launches({spot[0]: 0.0}) == {on_demand[0]: gpus_needed}


# ---- the S3 policy ------------------------------------------------------------------------------------------


def _allowed(statements: list[dict], action: str, arn: str) -> bool:
    """IAM's evaluation for Allow statements without conditions (`*` matches across `/`)."""
    def matches(patterns, value):
        patterns = [patterns] if isinstance(patterns, str) else patterns
        return any(fnmatch.fnmatchcase(value, p) for p in patterns)

    return any(s["Effect"] == "Allow" and "Condition" not in s and matches(s["Action"], action)
               and matches(s["Resource"], arn) for s in statements)


def _s3_locations() -> dict[str, list[str]]:
    """configs/distilbert-base.yaml's S3 locations: {"read": [uri, ...], "write": [...]}."""
    cfg = yaml.safe_load(CONFIG.read_text())
    return {"read": [s for s in cfg["data"]["sources"] if s.startswith("s3://")],
            "write": [u for u in (cfg["data"]["output"], cfg["run"]["storage"]) if u.startswith("s3://")]}


def _prefix(uri: str) -> tuple[str, str]:
    """(bucket, key prefix ending in /) of an s3:// prefix or glob: what the policy must grant under."""
    bucket, _, key = uri[len("s3://"):].partition("/")
    literal = re.split(r"[*?\[]", key)[0]
    if literal != key:  # a glob: the folder it lists
        return bucket, literal[: literal.rfind("/") + 1]
    return bucket, key.rstrip("/") + "/"


def test_the_s3_policy_grants_the_configs_prefixes_and_nothing_else():
    statements = _policy(S3_POLICY)
    locations = _s3_locations()
    assert locations["read"] and locations["write"]
    objects = ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"]
    for uri in locations["read"]:
        bucket, key = _prefix(uri)
        shard = f"arn:aws:s3:::{bucket}/{key}part-0.parquet"
        assert _allowed(statements, "s3:ListBucket", f"arn:aws:s3:::{bucket}"), uri
        assert _allowed(statements, "s3:GetObject", shard), uri
        assert not [a for a in objects[1:] if _allowed(statements, a, shard)], "the corpus is read-only"
    for uri in locations["write"]:
        bucket, key = _prefix(uri)
        for action in objects:
            assert _allowed(statements, action, f"arn:aws:s3:::{bucket}/{key}run/checkpoint_0/state.pt"), (uri, action)
        # pyarrow's create_dir writes an empty "folder/" object for each ancestor of the folder it creates
        for depth in range(1, key.count("/")):
            marker = f"arn:aws:s3:::{bucket}/{'/'.join(key.split('/')[:depth])}/"
            assert _allowed(statements, "s3:PutObject", marker), marker
            assert not _allowed(statements, "s3:DeleteObject", marker), marker
            assert not _allowed(statements, "s3:PutObject", marker + "x"), marker
    for bucket in {_prefix(u)[0] for u in locations["read"] + locations["write"]}:
        for action in objects:
            assert not _allowed(statements, action, f"arn:aws:s3:::{bucket}/other/file"), ("another prefix", action)
    assert not any(_allowed(statements, a, "arn:aws:s3:::another-bucket/corpus/x") for a in objects + ["s3:ListBucket"])
    assert not [a for s in statements for a in s["Action"] if "*" in a], "no wildcard actions"


class _Recorder:
    """A WSGI middleware that records each S3 request as the IAM actions and resources it needs."""

    def __init__(self, app):
        self.app, self.needed, self.lock = app, [], threading.Lock()

    def __call__(self, environ, start_response):
        method, path, query = environ["REQUEST_METHOD"], unquote(environ["PATH_INFO"]), parse_qs(
            environ.get("QUERY_STRING", ""), keep_blank_values=True)
        body = b""
        if method == "POST" and "delete" in query:  # DeleteObjects names its keys in the body
            body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
            environ["wsgi.input"] = io.BytesIO(body)
        if not path.startswith("/moto-api"):
            with self.lock:
                self.needed += _iam_needs(method, path, query, body)
        return self.app(environ, start_response)


def _iam_needs(method: str, path: str, query: dict, body: bytes) -> list[tuple[str, str, str]]:
    """(action, resource ARN, request) for one path-style S3 REST request (AWS's S3 action mapping)."""
    bucket, _, key = path.lstrip("/").partition("/")
    request = f"{method} {path}{'?' + '&'.join(query) if query else ''}"
    if not key:
        if method in ("GET", "HEAD") and not ({"location", "uploads", "versions"} & set(query)):
            return [("s3:ListBucket", f"arn:aws:s3:::{bucket}", request)]  # ListObjects(V2), HeadBucket
        if method == "POST" and "delete" in query:
            keys = [e.text for e in ElementTree.fromstring(body).iter() if e.tag.endswith("Key")]
            return [("s3:DeleteObject", f"arn:aws:s3:::{bucket}/{k}", request) for k in keys]
        return [("unmapped bucket request", f"arn:aws:s3:::{bucket}", request)]
    arn = f"arn:aws:s3:::{bucket}/{key}"
    if method in ("GET", "HEAD") and "uploadId" not in query:
        return [("s3:GetObject", arn, request)]
    if method in ("PUT", "POST"):  # PutObject, and the multipart upload's create/part/complete
        return [("s3:PutObject", arn, request)]
    if method == "DELETE":
        return [("s3:AbortMultipartUpload" if "uploadId" in query else "s3:DeleteObject", arn, request)]
    return [("unmapped object request", arn, request)]


@pytest.fixture
def recorded_s3(monkeypatch, tmp_path):
    """A real S3-compatible server (moto) on 127.0.0.1 with the config's buckets, recording what each request needs."""
    pytest.importorskip("moto")
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    recorder = _Recorder(DomainDispatcherApplication(create_backend_app))
    server = make_server("127.0.0.1", 0, recorder, threaded=True, request_handler=MotoRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    for key, value in {**FAKE_KEYS, "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}.items():
        monkeypatch.setenv(key, value)
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint)
    for bucket in {_prefix(u)[0] for urls in _s3_locations().values() for u in urls}:
        s3.create_bucket(Bucket=bucket)
    try:
        yield s3, recorder
    finally:
        server.shutdown()
        thread.join(timeout=10)
        import moto.backends

        moto.backends.get_backend("s3").reset()


def test_every_s3_request_of_the_pipelines_storage_code_is_allowed(recorded_s3, tmp_path):
    """The S3 calls of each stage on configs/distilbert-base.yaml's locations, made by the project's own functions
    and Ray Train's storage code on a fresh bucket: every request they send must be allowed by the policy."""
    import pyarrow as pa
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq
    from ray.train import Checkpoint
    from ray.train.v2._internal.execution.storage import StorageContext, delete_fs_path

    from pipeline import storage
    from pipeline.config import load_config
    from pipeline.corpus import sources

    s3, recorder = recorded_s3
    cfg = load_config(CONFIG)
    shard = io.BytesIO()
    pq.write_table(pa.table({"text": ["a document", "another one"]}), shard)
    for uri in cfg.data.sources:  # the user's corpus, uploaded by them (not by the policy's holder)
        bucket, key = _prefix(uri)
        for name in ("part-0.parquet", "part-1.parquet"):
            s3.put_object(Bucket=bucket, Key=f"{key}{name}", Body=shard.getvalue())
    recorder.needed.clear()

    # prepare: resolve and fingerprint the sources, read them; no manifest yet, so clear the attempt's folder;
    # write shards and the manifest; read the shards back.
    groups = sources.resolve(cfg.data, str(tmp_path / "corpora"))
    assert [len(g.paths) for g in groups] == [2], groups
    for path in groups[0].paths:  # the cache key's fingerprint (size, mtime: prepare.file_stats), then the reads
        assert storage.pyarrow_filesystem(path).get_file_info(storage.fs_path(path)).size > 0
        with storage.open_input(path) as stream:
            assert stream.read(4) == b"PAR1"
    out = storage.join(cfg.data_dir, "0123abcd4567ef89")
    assert storage.read_json(storage.join(out, "manifest.json")) is None
    fs = storage.pyarrow_filesystem(out)
    fs.delete_dir_contents(storage.fs_path(out), missing_dir_ok=True)
    rows = pa.table({"input_ids": [[101, 102]] * 3, "attention_mask": [[1, 1]] * 3})
    with fs.open_output_stream(storage.fs_path(storage.join(out, "train", "a_000000_000.parquet"))) as sink:
        pq.write_table(rows, sink)  # as the prepare tasks write each shard (pipeline/corpus/sink.py)
    storage.write_json(storage.join(out, "manifest.json"), {"key": "0123abcd4567ef89"})
    assert pads.dataset(storage.fs_path(storage.join(out, "train")), format="parquet", filesystem=fs).count_rows() == 3

    # distill: Ray Train's storage (as pipeline/train/driver.py configures it); two checkpoints persisted, the newest
    # read back for a resume, the oldest deleted (checkpoint.keep).
    fs = storage.pyarrow_filesystem(cfg.storage_path)
    context = StorageContext(storage_path=storage.fs_path(cfg.storage_path), experiment_dir_name="distil-1a2b3c4d",
                             storage_filesystem=fs)
    local = tmp_path / "checkpoint"
    (local / "hf_model").mkdir(parents=True)
    for name in ("train_state.json", "hf_model/config.json"):
        (local / name).write_text("{}")
    persisted = [context.persist_current_checkpoint(Checkpoint.from_directory(str(local)), f"checkpoint_{i}")
                 for i in range(2)]
    persisted[1].to_directory(str(tmp_path / "resumed"))
    delete_fs_path(fs, persisted[0].path)

    # Every job: the hold on the run's checkpoints in run.storage (pipeline/hold.py): a lease created, probed,
    # renewed, and released.
    from pipeline import hold

    taken = hold.take(cfg.with_overrides({"run.root": str(tmp_path / "head")}), job="policy-check", lease_s=0.4)
    time.sleep(0.3)
    taken.release()

    # libarrow's S3 client probes a bucket named "$extremelyunlikelytoexist$" and ignores the answer: not ours.
    needed = [n for n in recorder.needed if n[1] != "arn:aws:s3:::$extremelyunlikelytoexist$"]
    assert {a for a, _, _ in needed} >= {"s3:ListBucket", "s3:GetObject", "s3:PutObject", "s3:DeleteObject"}, needed
    statements = _policy(S3_POLICY)
    denied = sorted({(a, arn, req) for a, arn, req in needed if not _allowed(statements, a, arn)})
    assert not denied, "requests the policy does not allow:\n" + "\n".join(map(str, denied))


def _imds(notice_after: int, seconds_left: int):
    """A stand-in for EC2's instance metadata service (IMDSv2) on 127.0.0.1: a session token on PUT, then 404 for
    the spot notice until it has been asked ``notice_after`` times, then the notice."""
    import datetime
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    asked = {"notice": 0, "tokens": 0}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _send(self, code: int, body: str):
            self.send_response(code)
            self.end_headers()
            self.wfile.write(body.encode())

        def do_PUT(self):
            asked["tokens"] += 1
            ok = self.path == "/latest/api/token" and self.headers.get("X-aws-ec2-metadata-token-ttl-seconds")
            self._send(200 if ok else 400, "imds-token")

        def do_GET(self):
            if self.path != "/latest/meta-data/spot/instance-action" or self.headers.get("X-aws-ec2-metadata-token") != "imds-token":
                return self._send(401, "")
            asked["notice"] += 1
            if asked["notice"] <= notice_after:
                return self._send(404, "")
            when = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=seconds_left)
            asked["body"] = json.dumps({"action": "terminate", "time": when.strftime("%Y-%m-%dT%H:%M:%SZ")})
            self._send(200, asked["body"])

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, asked


@pytest.fixture
def ray_head():
    """A Ray head of its own (the spot notice drains it), started as the cluster starts one (`ray start --head`,
    token auth from conftest's RAY_AUTH_TOKEN_PATH), stopped by ending its own processes (found by its temp dir),
    not `ray stop`, which would stop every Ray on the machine. Not --block: that would stop the GCS as soon as the
    drained head's raylet exits, and the GCS is where the test reads what the drain recorded."""
    import shutil
    import subprocess
    import sys
    import tempfile
    import time

    import psutil
    import servers
    from ray._raylet import GcsClient

    ray = Path(sys.executable).parent / "ray"
    temp = tempfile.mkdtemp(prefix="distil-spot-")  # short: Ray's socket paths must fit 107 characters
    port = servers.free_port()
    ports = [f"--{name}={servers.free_port()}" for name in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                            "runtime-env-agent-port", "metrics-export-port")]
    address = f"127.0.0.1:{port}"
    try:
        start = subprocess.run([str(ray), "start", "--head", f"--port={port}", "--num-cpus=0",
                                "--node-ip-address=127.0.0.1", "--include-dashboard=false", "--disable-usage-stats",
                                f"--object-store-memory={100 * 2**20}", f"--temp-dir={temp}", *ports],
                               capture_output=True, text=True, timeout=180)
        assert start.returncode == 0, start.stdout[-3000:] + start.stderr[-3000:]
        nodes = GcsClient(address=address).get_all_node_info(timeout=60)
        assert [n.state for n in nodes.values()] == [next(iter(nodes.values())).ALIVE], nodes
        yield {"address": address, "ray": ray}
    finally:
        for proc in psutil.process_iter(["cmdline"]):  # this head's processes: their command lines name its temp dir
            if any(temp in a for a in proc.info["cmdline"] or ()):
                try:
                    proc.kill()
                except psutil.NoSuchProcess:
                    pass
        time.sleep(0.5)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_the_spot_notice_becomes_a_ray_drain_that_rays_cli_accepts_with_reason_preemption_and_its_deadline(
        tmp_path, ray_head):
    """The script's command runs through the installed `ray drain-node` (its own argument parsing, e.g. a required
    --reason-message) against a real head, which must accept the drain and record its reason and message; a
    wrapper in front of it records the arguments for the deadline."""
    import os
    import subprocess
    import time

    from ray._raylet import GcsClient

    server, asked = _imds(notice_after=2, seconds_left=120)
    recording_ray = tmp_path / "ray"
    recording_ray.write_text(f'#!/usr/bin/env bash\nprintf "%s\\0" "$RAY_AUTH_MODE" "$@" > {tmp_path / "called"}\n'
                             f'exec {ray_head["ray"]} "$@"\n')
    recording_ray.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "IMDS_ENDPOINT": f"http://127.0.0.1:{server.server_port}",
           "SPOT_POLL_S": "0.1", "RAY_BIN": str(recording_ray), "RAY_ADDRESS": ray_head["address"],
           "RAY_AUTH_TOKEN_PATH": os.environ["RAY_AUTH_TOKEN_PATH"], "RAY_USAGE_STATS_ENABLED": "0"}
    try:
        proc = subprocess.run(["bash", str(CLUSTER / "spot-notice.sh")], env=env, capture_output=True, text=True,
                              timeout=120)
    finally:
        server.shutdown()
    # exit code 0: the installed `ray drain-node` parsed the command and the head accepted the drain
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert asked["notice"] == 3 and asked["tokens"] == 3  # polled until the notice, with an IMDSv2 token each time
    mode, *args = (tmp_path / "called").read_text().split("\0")[:-1]
    assert mode == "token" and args[:3] == ["drain-node", "--reason", "DRAIN_NODE_REASON_PREEMPTION"]
    deadline = int(args[args.index("--deadline-remaining-seconds") + 1])
    assert 110 <= deadline <= 121, deadline
    # The head recorded the drain as the script asked for it: a preemption, with the notice in its message (set
    # when the drained node, idle here, leaves the cluster, which it does at once).
    gcs = GcsClient(address=ray_head["address"])
    for _ in range(120):
        (node,) = gcs.get_all_node_info(timeout=30).values()
        if node.death_info.reason_message:
            break
        time.sleep(0.5)
    assert node.death_info.reason_message == f"EC2 spot interruption notice ({asked['body']})"
    assert node.death_info.Reason.Name(node.death_info.reason) == "AUTOSCALER_DRAIN_PREEMPTED"


def test_every_worker_node_starts_the_spot_notice_watcher_from_the_mounted_script():
    cfg = _cluster()
    assert cfg["file_mounts"]["/home/ubuntu/distil/spot-notice.sh"] == "./cluster/spot-notice.sh"
    starts = " ; ".join(cfg["worker_start_ray_commands"])
    assert re.search(r"nohup bash ~/distil/spot-notice\.sh .*&\s*$", cfg["worker_start_ray_commands"][-1])
    assert "pkill -f '[s]pot-notice.sh'" in starts  # a restart replaces the watcher; the pattern spares its own shell
