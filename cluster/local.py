"""Local services on 127.0.0.1: a Ray head, an MLflow tracking server and an S3-compatible server.

    python -m cluster.local up [--services s3,mlflow,ray]   # idempotent; waits until healthy
    python -m cluster.local status
    python -m cluster.local env                             # shell exports for the running services
    python -m cluster.local down                            # stops only what `up` started

State lives in ``$TITOK_HOME/services`` (default ``./.titok/services``): ``services.json`` (pids, ports,
URLs) and ``env.sh``. Entry points call :func:`apply_service_env`, so once ``up`` has run, training,
sharding and evaluation use these services without further flags; variables already set in the
environment always win, so a real cluster, real S3 or a remote MLflow server work unchanged by URL.

The S3 server is moto's standalone server (in-memory; MinIO or real S3 are used by pointing
``AWS_ENDPOINT_URL`` elsewhere). The Ray head runs with token authentication (the token file is
created here with mode 0600), since Ray's GCS listens on all interfaces.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

HOST = "127.0.0.1"
SERVICES = ("s3", "mlflow", "ray")  # start order: Ray workers inherit the S3 settings of its env
DEFAULT_PORTS = {"s3": 9900, "mlflow": 5050, "ray": 6380, "ray_dashboard": 8266}
DEFAULT_BUCKET = "titok"
# moto accepts any credentials; these dummies are not secrets.
S3_DUMMY_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "titok-local", "AWS_SECRET_ACCESS_KEY": "titok-local-secret",
                        "AWS_DEFAULT_REGION": "us-east-1"}
START_TIMEOUT_S = {"s3": 30.0, "mlflow": 90.0, "ray": 90.0}


class ServiceError(RuntimeError):
    pass


@dataclass
class Service:
    name: str
    pid: int
    port: int
    url: str
    log: str
    env: dict[str, str] = field(default_factory=dict)
    extra: dict[str, int | str] = field(default_factory=dict)

    def alive(self) -> bool:
        return pid_alive(self.pid)

    def healthy(self) -> bool:
        return self.alive() and check_health(self)


def state_dir_default() -> Path:
    return Path(os.environ.get("TITOK_HOME", ".titok")).resolve() / "services"


def _bin(name: str) -> str:
    """Console scripts of this venv first (the services must run on the pinned stack)."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else (shutil.which(name) or name)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex((HOST, port)) == 0


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours still answers kill(0); treat it as dead.
    with contextlib.suppress(Exception):
        import psutil

        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    return True


def _pick_port(requested: int | None, default: int | None) -> int:
    if requested:
        if port_in_use(requested):
            raise ServiceError(f"port {requested} on {HOST} is already in use")
        return requested
    if default and not port_in_use(default):
        return default
    return free_port()


