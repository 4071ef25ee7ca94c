"""Offline checks of the cluster-launcher configs (cluster.yaml, cluster.local.yaml).

Both files go through the same steps `ray up` takes before it talks to a cloud
(ray.autoscaler._private.commands._bootstrap_config): ``prepare_config`` (merge
with the provider's defaults.yaml; for ``local`` also build the single node
type from head_ip/worker_ips) and then ``validate_config`` (jsonschema against
ray/autoscaler/ray-schema.json plus Ray's own cross-field checks). The provider
steps that follow in `ray up` (AWS resource autofill, bootstrap_aws) call the
AWS APIs and are not run for cluster.yaml; for the local provider they are
offline, so cluster.local.yaml also goes through the full `_bootstrap_config`.
Network access is blocked for the whole module.
"""

from __future__ import annotations

import copy
import json
import re
import socket
from pathlib import Path

import jsonschema
import pytest
import yaml

import ray
import ray.autoscaler
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[1]
AWS_YAML = REPO / "cluster.yaml"
LOCAL_YAML = REPO / "cluster.local.yaml"
SCHEMA = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())

# GPUs per instance for the types this project suggests; resources must agree.
AWS_GPUS = {
    "g5.12xlarge": 4, "g5.24xlarge": 4, "g5.48xlarge": 8,
    "g6.12xlarge": 4, "g6.48xlarge": 8, "p4d.24xlarge": 8, "p5.48xlarge": 8,
}

INSTALL = re.compile(r"\bpip install\b.*\s-e\s+~/ppsd-ray/?(\s|$)")


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("cluster config validation tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def load(path: Path) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


def prepared(path: Path) -> dict:
    cfg = prepare_config(copy.deepcopy(load(path)))
    validate_config(cfg)
    return cfg


def squash(cmds: list[str]) -> list[str]:
    return [" ".join(c.split()) for c in cmds]


def ray_start(cmds: list[str]) -> str:
    cmds = squash(cmds)
    starts = [i for i, c in enumerate(cmds) if "ray start" in c]
    assert len(starts) == 1, cmds
    # `ray stop` first, so that re-running `ray up` restarts Ray cleanly.
    assert "ray stop" in cmds[: starts[0]], cmds
    return cmds[starts[0]]


# --- schema / Ray's validator -------------------------------------------------------


@pytest.mark.parametrize("path", [AWS_YAML, LOCAL_YAML], ids=lambda p: p.name)
def test_raw_file_matches_launcher_schema(path):
    # additionalProperties is false at the top level, so typos in keys fail here.
    jsonschema.validate(load(path), SCHEMA)


@pytest.mark.parametrize("path", [AWS_YAML, LOCAL_YAML], ids=lambda p: p.name)
def test_prepare_and_validate_like_ray_up(path):
    cfg = prepared(path)
    assert cfg["head_node_type"] in cfg["available_node_types"]


def test_local_runs_the_whole_ray_up_bootstrap():
    # For the local provider every step `ray up` takes before SSHing is offline
    # (its bootstrap_config is a no-op), so run the real thing.
    from ray.autoscaler._private.commands import _bootstrap_config

    cfg = _bootstrap_config(load(LOCAL_YAML), no_config_cache=True)
    assert cfg["provider"]["type"] == "local"


def test_validator_rejects_a_broken_config():
    bad = prepare_config(load(AWS_YAML))
    bad["available_node_types"]["ray.worker.gpu"]["resources"]["GPU"] = "four"
    with pytest.raises(jsonschema.ValidationError):
        validate_config(bad)


# --- what matters for ppsd-ray ------------------------------------------------------


def test_aws_node_types():
    cfg = prepared(AWS_YAML)
    assert cfg["provider"]["type"] == "aws" and cfg["provider"]["region"]
    types = cfg["available_node_types"]

    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"]["CPU"] > 0

    gpu_workers = {k: v for k, v in types.items() if k != cfg["head_node_type"] and v["resources"].get("GPU", 0) > 0}
    assert gpu_workers, "no GPU worker node type"
    for name, nt in gpu_workers.items():
        # One node must hold a whole 4-stage pipeline (one GPU per stage actor).
        assert nt["resources"]["GPU"] >= 4, name
        itype = nt["node_config"]["InstanceType"]
        if itype in AWS_GPUS:
            assert nt["resources"]["GPU"] == AWS_GPUS[itype], (name, itype)
        assert 0 <= nt["min_workers"] <= nt["max_workers"] <= cfg["max_workers"]
    for name, nt in types.items():
        # Without an ImageId Ray silently uses an old Ubuntu 18.04 DLAMI.
        assert nt["node_config"].get("ImageId"), name


def test_local_provider_form():
    raw = load(LOCAL_YAML)
    assert raw["provider"]["type"] == "local"
    assert "available_node_types" not in raw  # the local provider rejects it
    assert raw["provider"]["head_ip"] and isinstance(raw["provider"]["worker_ips"], list)
    cfg = prepared(LOCAL_YAML)
    (node_type,) = cfg["available_node_types"].values()
    assert node_type["max_workers"] == len(raw["provider"]["worker_ips"])


@pytest.mark.parametrize("path", [AWS_YAML, LOCAL_YAML], ids=lambda p: p.name)
def test_repo_is_mounted_and_installed(path):
    cfg = prepared(path)
    local = cfg["file_mounts"]["~/ppsd-ray"]
    assert (REPO / local).resolve() == REPO and (REPO / local / "pyproject.toml").exists()
    # prepare_config merges setup_commands into head_ and worker_setup_commands.
    for key in ("head_setup_commands", "worker_setup_commands"):
        assert any(INSTALL.search(c) for c in squash(cfg[key])), key
        pins = {m for c in squash(cfg[key]) for m in re.findall(r'ray\[[^\]]*\]==([\w.]+)', c)}
        assert pins == {ray.__version__}, (key, pins)


@pytest.mark.parametrize("path", [AWS_YAML, LOCAL_YAML], ids=lambda p: p.name)
def test_start_commands_start_ray(path):
    cfg = prepared(path)
    head = ray_start(cfg["head_start_ray_commands"])
    for flag in ("--head", "--port=6379", "--autoscaling-config=~/ray_bootstrap_config.yaml",
                 "--dashboard-host=0.0.0.0", "--metrics-export-port=8080"):
        assert flag in head.split(), flag
    worker = ray_start(cfg["worker_start_ray_commands"])
    assert "--address=$RAY_HEAD_IP:6379" in worker.split()
    assert "--head" not in worker.split()
