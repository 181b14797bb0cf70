"""infra/: cluster definitions that agree with each other and with the code, and the local stack for real.

* the Ray cluster launcher config passes Ray's own schema and ``ray up``'s checks;
* the KubeRay RayCluster / RayJob carry what KubeRay needs, and the RayJob's entrypoint resolves to a
  configuration whose data and checkpoints are on the shared volume and whose workers fit the GPU group;
* the Dockerfile pins what the Makefile and pyproject.toml pin, and has what KubeRay and ``ray up`` run;
* the MLflow manifest serves at the address the Ray pods are given;
* ``infra/local/start.sh`` brings up a Ray head and an MLflow server on loopback, ``ray job submit``
  trains through them, and ``infra/local/stop.sh`` stops exactly that stack and nothing else.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from pipeline.cli import resolve_from_args, training_parser
from pipeline.config import ExperimentConfig, resolve_config
from pipeline.presets import KINETICS_PRESETS
from pipeline.tracking import RUN_NAME_TAG
from tests.conftest import REPO, free_port, service_env

INFRA = REPO / "infra"
BIN = Path(sys.executable).parent
SHARED = "/mnt/shared"


# --------------------------------------------------------------------------------------------- helpers

def _yaml_docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((INFRA / name).read_text()) if d]


def _dockerfile_args() -> dict[str, str]:
    text = (INFRA / "Dockerfile").read_text()
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", text, flags=re.M))


def _pyproject() -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _pyproject_requirement(name: str) -> Requirement:
    deps = _pyproject()["project"]["dependencies"]
    reqs = [Requirement(d) for d in deps]
    return next(r for r in reqs if r.name == name)


def _resolve_train_kinetics(argv: list[str]) -> ExperimentConfig:
    """What ``python jobs/train_kinetics.py ARGV`` would run with: its own parser, presets and resolution."""
    assert argv[:2] == ["python", "jobs/train_kinetics.py"], argv
    assert (REPO / argv[1]).is_file()
    parser = training_parser("train_kinetics", KINETICS_PRESETS, "demo")
    parser.exit = lambda status=0, message=None: pytest.fail(f"bad arguments {argv[2:]}: {message}")
    args = parser.parse_args(argv[2:])  # --preset is checked against KINETICS_PRESETS here
    assert args.preset in KINETICS_PRESETS
    return resolve_from_args(args, KINETICS_PRESETS)


def _documented_command(name: str) -> list[str]:
    """The ``python jobs/train_kinetics.py ...`` command in a file's header comment (continuations joined)."""
    lines = [line.lstrip("#").strip() for line in (INFRA / name).read_text().splitlines() if line.startswith("#")]
    text = " ".join(line[:-1] if line.endswith("\\") else line + "\n" for line in lines)
    match = re.search(r"python jobs/train_kinetics\.py[^\n]*", text)
    assert match, f"{name} documents no training command"
    return shlex.split(match.group(0))


def _assert_fits(cfg: ExperimentConfig, gpus: int, cpus: float) -> None:
    """The run's Ray Train workers fit in the GPU group (one GPU and cpus_per_worker CPUs each)."""
    assert cfg.cluster.use_gpu == "true"
    assert cfg.cluster.num_workers <= gpus, f"{cfg.cluster.num_workers} GPU workers, {gpus} GPUs"
    assert cfg.cluster.num_workers * cfg.cluster.cpus_per_worker <= cpus


def _assert_on_shared(cfg: ExperimentConfig, mount: str) -> None:
    for key, value in [("data.train", cfg.data.train), ("data.val", cfg.data.val),
                       ("cluster.storage_path", cfg.cluster.storage_path)]:
        assert value.startswith(mount + "/"), f"{key}={value!r} is not on the shared volume {mount}"


# ------------------------------------------------------------------------------- Ray cluster launcher

def _ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def test_launcher_config_passes_rays_schema_and_ray_up_checks():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((INFRA / "ray-cluster.yaml").read_text())
    schema = _ray_schema()
    jsonschema.validate(config, schema)
    # What `ray up` does before it talks to the cloud: merge the provider's defaults, then validate.
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"]
    # The schema is strict enough to mean something here.
    for broken in ({**config, "max_worker": 2}, {k: v for k, v in config.items() if k != "provider"},
                   {**config, "docker": {**config["docker"], "run_options": "--gpus all"}}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, schema)


