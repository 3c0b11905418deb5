"""The cluster and infrastructure configs: they parse, pass the validation `ray up` runs, describe the
cluster the issue asks for, reference files that exist, carry no credential, and the guide shows
exactly the commands the tests run."""

from __future__ import annotations

import copy
import os
import re
import shlex
import tomllib
import zipfile
from pathlib import Path

import pytest
import yaml

from tests.infra import (
    BOOTSTRAP_STORAGE,
    JOB_FOLLOW,
    JOB_LIST,
    JOB_SUBMIT,
    LOCAL_STACK,
    LOCAL_STACK_ACTIONS,
    REPO,
)

CLUSTER = REPO / "cluster"
INFRA = REPO / "infra"
LAUNCHER = CLUSTER / "aws.yaml"
RAYCLUSTER = CLUSTER / "kuberay" / "raycluster.yaml"
RAYJOB = CLUSTER / "kuberay" / "rayjob-pretrain.yaml"
RUNTIME_ENV = CLUSTER / "runtime_env.yaml"
GUIDE = CLUSTER / "README.md"
APP_DIR = "/home/ray/metallo"  # where infra/Dockerfile puts the project
# GPUs per instance of the types the configs use (from the EC2 instance-type catalogue).
GPUS_PER_INSTANCE = {"g5.2xlarge": 1, "g5.12xlarge": 4, "g5.48xlarge": 8, "p4d.24xlarge": 8, "p5.48xlarge": 8}
SECRET_ENV_NAMES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_PASSWORD",
                    "MLFLOW_TRACKING_TOKEN", "RAY_AUTH_TOKEN", "PGPASSWORD", "POSTGRES_PASSWORD")


def load(path: Path):
    return yaml.safe_load(path.read_text())


def project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def project_image() -> str:
    return load(LAUNCHER)["docker"]["image"]


# ------------------------------------------------------------------ every file parses

@pytest.mark.parametrize("path", sorted(CLUSTER.rglob("*.yaml")) + [INFRA / "mlflow" / "docker-compose.yaml"],
                         ids=lambda path: str(path.relative_to(REPO)))
def test_yaml_parses(path):
    documents = [document for document in yaml.safe_load_all(path.read_text()) if document is not None]
    assert documents and all(isinstance(document, dict) for document in documents)


# ------------------------------------------------------------------ Ray cluster launcher (AWS)

