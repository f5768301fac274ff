"""Cluster deployment files: ray-cluster.yaml against Ray's own schema and the project's pins,
the KubeRay manifests against each other, the code and serving/config.yaml, and a real
two-node Ray cluster on this machine, token-authenticated as Ray 2.60 sets it up (docs/scale-out.md),
running train_all and score_archive via `ray job submit` and refusing clients without the token.

`ray start --head` turns token authentication on by itself when RAY_AUTH_MODE is unset and a
token exists (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token, which `ray get-auth-token
--generate` or the first local `ray.init()` writes). Its clients do not follow: `ray job submit`,
`ray start --address` and a `ray.init(address=...)` driver send the token only with
RAY_AUTH_MODE=token in their own environment. Every process here gets a HOME of its own, so the
token this test generates never touches the user's ~/.ray/auth_token; RAY_TMPDIR points `ray job
submit` without --address at this cluster (not at /tmp/ray, another Ray's); each node runs in a
session of its own, so the test stops exactly its processes (never `ray stop`)."""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import shlex
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import pytest
import requests
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


# ----------------------------------------------------------------------------- two nodes, token auth, ray job submit

RAY = str(Path(sys.executable).parent / "ray")
# What a user's shell may carry that would change which cluster, mode or token the test sees.
AUTH_VARS = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
# What Ray prints: `ray start --head` with a token at hand, and clients without RAY_AUTH_MODE=token
# (`ray job submit` finding the cluster itself asks the GCS first; with --address http://... the dashboard).
ENABLED = "Token authentication is enabled for this Ray cluster"
GCS_REFUSED = "ray.exceptions.AuthenticationError: RPC error: InvalidAuthToken: Authentication token is missing or incorrect"
DASHBOARD_REFUSED = "ray.exceptions.AuthenticationError: Authentication required: Unauthorized: Missing authentication token"
NOT_TOKEN_MODE = "Note: RAY_AUTH_MODE is currently 'disabled' (not 'token')"
DRIVER_REFUSED = "Unauthenticated: RPC error: InvalidAuthToken: Authentication token is missing or incorrect"