def test_launcher_config_is_a_gpu_cluster_running_glimpse():
    config = yaml.safe_load((INFRA / "ray-cluster.yaml").read_text())
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("CPU") == 0  # training stays off the head
    gpu_types = {name: t for name, t in types.items() if t.get("resources", {}).get("GPU", 0) > 0}
    assert gpu_types, "no GPU worker group"
    ((_, gpu),) = gpu_types.items()
    assert 1 <= gpu["min_workers"] <= gpu["max_workers"] <= config["max_workers"]
    # Every node runs the image built from infra/Dockerfile, with the MLflow address in its environment
    # and the shared volume mounted.
    assert config["docker"]["image"] == _image_name()
    options = " ".join(config["docker"]["run_options"])
    assert re.search(r"--env MLFLOW_TRACKING_URI=http://\S+:\d+", options)
    assert f"--volume {SHARED}:{SHARED}" in options
    assert any(SHARED in c and "mount" in c for c in config["initialization_commands"])
    # The checkout is synced to the image's /app and installed there; the heavy folders are not synced.
    workdir = re.search(r"^WORKDIR (\S+)$", (INFRA / "Dockerfile").read_text(), flags=re.M).group(1)
    assert config["file_mounts"] == {workdir: "."}
    assert {".venv", ".git", "runs"} <= set(config["rsync_exclude"])
    assert any("pip install" in c and workdir in c for c in config["setup_commands"])
    assert any("ray start --head" in c for c in config["head_start_ray_commands"])
    assert any("$RAY_HEAD_IP" in c for c in config["worker_start_ray_commands"])
    # The command documented at the top of the file runs a real preset, on the shared volume, and fits.
    cfg = _resolve_train_kinetics(_documented_command("ray-cluster.yaml"))
    _assert_on_shared(cfg, SHARED)
    _assert_fits(cfg, gpus=gpu["resources"]["GPU"], cpus=gpu["resources"]["CPU"])


# ---------------------------------------------------------------------------------------------- KubeRay

def _image_name() -> str:
    """The tag infra/Dockerfile's build command gives the image."""
    match = re.search(r"docker build -f infra/Dockerfile -t (\S+) \.", (INFRA / "Dockerfile").read_text())
    assert match, "infra/Dockerfile documents no build command"
    return match.group(1)


def _quantity(value) -> float:
    """A Kubernetes CPU quantity ("8", "500m", 8) in cores."""
    value = str(value)
    return float(value[:-1]) / 1000 if value.endswith("m") else float(value)


def _check_cluster_spec(spec: dict) -> dict:
    """What KubeRay needs of a RayClusterSpec; returns facts the callers check further."""
    ray_version = _dockerfile_args()["RAY_VERSION"]
    assert str(spec["rayVersion"]) == ray_version, "rayVersion must be the image's Ray"
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    assert all(isinstance(v, str) for v in head["rayStartParams"].values()), "rayStartParams values are strings"
    assert head["rayStartParams"].get("dashboard-host") == "0.0.0.0"
    groups = spec["workerGroupSpecs"]
    assert groups and len({g["groupName"] for g in groups}) == len(groups)
    facts = {"mounts": [], "tracking": set()}

    def pod(template, role):
        pod_spec = template["spec"]
        containers = pod_spec["containers"]
        assert containers, f"{role}: no containers"
        main = containers[0]
        assert main["name"] and main["image"] == _image_name(), f"{role}: image {main.get('image')}"
        assert main["workingDir"] == "/app"
        resources = main["resources"]
        assert resources["limits"] and resources["requests"]
        env = {e["name"]: e.get("value") for e in main.get("env", [])}
        facts["tracking"].add(env["MLFLOW_TRACKING_URI"])
        volumes = {v["name"]: v for v in pod_spec.get("volumes", [])}
        for m in main.get("volumeMounts", []):
            assert m["name"] in volumes, f"{role}: mount of undeclared volume {m['name']}"
            claim = volumes[m["name"]].get("persistentVolumeClaim")
            if claim:
                facts["mounts"].append((role, m["mountPath"], claim["claimName"]))
        return resources

    pod(head["template"], "head")
    gpu_groups = []
    for group in groups:
        assert group["groupName"]
        assert isinstance(group["rayStartParams"], dict)
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        resources = pod(group["template"], group["groupName"])
        gpus = int(resources["limits"].get("nvidia.com/gpu", 0))
        if gpus:
            # Extended resources: requests, if given, must equal limits.
            assert int(resources["requests"].get("nvidia.com/gpu", gpus)) == gpus
            gpu_groups.append({"replicas": group["maxReplicas"], "gpus": gpus,
                               "cpus": _quantity(resources["limits"]["cpu"])})
    assert gpu_groups, "no worker group asks for nvidia.com/gpu"
    facts["gpu_groups"] = gpu_groups
    return facts