def test_launcher_config_passes_the_validation_ray_up_runs():
    """`ray up` fills in defaults, then validates against ray/autoscaler/ray-schema.json (shipped in the
    wheel) with jsonschema plus its own checks, before it touches AWS. Same calls here."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(load(LAUNCHER)))


def test_launcher_validation_would_catch_a_typo():
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    broken = load(LAUNCHER)
    broken["available_node_types"]["gpu_1x"]["min_worker"] = broken["available_node_types"]["gpu_1x"].pop("min_workers")
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        validate_config(prepare_config(broken))


def test_launcher_has_a_cpu_head_and_gpu_worker_types_with_autoscaling_bounds():
    config = load(LAUNCHER)
    node_types = config["available_node_types"]
    head = node_types[config["head_node_type"]]
    assert head["node_config"]["InstanceType"] not in GPUS_PER_INSTANCE
    assert head["resources"] == {"CPU": 0}, "no tasks on the head: it runs drivers and the control plane"

    workers = {name: spec for name, spec in node_types.items() if name != config["head_node_type"]}
    gpus = {name: GPUS_PER_INSTANCE.get(spec["node_config"]["InstanceType"], 0) for name, spec in workers.items()}
    assert 1 in gpus.values(), "a single-GPU node type for trials"
    assert 8 in gpus.values(), "an 8-GPU node type for pretraining"
    for name, spec in workers.items():
        assert 0 <= spec["min_workers"] <= spec["max_workers"], name
        assert spec["max_workers"] <= config["max_workers"], name
    assert sum(spec["min_workers"] for spec in workers.values()) <= config["max_workers"]
    assert config["idle_timeout_minutes"] > 0
    # The 8-GPU type fits the 8-GPU pretraining config (8 workers x cpus_per_worker CPUs).
    pretrain = load(REPO / "configs" / "pretrain" / "imagenet_resnet50_8gpu.yaml")["compute"]
    eight = next(name for name, count in gpus.items() if count == 8)
    assert workers[eight]["node_config"]["InstanceType"] == "p4d.24xlarge"
    assert pretrain["num_workers"] * pretrain["cpus_per_worker"] <= 96


def test_every_node_runs_the_project_image_with_credentials_from_roles_not_keys():
    config = load(LAUNCHER)
    image = config["docker"]["image"]
    assert image.endswith(f"/metallo:{project()['version']}")
    assert "head_image" not in config["docker"] and "worker_image" not in config["docker"]
    for name, spec in config["available_node_types"].items():
        node = spec["node_config"]
        assert node["IamInstanceProfile"]["Name"].startswith("metallo-ray-"), name
        assert node["MetadataOptions"]["HttpTokens"] == "required", name  # IMDSv2 only
        assert "docker" not in spec, f"{name} must not override the image"


def test_launcher_passes_node_settings_by_name_and_turns_on_ray_token_auth():
    config = load(LAUNCHER)
    run_options = config["docker"]["run_options"]
    assert "--env-file /home/ubuntu/metallo.env" in run_options
    assert "--env RAY_AUTH_MODE=token" in run_options
    for option in run_options:
        assert not any(name in option for name in SECRET_ENV_NAMES), f"a secret name in docker run options: {option}"
    fetch = " ".join(config["initialization_commands"])
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "RAY_AUTH_TOKEN"):
        assert name in fetch
    assert "/metallo/env/$name" in fetch and "--with-decryption" in fetch and "umask 077" in fetch
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_start
    # Ray's defaults would pip-install a nightly Ray and boto3; everything is in the image instead.
    assert config["setup_commands"] == config["head_setup_commands"] == config["worker_setup_commands"] == []


# ------------------------------------------------------------------ the runtime environment of jobs

def test_runtime_env_is_valid_for_ray_and_holds_no_value_that_matters():
    from ray.runtime_env import RuntimeEnv

    runtime_env = load(RUNTIME_ENV)
    RuntimeEnv(**runtime_env)
    assert set(runtime_env) == {"excludes", "env_vars"}
    for name, value in runtime_env["env_vars"].items():
        assert name not in SECRET_ENV_NAMES and not name.startswith(("AWS_", "MLFLOW_")), name
        assert isinstance(value, str) and len(value) < 8, f"{name}: only short, harmless switches belong here"
    for pattern in ("/.git/", "/.venv/", "/data/", "/metallo-runs/"):
        assert pattern in runtime_env["excludes"]


def test_the_uploaded_working_dir_stays_small_and_leaves_out_git_and_venv(tmp_path):
    """What `ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml` zips (same Ray code)."""
    from ray._private.runtime_env.packaging import create_package

    package = tmp_path / "package.zip"
    create_package(str(REPO), package, include_gitignore=True, excludes=load(RUNTIME_ENV)["excludes"])
    assert package.stat().st_size < 100 * 1024 * 1024, "the dashboard refuses uploads above 100 MiB"
    names = set(zipfile.ZipFile(package).namelist())
    sources = {str(path.relative_to(REPO)) for package_dir in ("metallo_core", "jobs", "configs")
               for path in (REPO / package_dir).rglob("*") if path.suffix in (".py", ".yaml")
               and "__pycache__" not in path.parts}
    missing = sorted(sources - names)
    assert not missing, f"code or configs the job needs were excluded: {missing[:10]}"
    assert not [name for name in names if name.startswith((".git/", ".venv/", "data/", "metallo-runs/"))]


# ------------------------------------------------------------------ KubeRay

def _pod_containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def _cluster_specs() -> dict[str, dict]:
    return {"RayCluster": load(RAYCLUSTER)["spec"], "RayJob": load(RAYJOB)["spec"]["rayClusterSpec"]}


def test_kuberay_manifests_are_a_raycluster_and_a_rayjob_for_this_ray_version():
    import ray

    cluster, job = load(RAYCLUSTER), load(RAYJOB)
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    for kind, spec in _cluster_specs().items():
        assert spec["rayVersion"] == ray.__version__ == "2.60.0", kind
        assert spec["authOptions"] == {"mode": "token"}, kind


def test_kuberay_worker_groups_request_gpus_and_every_pod_runs_the_project_image():
    image = project_image()
    for kind, spec in _cluster_specs().items():
        groups = spec["workerGroupSpecs"]
        gpu_counts = set()
        for group in groups:
            assert 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"], group["groupName"]
            (container,) = _pod_containers(group)
            limits, requests = container["resources"]["limits"], container["resources"]["requests"]
            assert limits == requests, f"{kind}/{group['groupName']}: guaranteed QoS"
            if "gpu" in group["groupName"]:
                gpu_counts.add(int(limits["nvidia.com/gpu"]))
                tolerations = group["template"]["spec"]["tolerations"]
                assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations
        assert gpu_counts, f"{kind} has no GPU worker group"
        if kind == "RayCluster":
            assert gpu_counts == {1, 8}, "single-GPU trials and 8-GPU pretraining"
        else:
            assert gpu_counts == {8}
        pods = [spec["headGroupSpec"], *groups]
        for group in pods:
            pod = group["template"]["spec"]
            assert pod["serviceAccountName"] == "metallo-ray", "S3 through IRSA"
            (container,) = pod["containers"]
            assert container["image"] == image
            assert {"configMapRef": {"name": "metallo-env"}} in container["envFrom"]
            assert {"secretRef": {"name": "metallo-mlflow-login", "optional": True}} in container["envFrom"]
            for variable in container.get("env", []):
                assert variable["name"] not in SECRET_ENV_NAMES or "valueFrom" in variable, variable["name"]
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_rayjob_runs_the_pretraining_entrypoint_on_a_config_that_exists():
    from ray.runtime_env import RuntimeEnv

    spec = load(RAYJOB)["spec"]
    words = shlex.split(spec["entrypoint"])
    assert words[:3] == ["python", "-m", "jobs.pretrain_dino"]
    assert (REPO / "jobs" / "pretrain_dino.py").is_file()
    config_path = words[words.index("--config") + 1]
    assert config_path.startswith(APP_DIR + "/"), "absolute, inside the image: the driver's working dir is not ours"
    local_config = REPO / config_path.removeprefix(APP_DIR + "/")
    assert local_config.is_file(), local_config  # tests/ssl/test_configs.py validates its content
    config = load(local_config)
    assert config["run"]["storage"].startswith("s3://") and config["compute"]["num_workers"] == 8

    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    RuntimeEnv(**runtime_env)
    assert runtime_env["env_vars"] == load(RUNTIME_ENV)["env_vars"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["backoffLimit"] >= 1


# ------------------------------------------------------------------ KubeRay structure (not the CRD schema)

# No installed package ships KubeRay's CRDs, and nothing is downloaded at test time, so the manifests are
# NOT validated against the real CRD OpenAPI schema here (the test after this one does that only where
# KUBERAY_CRD_DIR points at a KubeRay checkout). What runs everywhere is this MINIMAL schema, written by
# hand from KubeRay's documented ray.io/v1 API reference (docs/reference/api.md, KubeRay 1.5-1.7): the
# KubeRay-defined objects with their field names and types, unknown fields rejected (the API server would
# prune them silently, so a typo such as `workerGroupSpec` would be lost); pod templates are Kubernetes
# PodTemplateSpecs and only checked for having containers.
_POD_TEMPLATE = {"type": "object", "required": ["spec"], "properties": {
    "metadata": {"type": "object"},
    "spec": {"type": "object", "required": ["containers"],
             "properties": {"containers": {"type": "array", "minItems": 1}}}}}
_START_PARAMS = {"type": "object", "additionalProperties": {"type": "string"}}
_RAY_CLUSTER_SPEC = {
    "type": "object", "additionalProperties": False, "required": ["headGroupSpec"],
    "properties": {
        "rayVersion": {"type": "string"},
        "enableInTreeAutoscaling": {"type": "boolean"},
        "autoscalerOptions": {"type": "object", "additionalProperties": False, "properties": {
            name: {} for name in ("resources", "image", "imagePullPolicy", "securityContext", "env", "envFrom",
                                  "volumeMounts", "upscalingMode", "version")} | {
            "idleTimeoutSeconds": {"type": "integer", "minimum": 0}}},
        "authOptions": {"type": "object", "additionalProperties": False,
                        "properties": {"mode": {"enum": ["disabled", "token"]}}},
        "headServiceAnnotations": {"type": "object"},
        "gcsFaultToleranceOptions": {"type": "object"},
        "managedBy": {"type": "string"},
        "suspend": {"type": "boolean"},
        "upgradeStrategy": {"type": "object"},
        "headGroupSpec": {"type": "object", "additionalProperties": False, "required": ["template"], "properties": {
            "rayStartParams": _START_PARAMS, "template": _POD_TEMPLATE, "serviceType": {"type": "string"},
            "headService": {"type": "object"}, "enableIngress": {"type": "boolean"},
            "resources": {"type": "object"}, "labels": {"type": "object"}}},
        "workerGroupSpecs": {"type": "array", "items": {
            "type": "object", "additionalProperties": False, "required": ["groupName", "template"], "properties": {
                "groupName": {"type": "string"}, "replicas": {"type": "integer", "minimum": 0},
                "minReplicas": {"type": "integer", "minimum": 0}, "maxReplicas": {"type": "integer", "minimum": 0},
                "idleTimeoutSeconds": {"type": "integer", "minimum": 0}, "numOfHosts": {"type": "integer"},
                "rayStartParams": _START_PARAMS, "template": _POD_TEMPLATE, "scaleStrategy": {"type": "object"},
                "suspend": {"type": "boolean"}, "resources": {"type": "object"}, "labels": {"type": "object"}}}},
    },
}
_RAY_JOB_SPEC = {
    "type": "object", "additionalProperties": False, "required": ["entrypoint"],
    "properties": {
        "entrypoint": {"type": "string"}, "runtimeEnvYAML": {"type": "string"}, "jobId": {"type": "string"},
        "metadata": {"type": "object"},
        "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
        "entrypointNumCpus": {"type": "number"}, "entrypointNumGpus": {"type": "number"},
        "entrypointResources": {"type": "string"},
        "shutdownAfterJobFinishes": {"type": "boolean"},
        "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
        "activeDeadlineSeconds": {"type": "integer", "minimum": 0},
        "backoffLimit": {"type": "integer", "minimum": 0},
        "rayClusterSpec": _RAY_CLUSTER_SPEC, "clusterSelector": {"type": "object"},
        "submitterPodTemplate": {"type": "object"}, "submitterConfig": {"type": "object"},
        "deletionStrategy": {"type": "object"}, "managedBy": {"type": "string"}, "suspend": {"type": "boolean"},
    },
}


def _kuberay_object_schema(kind: str, spec: dict) -> dict:
    return {"type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "metadata", "spec"],
            "properties": {"apiVersion": {"const": "ray.io/v1"}, "kind": {"const": kind},
                           "metadata": {"type": "object", "required": ["name"]}, "spec": spec}}


MINIMAL_KUBERAY_SCHEMAS = {"RayCluster": _kuberay_object_schema("RayCluster", _RAY_CLUSTER_SPEC),
                           "RayJob": _kuberay_object_schema("RayJob", _RAY_JOB_SPEC)}


def kuberay_structure_errors(manifest: dict) -> list[str]:
    import jsonschema

    validator = jsonschema.Draft7Validator(MINIMAL_KUBERAY_SCHEMAS[manifest["kind"]])
    return [f"{list(error.absolute_path)}: {error.message}" for error in validator.iter_errors(manifest)]


def test_kuberay_manifests_match_the_documented_field_structure():
    """Against the minimal hand-written schema above, NOT KubeRay's CRD (see its comment)."""
    for path in (RAYCLUSTER, RAYJOB):
        errors = kuberay_structure_errors(load(path))
        assert not errors, f"{path.name}:\n" + "\n".join(errors)

    # Guard: the mistakes this schema exists to catch are reported.
    cluster = load(RAYCLUSTER)
    cluster["spec"]["workerGroupSpec"] = cluster["spec"].pop("workerGroupSpecs")  # a typo the server would prune
    cluster["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0  # must be a string
    job = load(RAYJOB)
    job["spec"]["rayClusterSpec"]["authOptions"]["mode"] = "tokens"
    del job["spec"]["entrypoint"]
    cluster_errors, job_errors = kuberay_structure_errors(cluster), kuberay_structure_errors(job)
    assert any("workerGroupSpec" in error for error in cluster_errors), cluster_errors
    assert any("num-cpus" in error for error in cluster_errors), cluster_errors
    assert any("'tokens'" in error for error in job_errors) and any("entrypoint" in error for error in job_errors)


@pytest.mark.skipif(not os.environ.get("KUBERAY_CRD_DIR"), reason="set KUBERAY_CRD_DIR to KubeRay's "
                    "ray-operator/config/crd/bases to validate the manifests against its CRD schemas")
def test_kuberay_manifests_validate_against_the_kuberay_crds():
    import jsonschema

    def strict(node):
        """The CRD's schema, with unknown fields rejected (the API server would prune them silently)."""
        if isinstance(node, dict):
            if node.get("x-kubernetes-int-or-string"):
                node.pop("type", None)
                node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
            if node.get("type") == "object" and "properties" in node and "additionalProperties" not in node \
                    and not node.get("x-kubernetes-preserve-unknown-fields"):
                node["additionalProperties"] = False
            for value in node.values():
                strict(value)
        elif isinstance(node, list):
            for value in node:
                strict(value)
        return node

    for crd_file, manifest in (("ray.io_rayclusters.yaml", RAYCLUSTER), ("ray.io_rayjobs.yaml", RAYJOB)):
        crd = load(Path(os.environ["KUBERAY_CRD_DIR"]) / crd_file)
        (version,) = [version for version in crd["spec"]["versions"] if version["name"] == "v1"]
        schema = strict(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
        schema["properties"]["metadata"] = {"type": "object"}
        errors = [f"{list(error.absolute_path)}: {error.message}"
                  for error in jsonschema.Draft7Validator(schema).iter_errors(load(manifest))]
        assert not errors, "\n".join(errors)


# ------------------------------------------------------------------ images

def test_project_image_installs_from_the_lock_as_non_root_with_dependencies_cached_apart():
    text = (INFRA / "Dockerfile").read_text()
    lines = [line.strip() for line in text.splitlines()]
    assert "FROM rayproject/ray:2.60.0-py311-gpu" in lines
    assert f"WORKDIR {APP_DIR}" in lines
    dependencies = text.index("uv sync --frozen --no-dev --no-install-project")
    copy_code = text.index(f"COPY --chown=ray:users . {APP_DIR}")
    install = re.search(r"uv sync --frozen --no-dev(?! --no-install-project)", text[copy_code:])
    assert dependencies < copy_code and install, "dependencies in their own layer, before the code"
    assert "source=uv.lock,target=uv.lock" in text[:copy_code]
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1] == "ray" and "root" not in users
    assert "ENV PATH=/home/ray/venv/bin:$PATH" in text and ">> /home/ray/.bashrc" in text
    ignored = (REPO / ".dockerignore").read_text().split()
    for pattern in (".git", ".venv", "data", "**/.env"):
        assert pattern in ignored


def test_mlflow_server_image_and_compose_file():
    text = (INFRA / "mlflow" / "Dockerfile").read_text()
    mlflow_pin = next(dependency for dependency in project()["dependencies"] if dependency.startswith("mlflow"))
    assert f'"mlflow[auth]{mlflow_pin.removeprefix("mlflow")}"' in text
    assert "psycopg2-binary==" in text and "boto3==" in text
    assert "--serve-artifacts" in text and "--app-name basic-auth" in text and "--allowed-hosts" in text
    assert [line.split()[1] for line in text.splitlines() if line.startswith("USER ")] == ["mlflow"]

    compose = load(INFRA / "mlflow" / "docker-compose.yaml")
    postgres, server = compose["services"]["postgres"], compose["services"]["mlflow"]
    assert postgres["healthcheck"]["test"] and server["healthcheck"]["test"]
    assert server["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert postgres["environment"]["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD:?")
    environment = dict(entry.partition("=")[::2] for entry in server["environment"])
    backend = environment["MLFLOW_BACKEND_STORE_URI"]
    assert backend.startswith("postgresql://") and ":" not in backend.split("://")[1].split("@")[0], \
        "no password in the URI: libpq reads PGPASSWORD"
    assert environment["PGPASSWORD"].startswith("${POSTGRES_PASSWORD:?")
    assert environment["MLFLOW_ARTIFACTS_DESTINATION"].startswith("${MLFLOW_ARTIFACTS_DESTINATION:-s3://")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_AUTH_ADMIN_PASSWORD",
                 "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert environment[name] == "", f"{name} is passed through by name only"
    assert server["ports"][0].startswith("${MLFLOW_BIND_ADDRESS:-127.0.0.1}:")


# ------------------------------------------------------------------ no credentials

_SECRET_NAME = r"[A-Za-z0-9_]*(?:SECRET|SECRET_KEY|SECRET_ACCESS_KEY|PASSWORD|PASSWD|TOKEN|API_KEY|ACCESS_KEY_ID)"
_ASSIGNMENT = re.compile(rf"(?i)\b({_SECRET_NAME})\b[\"'\\]*\s*[:=]\s*[\"'\\]*([^\s\"'\\,;)}}]*)")
_URL_PASSWORD = re.compile(r"\b[a-z][a-z0-9+.-]*://[^/\s:@'\"]+:([^@\s/'\"]+)@")
_AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")
_AWS_SECRET_LIKE = re.compile(r"(?<![A-Za-z0-9+/=])[A-Za-z0-9+/]{40}(?![A-Za-z0-9+/=])")
_PRIVATE_KEY = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----")


def _is_reference(value: str) -> bool:
    """An empty value, a $VARIABLE or <template> reference, an upper-case name or code: not a literal secret."""
    return (not value or value[0] in "$<{([?:" or len(value) < 6
            or re.fullmatch(r"[A-Z][A-Z0-9_]*", value) is not None or "(" in value)


def find_secrets(text: str, allowed: frozenset[str] = frozenset()) -> list[str]:
    """Secret-looking values in `text`, described by kind and line number (never the value itself)."""
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        if _AWS_KEY_ID.search(line):
            found.append(f"line {number}: AWS access key id")
        if _PRIVATE_KEY.search(line):
            found.append(f"line {number}: private key")
        for match in _URL_PASSWORD.finditer(line):
            if not _is_reference(match.group(1)):
                found.append(f"line {number}: password in a URL")
        for match in _ASSIGNMENT.finditer(line):
            if not _is_reference(match.group(2)) and match.group(2) not in allowed:
                found.append(f"line {number}: value for {match.group(1)}")
        for match in _AWS_SECRET_LIKE.finditer(line):
            token = match.group(0)
            if re.search(r"[a-z]", token) and re.search(r"[A-Z]", token) and re.search(r"[0-9]", token):
                found.append(f"line {number}: 40-character key-like string")
    return found


PLANTED = [
    "aws_secret_access_key = " + "wJalrXUtnFEMI/K7MDENG/bPxRfiCY" + "EXAMPLEKEY",
    "key: AKIA" + "IOSFODNN7EXAMPLE",
    "MLFLOW_BACKEND_STORE_URI=postgresql://mlflow:" + "hunter2hunter2@db:5432/mlflow",
    "MLFLOW_TRACKING_PASSWORD: " + "s3cr3t-value",
    '{"password": "' + 'correct-horse-battery"}',
    "-----BEGIN RSA " + "PRIVATE KEY-----",
    "export RAY_AUTH_TOKEN=" + "0123456789abcdef0123",
]
HARMLESS = [
    "POSTGRES_PASSWORD: ${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD in infra/mlflow/.env}",
    "- PGPASSWORD=${POSTGRES_PASSWORD:?set it}",
    '--from-literal=MLFLOW_TRACKING_PASSWORD="$MLFLOW_PASSWORD"',
    "- secretRef: {name: metallo-mlflow-login, optional: true}",
    "MLFLOW_AUTH_ADMIN_PASSWORD=<the admin's password>",
    '"AWS_SECRET_ACCESS_KEY": LOOPBACK_TEST_SECRET_ACCESS_KEY,',
    "MLFLOW_BACKEND_STORE_URI=postgresql://mlflow@postgres:5432/mlflow",
    "MetadataOptions: {HttpTokens: required, HttpPutResponseHopLimit: 2}",
    "  - MLFLOW_AUTH_ADMIN_PASSWORD",
]


def test_secret_scanner_finds_planted_secrets_and_passes_references():
    for line in PLANTED:
        assert find_secrets(line), f"missed: {line}"
    for line in HARMLESS:
        assert not find_secrets(line), f"false alarm: {line}"


def _scanned_files() -> list[Path]:
    files = [path for root in (CLUSTER, INFRA) for path in root.rglob("*") if path.is_file()]
    files = [path for path in files if "__pycache__" not in path.parts]
    return sorted(files + [REPO / ".dockerignore"])


def test_no_credential_values_under_cluster_and_infra():
    from infra.local_stack import LOOPBACK_TEST_ACCESS_KEY_ID, LOOPBACK_TEST_SECRET_ACCESS_KEY

    loopback_values = frozenset({LOOPBACK_TEST_ACCESS_KEY_ID, LOOPBACK_TEST_SECRET_ACCESS_KEY})
    problems = []
    for path in _scanned_files():
        text = path.read_text()
        # The loopback stack's fixed dummy keys (marked test-only) may appear in its own code and guide.
        allowed = loopback_values if path in (INFRA / "local_stack.py", GUIDE) else frozenset()
        problems += [f"{path.relative_to(REPO)} {problem}" for problem in find_secrets(text, allowed)]
        if path not in (INFRA / "local_stack.py", GUIDE):
            problems += [f"{path.relative_to(REPO)}: loopback test key" for value in loopback_values if value in text]
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------ the guide

def _guide_commands() -> list[str]:
    """Shell commands in the guide's ```bash blocks (continuations joined)."""
    blocks = re.findall(r"```bash\n(.*?)```", GUIDE.read_text(), flags=re.S)
    commands = []
    for block in blocks:
        commands += [line.strip() for line in block.replace("\\\n", " ").splitlines() if line.strip()]
    return commands


def _without_uv_run(words: list[str]) -> list[str]:
    return words[3:] if words[:3] == ["uv", "run", "--frozen"] else words


def test_guide_shows_the_commands_the_tests_run():
    commands = _guide_commands()
    for action in LOCAL_STACK_ACTIONS:
        assert any(command.startswith(f"{LOCAL_STACK} {action}") or f'"$({LOCAL_STACK} {action})"' in command
                   for command in commands), f"{LOCAL_STACK} {action}"
    assert any(command.startswith(BOOTSTRAP_STORAGE) for command in commands)
    submits = [_without_uv_run(shlex.split(command)) for command in commands if "ray job submit" in command]
    assert len(submits) >= 4
    for words in submits:
        assert tuple(words[:len(JOB_SUBMIT)]) == JOB_SUBMIT, " ".join(words)
    joined = "\n".join(commands)
    assert " ".join(JOB_FOLLOW) in joined and " ".join(JOB_LIST) in joined
    for manifest in ("cluster/aws.yaml", "cluster/kuberay/raycluster.yaml", "cluster/kuberay/rayjob-pretrain.yaml"):
        assert manifest in joined


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pydantic notices from Ray Serve's import
def test_guide_ray_commands_use_options_the_ray_cli_has():
    """The `ray up --help` level: every ray subcommand and option in the guide exists in this Ray."""
    import click
    from ray.scripts.scripts import cli

    checked = 0
    for command in _guide_commands():
        words = _without_uv_run(shlex.split(command))
        if not words or words[0] != "ray":
            continue
        node: click.Command = cli
        rest = words[1:]
        while isinstance(node, click.Group):
            assert rest and rest[0] in node.commands, f"unknown ray command in: {command}"
            node, rest = node.commands[rest[0]], rest[1:]
        options = {name for parameter in node.params for name in (*parameter.opts, *parameter.secondary_opts)}
        for word in rest:
            if word == "--":
                break
            if word.startswith("-"):
                assert word.split("=")[0] in options, f"`{word}` is not an option of `{node.name}` in: {command}"
        if node.name in ("up", "down", "dashboard", "exec", "attach"):
            assert (REPO / rest[0]).is_file(), command
        checked += 1
    assert checked >= 10


def test_guide_references_only_files_and_jobs_that_exist():
    text = GUIDE.read_text()
    for path in sorted(set(re.findall(r"(?<![\w/.])((?:cluster|infra|configs)/[\w./-]+\.(?:yaml|py|md))", text))):
        assert (REPO / path).is_file(), path
    for module in sorted(set(re.findall(r"python -m ((?:jobs|infra)\.\w+)", text))):
        assert (REPO / (module.replace(".", "/") + ".py")).is_file(), module
    from metallo_core.stage_table import stage_named

    stages = set(re.findall(r"-- metallo (\w+)", text))
    assert stages, "the guide shows `ray job submit ... -- metallo <stage>` too"
    for stage in sorted(stages):
        stage_named(stage)  # KeyError names the known stages
    for relative in re.findall(r"\]\(([^)#]+)\)", text):
        assert (GUIDE.parent / relative).resolve().exists(), relative
