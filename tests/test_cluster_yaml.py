"""cluster.yaml: valid for the Ray launcher that the client uses, and safe by construction.

- validates against the JSON schema shipped in the Ray wheel (ray/autoscaler/ray-schema.json)
  and through Ray's own prepare_config/validate_config (no cloud calls);
- the head runs no tasks (CPU: 0); a GPU worker type autoscales between min and max and can
  run on spot; disks are large enough for CUDA images;
- the dashboard / Jobs API (8265), the Ray client (10001) and the GCS (6379) are not opened to
  the world, and Ray's own default security group (which opens SSH to 0.0.0.0/0) is not used;
- the images and setup commands pin the same Ray version and Python minor as this client.

Each check is a function that returns the violations it finds; the "mutated" tests feed it a
broken copy of the config to show that it does fail.
"""
from __future__ import annotations

import copy
import ipaddress
import json
import re
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
jsonschema = pytest.importorskip("jsonschema")
ray = pytest.importorskip("ray")

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO / "cluster.yaml"
PRIVATE_PORTS = (6379, 8265, 10001)
SHARED_MOUNT = "/mnt/fleet"
GPU_FAMILIES = ("g4dn", "g5", "g6", "g6e", "gr6", "p3", "p4d", "p4de", "p5", "p5e", "p5en")


@pytest.fixture(scope="module")
def cfg() -> dict:
    with open(CLUSTER_YAML) as f:
        return yaml.safe_load(f)


def ray_schema() -> dict:
    path = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    assert path.is_file(), f"the Ray wheel has no {path}"
    return json.loads(path.read_text())


# --------------------------------------------------------------------------- checks

def head_violations(cfg: dict) -> list[str]:
    head = cfg["available_node_types"][cfg["head_node_type"]]
    out = []
    if head.get("resources", {}).get("CPU") != 0:
        out.append(f"head resources {head.get('resources')} must have CPU: 0")
    for cmd in cfg.get("head_start_ray_commands", []):
        m = re.search(r"--num-cpus[= ](\d+)", cmd)
        if m and int(m.group(1)) != 0:
            out.append(f"head start command gives the head {m.group(1)} CPUs")
    return out


def gpu_worker_types(cfg: dict) -> dict[str, dict]:
    return {name: t for name, t in cfg["available_node_types"].items()
            if name != cfg["head_node_type"] and t.get("resources", {}).get("GPU", 0) >= 1}


def gpu_violations(cfg: dict) -> list[str]:
    gpus = gpu_worker_types(cfg)
    if not gpus:
        return ["no worker node type with resources GPU >= 1"]
    out = []
    for name, t in gpus.items():
        if "min_workers" not in t or "max_workers" not in t:
            out.append(f"{name}: needs min_workers and max_workers")
            continue
        if not 0 <= t["min_workers"] <= t["max_workers"] <= cfg.get("max_workers", t["max_workers"]):
            out.append(f"{name}: need 0 <= min_workers <= max_workers <= cluster max_workers")
        if t["max_workers"] < 1:
            out.append(f"{name}: max_workers {t['max_workers']} cannot scale up")
        itype = t["node_config"].get("InstanceType", "")
        if itype.split(".")[0] not in GPU_FAMILIES:
            out.append(f"{name}: {itype!r} is not a GPU instance family")
        disks = [m.get("Ebs", {}).get("VolumeSize", 0) for m in t["node_config"].get("BlockDeviceMappings", [])]
        if not disks or max(disks) < 150:
            out.append(f"{name}: root disk {disks} GB is too small for CUDA images (want >= 150)")
    if not any(t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot" for t in gpus.values()):
        out.append("no GPU worker type uses spot (InstanceMarketOptions.MarketType: spot)")
    return out


def _world(rule: dict) -> bool:
    cidrs = [r.get("CidrIp") for r in rule.get("IpRanges", [])] + [r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])]
    return any(c and ipaddress.ip_network(c, strict=False).prefixlen == 0 for c in cidrs)


def _covers(rule: dict, port: int) -> bool:
    if str(rule.get("IpProtocol")) == "-1":
        return True
    lo, hi = rule.get("FromPort", -1), rule.get("ToPort", -1)
    return lo == -1 or lo <= port <= hi


def port_violations(cfg: dict) -> list[str]:
    out = []
    rules = cfg.get("provider", {}).get("security_group", {}).get("IpPermissions", [])
    for rule in rules:
        for port in PRIVATE_PORTS:
            if _world(rule) and _covers(rule, port):
                out.append(f"security_group rule {rule} opens {port} to the world")
    # Ray's own default group always adds SSH from 0.0.0.0/0: every node type must bring its own
    for name, t in cfg["available_node_types"].items():
        if not t["node_config"].get("SecurityGroupIds"):
            out.append(f"{name}: no SecurityGroupIds -> Ray creates a group with 22/tcp open to 0.0.0.0/0")
    for cmd in cfg.get("head_start_ray_commands", []):
        if re.search(r"--dashboard-host[= ]0\.0\.0\.0", cmd):
            out.append("dashboard bound to 0.0.0.0 on the head")
    return out