def _check_shared_mounts(facts: dict) -> str:
    """Head and every worker group mount the same claim at the same path; returns that path."""
    claim_name = yaml.safe_load((INFRA / "shared-volume.yaml").read_text())["metadata"]["name"]
    roles = {role for role, _, _ in facts["mounts"]}
    shared = {(path, claim) for _, path, claim in facts["mounts"]}
    assert len(shared) == 1, f"pods mount different shared volumes: {shared}"
    (path, claim), = shared
    assert claim == claim_name and "head" in roles and len(roles) >= 2
    return path


def test_kuberay_raycluster_manifest():
    (doc,) = _yaml_docs("kuberay-raycluster.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])
    facts = _check_cluster_spec(doc["spec"])
    mount = _check_shared_mounts(facts)
    assert doc["spec"]["authOptions"]["mode"] == "token"
    cfg = _resolve_train_kinetics(_documented_command("kuberay-raycluster.yaml"))
    _assert_on_shared(cfg, mount)
    best = max(facts["gpu_groups"], key=lambda g: g["gpus"])
    _assert_fits(cfg, gpus=best["gpus"], cpus=best["cpus"])


def test_kuberay_rayjob_manifest_runs_a_real_preset_on_shared_storage():
    (doc,) = _yaml_docs("kuberay-rayjob.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    assert doc["metadata"]["name"]
    spec = doc["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    facts = _check_cluster_spec(spec["rayClusterSpec"])
    mount = _check_shared_mounts(facts)
    argv = shlex.split(spec["entrypoint"])
    cfg = _resolve_train_kinetics(argv)
    assert argv[argv.index("--preset") + 1] == "video_sparseformer_tiny_k400"
    assert cfg.model.name == "video_sparseformer_tiny" and cfg.data.synthetic == ""
    _assert_on_shared(cfg, mount)
    assert cfg.cluster.name, "a named run resumes when the RayJob retries"
    group = facts["gpu_groups"][0]
    _assert_fits(cfg, gpus=group["gpus"] * group["replicas"], cpus=group["cpus"])


def test_kuberay_pods_reach_the_mlflow_service():
    docs = _yaml_docs("mlflow-server.yaml")
    service = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "mlflow")
    namespace, port = service["metadata"]["namespace"], service["spec"]["ports"][0]["port"]
    expected = f"http://{service['metadata']['name']}.{namespace}.svc.cluster.local:{port}"
    for name in ("kuberay-raycluster.yaml", "kuberay-rayjob.yaml"):
        (doc,) = _yaml_docs(name)
        spec = doc["spec"].get("rayClusterSpec", doc["spec"])
        assert _check_cluster_spec(spec)["tracking"] == {expected}, name
    # The server accepts that Host header, and runs the script the local stack runs.
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert expected.removeprefix("http://") in env["GLIMPSE_MLFLOW_ALLOWED_HOSTS"].split(",")
    assert container["command"][-1] == "/app/infra/mlflow/serve.sh" and (INFRA / "mlflow/serve.sh").is_file()
    assert int(env["GLIMPSE_MLFLOW_PORT"]) == service["spec"]["ports"][0]["targetPort"]
    # A database backend, whose driver is in the image, and a volume for the artifacts.
    assert env["GLIMPSE_MLFLOW_BACKEND_URI"].startswith("postgresql://")
    assert "psycopg2" in (INFRA / "Dockerfile").read_text()
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert env["GLIMPSE_MLFLOW_ARTIFACTS"] in mounts
    db_service = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "mlflow-db")
    assert f"@{db_service['metadata']['name']}:{db_service['spec']['ports'][0]['port']}/" in env[
        "GLIMPSE_MLFLOW_BACKEND_URI"]
    for doc in docs:
        assert doc["metadata"]["namespace"] == namespace


# ------------------------------------------------------------------------------------------- Dockerfile

def test_dockerfile_pins_match_the_makefile_and_pyproject():
    args = _dockerfile_args()
    makefile = (REPO / "Makefile").read_text()
    assert f"torch=={args['TORCH_VERSION']}" in makefile
    assert f"torchvision=={args['TORCHVISION_VERSION']}" in makefile
    for package, key in [("torch", "TORCH_VERSION"), ("torchvision", "TORCHVISION_VERSION"),
                         ("ray", "RAY_VERSION"), ("mlflow", "MLFLOW_VERSION")]:
        requirement = _pyproject_requirement(package)
        assert requirement.specifier.contains(args[key]), f"{key}={args[key]} is outside pyproject's {requirement}"
    assert args["BASE_IMAGE"].startswith("nvidia/cuda:")
    python = re.fullmatch(r"python(3\.\d+)", args["PYTHON"]).group(1)
    assert SpecifierSet(_pyproject()["project"]["requires-python"]).contains(python)


def test_dockerfile_has_the_code_and_the_tools_the_cluster_runs():
    text = (INFRA / "Dockerfile").read_text()
    copied = set(re.findall(r"^COPY (\S+) \./\S*$", text, flags=re.M))
    packages = _pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]
    for pattern in packages:  # models*, datasets*, pipeline*
        assert pattern.rstrip("*") in copied, f"{pattern} is not copied into the image"
    assert {"jobs", "infra"} <= copied
    assert re.search(r"pip install [^\n]*-e \.", text), "Glimpse is not installed in the image"
    apt = re.search(r"apt-get install[^\n]*\n(?:[^\n]*\\\n)*[^\n]*", text).group(0)
    for tool in ("wget", "grep", "rsync", "bash"):  # KubeRay's probes, the launcher's file sync
        assert re.search(rf"\b{tool}\b", apt), f"{tool} is not installed in the image"
    # FFmpeg's shared libraries for torchcodec (the default decoder), checked when the image is built.
    assert re.search(r"\bffmpeg\b", apt), "ffmpeg (FFmpeg's shared libraries) is not installed in the image"
    assert "resolve_decoder('auto') == 'torchcodec'" in text
    ignored = (INFRA / "Dockerfile.dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored


# ------------------------------------------------------------------------------------------ local stack

SCRIPTS = ["local/start.sh", "local/stop.sh", "local/common.sh", "mlflow/serve.sh"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_are_valid_bash(script):
    path = INFRA / script
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    if script != "local/common.sh":  # sourced, not run
        assert os.access(path, os.X_OK), f"{script} is not executable"


def _stack_env(state: Path, ports: dict[str, int]) -> dict[str, str]:
    env = service_env()
    env.update({"GLIMPSE_STACK_DIR": str(state), "GLIMPSE_RAY_NUM_CPUS": "2",
                "GLIMPSE_RAY_OBJECT_STORE_MEMORY": str(200 * 1024 ** 2), "GLIMPSE_STOP_TIMEOUT": "10"})
    env.update({k: str(v) for k, v in ports.items()})
    return env


def test_start_refuses_a_busy_port_and_starts_nothing(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        ports = {"GLIMPSE_RAY_PORT": free_port(), "GLIMPSE_DASHBOARD_PORT": free_port(),
                 "GLIMPSE_RAY_CLIENT_PORT": free_port(), "GLIMPSE_DASHBOARD_AGENT_PORT": free_port(),
                 "GLIMPSE_MLFLOW_PORT": port}
        proc = subprocess.run(["bash", str(INFRA / "local/start.sh")], env=_stack_env(tmp_path / "s", ports),
                              capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stdout == ""
    assert f"port(s) {port} already in use" in proc.stderr
    assert not (tmp_path / "s" / "stack_id").exists()
    stop = subprocess.run(["bash", str(INFRA / "local/stop.sh")], env=_stack_env(tmp_path / "s", ports),
                          capture_output=True, text=True, timeout=60)
    assert stop.returncode == 0


def test_start_refuses_a_ray_temp_dir_that_is_not_its_own(tmp_path):
    foreign = tmp_path / "ray"  # like /tmp/ray: other clusters' sessions, which stop.sh must never match
    (foreign / "session_latest").mkdir(parents=True)
    ports = {"GLIMPSE_RAY_PORT": free_port(), "GLIMPSE_DASHBOARD_PORT": free_port(),
             "GLIMPSE_RAY_CLIENT_PORT": free_port(), "GLIMPSE_DASHBOARD_AGENT_PORT": free_port(),
             "GLIMPSE_MLFLOW_PORT": free_port()}
    env = {**_stack_env(tmp_path / "s", ports), "GLIMPSE_RAY_TEMP_DIR": str(foreign)}
    proc = subprocess.run(["bash", str(INFRA / "local/start.sh")], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and "not a Glimpse stack's" in proc.stderr
    assert not (tmp_path / "s" / "stack_id").exists() and not (foreign / ".glimpse-stack").exists()


def _proc_table() -> dict[int, dict]:
    """Live (non-zombie) processes: pid -> cmdline, environ entries, session id, executable name."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            rest = stat[stat.rindex(")") + 2:].split()
            if rest[0] == "Z":
                continue
            table[int(entry.name)] = {
                "cmdline": (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"),
                "environ": set((entry / "environ").read_bytes().decode(errors="replace").split("\0")),
                "sid": int(rest[3]), "comm": (entry / "comm").read_text().strip()}  # state ppid pgrp sid
        except (OSError, ValueError):
            continue
    return table


def _listening_ports() -> set[int]:
    ports = set()
    for name in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{name}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":  # LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def _stack_leftovers(state: Path, ray_tmp: str, stack_id: str, sids: set[int], ports: set[int]) -> list[str]:
    """Processes that reference the stack's state or temp dir, carry its mark or sit in its sessions,
    and those of its ports still listening."""
    paths = re.compile("|".join(re.escape(p) + r"(?=/|\s|$)" for p in (str(state), ray_tmp)))
    left = []
    for pid, p in _proc_table().items():
        if (paths.search(p["cmdline"]) or p["sid"] in sids
                or (stack_id and f"GLIMPSE_LOCAL_STACK_ID={stack_id}" in p["environ"])):
            left.append(f"{pid} {p['cmdline'][:120]}")
    left += [f"port {port} still listening" for port in sorted(ports & _listening_ports())]
    return left


def _decoys(state: Path) -> list[subprocess.Popen]:
    """Processes that look like Ray's by name, or carry another stack's mark: stop.sh must spare them."""
    sleep = "import time; time.sleep(900)"
    env = {**service_env(), "GLIMPSE_LOCAL_STACK_ID": "0123456789abcdef"}
    return [subprocess.Popen(["bash", "-c", "exec -a ray::IDLE sleep 900"], start_new_session=True),
            subprocess.Popen([sys.executable, "-c", sleep, "raylet", f"--temp-dir={state}-other/ray"],
                             start_new_session=True),
            subprocess.Popen([sys.executable, "-c", sleep], env=env, start_new_session=True)]


def _foreign_ray_daemons(ray_tmp: str) -> set[int]:
    """GCS servers and raylets of other Ray clusters on the machine (the test session's, anyone's)."""
    return {pid for pid, p in _proc_table().items()
            if p["comm"] in ("gcs_server", "raylet") and ray_tmp not in p["cmdline"]}


def _ray(*args: str, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), *args], env=env, capture_output=True, text=True, timeout=timeout)


def _new_stack() -> tuple[Path, dict[str, int], dict[str, str]]:
    state = Path(tempfile.mkdtemp(prefix="gls", dir="/tmp"))  # short: Ray's socket paths have a length limit
    ports = {"GLIMPSE_RAY_PORT": free_port(), "GLIMPSE_DASHBOARD_PORT": free_port(),
             "GLIMPSE_RAY_CLIENT_PORT": free_port(), "GLIMPSE_DASHBOARD_AGENT_PORT": free_port(),
             "GLIMPSE_MLFLOW_PORT": free_port()}
    return state, ports, _stack_env(state, ports)


def _script(name: str, env: dict, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(INFRA / "local" / name), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def _answers(url: str, token: str) -> bool:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"}),
                                    timeout=10) as r:
            return r.status == 200
    except OSError:
        return False


def _identity(state: Path) -> tuple[str, str, set[int]]:
    """A running stack's Ray temp dir, mark and sessions, as start.sh recorded them (stop.sh deletes some)."""
    def read(name: str) -> str:
        return (state / name).read_text().strip() if (state / name).exists() else ""

    return read("ray_temp_dir") or str(state / "ray"), read("stack_id"), {int(x) for x in read("sids").split()}


def _kill_leftovers(state: Path, identity: tuple[str, str, set[int]]) -> None:
    """Last resort after a failure: nothing of a test's stack may outlive the test."""
    for line in _stack_leftovers(state, *identity, set()):
        try:
            os.kill(int(line.split()[0]), signal.SIGKILL)
        except (OSError, ValueError):
            pass


@pytest.mark.slow
def test_local_stack_trains_through_ray_and_mlflow_then_stops_only_itself(tmp_path, synthetic_root):
    """Two stacks side by side: one trains and is stopped, the other (standing for any other Ray cluster on
    the machine, such as the test session's) keeps running; then it is stopped too."""
    from mlflow.tracking import MlflowClient

    state, ports, env = _new_stack()
    other_state, other_ports, other_env = _new_stack()
    decoys = _decoys(state)
    other = subprocess.Popen(["bash", str(INFRA / "local/start.sh")], env=other_env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    identities = {}
    try:
        started = _script("start.sh", env)
        assert started.returncode == 0, started.stderr[-4000:]
        identities[state] = _identity(state)
        other_out, other_err = other.communicate(timeout=300)
        assert other.returncode == 0, other_err[-4000:]
        identities[other_state] = _identity(other_state)
        ray_tmp, stack_id, sids = identities[state]
        exports = dict(re.findall(r"^export (\w+)=(\S+)$", started.stdout, flags=re.M))
        dashboard = f"http://127.0.0.1:{ports['GLIMPSE_DASHBOARD_PORT']}"
        tracking = f"http://127.0.0.1:{ports['GLIMPSE_MLFLOW_PORT']}"
        assert exports == {"RAY_ADDRESS": dashboard, "MLFLOW_TRACKING_URI": tracking, "RAY_AUTH_MODE": "token",
                           "RAY_AUTH_TOKEN_PATH": str(state / "auth_token")}
        assert (state / "env.sh").read_text() == started.stdout
        assert ray_tmp == str(state / "ray") and (state / "logs" / "mlflow.log").is_file()
        # Running it again while the stack is up changes nothing and prints the same exports.
        again = _script("start.sh", env, timeout=120)
        assert again.returncode == 0 and again.stdout == started.stdout and "already running" in again.stderr
        assert (state / "stack_id").read_text().strip() == stack_id
        # The job server wants this stack's token, and no other.
        token = (state / "auth_token").read_text().strip()
        other_token = (other_state / "auth_token").read_text().strip()
        assert _answers(f"{dashboard}/api/version", token)
        assert _answers(f"{dashboard}/api/jobs/", token)
        assert not _answers(f"{dashboard}/api/jobs/", "") and not _answers(f"{dashboard}/api/jobs/", other_token)

        # The user's way, as on a cluster: the exports, then `ray job submit --working-dir .`.
        client_env = {**service_env(), **exports}
        client_env.pop("RAY_AUTH_TOKEN", None)  # env.sh unsets it: it would win over RAY_AUTH_TOKEN_PATH
        submitted = _ray("job", "submit", "--address", dashboard, "--working-dir", str(REPO), "--",
                         "python", "jobs/train_kinetics.py", "--preset", "smoke",
                         f"cluster.storage_path={tmp_path / 'runs'}", f"data.synthetic_root={synthetic_root}",
                         "--name", "local-stack", env=client_env)
        output = submitted.stdout + submitted.stderr
        assert submitted.returncode == 0, output[-4000:]
        assert "succeeded" in output, output[-4000:]

        # The run is on the stack's MLflow server: database in the state dir, artifacts in its store.
        smoke = resolve_config(KINETICS_PRESETS, "smoke").tracking
        client = MlflowClient(tracking)
        experiment = client.get_experiment_by_name(smoke.experiment)
        runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = 'local-stack'")
        assert len(runs) == 1 and runs[0].info.status == "FINISHED"
        run = runs[0]
        assert "eval/top1" in run.data.metrics
        if smoke.register:  # and the registry
            assert client.get_model_version_by_alias(smoke.register, "candidate").run_id == run.info.run_id
        assert (state / "mlflow" / "mlflow.db").is_file()
        assert list((state / "mlflow" / "artifacts").rglob("config.yaml")), "no artifacts in the local store"
        assert MlflowClient(f"http://127.0.0.1:{other_ports['GLIMPSE_MLFLOW_PORT']}").search_experiments(
            filter_string=f"name = '{smoke.experiment}'") == []

        # A job still running when the stack stops: its driver (in a session of its own) goes too.
        sleeper = _ray("job", "submit", "--address", dashboard, "--no-wait", "--submission-id", "glimpse-sleeper",
                       "--", "python", "-c", "import time; time.sleep(900)", "glimpse-sleeper-job",
                       env=client_env, timeout=120)
        assert sleeper.returncode == 0, sleeper.stderr[-2000:]
        deadline = time.time() + 120
        while "RUNNING" not in _ray("job", "status", "--address", dashboard, "glimpse-sleeper",
                                    env=client_env, timeout=60).stdout:
            assert time.time() < deadline, "the sleeper job never ran"
            time.sleep(1)
        assert any("glimpse-sleeper-job" in p["cmdline"] for p in _proc_table().values())

        other_ray_tmp, other_id, other_sids = identities[other_state]
        foreign = _foreign_ray_daemons(ray_tmp)
        assert any(other_ray_tmp in _proc_table()[pid]["cmdline"] for pid in foreign)
        stopped = _script("stop.sh", env, timeout=180)
        assert stopped.returncode == 0, stopped.stderr[-4000:]
        assert not _stack_leftovers(state, ray_tmp, stack_id, sids, set(ports.values()))
        assert not any("glimpse-sleeper-job" in p["cmdline"] for p in _proc_table().values())
        # The other stack, other Ray clusters and look-alikes live on.
        assert all(d.poll() is None for d in decoys), "stop.sh killed a process that is not the stack's"
        alive = set(_proc_table())
        assert foreign <= alive, f"stop.sh stopped another Ray cluster's daemons: {foreign - alive}"
        assert _answers(f"http://127.0.0.1:{other_ports['GLIMPSE_DASHBOARD_PORT']}/api/version", other_token)
        assert _answers(f"http://127.0.0.1:{other_ports['GLIMPSE_MLFLOW_PORT']}/health", "")
        # Data and logs stay; a second stop has nothing to do.
        assert (state / "mlflow" / "mlflow.db").is_file() and (state / "logs" / "mlflow.log").is_file()
        assert not (state / "env.sh").exists()
        again = _script("stop.sh", env, timeout=60)
        assert again.returncode == 0 and "stopped (0 process(es))" in again.stderr

        # The other stack stops as cleanly, and --purge removes its state.
        other_stopped = _script("stop.sh", other_env, "--purge", timeout=180)
        assert other_stopped.returncode == 0, other_stopped.stderr[-4000:]
        assert not _stack_leftovers(other_state, other_ray_tmp, other_id, other_sids, set(other_ports.values()))
        assert not other_state.exists()
    finally:
        if other.poll() is None:
            other.kill()
            other.wait()
        for stack_state, stack_env in ((state, env), (other_state, other_env)):
            identity = identities.get(stack_state) or _identity(stack_state)
            if (stack_state / "stack_id").exists():  # not stopped yet: the test failed on the way
                _script("stop.sh", stack_env, timeout=180)
            _kill_leftovers(stack_state, identity)
            shutil.rmtree(stack_state, ignore_errors=True)
        for d in decoys:
            d.kill()
            d.wait()
