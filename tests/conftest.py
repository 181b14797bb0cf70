"""Shared fixtures: real services on loopback (a Ray head, an MLflow server) and small synthetic data."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# Ray 2.60 turns token authentication on once a token exists (ray.init() writes ~/.ray/auth_token),
# and reads the token settings when ``ray`` is imported. So this session gets its own token now,
# before any test imports ray; the Ray head, ``ray job submit`` and in-process clients all share it.
_token_dir = Path(tempfile.mkdtemp(prefix="glimpse-raytoken-"))
(_token_dir / "auth_token").write_text(secrets.token_hex(32))
os.environ["RAY_AUTH_MODE"] = "token"
os.environ["RAY_AUTH_TOKEN_PATH"] = str(_token_dir / "auth_token")


_ISSUED_PORTS: set[int] = set()


def free_port() -> int:
    """A free loopback port, never one this test process handed out before.

    The kernel may give the same ephemeral port to two binds in a row once the first socket is
    closed; CI once got one port for both Ray's GCS and its dashboard, and `ray start` failed.
    """
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _ISSUED_PORTS:
            _ISSUED_PORTS.add(port)
            return port


def _wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None, token: str | None = None) -> None:
    deadline = time.time() + timeout
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server for {url} exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


def service_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    env.pop("RAY_ADDRESS", None)
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    return env


@pytest.fixture(scope="session")
def ray_cluster():
    """A real Ray head on loopback (``ray start --head``) with its own ports and temp dir.

    Yields {"address": GCS address, "dashboard": job-submission URL}. In-process tests connect
    to it too, so the whole session uses one cluster.
    """
    import ray

    temp_dir = tempfile.mkdtemp(prefix="rayg", dir="/tmp")  # short: Ray's socket paths have a length limit
    token = Path(os.environ["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    port, dash = free_port(), free_port()
    cmd = [str(BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
           "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--include-dashboard", "true",
           "--temp-dir", temp_dir, "--num-cpus", "2", "--disable-usage-stats",
           "--dashboard-agent-listen-port", str(free_port()), "--ray-client-server-port", str(free_port())]
    # Every daemon and worker of this cluster inherits the marker variable: teardown stops exactly
    # them (`ray stop` would stop every Ray on the machine, a developer's own included).
    subprocess.run(cmd, check=True, env={**service_env(), "GLIMPSE_TEST_RAY": temp_dir}, capture_output=True,
                   timeout=120)
    info = {"address": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dash}", "temp_dir": temp_dir}
    try:
        _wait_http(f"{info['dashboard']}/api/version", 90, token=token)
        yield info
    finally:
        if ray.is_initialized():
            ray.shutdown()
        stop_own_ray(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _own_ray_pids(temp_dir: str) -> list[int]:
    """Processes of the Ray cluster started with ``temp_dir``: by the marker in their environment or
    the temp dir on their command line (Ray's daemons and workers inherit both from ``ray start``)."""
    import psutil

    marker = f"GLIMPSE_TEST_RAY={temp_dir}".encode()
    pids = []
    for p in psutil.process_iter(["pid", "cmdline", "status"]):
        if p.pid == os.getpid() or p.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        try:
            environ = Path(f"/proc/{p.pid}/environ").read_bytes()
        except OSError:
            environ = b""
        if marker in environ.split(b"\0") or any(temp_dir in arg for arg in p.info["cmdline"] or ()):
            pids.append(p.pid)
    return pids


def stop_own_ray(temp_dir: str, grace: float = 15.0) -> None:
    """SIGTERM this session's Ray cluster, SIGKILL what is left after ``grace`` seconds."""
    import psutil

    procs = [psutil.Process(pid) for pid in _own_ray_pids(temp_dir) if psutil.pid_exists(pid)]
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real ``mlflow server`` with an SQLite backend on loopback; yields its URI."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    cmd = [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
           "--artifacts-destination", (root / "artifacts").as_uri(), "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1", "--allowed-hosts", f"127.0.0.1:{port},localhost:{port}"]
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(cmd, env=service_env(), stdout=log, stderr=subprocess.STDOUT)
    uri = f"http://127.0.0.1:{port}"
    try:
        _wait_http(f"{uri}/health", 120, proc)
        yield uri
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """Root under which the smoke synthetic datasets are built once per session."""
    return tmp_path_factory.mktemp("synthetic")


@pytest.fixture(scope="session")
def smoke_video(synthetic_root) -> Path:
    from datasets.synthetic import ensure_synthetic

    return ensure_synthetic(synthetic_root / "smoke", kind="video", preset="smoke")  # the pipeline's layout