def version_violations(cfg: dict, ray_version: str, py_minor: tuple[int, int]) -> list[str]:
    out = []
    tag = f"{ray_version}-py{py_minor[0]}{py_minor[1]}"
    docker = cfg.get("docker", {})
    images = [docker.get(k) for k in ("image", "head_image", "worker_image") if docker.get(k)]
    images += [t.get("docker", {}).get("worker_image") for t in cfg["available_node_types"].values()
               if t.get("docker", {}).get("worker_image")]
    if not images:
        out.append("no docker image: nothing pins Python / Ray on the nodes")
    for img in images:
        if tag not in img:
            out.append(f"image {img!r} does not pin Ray {ray_version} / Python {py_minor[0]}.{py_minor[1]} ({tag})")
    setup = " ".join(cfg.get("setup_commands", []))
    if f"=={ray_version}" not in setup or "ray[" not in setup:
        out.append(f"setup_commands do not pin ray=={ray_version}")
    if not re.search(r"fleet-mining(\[\w,-]+\])? @ git\+\S+@v?\d+\.\d+\.\d+\b|fleet_mining-\d+\.\d+\.\d+\S*\.whl", setup):
        out.append("setup_commands do not install this package at a pinned version (git tag or wheel)")
    return out


# --------------------------------------------------------------------------- tests

def test_valid_against_the_ray_wheel_schema(cfg):
    jsonschema.validate(cfg, ray_schema())


def test_schema_rejects_a_broken_config(cfg):
    bad = copy.deepcopy(cfg)
    bad["available_node_types"][bad["head_node_type"]]["resources"]["CPU"] = "zero"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, ray_schema())
    bad = copy.deepcopy(cfg)
    bad["max_worker"] = 3  # typo of max_workers: additionalProperties is false
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, ray_schema())


def test_ray_launcher_accepts_it(cfg):
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_head_runs_no_tasks(cfg):
    assert head_violations(cfg) == []
    bad = copy.deepcopy(cfg)
    bad["available_node_types"][bad["head_node_type"]]["resources"] = {}
    assert head_violations(bad)


def test_gpu_worker_type_autoscales_on_spot_with_big_disks(cfg):
    assert gpu_violations(cfg) == []
    names = list(gpu_worker_types(cfg))
    bad = copy.deepcopy(cfg)
    for n in names:
        bad["available_node_types"][n]["node_config"].pop("InstanceMarketOptions", None)
        bad["available_node_types"][n]["node_config"]["BlockDeviceMappings"][0]["Ebs"]["VolumeSize"] = 30
    v = gpu_violations(bad)
    assert any("spot" in x for x in v) and any("disk" in x for x in v)


def test_private_ports_not_open_to_the_world(cfg):
    assert port_violations(cfg) == []
    raw = CLUSTER_YAML.read_text()
    active = "\n".join(line.split("#", 1)[0] for line in raw.splitlines())
    assert "0.0.0.0/0" not in active and "::/0" not in active


@pytest.mark.parametrize("rule", [
    {"IpProtocol": "tcp", "FromPort": 8265, "ToPort": 8265, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]},
    {"IpProtocol": "tcp", "FromPort": 10000, "ToPort": 10002, "Ipv6Ranges": [{"CidrIpv6": "::/0"}]},
    {"IpProtocol": "-1", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]},
])
def test_port_check_catches_world_open_rules(cfg, rule):
    bad = copy.deepcopy(cfg)
    bad["provider"].setdefault("security_group", {}).setdefault("IpPermissions", []).append(rule)
    assert port_violations(bad)


def test_port_check_catches_ray_default_security_group(cfg):
    bad = copy.deepcopy(cfg)
    for t in bad["available_node_types"].values():
        t["node_config"].pop("SecurityGroupIds", None)
    assert any("0.0.0.0/0" in v for v in port_violations(bad))


def test_nodes_pin_the_clients_ray_and_python(cfg):
    assert version_violations(cfg, ray.__version__, sys.version_info[:2]) == []
    assert version_violations(cfg, "2.59.0", (3, 10))  # another client would be refused
    bad = copy.deepcopy(cfg)
    bad["setup_commands"] = [re.sub(r"@v?\d+\.\d+\.\d+", "@main", c) for c in bad["setup_commands"]]
    assert any("pinned version" in v for v in version_violations(bad, ray.__version__, sys.version_info[:2]))


