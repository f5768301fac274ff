"""Which Ray every command runs on, decided once, said out loud, and checked before joining.

``ray.init()`` on its own joins whatever address ``RAY_ADDRESS`` or the session file of the
last ``ray start`` (``/tmp/ray/ray_current_cluster``) names. When that cluster has died, it
retries the dead GCS for many minutes, printing time-outs. :func:`connect` makes the same
choice as Ray, prints it, and refuses in a few seconds, with what to do, when nothing
listens at the address. Ray is imported only when a command connects.

A local Ray that :func:`connect` starts dies with the command, however the command ends. Ray
ties its GCS, raylet and dashboard to the driver (the kernel kills them when it dies), but not
the raylet's own children: after a SIGKILLed driver its dashboard and runtime-env agents stay
for about a minute (each tries to report the raylet's death to the dead GCS first) and its
workers until they notice. A small watchdog process (:func:`_start_watchdog`) waits for the
driver to end and then stops every process that still holds a file of that Ray session.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import subprocess
import sys
import time
import warnings
from typing import Any, Callable, Mapping

__all__ = ["ClusterChoice", "RayClusterUnreachable", "choose_cluster", "check_reachable", "connect",
           "session_file_path", "verbose", "VERBOSE_ENV", "LOCAL_RAY_ENVIRONMENT", "RAY_TRAIN_ENVIRONMENT",
           "RAYLET_ENVIRONMENT", "apply_local_ray_environment"]

# What to do when the cluster cannot be reached: the two ways out, in every message.
ADVICE = ("Set RAY_ADDRESS=local to start a private local Ray, or `ray stop` to clear the dead cluster's "
          "session files (it also stops any Ray still running on this machine)")
# kwargs that size a new local instance; ray.init refuses them when joining a cluster.
LOCAL_ONLY = ("num_cpus", "num_gpus", "resources", "labels", "object_store_memory")
# GCS connection attempts ray.init makes once the port has answered. Ray's default, 20, is ~20 s when
# the cluster refuses the token and ~13 min when the port is not a GCS (each attempt already waits ~40 s).
JOIN_ATTEMPTS = "1"
# Set (by --verbose) to show Ray's own logs on the console as well as the product's progress.
VERBOSE_ENV = "FRACRAY_VERBOSE"
# What a job's Ray Train runs get, on a local Ray or a cluster (cluster/runtime_env.yaml carries the
# same): Ray Train's controller looks at its workers every 2 s by default, and a run's reports and
# its end wait for that look: ~6 s of a ~33 s run on a 2-core laptop (measured in docs/training.md).
# 0.5 s costs one small call per worker.
RAY_TRAIN_ENVIRONMENT = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
# A raylet's setting, so it acts only where a raylet starts: a command's local Ray, and the `ray start`
# commands of ray-cluster.yaml and the image's environment (cluster/Dockerfile). Beyond one per CPU,
# Ray stops a worker process after 1 s idle; a training run's data tasks idle longer than that
# between epochs, so every epoch started new workers that imported torch again (~2 s of CPU each).
# Kept 30 s, the embedded default took 449 -> 347 s of CPU (docs/training.md).
RAYLET_ENVIRONMENT = {"RAY_idle_worker_killing_time_threshold_ms": "30000"}
# The environment of a local Ray a command starts (its processes inherit the driver's; a value the
# user set wins).
LOCAL_RAY_ENVIRONMENT = RAY_TRAIN_ENVIRONMENT | RAYLET_ENVIRONMENT

RAY_DATA_LOGGING_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ray_data_logging.yaml")


def apply_local_ray_environment() -> None:
    """Put :data:`LOCAL_RAY_ENVIRONMENT` into this process's environment before a local Ray starts
    from it; a value already set wins."""
    for name, value in LOCAL_RAY_ENVIRONMENT.items():
        os.environ.setdefault(name, value)


class RayClusterUnreachable(ConnectionError):
    """The chosen cluster does not answer; the message says which, why and what to do."""


@dataclasses.dataclass(frozen=True)
class ClusterChoice:
    """address: host:port (or ray://host:port) to join, None for a new local instance.
    source: where the address came from, for messages. init_address: what to pass to ray.init
    (None for a cluster found in the session file, so that Ray re-reads it and turns on token
    authentication itself, as it does for clusters it finds)."""

    address: str | None
    source: str
    init_address: str | None

    @property
    def joins(self) -> bool:
        return self.address is not None


def session_file_path(temp_dir: str | None = None) -> str:
    """Ray's record of the last ``ray start`` on this machine (under $RAY_TMPDIR, $TMPDIR or /tmp)."""
    from ray._common.utils import get_ray_address_file

    return get_ray_address_file(temp_dir)


def choose_cluster(address: str | None = None, *, environ: Mapping[str, str] | None = None,
                   session_file: str | None = None) -> ClusterChoice:
    """Ray's own order: an explicit ``address``; else ``RAY_ADDRESS``; else (address None or
    "auto") the cluster recorded in ``session_file``; else a new local instance ("auto" with
    no record: whatever local Ray ray.init finds). "local" always means a new local instance."""
    environ = os.environ if environ is None else environ
    from_env = address in (None, "", "auto") and bool(environ.get("RAY_ADDRESS"))
    if from_env:
        address = environ["RAY_ADDRESS"]
    source = "from RAY_ADDRESS" if from_env else "from the address argument"
    if address == "local":
        return ClusterChoice(None, "RAY_ADDRESS=local" if from_env else "address='local'", "local")
    if address not in (None, "", "auto"):
        return ClusterChoice(address, source, address)
    path = session_file if session_file is not None else session_file_path()
    recorded = _read_session_file(path)
    if recorded:
        return ClusterChoice(recorded, f"recorded by `ray start` in {path}", address or None)
    if address == "auto":
        return ClusterChoice(None, "address='auto' and no `ray start` record: any running local Ray", "auto")
    return ClusterChoice(None, "no RAY_ADDRESS and no `ray start` record", "local")


def _read_session_file(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip() or None
    except OSError:
        return None


def _host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of "host:port" or "ray://host:port"; None for what cannot be checked this way."""
    rest = address.split("://", 1)[1] if address.startswith("ray://") else address
    if "://" in rest:
        return None
    host, sep, port = rest.rstrip("/").rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def check_reachable(address: str, *, timeout_s: float = 5.0) -> str | None:
    """None if something accepts a TCP connection at the address's port within ``timeout_s``
    (retrying, so a head that is just starting gets a moment), else why not. Both the address
    as given and Ray's form of it (local names become the node's IP, which is where
    ``ray start`` listens) are tried."""
    parsed = _host_port(address)
    if parsed is None:
        return None
    host, port = parsed
    hosts = [host]
    try:
        from ray._private.services import resolve_ip_for_localhost

        hosts.append(resolve_ip_for_localhost(host))
    except Exception:  # private API: the address as given is still checked
        pass
    deadline = time.monotonic() + timeout_s
    why = "no answer"
    while True:
        for candidate in dict.fromkeys(hosts):
            remaining = max(0.2, min(2.0, deadline - time.monotonic()))
            try:
                with socket.create_connection((candidate, port), timeout=remaining):
                    return None
            except OSError as exc:
                why = f"TCP connect to {candidate}:{port}: {exc.strerror or exc}"
        if time.monotonic() >= deadline:
            return f"{why} (tried for {timeout_s:g} s)"
        time.sleep(0.25)


def _local_cpus(init_kwargs: Mapping[str, Any]) -> str:
    if init_kwargs.get("num_cpus") is not None:
        return f"{init_kwargs['num_cpus']:g}"
    try:
        from ray._private.utils import get_num_cpus

        return str(get_num_cpus())
    except Exception:
        return str(os.cpu_count() or 1)


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)  # stderr: commands print their JSON results on stdout


def connect(address: str | None = None, *, timeout_s: float = 5.0, log: Callable[[str], None] = _say,
            **init_kwargs: Any) -> ClusterChoice:
    """``ray.init`` for every command and benchmark: decide which Ray (see :func:`choose_cluster`),
    say it in one line, and when joining check first that the GCS port answers, so that a dead
    cluster fails in seconds with :class:`RayClusterUnreachable` instead of hanging. ``init_kwargs``
    go to ``ray.init`` (log_to_driver, num_cpus, runtime_env, ...). A no-op when Ray is already
    initialised in this process (tests, or a caller that connected itself)."""
    import ray

    if ray.is_initialized():
        return ClusterChoice(None, "already initialised in this process", None)
    _quiet_ray(init_kwargs)
    choice = choose_cluster(address, session_file=session_file_path(init_kwargs.get("_temp_dir")))
    if not choice.joins:
        if choice.init_address == "auto":
            log(f"Ray: joining a running local Ray ({choice.source})")
        else:
            log(f"Ray: starting a local Ray instance ({_local_cpus(init_kwargs)} CPUs; {choice.source})")
            apply_local_ray_environment()
        ray.init(address=choice.init_address, **init_kwargs)
        _start_watchdog()
        _after_init(log)
        return choice
    local_only = [k for k in LOCAL_ONLY if init_kwargs.get(k) is not None]
    if local_only:
        raise ValueError(f"{', '.join(local_only)} set a new local Ray's size, but this would join the cluster at "
                         f"{choice.address} ({choice.source}). Set RAY_ADDRESS=local to measure on a private local "
                         f"Ray. Got {({k: init_kwargs[k] for k in local_only})}")
    log(f"Ray: joining the cluster at {choice.address} ({choice.source})")
    why = check_reachable(choice.address, timeout_s=timeout_s)
    if why is not None:
        raise RayClusterUnreachable(f"No Ray cluster answers at {choice.address} ({choice.source}): {why}. "
                                    f"{ADVICE}.")
    token_auth = _enable_token_auth_if_available()
    bounded = "RAY_gcs_server_port_wait_time_s" not in os.environ
    if bounded:  # read by ray.init as it connects; the port answers, so one attempt is enough
        os.environ["RAY_gcs_server_port_wait_time_s"] = JOIN_ATTEMPTS
    try:
        ray.init(address=choice.init_address, **init_kwargs)
    except (ConnectionError, RuntimeError) as exc:
        auth = ("this process sends the token in RAY_AUTH_TOKEN or ~/.ray/auth_token: check that it is the "
                "cluster's (`ray get-auth-token` on its head)" if token_auth else
                "set RAY_AUTH_MODE=token, with its token in RAY_AUTH_TOKEN or ~/.ray/auth_token")
        raise RayClusterUnreachable(f"Something answers at {choice.address} ({choice.source}) but Ray could not join "
                                    f"a cluster there ({exc}). If the cluster uses token authentication (Ray 2.60's "
                                    f"`ray start` turns it on), {auth}. Otherwise it is not a Ray port or the "
                                    f"cluster is stuck: {ADVICE}.") from exc
    finally:
        if bounded:
            os.environ.pop("RAY_gcs_server_port_wait_time_s", None)
    _after_init(log)
    return choice


# The watchdog (run as `python -c`, so it needs nothing but Python): reads its stdin, the read end
# of a pipe whose write end only the driver holds, until EOF (the driver is gone, however it
# ended); then, after a moment for a clean ray.shutdown to finish, stops (SIGTERM, then SIGKILL)
# every process that still has a file open in the session's folder: the session's folder
# name is unique (time and driver pid), and every Ray process keeps its logs open there.
_WATCHDOG = r"""
import os, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGHUP, signal.SIG_IGN)
session = os.path.realpath(sys.argv[1]) + "/"
if not os.path.basename(session[:-1]).startswith("session_"):
    sys.exit(f"not a Ray session folder: {session!r}")
