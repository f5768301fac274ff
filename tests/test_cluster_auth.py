"""Token authentication as Ray 2.60 sets it up, on a real cluster (issue 12; README "Scale out").

`ray start --head` turns token authentication on by itself when RAY_AUTH_MODE is unset and a
token exists (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token, which `ray get-auth-token
--generate` or the first local `ray.init()` writes). Its clients do not follow: `ray job submit`
and a `ray.init(address=...)` driver send the token only with RAY_AUTH_MODE=token in their own
environment. Every process here gets a HOME of its own, so the token this test generates never
touches the user's ~/.ray/auth_token; RAY_TMPDIR points `ray job submit` without --address at this
cluster (not at /tmp/ray, another Ray's); the cluster runs in a session of its own, so the test
stops exactly its processes (never `ray stop`)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import requests

from conftest import REPO, _free_port, stop_sessions

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
TRAIN_ALL = ["python", "pipelines/train_all.py", "--body-parts", "wrist", "--synthetic-patients-per-part", "2",
             "--skip-training"]  # the data stage only: cheap


def _run(command: list[str], env: dict, timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)


@pytest.fixture(scope="module")
def token_cluster():
    """A one-node Ray started the way the README says: a token in ~/.ray/auth_token, then a plain
    `ray start --head` (RAY_AUTH_MODE unset: Ray turns token authentication on itself)."""
    home = Path(tempfile.mkdtemp(prefix="fr-home-", dir="/tmp"))
    tmp = tempfile.mkdtemp(prefix="fr-auth-", dir="/tmp")  # short: Ray's sockets live under it
    env = {k: v for k, v in os.environ.items() if k not in AUTH_VARS} | {"HOME": str(home), "RAY_TMPDIR": tmp}
    # Ray started from the project's environment, so a job's `python` is this environment's Python.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    port, dashboard = _free_port(), _free_port()
    sessions: list[int] = []
    try:
        generated = _run([RAY, "get-auth-token", "--generate"], env, 120)
        assert generated.returncode == 0, generated.stderr[-3000:]
        token = (home / ".ray" / "auth_token").read_text()
        assert token and generated.stdout == token

        # Each agent on a port of its own: another Ray on this machine holds the defaults.
        agents = [f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
                  f"--runtime-env-agent-port={_free_port()}", f"--metrics-export-port={_free_port()}"]
        # --temp-dir = Ray's default under RAY_TMPDIR, where `ray job submit` looks for the cluster.
        proc = subprocess.Popen([RAY, "start", "--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=true",
                                 f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1",
                                 f"--temp-dir={tmp}/ray", "--disable-usage-stats", *agents],
                                env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
        sessions.append(proc.pid)
        output, _ = proc.communicate(timeout=180)
        assert proc.returncode == 0, output[-3000:]
        assert ENABLED in output, output[-3000:]
        yield {"gcs": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dashboard}", "env": env,
               "token": token}
    finally:
        stop_sessions(sessions)
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)


def _submit(cluster: dict, env: dict, entrypoint: list[str], address: bool = False) -> subprocess.CompletedProcess:
    """The README's command, from the repository: `ray job submit --working-dir . -- ...`, with or
    without --address http://<dashboard>."""
    command = [RAY, "job", "submit", *(["--address", cluster["dashboard"]] if address else []),
               "--working-dir", ".", "--runtime-env", "cluster/runtime_env.yaml", "--", *entrypoint]
    for _ in range(30):  # right after `ray start` the job agent may still be coming up
        done = _run(command, env, 600)
        if "No available agent to submit job" not in done.stderr:
            return done
        time.sleep(3)
    return done


def _jobs(cluster: dict) -> str:
    listed = _run([RAY, "job", "list", "--address", cluster["dashboard"]], cluster["env"] | {"RAY_AUTH_MODE": "token"}, 120)
    assert listed.returncode == 0, listed.stderr[-3000:]
    return listed.stdout + listed.stderr


@pytest.mark.slow
def test_clients_without_ray_auth_mode_token_are_refused(token_cluster, tmp_path):
    env = token_cluster["env"]  # RAY_AUTH_MODE unset, the cluster's token in ~/.ray/auth_token
    found = _submit(token_cluster, env, [*TRAIN_ALL, "--output", str(tmp_path / "found")])
    assert found.returncode != 0, found.stdout[-3000:]
    assert GCS_REFUSED in found.stderr and NOT_TOKEN_MODE in found.stderr, found.stderr[-3000:]
    named = _submit(token_cluster, env, [*TRAIN_ALL, "--output", str(tmp_path / "named")], address=True)
    assert named.returncode != 0, named.stdout[-3000:]
    assert DASHBOARD_REFUSED in named.stderr and NOT_TOKEN_MODE in named.stderr, named.stderr[-3000:]
    # Nothing was submitted.
    assert str(tmp_path) not in _jobs(token_cluster)

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
    joined = _run(driver, env | {"RAY_AUTH_MODE": "token"}, 120)
    assert joined.returncode == 0 and "CPUs 1.0" in joined.stdout, joined.stderr[-3000:]


@pytest.mark.slow
def test_ray_job_submit_train_all_with_ray_auth_mode_token(token_cluster, tmp_path):
    # The design card's usage: `ray job submit -- python pipelines/train_all.py` (no --address:
    # the cluster the last `ray start` recorded), the token from ~/.ray/auth_token.
    out = tmp_path / "run"
    done = _submit(token_cluster, token_cluster["env"] | {"RAY_AUTH_MODE": "token"}, [*TRAIN_ALL, "--output", str(out)])
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    assert "Every image accounted for" in log and "succeeded" in log, log[-4000:]
    assert (out / "data_stage.json").exists()
    assert str(out) in _jobs(token_cluster)

    # A second machine (a laptop) has no ~/.ray/auth_token: it gets the head's token, here in
    # RAY_AUTH_TOKEN, and names the head's dashboard.
    other_home = tmp_path / "second-machine"
    other_home.mkdir()
    laptop = token_cluster["env"] | {"HOME": str(other_home), "RAY_AUTH_MODE": "token"}
    remote = _submit(token_cluster, laptop | {"RAY_AUTH_TOKEN": token_cluster["token"]},
                     ["python", "-c", "print('from the laptop')"], address=True)
    assert remote.returncode == 0 and "from the laptop" in remote.stdout, remote.stderr[-3000:]
    missing = _submit(token_cluster, laptop, ["python", "-c", "print('never')"], address=True)
    assert missing.returncode != 0 and "couldn't find an authentication token" in missing.stderr, missing.stderr[-3000:]
