"""The deployment files (cluster.yaml, cluster.local.yaml, deploy/): the launcher files pass Ray's own
config validation and the KubeRay manifests the KubeRay CRD schemas (vendored in deploy/kuberay/schemas/);
every file pins the Ray the tests run, turns token authentication on and declares TRAIN_DRIVER_RESOURCE
on the head alone; a head started the way cluster.yaml starts it refuses unauthenticated clients; and
a sweep's driver-side work lands on the node that declares TRAIN_DRIVER_RESOURCE."""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import subprocess
import sys
import tempfile
import time
from functools import lru_cache
from pathlib import Path

import pytest
import ray
import yaml

from orchestrator.engine.executor import DRIVER_RESOURCE, DRIVER_SHARE, driver_resources

from helpers import free_port, kill_pids_mentioning, stop_ray_head, tail, without_ray_settings

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER_FILES = ["cluster.yaml", "cluster.local.yaml"]
KUBERAY = ROOT / "deploy" / "kuberay"
MANIFESTS = {"raycluster.yaml": "raycluster", "rayjob.yaml": "rayjob"}
TOKEN_FILE = "~/.ray/auth_token"  # Ray's default token path: the launcher files copy the token there
SHARED = "/mnt/shared"
IMAGE_ROOT = "/home/ray/compat-orchestrator"  # deploy/Dockerfile's WORKDIR: the repository root in the image
HEAD_START_TIMEOUT_S = 60


def launcher(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


def ray_start(commands: list[str]) -> tuple[dict[str, str], list[str]]:
    """(environment assignments, arguments after ``ray start``) of the ``ray start`` among ``commands``."""
    for command in commands:
        for part in command.split(";"):
            words = shlex.split(part)
            env = {}
            while words and re.fullmatch(r"[A-Z_]+=.*", words[0]):
                key, value = words.pop(0).split("=", 1)
                env[key] = value
            if words[:2] == ["ray", "start"]:
                return env, words[2:]
    raise AssertionError(f"no `ray start` in {commands}")


def flag(args: list[str], name: str):
    return next((a.split("=", 1)[1] for a in args if a.startswith(f"--{name}=")), None)


def head_resources(name: str) -> dict:
    """The custom resources a launcher file gives its head node (node type or ``ray start --resources``)."""
    cfg = launcher(name)
    if "available_node_types" in cfg:
        return dict(cfg["available_node_types"][cfg["head_node_type"]]["resources"])
    return json.loads(flag(ray_start(cfg["head_start_ray_commands"])[1], "resources") or "{}")


# -- the cluster launcher --------------------------------------------------------------------------
@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_file_passes_rays_validation(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(launcher(name)))


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_every_node_starts_with_token_auth_and_a_loopback_dashboard(name):
    cfg = launcher(name)
    head_env, head_args = ray_start(cfg["head_start_ray_commands"])
    worker_env, worker_args = ray_start(cfg["worker_start_ray_commands"])
    assert head_env.get("RAY_AUTH_MODE") == "token" and worker_env.get("RAY_AUTH_MODE") == "token"
    assert "--head" in head_args and flag(head_args, "dashboard-host") == "127.0.0.1"
    assert "--head" not in worker_args
    assert cfg["file_mounts"][TOKEN_FILE] == TOKEN_FILE  # the submitting machine's token, on every node


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_only_the_head_declares_the_driver_resource(name):
    cfg = launcher(name)
    assert head_resources(name).get(DRIVER_RESOURCE, 0) > 0
    assert flag(ray_start(cfg["worker_start_ray_commands"])[1], "resources") is None
    for node_type, spec in cfg.get("available_node_types", {}).items():
        if node_type != cfg["head_node_type"]:
            assert DRIVER_RESOURCE not in spec["resources"]


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_every_node_mounts_the_shared_storage(name):
    cfg = launcher(name)
    assert any(c.startswith("mountpoint -q " + SHARED) and " mount " in c for c in cfg["initialization_commands"])
    if cfg.get("docker"):  # the host's mount, seen inside the container at the same path
        assert f"-v {SHARED}:{SHARED}" in cfg["docker"]["run_options"]


def test_every_deployment_pins_the_ray_the_tests_run():
    version = ray.__version__
    pin = f'"ray[default]=={version}"'
    for name in LAUNCHER_FILES:
        assert any(pin in c for c in launcher(name)["setup_commands"]), name
    image = launcher("cluster.yaml")["docker"]["image"]
    assert re.fullmatch(rf"rayproject/ray:{re.escape(version)}-py3\d+-gpu", image)
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert f"FROM {image}\n" in dockerfile and pin in dockerfile
    assert f"WORKDIR {IMAGE_ROOT}\n" in dockerfile
    for manifest in MANIFESTS:
        assert cluster_spec(manifest)["rayVersion"] == version


# -- KubeRay ---------------------------------------------------------------------------------------
@lru_cache(maxsize=None)
def crd_schema(kind: str) -> dict:
    """The vendored CRD schema, strict about unknown fields as the API server's strict field validation is."""
    def strict(node):
        if isinstance(node, list):
            return [strict(v) for v in node]
        if not isinstance(node, dict):
            return node
        node = {k: strict(v) for k, v in node.items()}
        if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
            node.setdefault("additionalProperties", False)
        return node

    return strict(json.loads((KUBERAY / "schemas" / f"{kind}-v1.json").read_text()))


def manifest(name: str) -> dict:
    return yaml.safe_load((KUBERAY / name).read_text())


def cluster_spec(name: str) -> dict:
    spec = manifest(name)["spec"]
    return spec["rayClusterSpec"] if "rayClusterSpec" in spec else spec


def schema_errors(document: dict, kind: str) -> list[str]:
    import jsonschema

    validator = jsonschema.Draft7Validator(crd_schema(kind))
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]


