"""Cluster deployment files: ray-cluster.yaml against Ray's own schema and the project's pins,
the KubeRay manifests against each other, the code and serving/config.yaml, and a real
two-node Ray cluster on this machine running train_all and score_archive via `ray job submit`."""

from __future__ import annotations

import importlib
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import pytest
import yaml

from conftest import REPO, _free_port, stop_sessions, wait_ready
from fracray.raycluster import RAYLET_ENVIRONMENT

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PINS = {re.split(r"[\[=<>]", d)[0].lower(): d.split("==")[1] for d in PYPROJECT["project"]["dependencies"] if "==" in d}
KUBERAY = REPO / "cluster" / "kuberay"


def _load(path: Path):
    return yaml.safe_load(path.read_text())


# ----------------------------------------------------------------------------- ray up

def test_ray_cluster_yaml_validates_against_the_installed_ray_schema():
    import jsonschema
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = _load(REPO / "ray-cluster.yaml")
    jsonschema.validate(config, schema)
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    assert types["head"]["resources"] == {"CPU": 0}, "keep work off the head node"
    assert {"cpu_worker", "gpu_worker"} <= set(types)
    assert "g5" in types["gpu_worker"]["node_config"]["InstanceType"] or "p" in types["gpu_worker"]["node_config"]["InstanceType"]
    assert types["gpu_worker"]["min_workers"] == 0 < types["gpu_worker"]["max_workers"]


def test_ray_cluster_yaml_names_the_projects_python_and_pins():
    text = (REPO / "ray-cluster.yaml").read_text()
    named = dict(re.findall(r'"([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==([0-9][\w.]*)"', text))
    assert {"ray", "torch"} <= set(named), named
    for name, version in named.items():
        assert PINS[name.lower()] == version, f"ray-cluster.yaml installs {name}=={version}, pyproject pins {PINS[name.lower()]}"
    pythons = set(re.findall(r"python(3\.\d+)", text))
    assert pythons == {f"{sys.version_info.major}.{sys.version_info.minor}"}, pythons
    assert "pip install --quiet -e ~/fracray" in text  # the rest of the pins come from pyproject.toml
    config = _load(REPO / "ray-cluster.yaml")
    from fracray.serving.proxy_guard import CALLBACK

    # Every node's raylet starts with Serve's proxy running the request limits and with
    # RAYLET_ENVIRONMENT (idle workers kept), from ray-cluster.yaml and from the image alike.
    node_env = {"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": CALLBACK} | RAYLET_ENVIRONMENT
    dockerfile = (REPO / "cluster" / "Dockerfile").read_text()
    for cmd in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        assert "~/venv/bin/ray " in cmd  # the project's Ray
        if " start " in cmd:
            prefix = cmd.split("~/venv/bin/ray start")[0].split()
            assert dict(v.split("=", 1) for v in prefix) == node_env, cmd
    for name, value in node_env.items():
        assert f"ENV {name}={value}" in dockerfile, name


def test_dockerfile_uses_the_pinned_ray_and_python():
    text = (REPO / "cluster" / "Dockerfile").read_text()
    base = re.search(r"^FROM rayproject/ray:(\S+)-py(\d)(\d+)-gpu", text, re.M)
    assert base, "FROM rayproject/ray:<ray>-py<XY>-gpu"
    assert base.group(1) == PINS["ray"]
    assert f"{base.group(2)}.{base.group(3)}" == f"{sys.version_info.major}.{sys.version_info.minor}"
    for source in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", text, re.M):
        for path in source.split():
            assert (REPO / path).exists(), f"Dockerfile copies {path}, which does not exist"


def test_runtime_env_file_is_valid_and_ships_the_package():
    from ray.runtime_env import RuntimeEnv

    env = _load(REPO / "cluster" / "runtime_env.yaml")
    RuntimeEnv(**env)  # raises on unknown fields
    for module in env["py_modules"]:
        assert (REPO / module / "__init__.py").exists(), module
    from fracray.raycluster import LOCAL_RAY_ENVIRONMENT, RAY_TRAIN_ENVIRONMENT

    # A job on a cluster gets what a command's own local Ray gives Ray Train (the 0.5 s poll), but
    # not the raylet's settings: a job's env_vars reach its workers, never the raylet.
    assert RAY_TRAIN_ENVIRONMENT.items() <= env["env_vars"].items()
    assert not (LOCAL_RAY_ENVIRONMENT.keys() - RAY_TRAIN_ENVIRONMENT.keys()) & env["env_vars"].keys()


# ----------------------------------------------------------------------------- KubeRay

