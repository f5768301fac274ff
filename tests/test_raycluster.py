"""Which Ray a command joins: RAY_ADDRESS, the last `ray start` (its session file), or a new
local one; a dead cluster fails in seconds with what to do, never hangs. The session file
is isolated with RAY_TMPDIR (where Ray itself looks), so the machine's /tmp/ray is untouched."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from conftest import REPO, _free_port
from fracray.raycluster import ADVICE, LOCAL_RAY_ENVIRONMENT, check_reachable, choose_cluster, session_file_path


def _dead_address() -> str:
    return f"127.0.0.1:{_free_port()}"  # nothing listens there once the probe socket is closed


def test_choose_cluster_follows_rays_order(tmp_path):
    session = tmp_path / "ray_current_cluster"
    none = str(tmp_path / "missing")
    assert choose_cluster(environ={}, session_file=none).init_address == "local"
    assert not choose_cluster(environ={}, session_file=none).joins
    session.write_text("10.0.0.1:6379\n")
    found = choose_cluster(environ={}, session_file=str(session))
    assert found.address == "10.0.0.1:6379" and str(session) in found.source
    assert found.init_address is None  # ray.init re-reads the file and turns on token auth itself
    env = choose_cluster(environ={"RAY_ADDRESS": "10.0.0.2:6379"}, session_file=str(session))
    assert env.address == env.init_address == "10.0.0.2:6379" and "RAY_ADDRESS" in env.source
    local = choose_cluster(environ={"RAY_ADDRESS": "local"}, session_file=str(session))
    assert not local.joins and local.init_address == "local"
    assert choose_cluster("10.0.0.3:6379", environ={"RAY_ADDRESS": "10.0.0.2:6379"}).address == "10.0.0.3:6379"
    auto = choose_cluster("auto", environ={}, session_file=none)
    assert not auto.joins and auto.init_address == "auto"


def test_session_file_is_where_ray_looks_under_ray_tmpdir(tmp_path, monkeypatch):
    from ray._private.services import get_ray_address_from_environment

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    path = session_file_path()
    assert path == str(tmp_path / "ray" / "ray_current_cluster")
    os.makedirs(os.path.dirname(path))
    dead = _dead_address()
    with open(path, "w") as f:
        f.write(dead)
    assert get_ray_address_from_environment(None, None) == dead  # what a bare ray.init() would join
    assert choose_cluster().address == dead


def test_check_reachable(tmp_path):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        assert check_reachable(f"127.0.0.1:{server.getsockname()[1]}", timeout_s=2) is None
    started = time.monotonic()
    why = check_reachable(_dead_address(), timeout_s=1)
    assert why and "TCP connect" in why and time.monotonic() - started < 5
    assert check_reachable("anyscale://cluster") is None  # not a host:port: left to Ray


def _run(command: str, args: list[str], env: dict[str, str], cwd) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    out = subprocess.run([sys.executable, str(REPO / "pipelines" / f"{command}.py"), *args], env=env, cwd=cwd,
                         capture_output=True, text=True, timeout=120)
    return out, time.monotonic() - started


def test_dead_ray_address_fails_in_seconds_with_what_to_do(tmp_path, untrained_index):
    dead = _dead_address()
    env = dict(os.environ, RAY_ADDRESS=dead)
    out, seconds = _run("score_archive", ["--input", str(tmp_path), "--models", untrained_index,
                                          "--output", str(tmp_path / "scores")], env, tmp_path)
    assert out.returncode == 2 and seconds < 30, (seconds, out.stderr[-3000:])
    assert f"Ray: joining the cluster at {dead} (from RAY_ADDRESS)" in out.stderr
    error = out.stderr.strip().splitlines()[-1]
    assert error.startswith(f"error: No Ray cluster answers at {dead}") and ADVICE in error
    assert "RAY_ADDRESS=local" in error and "`ray stop`" in error
    assert "Traceback" not in out.stderr and "GCS" not in out.stderr  # no time-outs printed by Ray
    assert not (tmp_path / "scores").exists()


def test_dead_cluster_in_the_session_file_fails_in_seconds(tmp_path, untrained_index, fracatlas_root):
    """A `ray start` cluster that died and left its address behind (in an isolated RAY_TMPDIR)."""
    session = tmp_path / "raytmp" / "ray" / "ray_current_cluster"
    session.parent.mkdir(parents=True)
    dead = _dead_address()
    session.write_text(dead)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": str(tmp_path / "raytmp")}
    out, seconds = _run("evaluate", ["--models", untrained_index, "--dataset", "fracatlas", "--data",
                                     str(fracatlas_root), "--split", "all"], env, tmp_path)
    assert out.returncode == 2 and seconds < 30, (seconds, out.stderr[-3000:])
    assert f"Ray: joining the cluster at {dead} (recorded by `ray start` in {session})" in out.stderr
    error = out.stderr.strip().splitlines()[-1]
    assert error.startswith(f"error: No Ray cluster answers at {dead}") and ADVICE in error
    assert "Traceback" not in out.stderr and out.stdout == ""


@pytest.mark.parametrize("kwargs", [{"num_cpus": 2}])
def test_local_only_settings_are_refused_when_joining(tmp_path, kwargs):
    """A benchmark sized with num_cpus would silently measure a whole cluster: refused, with the way out."""
    code = ("import sys; from fracray.raycluster import connect\n"
            "try:\n    connect(**%r)\nexcept ValueError as e:\n    print(e); sys.exit(3)\n" % kwargs)
    env = dict(os.environ, RAY_ADDRESS=_dead_address())
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 3 and "RAY_ADDRESS=local" in out.stdout and "num_cpus" in out.stdout


_DRIVER = """
import os, sys, time
from fracray.raycluster import connect
import ray
connect(num_cpus=1, include_dashboard=False)
@ray.remote
class Holder:
    def pid(self):
        return os.getpid()
    def env(self, name):
        return os.environ.get(name)