def _spawn(cmd: list[str], log_path: Path, env: dict[str, str] | None = None) -> int:
    """Start a service in its own session/process group, so `down` can stop all its children."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, **(env or {})}
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=full_env, start_new_session=True, close_fds=True)
    return proc.pid


def _wait_healthy(service: Service, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not service.alive():
            tail = _tail(service.log)
            raise ServiceError(f"{service.name} exited during start-up; last log lines:\n{tail}")
        if check_health(service):
            return
        time.sleep(0.5)
    stop_service(service)
    raise ServiceError(f"{service.name} did not become healthy within {timeout_s:.0f}s; see {service.log}")


def _tail(path: str, lines: int = 15) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    return ""


def _http_ok(url: str, timeout: float = 2.0) -> bool:
    """The server answers HTTP (any status below 500; e.g. Ray's dashboard says 401 without a token)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (loopback only)
            return resp.status < 500
    except urllib.error.HTTPError as err:
        return err.code < 500
    except Exception:
        return False


def check_health(service: Service) -> bool:
    if service.name == "s3":
        return _http_ok(f"{service.url}/moto-api/")
    if service.name == "mlflow":
        return _http_ok(f"{service.url}/health")
    if service.name == "ray":
        dash = service.extra.get("dashboard_url")
        return port_in_use(service.port) and (not dash or _http_ok(f"{dash}/api/version"))
    return service.alive()


# ----------------------------------------------------------------------------------------------
# Starting each service


def start_s3(state_dir: Path, port: int | None = None, bucket: str = DEFAULT_BUCKET) -> Service:
    port = _pick_port(port, DEFAULT_PORTS["s3"] if port is None and state_dir == state_dir_default() else None)
    log = state_dir / "s3.log"
    pid = _spawn([_bin("moto_server"), "-H", HOST, "-p", str(port)], log)
    url = f"http://{HOST}:{port}"
    env = {"AWS_ENDPOINT_URL": url, **S3_DUMMY_CREDENTIALS}
    service = Service("s3", pid, port, url, str(log), env=env, extra={"bucket": bucket})
    _wait_healthy(service, START_TIMEOUT_S["s3"])
    if bucket:
        _create_bucket(url, bucket)
    return service


def _create_bucket(endpoint: str, bucket: str) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id=S3_DUMMY_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=S3_DUMMY_CREDENTIALS["AWS_SECRET_ACCESS_KEY"])
    with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou, client.exceptions.BucketAlreadyExists):
        client.create_bucket(Bucket=bucket)


def start_mlflow(state_dir: Path, port: int | None = None, artifacts: str | None = None,
                 s3_env: dict[str, str] | None = None) -> Service:
    """MLflow tracking server: SQLite backend store; artifacts in a local dir or on S3 (proxied)."""
    port = _pick_port(port, DEFAULT_PORTS["mlflow"] if state_dir == state_dir_default() else None)
    state_dir.mkdir(parents=True, exist_ok=True)
    db = state_dir / "mlflow.db"
    artifacts = artifacts or str(state_dir / "mlflow-artifacts")
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    if artifacts.startswith("s3://"):
        # The local S3 server's settings, else real S3 through the default credential chain.
        env.update(s3_env or {})
        endpoint = (s3_env or {}).get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            env["MLFLOW_S3_ENDPOINT_URL"] = endpoint
    cmd = [_bin("mlflow"), "server", "--backend-store-uri", f"sqlite:///{db}", "--artifacts-destination",
           artifacts, "--host", HOST, "--port", str(port), "--workers", "1"]
    log = state_dir / "mlflow.log"
    pid = _spawn(cmd, log, env)
    url = f"http://{HOST}:{port}"
    service = Service("mlflow", pid, port, url, str(log), env={"MLFLOW_TRACKING_URI": url},
                      extra={"artifacts": artifacts})
    _wait_healthy(service, START_TIMEOUT_S["mlflow"])
    return service


def start_ray(state_dir: Path, port: int | None = None, dashboard_port: int | None = None,
              num_cpus: int | None = None, extra_env: dict[str, str] | None = None) -> Service:
    """A Ray head (``ray start --head --block``) with token authentication."""
    default = state_dir == state_dir_default()
    port = _pick_port(port, DEFAULT_PORTS["ray"] if default else None)
    dashboard_port = _pick_port(dashboard_port, DEFAULT_PORTS["ray_dashboard"] if default else None)
    state_dir.mkdir(parents=True, exist_ok=True)
    token_path = state_dir / "ray_auth_token"
    if not token_path.exists():
        token_path.write_text(secrets.token_hex(32))
        token_path.chmod(0o600)
    auth_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path)}
    cmd = [_bin("ray"), "start", "--head", "--block", f"--node-ip-address={HOST}", f"--port={port}",
           f"--dashboard-host={HOST}", f"--dashboard-port={dashboard_port}", "--disable-usage-stats",
           f"--ray-client-server-port={free_port()}"]
    if num_cpus is not None:
        cmd.append(f"--num-cpus={num_cpus}")
    log = state_dir / "ray.log"
    pid = _spawn(cmd, log, {**(extra_env or {}), **auth_env})
    dashboard_url = f"http://{HOST}:{dashboard_port}"
    env = {"RAY_ADDRESS": f"{HOST}:{port}", "RAY_API_SERVER_ADDRESS": dashboard_url, **auth_env}
    service = Service("ray", pid, port, f"{HOST}:{port}", str(log), env=env,
                      extra={"dashboard_url": dashboard_url, "dashboard_port": dashboard_port})
    _wait_healthy(service, START_TIMEOUT_S["ray"])
    return service