def _run(command: list[str], env: dict, timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def _ray_start(args: list[str], env: dict, sessions: list[int]) -> str:
    proc = subprocess.Popen([RAY, "start", *args], env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    sessions.append(proc.pid)
    output, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, f"ray start {' '.join(args)}\n{output[-3000:]}"
    return output


@pytest.fixture(scope="module")
def token_cluster():
    """A Ray head and a second Ray node (1 CPU each), started as docs/scale-out.md says: a token in
    ~/.ray/auth_token, a plain `ray start --head` (RAY_AUTH_MODE unset: Ray turns token
    authentication on itself), then `RAY_AUTH_MODE=token ray start --address=<head>` for the second
    node, each node as ray-cluster.yaml starts it (RAYLET_ENVIRONMENT)."""
    home = Path(tempfile.mkdtemp(prefix="fr-home-", dir="/tmp"))
    tmp = tempfile.mkdtemp(prefix="fr-ray-", dir="/tmp")  # short: Ray's sockets live under it
    env = {k: v for k, v in os.environ.items() if k not in AUTH_VARS} | {"HOME": str(home), "RAY_TMPDIR": tmp}
    # Ray started from inside the project's environment (as an activated venv would), so a job's
    # `python` is this environment's Python.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env |= RAYLET_ENVIRONMENT
    port, dashboard = _free_port(), _free_port()
    sessions: list[int] = []

    def agent_ports() -> list[str]:
        # Each node's agents on ports of their own: another Ray on this machine (the test
        # session's) already holds the default agent port, and a job needs the head's agent.
        return [f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
                f"--runtime-env-agent-port={_free_port()}", f"--metrics-export-port={_free_port()}"]

    try:
        generated = _run([RAY, "get-auth-token", "--generate"], env, 120)
        assert generated.returncode == 0, generated.stderr[-3000:]
        token = (home / ".ray" / "auth_token").read_text()
        assert token and generated.stdout == token
        # --temp-dir = Ray's default under RAY_TMPDIR, where `ray job submit` looks for the cluster.
        output = _ray_start(["--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=true",
                             f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1", f"--temp-dir={tmp}/ray",
                             "--disable-usage-stats", *agent_ports()], env, sessions)
        assert ENABLED in output, output[-3000:]
        _ray_start([f"--address=127.0.0.1:{port}", "--num-cpus=1", f"--temp-dir={tmp}/ray", "--disable-usage-stats",
                    *agent_ports()], env | {"RAY_AUTH_MODE": "token"}, sessions)
        yield {"gcs": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dashboard}", "env": env, "token": token}
    finally:
        stop_sessions(sessions)
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)


def _submit(cluster: dict, env: dict, entrypoint: list[str], *, address: bool = True,
            timeout: int = 600) -> subprocess.CompletedProcess:
    """The README's command, from the repository: `ray job submit --working-dir . -- ...`, with or
    without --address http://<dashboard>."""
    command = [RAY, "job", "submit", *(["--address", cluster["dashboard"]] if address else []),
               "--working-dir", ".", "--runtime-env", "cluster/runtime_env.yaml", "--", *entrypoint]
    for _ in range(30):  # right after `ray start` the job agent may still be coming up
        done = _run(command, env, timeout)
        if "No available agent to submit job" not in done.stderr:
            return done
        time.sleep(3)
    return done


def _token(cluster: dict) -> dict:
    return cluster["env"] | {"RAY_AUTH_MODE": "token"}


def _jobs(cluster: dict) -> str:
    listed = _run([RAY, "job", "list", "--address", cluster["dashboard"]], _token(cluster), 120)
    assert listed.returncode == 0, listed.stderr[-3000:]
    return listed.stdout + listed.stderr


def _nodes_used(cluster: dict) -> dict[str, set[str]]:
    """Node ids that ran tasks and actors, by job (Ray's state API on the cluster, with the token)."""
    code = """import json, sys
from ray.util.state import list_actors, list_tasks
used = {}
options = dict(address=sys.argv[1], limit=10000, detail=True, raise_on_missing_output=False)
for item in list_tasks(**options) + list_actors(**options):
    node = item.get("node_id") if isinstance(item, dict) else getattr(item, "node_id", None)
    job = item.get("job_id") if isinstance(item, dict) else getattr(item, "job_id", None)
    if node:
        used.setdefault(str(job), set()).add(node)
print(json.dumps({job: sorted(nodes) for job, nodes in used.items()}))
"""
    done = _run([sys.executable, "-c", code, cluster["dashboard"]], _token(cluster), 120)
    assert done.returncode == 0, done.stderr[-3000:]
    return {job: set(nodes) for job, nodes in json.loads(done.stdout).items()}


@pytest.mark.slow
def test_clients_without_ray_auth_mode_token_are_refused(token_cluster, tmp_path):
    env = token_cluster["env"]  # RAY_AUTH_MODE unset, the cluster's token in ~/.ray/auth_token
    never = ["python", "pipelines/train_all.py", "--skip-training", "--output"]
    found = _submit(token_cluster, env, [*never, str(tmp_path / "found")], address=False)
    assert found.returncode != 0, found.stdout[-3000:]
    assert GCS_REFUSED in found.stderr and NOT_TOKEN_MODE in found.stderr, found.stderr[-3000:]
    named = _submit(token_cluster, env, [*never, str(tmp_path / "named")])
    assert named.returncode != 0, named.stdout[-3000:]
    assert DASHBOARD_REFUSED in named.stderr and NOT_TOKEN_MODE in named.stderr, named.stderr[-3000:]
    assert str(tmp_path) not in _jobs(token_cluster)  # nothing was submitted

    # The dashboard's HTTP API (what `ray job submit` talks to) wants the token as a bearer header.
    jobs = f"{token_cluster['dashboard']}/api/jobs/"
    anonymous = requests.get(jobs, timeout=30)
    assert anonymous.status_code == 401 and "Missing authentication token" in anonymous.text
    assert requests.get(jobs, headers={"Authorization": "Bearer wrong"}, timeout=30).status_code == 403
    assert requests.get(jobs, headers={"Authorization": f"Bearer {token_cluster['token']}"}, timeout=30).status_code == 200

    # A Python driver given the address is refused by the GCS without RAY_AUTH_MODE=token, joins with it.
    driver = [sys.executable, "-c", f"import ray; ray.init(address={token_cluster['gcs']!r}, log_to_driver=False); "
                                    "print('CPUs', ray.cluster_resources()['CPU'])"]
    refused = _run(driver, env | {"RAY_gcs_server_port_wait_time_s": "1"}, 120)
    assert refused.returncode != 0 and DRIVER_REFUSED in refused.stderr, refused.stderr[-3000:]
    joined = _run(driver, _token(token_cluster), 120)
    assert joined.returncode == 0 and "CPUs 2.0" in joined.stdout, joined.stderr[-3000:]  # both nodes

    # A second machine (a laptop) has no ~/.ray/auth_token: it gets the head's token, here in
    # RAY_AUTH_TOKEN, and names the head's dashboard.
    other_home = tmp_path / "second-machine"
    other_home.mkdir()
    laptop = _token(token_cluster) | {"HOME": str(other_home)}
    remote = _submit(token_cluster, laptop | {"RAY_AUTH_TOKEN": token_cluster["token"]},
                     ["python", "-c", "print('from the laptop')"])
    assert remote.returncode == 0 and "from the laptop" in remote.stdout, remote.stderr[-3000:]
    missing = _submit(token_cluster, laptop, ["python", "-c", "print('never')"])
    assert missing.returncode != 0 and "couldn't find an authentication token" in missing.stderr, missing.stderr[-3000:]


@pytest.mark.slow
def test_train_all_and_score_archive_run_on_both_nodes(token_cluster, tmp_path):
    python = "python"  # the job runs in the cluster's Python: this environment, which started Ray
    out = tmp_path / "run"
    # The design card's usage: `ray job submit -- python pipelines/train_all.py` (no --address: the
    # cluster the last `ray start` recorded), the token from ~/.ray/auth_token. One model over both
    # parts (the router and per-bone runs are the embedded default's, test_train_all) and the backbone
    # comparison's two runs: three Ray Train runs spread over the two nodes.
    trained = _submit(token_cluster, _token(token_cluster),
                      [python, "pipelines/train_all.py", "--output", str(out), "--body-parts", "wrist,humerus",
                       "--synthetic-patients-per-part", "4", "--epochs", "1", "--train-batch-size", "8",
                       "--single-model", "--compare-backbones", "efficientnet_lite0"], address=False, timeout=1500)
    log = trained.stdout + trained.stderr
    assert trained.returncode == 0, log[-6000:]
    assert "Every image accounted for" in log and "succeeded" in log, log[-6000:]
    assert str(out) in _jobs(token_cluster)
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
    scored = _submit(token_cluster, _token(token_cluster),
                     [python, "pipelines/score_archive.py", "--input", str(out / "synthetic-mura"), "--models",
                      str(index), "--output", str(scores), "--concurrency", "2"], timeout=900)
    assert scored.returncode == 0, scored.stdout[-3000:] + scored.stderr[-3000:]
    assert "Scored" in scored.stdout and (scores / "summary.json").exists()
    summary = json.loads((scores / "summary.json").read_text())
    assert summary["scored"] > 0
    used = _nodes_used(token_cluster)
    both = [job for job, nodes in used.items() if len(nodes) == 2]
    assert len(both) >= 2, f"train_all and score_archive should each use both nodes; nodes by job: {used}"

    # `serve deploy` of serving/config.yaml onto the same cluster, pointed at the run just trained.
    config = _load(REPO / "serving" / "config.yaml")
    port = _free_port()
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    config["applications"][0]["args"]["models"] = str(index)
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    deployed = _run([str(Path(sys.executable).parent / "serve"), "deploy", str(path), "-a", token_cluster["dashboard"]],
                    _token(token_cluster), 300)
    assert deployed.returncode == 0, deployed.stdout[-2000:] + deployed.stderr[-2000:]
    wait_ready(f"http://127.0.0.1:{port}", timeout=300)
    image = next((out / "synthetic-mura").rglob("*.png"), None) or next((out / "synthetic-mura").rglob("*.jpg"))
    answer = requests.post(f"http://127.0.0.1:{port}/v1/classify", data=image.read_bytes(), timeout=60)
    assert answer.status_code == 200 and answer.json()["body_part"] == "all", answer.text
    assert 0 <= answer.json()["fracture_probability"] <= 1