holder = Holder.remote()
ray.get(holder.pid.remote())
print("POLL", ray.get(holder.env.remote("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")), flush=True)
@ray.remote(num_cpus=0.25)
def busy():
    time.sleep(2)
    return os.getpid()
first = set(ray.get([busy.remote() for _ in range(4)]))
time.sleep(3)  # idle longer than Ray's 1 s before it stops workers beyond one per CPU
print("REUSED", len(first), len(first & set(ray.get([busy.remote() for _ in range(4)]))), flush=True)
print("SESSION", os.path.realpath(ray._private.worker._global_node.get_session_dir_path()), flush=True)
time.sleep(600)
"""


def _holding(session: str) -> list[str]:
    """Processes (pid:name) that hold a file of the Ray session ``session`` open."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
            name = open(f"/proc/{pid}/comm").read().strip()
        except OSError:
            continue
        if any(link.startswith(session + "/") for link in links):
            out.append(f"{pid}:{name}")
    return out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_sigkilled_driver_takes_its_local_ray_with_it(tmp_path):
    """A command's own local Ray (connect) dies with it, even by SIGKILL: no agent, worker or
    actor of that session is left (Ray's agents alone stay ~60 s, reporting to the dead GCS)."""
    script = tmp_path / "driver.py"
    script.write_text(_DRIVER)
    env = {**os.environ, "RAY_ADDRESS": "local", "PYTHONPATH": str(REPO / "lib")}
    for name in LOCAL_RAY_ENVIRONMENT:  # what connect() gives the Ray it starts (below)
        env.pop(name, None)
    proc = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, start_new_session=True)
    try:
        line, lines = "", []
        deadline = time.time() + 180
        while not line.startswith("SESSION") and time.time() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            assert line or proc.poll() is None, "the driver exited before its Ray started"
        # The local Ray's workers poll Ray Train's workers every 0.5 s (raycluster.LOCAL_RAY_ENVIRONMENT).
        assert "POLL 0.5\n" in lines, lines
        # ... and keep idle workers 30 s, not 1 s: the second round of tasks runs in the first
        # round's processes (Ray's 1 s keeps one per CPU, here 1, and starts the others anew).
        first, reused = map(int, next(x for x in lines if x.startswith("REUSED")).split()[1:])
        assert first >= 2 and reused >= 2, lines
        session = line.split(None, 1)[1].strip()
        before = _holding(session)
        assert any("raylet" in p for p in before) and any("DashboardA" in p or "RuntimeEnv" in p for p in before), before
    finally:
        proc.kill()  # SIGKILL: no atexit, no ray.shutdown
        proc.wait(30)
    deadline = time.time() + 20
    while _holding(session) and time.time() < deadline:
        time.sleep(0.5)
    assert _holding(session) == [], f"left of the driver's Ray after 20 s: {_holding(session)}"