def stop_service(service: Service, timeout_s: float = 10.0) -> None:
    """Stop the process group (session) that was started for this service, and nothing else.

    The session's leader is asked first, alone: ``ray start --block`` then stops its node's processes
    in their order, and an idle head node is gone in 2 to 5 s (one that has just run a training job
    took ~11 s). Signalled all at once, the GCS and the raylet each wait out their own timeouts instead
    (~24 s for an idle head node, then killed). Whatever of the session is still running when the leader
    has exited (or after ``timeout_s``) gets SIGTERM, then SIGKILL.
    """
    if not pid_alive(service.pid):
        return
    deadline = time.monotonic() + timeout_s
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(service.pid, signal.SIGTERM)
    _wait_until_gone([service.pid], deadline)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        # Children that appeared meanwhile (e.g. Ray workers) belong to the same session.
        members = [p for p in _session_members(service.pid, include_leader=False) + [service.pid] if pid_alive(p)]
        if not members:
            break
        for pid in members:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        grace_s = max(deadline - time.monotonic(), 1.0) if sig == signal.SIGTERM else 5.0
        _wait_until_gone(members, time.monotonic() + grace_s)
    # Reap our own child if it was started by this process (tests).
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(service.pid, os.WNOHANG)


def _wait_until_gone(pids: list[int], deadline: float) -> None:
    while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
        time.sleep(0.1)


def _session_members(leader_pid: int, include_leader: bool = True) -> list[int]:
    """PIDs whose session id is the service's session (it was started with setsid)."""
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil comes with ray
        return [leader_pid]
    out = []
    for proc in psutil.process_iter(["pid"]):
        with contextlib.suppress(psutil.Error, OSError):
            if os.getsid(proc.info["pid"]) == leader_pid and (include_leader or proc.info["pid"] != leader_pid):
                out.append(proc.info["pid"])
    return out


# ----------------------------------------------------------------------------------------------
# State file and the up/down/status commands


def load_state(state_dir: Path | None = None) -> dict[str, Service]:
    path = (state_dir or state_dir_default()) / "services.json"
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    return {name: Service(**record) for name, record in data.get("services", {}).items()}


def save_state(services: dict[str, Service], state_dir: Path | None = None) -> None:
    state_dir = state_dir or state_dir_default()
    state_dir.mkdir(parents=True, exist_ok=True)
    payload = {"services": {name: asdict(s) for name, s in services.items()}}
    tmp = state_dir / "services.json.tmp"
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, state_dir / "services.json")
    env = service_env(services)
    lines = [f"export {k}={_shell_quote(v)}" for k, v in sorted(env.items())]
    (state_dir / "env.sh").write_text("\n".join(lines) + "\n")


def _shell_quote(value: str) -> str:
    import shlex

    return shlex.quote(value)


def service_env(services: dict[str, Service]) -> dict[str, str]:
    env: dict[str, str] = {}
    for name in SERVICES:
        if name in services:
            env.update(services[name].env)
    return env