@pytest.mark.parametrize("name", MANIFESTS)
def test_kuberay_manifest_matches_the_crd_schema(name):
    document = manifest(name)
    assert document["apiVersion"] == "ray.io/v1"
    assert schema_errors(document, MANIFESTS[name]) == []


@pytest.mark.parametrize("path, value, message", [
    (["headGroupSpec", "rayStartParam"], {}, "'rayStartParam' was unexpected"),
    (["authOptions", "mode"], "tokens", "is not one of"),
    (["workerGroupSpecs"], {"groupName": "gpu"}, "is not of type 'array'"),
])
def test_the_schema_check_catches_misspelt_and_invalid_fields(path, value, message):
    document = manifest("raycluster.yaml")
    parent = document["spec"]
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    assert any(message in error for error in schema_errors(document, "raycluster"))


def test_kuberay_cluster_is_authenticated_private_and_has_gpu_workers():
    spec = cluster_spec("raycluster.yaml")
    secret = spec["authOptions"]["secretName"]
    assert spec["authOptions"] == {"mode": "token", "secretName": secret}
    head = spec["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP" and head["enableIngress"] is False
    assert float(head["resources"][DRIVER_RESOURCE]) > 0
    groups = spec["workerGroupSpecs"]
    assert all(DRIVER_RESOURCE not in g.get("resources", {}) for g in groups)
    gpu_limits = [c["resources"]["limits"].get("nvidia.com/gpu", 0)
                  for g in groups for c in g["template"]["spec"]["containers"]]
    assert gpu_limits and min(gpu_limits) >= 1
    claim = manifest("storage.yaml")
    assert claim["kind"] == "PersistentVolumeClaim" and claim["spec"]["accessModes"] == ["ReadWriteMany"]
    images = set()
    for pod in [head["template"]["spec"], *(g["template"]["spec"] for g in groups)]:
        volumes = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]}
        (container,) = pod["containers"]
        mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
        assert mounts == {SHARED: claim["metadata"]["name"]}
        images.add(container["image"])
    (image,) = images
    assert image.rsplit(":", 1)[1] not in ("latest", image)  # a pinned tag
    docs = (ROOT / "docs" / "guide" / "ray.md").read_text()
    assert f"kubectl create secret generic {secret} --from-file=auth_token=" in docs
    assert f"-t {image} " in docs  # the documented build produces the image the manifests run


def test_rayjob_runs_compat_on_the_same_cluster():
    job = manifest("rayjob.yaml")["spec"]
    assert cluster_spec("rayjob.yaml") == cluster_spec("raycluster.yaml")
    assert job["shutdownAfterJobFinishes"] is True
    words = shlex.split(job["entrypoint"])
    assert words[:4] == ["python", "-m", "orchestrator.cli", "run"]
    from orchestrator.cli import build_parser
    from orchestrator.config import load_config

    args = build_parser().parse_args(words[3:])
    assert args.config.startswith(IMAGE_ROOT + "/")
    config = ROOT / args.config[len(IMAGE_ROOT) + 1:]
    assert config.is_file()
    assert args.output_dir.startswith(SHARED + "/")
    assert load_config(str(config), args.set).resources.use_gpu is True


