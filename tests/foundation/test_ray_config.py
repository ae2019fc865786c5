"""ray_config.yaml is a cluster launcher file Ray accepts, and it says what this project needs.

Ray's own validation runs here for real: ``prepare_config`` (merges the AWS provider's defaults,
checks the Docker settings, fills per-type worker bounds) then ``validate_config`` (the JSON schema
Ray ships, ray/autoscaler/ray-schema.json, plus its cross-field checks). What ``ray up`` does next
(bootstrapping against the AWS APIs) needs an AWS account and is not run.
"""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "ray_config.yaml"


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(CONFIG.read_text())


@pytest.fixture(scope="module")
def prepared(raw) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)
    return config


def lock_pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        name, sep, version = line.partition("==")
        if sep and not line.startswith("#"):
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins


def test_ray_accepts_the_file(prepared) -> None:
    assert prepared["provider"]["type"] == "aws"
    assert re.fullmatch(r"[a-z]{2}-[a-z]+-\d", prepared["provider"]["region"])
    zones = prepared["provider"]["availability_zone"].split(",")
    assert zones and all(z.startswith(prepared["provider"]["region"]) for z in zones)
    assert prepared["head_node_type"] in prepared["available_node_types"]
    # Ray's defaults were merged in (the validator insists on them) and our values won.
    assert prepared["cluster_name"] == "titok"
    assert "cluster_synced_files" in prepared


def test_validator_is_strict() -> None:
    """The same validator rejects what is wrong, so passing it means something."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    good = yaml.safe_load(CONFIG.read_text())
    typo = {**copy.deepcopy(good), "max_worker": 3}
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        validate_config(prepare_config(typo))
    wrong_head = {**copy.deepcopy(good), "head_node_type": "no_such_type"}
    with pytest.raises((ValueError, KeyError)):
        validate_config(prepare_config(wrong_head))
    negative = copy.deepcopy(good)
    negative["available_node_types"]["gpu_8x"]["resources"]["GPU"] = -8
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(negative))


def test_node_types(prepared) -> None:
    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    assert head["resources"].get("CPU", 0) <= 2, "no Ray work on the head"
    assert not head["resources"].get("GPU")
    assert head["max_workers"] == 0
    gpu_types = {name: t for name, t in types.items() if t["resources"].get("GPU")}
    assert gpu_types, "a GPU worker type"
    for name, node in gpu_types.items():
        assert node["resources"]["GPU"] == 8, name
        assert node["node_config"]["InstanceType"].split(".")[0] in ("p4d", "p4de", "p5", "p5e", "p5en"), name
        assert node["min_workers"] == 0 < node["max_workers"], "autoscaling from zero"
        # 8 trainer workers per node, each with at least one CPU for its data loader.
        assert node["resources"]["CPU"] >= 8
    assert sum(t["max_workers"] for n, t in types.items() if n != prepared["head_node_type"]) <= prepared["max_workers"]
    assert sum(t["max_workers"] * t["resources"].get("GPU", 0) for t in types.values()) >= 32, \
        "room for the generator's 32-GPU reference recipe"


def test_s3_through_instance_profiles_only(prepared) -> None:
    for name, node in prepared["available_node_types"].items():
        profile = node["node_config"].get("IamInstanceProfile")
        assert profile and (profile.get("Name") or profile.get("Arn")), f"{name}: IamInstanceProfile"
    text = CONFIG.read_text()
    for pattern in (r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", r"(?i)aws_secret_access_key", r"(?i)aws_access_key_id",
                    r"(?i)aws_session_token", r"(?<![A-Za-z0-9/+])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])"):
        assert not re.search(pattern, text), f"credential-like text in ray_config.yaml: {pattern}"


def test_setup_installs_the_package_with_the_pinned_torch(prepared) -> None:
    project = (REPO / "pyproject.toml").read_text()
    wanted = {name: re.search(rf'"{name}==([^"]+)"', project).group(1) for name in ("torch", "torchvision")}
    commands = prepared["setup_commands"]
    installs = [c for c in commands if "pip install" in c and "--editable ." in c]
    assert len(installs) == 1, commands
    argv = shlex.split(installs[0].split("&&")[-1])
    assert argv[:2] == ["pip", "install"]
    lock = argv[argv.index("--constraint") + 1]
    assert (REPO / lock).is_file(), lock
    pins = lock_pins(REPO / lock)
    for name, version in wanted.items():
        assert f"{name}=={version}" in argv, f"{name} pinned as in pyproject.toml"
        assert pins[name] == version, f"{lock} pins {name} {pins[name]}"
    index = argv[argv.index("--extra-index-url") + 1]
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu\d+", index), "the CUDA wheel index"
    # The editable install runs in the file-mounted repository.
    mounted = installs[0].split("&&")[0].split("cd", 1)[1].strip()
    assert prepared["file_mounts"][mounted] == "."
    # The container's Python and Ray are the lock's: the lock is per Python version.
    image = prepared["docker"]["image"]
    match = re.fullmatch(r"rayproject/ray:([\d.]+)-py3(\d+)-gpu", image)
    assert match, image
    assert lock == f"constraints/py3.{match.group(2)}.txt"
    import ray

    assert match.group(1) == pins["ray"] == ray.__version__, "laptop, image and lock on one Ray"
    # Merged as Ray runs them: the shared setup first on the head and on the workers.
    assert prepared["head_setup_commands"][:len(commands)] == commands
    assert prepared["worker_setup_commands"][:len(commands)] == commands


def test_start_commands(prepared) -> None:
    head = " ; ".join(prepared["head_start_ray_commands"])
    worker = " ; ".join(prepared["worker_start_ray_commands"])
    assert "ray start --head" in head and "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    assert "ray start --address=$RAY_HEAD_IP:" in worker
    port = re.search(r"ray start --head --port=(\d+)", head).group(1)
    assert f"$RAY_HEAD_IP:{port}" in worker
    # Token auth on every node, with the token mounted from where `ray get-auth-token --generate` puts it.
    assert "RAY_AUTH_MODE=token ray start" in head and "RAY_AUTH_MODE=token ray start" in worker
    assert prepared["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert ".gitignore" in prepared["rsync_filter"] and (REPO / ".gitignore").is_file()