def up(names: Iterable[str] = SERVICES, state_dir: Path | None = None, *, mlflow_artifacts: str | None = None,
       ports: dict[str, int] | None = None, ray_num_cpus: int | None = None, quiet: bool = False) -> dict[str, Service]:
    """Start the named services unless they are already running and healthy. Returns all services."""
    state_dir = state_dir or state_dir_default()
    ports = ports or {}
    names = [n for n in SERVICES if n in set(names)]
    unknown = set(names) - set(SERVICES)
    if unknown:
        raise ServiceError(f"unknown service(s) {sorted(unknown)}; valid: {', '.join(SERVICES)}")
    services = load_state(state_dir)
    for name in names:
        existing = services.get(name)
        if existing and existing.healthy():
            _say(quiet, f"{name}: already running at {existing.url} (pid {existing.pid})")
            continue
        if existing:
            stop_service(existing)
        s3_env = services["s3"].env if "s3" in services else None
        if name == "s3":
            service = start_s3(state_dir, ports.get("s3"))
        elif name == "mlflow":
            service = start_mlflow(state_dir, ports.get("mlflow"), artifacts=mlflow_artifacts, s3_env=s3_env)
        else:
            service = start_ray(state_dir, ports.get("ray"), ports.get("ray_dashboard"), num_cpus=ray_num_cpus,
                                extra_env={**(s3_env or {}), **(services["mlflow"].env if "mlflow" in services else {})})
        services[name] = service
        save_state(services, state_dir)
        _say(quiet, f"{name}: started at {service.url} (pid {service.pid}, log {service.log})")
    save_state(services, state_dir)
    return services


def down(names: Iterable[str] = SERVICES, state_dir: Path | None = None, quiet: bool = False) -> None:
    state_dir = state_dir or state_dir_default()
    services = load_state(state_dir)
    for name in reversed(SERVICES):
        if name in set(names) and name in services:
            stop_service(services[name])
            _say(quiet, f"{name}: stopped (pid {services[name].pid})")
            del services[name]
    save_state(services, state_dir)


def status(state_dir: Path | None = None) -> dict[str, dict[str, object]]:
    services = load_state(state_dir)
    out: dict[str, dict[str, object]] = {}
    for name in SERVICES:
        s = services.get(name)
        out[name] = ({"state": "stopped"} if s is None else
                     {"state": "running" if s.healthy() else ("unhealthy" if s.alive() else "dead"),
                      "url": s.url, "pid": s.pid, "log": s.log, **{k: v for k, v in s.extra.items()}})
    return out


def apply_service_env(state_dir: Path | None = None) -> dict[str, str]:
    """Export the running local services' variables into ``os.environ`` (without overriding any).

    Called by entry points, so `python -m cluster.local up` is all a user needs before running them.
    Returns the variables that were set.
    """
    services = {n: s for n, s in load_state(state_dir).items() if s.alive()}
    applied = {}
    for key, value in service_env(services).items():
        if key not in os.environ:
            os.environ[key] = value
            applied[key] = value
    return applied


def _say(quiet: bool, message: str) -> None:
    if not quiet:
        print(message, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.local", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["up", "down", "status", "env"])
    parser.add_argument("--services", default=",".join(SERVICES),
                        help=f"comma-separated subset of {','.join(SERVICES)} (default: all)")
    parser.add_argument("--state-dir", type=Path, default=None, help="default: $TITOK_HOME/services or ./.titok/services")
    parser.add_argument("--mlflow-artifacts", default=None,
                        help="artifact store of the MLflow server: a local dir (default) or s3://bucket/prefix")
    parser.add_argument("--ray-num-cpus", type=int, default=None)
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.services.split(",") if n.strip()]
    bad = [n for n in names if n not in SERVICES]
    if bad:
        parser.error(f"unknown service(s) {bad}; valid: {', '.join(SERVICES)}")
    try:
        if args.command == "up":
            up(names, args.state_dir, mlflow_artifacts=args.mlflow_artifacts, ray_num_cpus=args.ray_num_cpus)
            print(f"environment: source {(args.state_dir or state_dir_default()) / 'env.sh'}")
        elif args.command == "down":
            down(names, args.state_dir)
        elif args.command == "status":
            for name, info in status(args.state_dir).items():
                details = " ".join(f"{k}={v}" for k, v in info.items() if k != "state")
                print(f"{name:7s} {info['state']:9s} {details}")
        else:
            for key, value in sorted(service_env(load_state(args.state_dir)).items()):
                print(f"export {key}={_shell_quote(value)}")
    except ServiceError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