while sys.stdin.buffer.read(4096):
    pass
time.sleep(1.0)
def left():
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(session):
                    out.append(int(pid))
                    break
            except OSError:
                continue
    return out
for sig in (signal.SIGTERM, signal.SIGKILL):
    for pid in left():
        try:
            os.kill(pid, sig)
        except OSError:
            pass
    deadline = time.monotonic() + 5
    while left() and time.monotonic() < deadline:
        time.sleep(0.2)
"""
_watchdog_pipe: int | None = None  # the write end, held open for the driver's whole life


def _start_watchdog() -> None:
    """After ``ray.init`` started a local Ray in this process: a watchdog that stops what is left
    of it when this process ends (see the module's docstring). Linux only (it reads /proc);
    nothing when this process joined a Ray it did not start."""
    global _watchdog_pipe
    import ray

    node = getattr(ray._private.worker, "_global_node", None)  # private: which processes this driver started
    if node is None or not getattr(node, "all_processes", None) or not os.path.isdir("/proc/self/fd"):
        return
    session = os.path.realpath(node.get_session_dir_path())
    if not os.path.basename(session).startswith("session_") or not os.path.isdir(session):
        return  # the watchdog stops only what holds a file in one Ray session's own folder
    read_end, write_end = os.pipe()  # not inheritable: no process started later holds the write end
    try:
        subprocess.Popen([sys.executable, "-c", _WATCHDOG, session], stdin=read_end, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True)
    except OSError:
        os.close(write_end)
        return
    finally:
        os.close(read_end)
    if _watchdog_pipe is not None:  # a second local Ray in this process: the first one's watchdog ends now
        os.close(_watchdog_pipe)
    _watchdog_pipe = write_end


def verbose() -> bool:
    """``--verbose`` (or FRACRAY_VERBOSE=1): Ray's own logs on the console too."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _quiet_ray(init_kwargs: dict[str, Any]) -> None:
    """Unless verbose, the console shows the product's progress, not Ray's: the workers' output
    stays in the session's log files (log_to_driver off), Ray's INFO lines and its deprecation
    warnings are not shown. The caller's own init_kwargs win."""
    if verbose():
        init_kwargs.setdefault("log_to_driver", True)
        return
    init_kwargs.setdefault("log_to_driver", False)
    init_kwargs.setdefault("logging_level", logging.WARNING)
    # Ray Data reconfigures its logger for every dataset it runs, from this file when set.
    os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", RAY_DATA_LOGGING_CONFIG)
    if "ray.data" in sys.modules:
        from ray.data._internal.logging import configure_logging  # private: Ray Data's own reconfiguration

        configure_logging()
    for name in ("ray", "ray.train", "ray.serve"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for category in (DeprecationWarning, FutureWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category, module=r"ray(\.|$)")
    # A notice about Ray itself, not about the job (filters apply on the logger that logs).
    logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(_drop_token_notice)


def _drop_token_notice(record: logging.LogRecord) -> bool:
    return "Token authentication is enabled for this Ray cluster" not in record.getMessage()


def _after_init(log: Callable[[str], None]) -> None:
    import ray

    if verbose():
        return
    for name in ("ray", "ray.train", "ray.serve"):  # ray.init configured them again
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        logs = ray._private.worker._global_node.get_logs_dir_path()  # private: only for the message
    except Exception:
        logs = "the Ray session's logs folder (/tmp/ray/session_latest/logs on the head)"
    log(f"Ray's own logs: {logs} (--verbose shows them here)")


def _enable_token_auth_if_available() -> bool:
    """When RAY_AUTH_MODE is unset and a token is at hand, turn token authentication on, as
    ray.init does for clusters it finds itself but not for an explicit address (RAY_ADDRESS).
    Harmless against a cluster without authentication (it ignores the token)."""
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )

        return bool(maybe_enable_token_auth_if_token_available(warn_if_disabled=False))
    except Exception:  # private API moved: leave authentication to Ray's defaults
        return os.environ.get("RAY_AUTH_MODE", "").lower() == "token"