def _containers(cluster_spec: dict) -> list[dict]:
    groups = [cluster_spec["headGroupSpec"]] + cluster_spec["workerGroupSpecs"]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def test_kuberay_manifests_have_the_required_fields():
    cluster = _load(KUBERAY / "raycluster.yaml")
    job = _load(KUBERAY / "rayjob.yaml")
    service = _load(KUBERAY / "rayservice.yaml")
    assert [d["kind"] for d in (cluster, job, service)] == ["RayCluster", "RayJob", "RayService"]
    specs = [cluster["spec"], job["spec"]["rayClusterSpec"], service["spec"]["rayClusterConfig"]]
    for doc in (cluster, job, service):
        assert doc["apiVersion"] == "ray.io/v1" and doc["metadata"]["name"]
    for spec in specs:
        assert spec["rayVersion"] == PINS["ray"]
        assert "rayStartParams" in spec["headGroupSpec"]
        for group in spec["workerGroupSpecs"]:
            assert {"groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template"} <= set(group)
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        images = {c["image"] for c in _containers(spec)}
        assert images == {f"fracray:{PYPROJECT['project']['version']}"}, images
        gpu = [g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu-workers"][0]
        assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
        ports = {p["name"]: p["containerPort"] for p in spec["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]}
        serve_port = _load(REPO / "serving" / "config.yaml")["http_options"]["port"]
        assert ports == {"gcs-server": 6379, "dashboard": 8265, "client": 10001, "serve": serve_port}
    # One cluster definition: the job's and the service's clusters are the RayCluster's.
    assert specs[1] == specs[0] and specs[2] == specs[0]
    accounts = {c_spec["template"]["spec"]["serviceAccountName"]
                for c_spec in [specs[0]["headGroupSpec"]] + specs[0]["workerGroupSpecs"]}
    assert accounts == {_load(KUBERAY / "serviceaccount.yaml")["metadata"]["name"]}


def test_rayjob_entrypoint_runs_train_all_with_flags_it_accepts():
    from fracray.cli.train_all import build_parser, config_from_args

    job = _load(KUBERAY / "rayjob.yaml")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "python" and (REPO / argv[1]).exists() and argv[1] == "pipelines/train_all.py"
    args = build_parser().parse_args(argv[2:])
    assert args.output.startswith("s3://") and args.data.startswith("s3://") and args.use_gpu
    # ... and every one of them lands in the job's config (the GPU flag in the fracture models' TrainConfig).
    config = config_from_args(vars(args))
    assert config.output == args.output and config.data == args.data and config.training.use_gpu
    assert config.training.fracture.use_gpu and config.training.fracture.epochs == args.epochs
    runtime = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert runtime["working_dir"] == "/home/ray/fracray"  # the Dockerfile's WORKDIR
    assert "WORKDIR /home/ray/fracray" in (REPO / "cluster" / "Dockerfile").read_text()


def test_rayservice_runs_serving_config_yaml():
    """serveConfigV2 = serving/config.yaml, except the two args a GPU cluster changes."""
    from ray.serve.schema import ServeDeploySchema

    service = _load(KUBERAY / "rayservice.yaml")
    embedded = yaml.safe_load(service["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(embedded)
    ours = _load(REPO / "serving" / "config.yaml")
    args, our_args = embedded["applications"][0].pop("args"), ours["applications"][0].pop("args")
    assert embedded == ours
    assert args.pop("models").startswith("s3://") and args.pop("num_gpus") == 1
    our_args.pop("models"), our_args.pop("num_gpus")
    assert args == our_args
    module, attr = embedded["applications"][0]["import_path"].split(":")
    assert callable(getattr(importlib.import_module(module), attr))


# ----------------------------------------------------------------------------- two nodes, ray job submit


def _ray_start(args: list[str], env: dict, sessions: list[int]) -> None:
    proc = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    sessions.append(proc.pid)
    output, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, f"ray start {' '.join(args)}\n{output[-3000:]}"


@pytest.fixture
def two_node_cluster():
    """A Ray head and a second Ray node, each its own `ray start` (1 CPU each)."""
    port, dashboard = _free_port(), _free_port()
    # Token auth off: a throwaway cluster on 127.0.0.1 (a second node would need the head's token).
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_AUTH_MODE": "disabled"}
    # Ray started from inside the project's environment (as an activated venv would), so a job's
    # `python` is this environment's Python.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env |= RAYLET_ENVIRONMENT  # as ray-cluster.yaml starts each node
    temp = tempfile.mkdtemp(prefix="fr-ray-", dir="/tmp")  # short: Ray's sockets live here
    sessions: list[int] = []

    def agent_ports() -> list[str]:
        # Each node's agents on ports of their own: another Ray on this machine (the test
        # session's) already holds the default agent port, and a job needs the head's agent.
        return [f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
                f"--runtime-env-agent-port={_free_port()}", f"--metrics-export-port={_free_port()}"]

    try:
        _ray_start(["--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=true",
                    f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1", f"--temp-dir={temp}",
                    "--disable-usage-stats", *agent_ports()], env, sessions)
        _ray_start([f"--address=127.0.0.1:{port}", "--num-cpus=1", f"--temp-dir={temp}", "--disable-usage-stats",
                    *agent_ports()], env, sessions)
        yield {"gcs": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dashboard}", "env": env}
    finally:
        stop_sessions(sessions)


def _run_cli(command: list[str], env: dict, timeout: int) -> str:
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(command)}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    return done.stdout


def _submit(cluster: dict, entrypoint: list[str], timeout: int) -> str:
    ray_bin = str(Path(sys.executable).parent / "ray")
    command = [ray_bin, "job", "submit", "--address", cluster["dashboard"], "--working-dir", str(REPO),
               "--runtime-env", str(REPO / "cluster" / "runtime_env.yaml"), "--", *entrypoint]
    for _ in range(30):  # right after `ray start` the job agent may still be coming up
        done = subprocess.run(command, env=cluster["env"], capture_output=True, text=True, timeout=timeout)
        if "No available agent to submit job" not in done.stderr:
            break
        time.sleep(3)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def _nodes_used(cluster: dict) -> dict[str, set[str]]:
    """Node ids that ran tasks and actors, by job (Ray's state API on the cluster)."""
    from ray.util.state import list_actors, list_tasks

    used: dict[str, set[str]] = {}
    for item in list_tasks(address=cluster["dashboard"], limit=10000, detail=True, raise_on_missing_output=False) + \
            list_actors(address=cluster["dashboard"], limit=10000, detail=True, raise_on_missing_output=False):
        node = item.get("node_id") if isinstance(item, dict) else getattr(item, "node_id", None)
        job = item.get("job_id") if isinstance(item, dict) else getattr(item, "job_id", None)
        if node:
            used.setdefault(job, set()).add(node)
    return used


@pytest.mark.slow
def test_train_all_and_score_archive_run_on_both_nodes(two_node_cluster, tmp_path):
    python = "python"  # the job runs in the cluster's Python: this environment, which started Ray
    out = tmp_path / "run"
    # One model over both parts (the router and per-bone runs are the embedded default's, test_train_all)
    # and the backbone comparison's two runs: three Ray Train runs spread over the two nodes.
    _submit(two_node_cluster, [python, "pipelines/train_all.py", "--output", str(out), "--body-parts",
                               "wrist,humerus", "--synthetic-patients-per-part", "4", "--epochs", "1",
                               "--train-batch-size", "8", "--single-model",
                               "--compare-backbones", "efficientnet_lite0"], timeout=1500)
    index = out / "model_index.json"
    assert index.exists() and (out / "report.md").exists()
    written = json.loads(index.read_text())
    assert written["router"] is None and list(written["classifiers"]) == ["all"]  # --single-model
    # --compare-backbones: the backbone with and without ImageNet weights, validation metrics and a plot.
    report = json.loads((out / "report.json").read_text())
    assert set(report["comparison"]) == {"compare_efficientnet_lite0_imagenet", "compare_efficientnet_lite0_scratch"}
    assert all(c["valid"] and c["valid"]["n"] > 0 and c["seconds"] > 0 for c in report["comparison"].values())
    assert (out / "backbone_comparison.png").exists()
    scores = tmp_path / "scores"
    stdout = _submit(two_node_cluster, [python, "pipelines/score_archive.py", "--input", str(out / "synthetic-mura"),
                                        "--models", str(index), "--output", str(scores), "--concurrency", "2"],
                     timeout=900)
    assert "Scored" in stdout and (scores / "summary.json").exists()
    summary = json.loads((scores / "summary.json").read_text())
    assert summary["scored"] > 0
    used = _nodes_used(two_node_cluster)
    both = [job for job, nodes in used.items() if len(nodes) == 2]
    assert len(both) >= 2, f"train_all and score_archive should each use both nodes; nodes by job: {used}"

    # `serve deploy` of serving/config.yaml onto the same cluster, pointed at the run just trained.
    import requests

    config = _load(REPO / "serving" / "config.yaml")
    port = _free_port()
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    config["applications"][0]["args"]["models"] = str(index)
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    _run_cli([str(Path(sys.executable).parent / "serve"), "deploy", str(path), "-a", two_node_cluster["dashboard"]],
             two_node_cluster["env"], 300)
    wait_ready(f"http://127.0.0.1:{port}", timeout=300)
    image = next((out / "synthetic-mura").rglob("*.png"), None) or next((out / "synthetic-mura").rglob("*.jpg"))
    answer = requests.post(f"http://127.0.0.1:{port}/v1/classify", data=image.read_bytes(), timeout=60)
    assert answer.status_code == 200 and answer.json()["body_part"] == "all", answer.text
    assert 0 <= answer.json()["fracture_probability"] <= 1