def shared_mount_violations(cfg: dict) -> list[str]:
    """The index root is a local directory that head and workers must share: it must be a host
    mount (initialization_commands) passed into the containers at the same path."""
    out = []
    if not any(f"-v {SHARED_MOUNT}:{SHARED_MOUNT}" in o for o in cfg.get("docker", {}).get("run_options", [])):
        out.append(f"docker run_options do not pass {SHARED_MOUNT} into the containers")
    if not any(re.search(rf"mount -t nfs4 .* {re.escape(SHARED_MOUNT)}\b", c) for c in cfg.get("initialization_commands", [])):
        out.append(f"initialization_commands do not mount a shared file system at {SHARED_MOUNT}")
    return out


def test_index_directory_is_shared_by_all_nodes(cfg):
    assert shared_mount_violations(cfg) == []
    bad = copy.deepcopy(cfg)
    bad["docker"]["run_options"] = [o for o in bad["docker"]["run_options"] if SHARED_MOUNT not in o]
    assert shared_mount_violations(bad)


def test_change_me_placeholders_are_marked(cfg):
    raw = CLUSTER_YAML.read_text()
    for placeholder in ("ami-CHANGE-ME", "sg-CHANGE-ME", "fs-CHANGE-ME", "CHANGE-ME-org/fleet-mining"):
        assert placeholder in raw


# --------------------------------------------------------------------------- deploy/ and submission

def _submit_args(argv: list[str]):
    from jobs.submit_nightly import build_parser, split_extra

    i = argv.index("jobs.submit_nightly")
    own, extra = split_extra(argv[i + 1:])
    return build_parser().parse_args(own), extra


def test_crontab_example_submits_the_night_once_per_day():
    import shlex

    lines = [ln for ln in (REPO / "deploy" / "crontab.example").read_text().splitlines()
             if ln.strip() and not ln.lstrip().startswith("#") and "=" not in ln.split()[0]]
    assert len(lines) == 1, lines
    fields = lines[0].split(None, 5)
    assert fields[:5] == ["30", "1", "*", "*", "*"]
    assert re.search(r"(?<!\\)%", fields[5]) is None, "unescaped % in a crontab is a newline"
    argv = shlex.split(fields[5].split(">>")[0])
    args, extra = _submit_args(argv)
    assert args.no_working_dir and args.address == "http://127.0.0.1:8265"
    assert args.input.startswith("s3://") and args.output.startswith("s3://")
    assert args.index.startswith(SHARED_MOUNT + "/")  # a local dir every node sees (see the next test)
    assert args.date is None  # submit_nightly derives nightly-<UTC date> itself
    assert extra == ["--clip-model", "ViT-B-16"]


def test_k8s_cronjob_forbids_overlap_and_does_not_retry_a_refused_night():
    from mining.nightly_submit import EXIT_ALREADY_SUBMITTED

    cj = yaml.safe_load((REPO / "deploy" / "k8s-nightly-cronjob.yaml").read_text())
    assert cj["kind"] == "CronJob" and cj["apiVersion"] == "batch/v1"
    spec = cj["spec"]
    assert spec["concurrencyPolicy"] == "Forbid" and spec["timeZone"] == "Etc/UTC"
    job = spec["jobTemplate"]["spec"]
    rules = job["podFailurePolicy"]["rules"]
    assert any(r["action"] == "FailJob" and EXIT_ALREADY_SUBMITTED in r["onExitCodes"]["values"] for r in rules)
    pod = job["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    (container,) = pod["containers"]
    args, extra = _submit_args(container["command"])
    assert args.no_working_dir and args.wait and args.index
    env = {e["name"]: e for e in container["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token" and "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"]


def test_submission_helpers():
    import shlex

    from mining.nightly_submit import (build_runtime_env, nightly_entrypoint, nightly_submission_id,
                                     s3_env_vars)

    assert nightly_submission_id("2026-11-20") == "nightly-2026-11-20"
    for bad in ("2026-11-31", "20261120", "2026-1-2", "", "nightly"):
        with pytest.raises(ValueError):
            nightly_submission_id(bad)
    ep = nightly_entrypoint("s3://b/raw dir/", "s3://b/out", "/idx", "2026-11-20", ["--clip-model", "ViT-B-16"])
    assert shlex.split(ep) == ["python", "-m", "jobs.nightly", "--input", "s3://b/raw dir/", "--output", "s3://b/out",
                               "--index", "/idx", "--date", "2026-11-20", "--clip-model", "ViT-B-16"]
    with pytest.raises(ValueError, match="--date"):
        nightly_entrypoint("i", "o", None, "2026-11-20", ["--date=2026-11-21"])
    env = s3_env_vars({"AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "AWS_SECRET_ACCESS_KEY": "", "HOME": "/root"})
    assert env == {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000"}
    re_ = build_runtime_env(str(REPO), env)
    assert re_["working_dir"] == str(REPO) and re_["env_vars"] == env and ".git" in re_["excludes"]
    assert "working_dir" not in build_runtime_env(None, {})
    with pytest.raises(FileNotFoundError, match="--no-working-dir"):
        build_runtime_env(str(REPO / "docs"), {})