def test_deploy_files_link_to_existing_guide_sections():
    from test_docs_links import anchors

    guide = ROOT / "docs" / "guide" / "ray.md"
    files = [ROOT / n for n in LAUNCHER_FILES] + sorted((ROOT / "deploy").rglob("*.yaml"))
    links = {(f.name, a) for f in files for a in re.findall(r"docs/guide/ray\.md#([\w-]+)", f.read_text())}
    assert links and not [link for link in links if link[1] not in anchors(guide)]


# -- drivers on the driver node --------------------------------------------------------------------
def test_drivers_ask_for_the_driver_resource_only_where_a_node_declares_it():
    assert driver_resources({"CPU": 8.0, "GPU": 2.0}) == {}
    assert driver_resources({"CPU": 8.0, DRIVER_RESOURCE: 0.0}) == {}
    assert driver_resources({"CPU": 8.0, DRIVER_RESOURCE: 4.0}) == {DRIVER_RESOURCE: DRIVER_SHARE}
    assert DRIVER_SHARE <= head_resources("cluster.yaml")[DRIVER_RESOURCE] / 100  # room for 100 drivers


TINY_SWEEP = [
    "data.num_classes=4", "data.train_per_class=16", "data.test_per_class=4",
    "scenario.initial_classes=2", "scenario.increment=2", "scenario.num_steps=2",
    "model.width=8", "model.embedding_dim=16", "training.epochs=1", "training.incremental={}", "training.batch_size=16",
    "resources.num_workers=1", "methods=[{name: independent}]",
    "sweep={space: {training.lr: {grid: [0.001]}}, search: grid}",
]


@pytest.mark.integration
def test_a_sweeps_driver_side_work_runs_on_the_driver_node(tmp_path):
    """Two nodes, only the second declaring TRAIN_DRIVER_RESOURCE (as cluster.yaml's head does): the
    trial (the driver of its steps on Train workers), the task queue and the Train controller run there,
    the Train worker on the other node's CPU."""
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors

    from orchestrator.config import load_raw
    from orchestrator.tuning.sweep import parse_sweep, run_sweep

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": True, "dashboard_port": free_port()})  # the state API needs it
    try:
        head = cluster.head_node.node_id
        driver_node = cluster.add_node(num_cpus=1, resources={DRIVER_RESOURCE: 1}).node_id
        state_api = "http://" + ray.init(address=cluster.address, log_to_driver=False).dashboard_url
        sweep = parse_sweep(load_raw(None, [*TINY_SWEEP, f"output_dir={tmp_path}"]))
        results = run_sweep(sweep, progress=False, echo=lambda line: None)
        assert results is not None and not any(t.error for t in results.trials)
        where = {a.class_name: a.node_id for a in list_actors(address=state_api, detail=True, limit=1000)}
    finally:
        ray.shutdown()
        cluster.shutdown()
    trial = next((name for name in where if name.endswith("Trainable")), None)  # Tune's wrapper of the Trial class
    assert trial, where
    drivers = {name: where[name] for name in (trial, "TaskQueue", "TrainController")}
    assert set(drivers.values()) == {driver_node}, where
    assert where["RayTrainWorker"] == head, where


