"""The files that bring ma-ray to a real cluster: the Ray cluster launcher's YAML against Ray's
own schema (the one `ray up` validates with), the KubeRay RayJob's structure, and what both
promise: the paper preset's 4 x 4 GPUs, an image at the pinned Ray version with ma-ray's gpu
extra, and the NCCL environment docs/cluster.md explains. No cluster is started."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import jsonschema
import ray
import ray.autoscaler
import yaml

from ma_ray import config as C

ROOT = Path(__file__).resolve().parents[2]
LAUNCHER = ROOT / "cluster" / "ray-cluster-4x4.yaml"
RAYJOB = ROOT / "cluster" / "kuberay-rayjob-paper.yaml"
DOCKERFILE = ROOT / "cluster" / "Dockerfile"
PRESET = "cluster/paper-16gpu.yaml"
NCCL_ENV = {"NCCL_SOCKET_IFNAME", "TORCH_NCCL_ASYNC_ERROR_HANDLING", "TORCH_NCCL_BLOCKING_WAIT",
            "TORCH_NCCL_ENABLE_MONITORING", "TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC"}


def paper():
    return C.load(str(ROOT / PRESET))


def ray_image_tag(image: str) -> str:
    repo, _, tag = image.partition(":")
    assert repo == "rayproject/ray", image
    return tag


def assert_gpu_variant_of_pinned_ray(tag: str) -> None:
    # "<ray version>-py<python>-cu<cuda>": the pinned Ray, a CUDA (GPU) build.
    assert re.fullmatch(rf"{re.escape(ray.__version__)}-py3\d+-cu1\d+", tag), tag


def launcher():
    return yaml.safe_load(LAUNCHER.read_text())


def docker_env(run_options) -> dict:
    env = {}
    for option in run_options:
        words = shlex.split(option)
        if words[0] in ("--env", "-e"):
            name, _, value = words[1].partition("=")
            env[name] = value
    return env


def test_launcher_passes_rays_schema():
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(launcher(), schema)
    # And Ray's own check after the schema (head type among the types, worker counts).
    from ray.autoscaler._private.util import validate_config
    validate_config({"cluster_synced_files": [], **launcher()})


def test_launcher_is_the_paper_topology():
    cfg, c = launcher(), paper().cluster
    types = cfg["available_node_types"]
    gpu_types = {name: t for name, t in types.items() if t["resources"].get("GPU", 0) > 0}
    assert types[cfg["head_node_type"]]["resources"]["GPU"] == 0
    assert len(gpu_types) == 1
    (gpu,) = gpu_types.values()
    assert gpu["resources"]["GPU"] == c.gpus_per_node
    assert gpu["min_workers"] == gpu["max_workers"] == c.num_nodes
    assert cfg["max_workers"] == c.num_nodes
    assert any("--num-gpus=0" in cmd for cmd in cfg["head_start_ray_commands"])


def test_launcher_installs_ma_ray_with_its_gpu_extra_on_the_pinned_ray_image():
    cfg = launcher()
    assert_gpu_variant_of_pinned_ray(ray_image_tag(cfg["docker"]["image"]))
    mounted = {remote for remote, local in cfg["file_mounts"].items() if local == "."}
    assert mounted == {"~/ma-ray"}
    assert any('"$HOME/ma-ray[gpu]"' in cmd and cmd.startswith("pip install") for cmd in cfg["setup_commands"])


def test_launcher_sets_the_nccl_environment():
    env = docker_env(launcher()["docker"]["run_options"])
    assert NCCL_ENV <= set(env)
    assert env["TORCH_NCCL_BLOCKING_WAIT"] == "0"  # a blocking wait would be a host sync per op
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    assert "lo" in env["NCCL_SOCKET_IFNAME"].lstrip("^").split(",")  # loopback excluded


def rayjob():
    return yaml.safe_load(RAYJOB.read_text())


def test_rayjob_runs_the_paper_preset():
    job = rayjob()
    assert job["apiVersion"] == "ray.io/v1"
    assert job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["rayClusterSpec"]["rayVersion"] == ray.__version__
    command = spec["entrypoint"].split("&&")[-1].split()
    assert command[:4] == ["ma-ray", "train", "--config", PRESET]
    # The entrypoint's cwd holds the preset: the image's copy of the repository.
    assert "cd /home/ray/ma-ray" in spec["entrypoint"]
    assert (ROOT / PRESET).is_file()
    out = command[command.index("--out") + 1]
    mounts = {m["mountPath"] for g in spec["rayClusterSpec"]["workerGroupSpecs"]
              for c in g["template"]["spec"]["containers"] for m in c.get("volumeMounts", [])}
    assert any(out.startswith(m + "/") for m in mounts), "the run folder must be on the pods' shared volume"


def test_rayjob_is_the_paper_topology_with_gpu_resources():
    spec, c = rayjob()["spec"]["rayClusterSpec"], paper().cluster
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    (group,) = spec["workerGroupSpecs"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == c.num_nodes
    (container,) = group["template"]["spec"]["containers"]
    for kind in ("requests", "limits"):
        assert container["resources"][kind]["nvidia.com/gpu"] == str(c.gpus_per_node)


def test_rayjob_image_installs_ma_ray_with_its_gpu_extra():
    spec = rayjob()["spec"]["rayClusterSpec"]
    images = {c["image"] for g in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
              for c in g["template"]["spec"]["containers"]}
    assert len(images) == 1
    (image,) = images
    # The manifest's image is cluster/Dockerfile's build: tagged with the Ray and CUDA it is on.
    text = DOCKERFILE.read_text()
    base = re.search(r"^FROM (\S+)", text, re.M).group(1)
    tag = ray_image_tag(base)
    assert_gpu_variant_of_pinned_ray(tag)
    assert image.endswith(f"-ray{tag}")
    assert re.search(r'^RUN pip install .*"\.\[gpu\]"', text, re.M)
    assert "gpu" in __import__("tomllib").loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def test_rayjob_sets_the_nccl_environment_on_the_gpu_pods():
    (group,) = rayjob()["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    (container,) = group["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert NCCL_ENV <= set(env)
    assert env["TORCH_NCCL_BLOCKING_WAIT"] == "0"
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    assert all(isinstance(v, str) for v in env.values())  # Kubernetes takes strings only
    # Both files set the watchdog alike.
    launcher_env = docker_env(launcher()["docker"]["run_options"])
    for name in NCCL_ENV - {"NCCL_SOCKET_IFNAME"}:
        assert env[name] == launcher_env[name], name
