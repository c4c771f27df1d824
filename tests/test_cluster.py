import copy
from pathlib import Path

import pytest
import yaml

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"


def _validate(cfg: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = prepare_config(copy.deepcopy(cfg))
    validate_config(cfg)
    return cfg


def test_aws_gpu_cluster_passes_rays_own_validation():
    cfg = _validate(yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text()))
    types = cfg["available_node_types"]
    head = cfg["head_node_type"]
    gpu_types = [n for n, t in types.items() if n != head and t["node_config"]["InstanceType"].startswith(("g", "p"))]
    assert gpu_types, "at least one GPU worker type"
    assert all(types[n]["min_workers"] == 0 and types[n]["max_workers"] >= 1 for n in gpu_types)
    assert not types[head]["node_config"]["InstanceType"].startswith(("g", "p")), "a CPU head"
    setup = " ".join(cfg["setup_commands"])
    assert "download.pytorch.org/whl/cu" in setup and "torch==2.13.0" in setup


def test_validation_catches_a_broken_cluster_file():
    cfg = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    cfg["head_node_type"] = "no-such-type"
    with pytest.raises(ValueError):
        _validate(cfg)