# -- a head started the way cluster.yaml starts it -------------------------------------------------
@pytest.fixture
def head_like_cluster_yaml():
    """cluster.yaml's `ray start --head`, its environment assignments included, on this machine: the
    token where file_mounts puts it (~/.ray/auth_token, under a HOME of the test's own), loopback
    ports of its own, one CPU, its own temp dir, and no autoscaler (that flag would start AWS's).
    Stopped by PID: SIGTERM to `ray start --block`, then any process still naming its temp dir."""
    pytest.importorskip("ray.dashboard.optional_deps", reason="the dashboard needs ray[default]")
    env_of_file, args = ray_start(launcher("cluster.yaml")["head_start_ray_commands"])
    temp_dir = Path(tempfile.mkdtemp(prefix="rayauth-", dir="/tmp"))  # short: Ray's socket paths live under it
    home = temp_dir / "home"
    token_file = home / ".ray" / "auth_token"
    token_file.parent.mkdir(parents=True)
    token_file.write_text(secrets.token_hex(32))
    token_file.chmod(0o600)
    gcs_port, dashboard_port = free_port(), free_port()
    custom = {k: v for k, v in head_resources("cluster.yaml").items() if k not in ("CPU", "GPU")}
    local_args = [a for a in args if not a.startswith(("--port=", "--autoscaling-config="))] + [
        f"--port={gcs_port}", "--block", "--num-cpus=1", f"--resources={json.dumps(custom)}",
        "--include-dashboard=true", f"--dashboard-port={dashboard_port}",
        f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}",
        f"--temp-dir={temp_dir}"]
    env = {**without_ray_settings(os.environ), **env_of_file, "HOME": str(home),
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}  # nothing to drain: no 30 s wait on SIGTERM
    ray_cli = str(Path(sys.executable).parent / "ray")
    log = open(temp_dir / "head.log", "wb")
    head = subprocess.Popen([ray_cli, "start", *local_args], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    dashboard = f"http://127.0.0.1:{dashboard_port}"
    try:
        deadline = time.monotonic() + HEAD_START_TIMEOUT_S
        while not _answers(dashboard):
            if head.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the head did not come up (exit {head.poll()}):\n{tail(temp_dir / 'head.log')}")
            time.sleep(1)
        yield {"gcs": f"127.0.0.1:{gcs_port}", "dashboard": dashboard, "token_file": token_file,
               "resources": custom, "temp_dir": temp_dir}
    finally:
        stop_ray_head(head)
        kill_pids_mentioning(str(temp_dir))  # anything that outlived it and is ours by its temp dir
        log.close()
        subprocess.run(["rm", "-rf", str(temp_dir)], check=False)


def _answers(url: str) -> bool:
    import requests

    try:
        requests.get(f"{url}/api/version", timeout=2)
        return True
    except requests.RequestException:
        return False


CLIENT = """
import json, sys
import ray
from ray.job_submission import JobSubmissionClient
gcs, dashboard = sys.argv[1:]
try:
    jobs = JobSubmissionClient(dashboard).list_jobs()
except Exception as exc:
    jobs = f"refused: {exc}"
try:
    ray.init(address=gcs, log_to_driver=False)
    connected = ray.cluster_resources()
except Exception as exc:
    connected = f"refused: {exc!r} {exc.__cause__!r}"
print(json.dumps({"jobs": jobs if isinstance(jobs, str) else len(jobs), "gcs": connected}))
"""


def run_client(head: dict, **env) -> dict:
    """A fresh Python that lists the head's jobs (the job SDK, as `ray job` does) and joins its GCS
    (`ray.init`), with only ``env`` telling it about authentication and a HOME that holds no token."""
    home = head["temp_dir"] / "client-home"
    home.mkdir(exist_ok=True)
    environment = {**without_ray_settings(os.environ), "HOME": str(home),
                   "RAY_gcs_server_port_wait_time_s": "2", **env}  # a refused connection gives up after 2 tries
    done = subprocess.run([sys.executable, "-c", CLIENT, head["gcs"], head["dashboard"]], env=environment,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.integration
def test_a_head_started_like_cluster_yaml_refuses_unauthenticated_clients(head_like_cluster_yaml):
    import requests

    head = head_like_cluster_yaml
    jobs = f"{head['dashboard']}/api/jobs/"
    token = head["token_file"].read_text()
    assert requests.get(jobs, timeout=10).status_code == 401
    assert requests.get(jobs, headers={"Authorization": "Bearer " + "0" * 64}, timeout=10).status_code == 403
    assert requests.get(jobs, headers={"Authorization": f"Bearer {token}"}, timeout=10).status_code == 200

    anonymous = run_client(head, RAY_AUTH_MODE="disabled")
    assert anonymous["jobs"].startswith("refused: Authentication required")  # the SDK's words for a 401
    assert anonymous["gcs"].startswith("refused") and "InvalidAuthToken" in anonymous["gcs"]

    wrong_token = run_client(head, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 64)
    assert wrong_token["jobs"].startswith("refused: Authentication failed")  # ... and for a 403
    assert wrong_token["gcs"].startswith("refused") and "InvalidAuthToken" in wrong_token["gcs"]

    member = run_client(head, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(head["token_file"]))
    assert member["jobs"] == 0
    assert member["gcs"][DRIVER_RESOURCE] == float(head["resources"][DRIVER_RESOURCE])
