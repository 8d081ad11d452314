"""The deployment files (Dockerfile, docker-compose.yml, Kubernetes manifests) are valid and agree.

No Docker engine or cluster is needed: the files are parsed and cross-checked against each other and
against ``settings/settings.toml``. ``kubectl kustomize``, ``kubeconform`` and ``docker compose
config`` run only when they are installed.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from tasker.settings import load_settings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
DOCKERIGNORE = ROOT / ".dockerignore"
SETTINGS_TOML = ROOT / "settings" / "settings.toml"
README = DEPLOY / "README.md"

# TASKER_* variables that are not settings keys: the environment switch and the file override.
SPECIAL_VARIABLES = {"TASKER_ENV", "TASKER_SETTINGS_FILE"}
# Manifests kept out of kustomization.yaml on purpose (each must be named in its comments).
NOT_IN_KUSTOMIZATION = {"secret.example.yaml", "worker-keda-scaledobject.yaml"}
CLUSTER_SCOPED_KINDS = {"Namespace"}


# ---------------------------------------------------------------------------------------- helpers


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def load_docs(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as handle:
        docs = [doc for doc in yaml.safe_load_all(handle) if doc is not None]
    for doc in docs:
        assert isinstance(doc, dict), f"{path.name}: every YAML document must be a mapping"
    return docs


def all_objects() -> list[tuple[str, dict[str, Any]]]:
    return [(path.name, doc) for path in manifest_files() for doc in load_docs(path)]


def objects_of(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in all_objects() if doc["kind"] == kind]


def one(kind: str) -> dict[str, Any]:
    found = objects_of(kind)
    assert len(found) == 1, f"expected exactly one {kind}, found {len(found)}"
    return found[0]


def kustomization() -> dict[str, Any]:
    return load_docs(K8S / "kustomization.yaml")[0]


def compose() -> dict[str, Any]:
    with COMPOSE.open(encoding="utf-8") as handle:
        data = yaml.safe_load(handle)
    assert isinstance(data, dict)
    return data


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, rest = line.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    assert not pending, "Dockerfile ends with a line continuation"
    return instructions


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[last_from:]


def exec_form(instruction: str) -> list[str]:
    for keyword, rest in reversed(final_stage()):
        if keyword == instruction:
            value = json.loads(rest)
            assert isinstance(value, list), f"{instruction} must use the exec (JSON array) form"
            return [str(item) for item in value]
    raise AssertionError(f"the final Dockerfile stage has no {instruction}")


def image_user() -> str:
    users = [rest for keyword, rest in final_stage() if keyword == "USER"]
    assert users, "the final Dockerfile stage must switch to a non-root USER"
    return users[-1]


def settings_defaults() -> dict[str, Any]:
    with SETTINGS_TOML.open("rb") as handle:
        default = tomllib.load(handle)["default"]
    assert isinstance(default, dict)
    return default


def settings_key_problem(variable: str) -> str | None:
    """Why ``variable`` is not a valid TASKER_* settings variable, or None when it is."""
    if variable in SPECIAL_VARIABLES:
        return None
    if not variable.startswith("TASKER_"):
        return f"{variable} does not start with TASKER_"
    default = settings_defaults()
    parts = variable.removeprefix("TASKER_").lower().split("__")
    if len(parts) == 1:
        key = parts[0]
        if key not in default or isinstance(default[key], dict):
            return f"{variable}: no top-level key {key!r} in [default] of settings.toml"
        return None
    if len(parts) == 2:
        section, key = parts
        table = default.get(section)
        if not isinstance(table, dict):
            return f"{variable}: no table [default.{section}] in settings.toml"
        if key not in table:
            return f"{variable}: no key {key!r} in [default.{section}] of settings.toml"
        return None
    return f"{variable}: settings.toml has no tables nested deeper than [default.<section>]"


def assert_settings_variables(names: list[str], where: str) -> None:
    problems = [p for p in map(settings_key_problem, names) if p]
    assert not problems, f"{where}: invalid settings variables:\n" + "\n".join(problems)


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    spec = obj["spec"]["template"]["spec"]
    assert isinstance(spec, dict)
    return spec


def container(obj: dict[str, Any]) -> dict[str, Any]:
    containers = pod_spec(obj)["containers"]
    assert len(containers) == 1, f"{obj['metadata']['name']}: expected one container"
    return containers[0]


def k8s_argv(ctr: dict[str, Any]) -> list[str]:
    """The command a container runs: command (or the image's ENTRYPOINT) followed by args."""
    command = ctr.get("command") or exec_form("ENTRYPOINT")
    args = ctr.get("args", [] if "command" in ctr else exec_form("CMD"))
    return [*command, *args]


def compose_argv(service: dict[str, Any]) -> list[str]:
    entrypoint = service.get("entrypoint", exec_form("ENTRYPOINT"))
    command = service.get("command", exec_form("CMD"))
    if isinstance(entrypoint, str):
        entrypoint = shlex.split(entrypoint)
    if isinstance(command, str):
        command = shlex.split(command)
    return [*entrypoint, *command]


def compose_environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def configmap_env() -> dict[str, str]:
    return dict(one("ConfigMap")["data"])


def example_secret() -> dict[str, Any]:
    return one("Secret")


def workloads() -> list[dict[str, Any]]:
    return [one("Deployment"), one("Job")]


# ----------------------------------------------------------------------------------- Dockerfile


def test_dockerfile_is_multi_stage_on_python_311_slim() -> None:
    instructions = dockerfile_instructions()
    args = dict(
        rest.split("=", 1) for keyword, rest in instructions if keyword == "ARG" and "=" in rest
    )
    froms = [rest for keyword, rest in instructions if keyword == "FROM"]
    assert len(froms) >= 2, "the Dockerfile must be multi-stage"
    for line in froms:
        image = line.split()[0]
        image = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), image)
        assert image == "python:3.11-slim", f"unexpected base image in FROM {line}"
    stages = [line.split()[-1] for line in froms if " as " in line.lower()]
    copied_from = [
        m.group(1)
        for keyword, rest in final_stage()
        if keyword == "COPY" and (m := re.search(r"--from=(\S+)", rest))
    ]
    assert copied_from, "the final stage must copy the build stage's output (COPY --from=...)"
    assert set(copied_from) <= set(stages), f"COPY --from names unknown stages: {copied_from}"


def test_dockerfile_installs_the_package_from_the_repository() -> None:
    runs = " ".join(rest for keyword, rest in dockerfile_instructions() if keyword == "RUN")
    assert re.search(r"pip install (\S+ )*\.(\s|$)", runs), "the image must `pip install .`"
    for keyword, rest in dockerfile_instructions():
        if keyword != "COPY" or "--from=" in rest:
            continue
        sources = [part for part in rest.split() if not part.startswith("--")][:-1]
        for source in sources:
            assert (ROOT / source).exists(), f"COPY source {source} is missing from the repo"


def test_dockerfile_runs_as_non_root_with_tasker_entrypoint() -> None:
    user = image_user().split(":")[0]
    assert user not in {"root", "0"}, "the image must not run as root"
    assert exec_form("ENTRYPOINT") == ["tasker"]
    assert exec_form("CMD") == ["worker"]


def test_dockerignore_keeps_local_state_out_and_build_inputs_in() -> None:
    patterns = {
        line.strip().rstrip("/")
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }
    for required in (".venv", ".tasker", ".git", "bench/results"):
        assert required in patterns, f".dockerignore must exclude {required}"
    assert any("__pycache__" in p for p in patterns), ".dockerignore must exclude __pycache__"
    for needed in ("pyproject.toml", "README.md", "tasker", "sql", "settings", "examples"):
        assert needed not in patterns, f".dockerignore excludes {needed}, which the build needs"


# ------------------------------------------------------------------------------ docker-compose


def test_compose_has_postgres_migrate_and_worker() -> None:
    services = compose()["services"]
    assert {"postgres", "migrate", "worker"} <= set(services)
    postgres = services["postgres"]
    assert postgres["image"] == "postgres:15"
    assert postgres["healthcheck"]["test"], "postgres needs a healthcheck for depends_on"
    volume = postgres["volumes"][0].split(":")[0]
    assert volume in compose()["volumes"], "the postgres data volume must be declared"


def test_compose_startup_order() -> None:
    services = compose()["services"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert (
        services["worker"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    )


def test_compose_builds_the_tasker_image_and_runs_tasker_commands() -> None:
    services = compose()["services"]
    for name in ("migrate", "worker"):
        service = services[name]
        assert service["build"]["context"] == "."
        assert service["build"]["dockerfile"] == "deploy/Dockerfile"
        assert (ROOT / service["build"]["dockerfile"]).is_file()
        assert compose_argv(service)[0] == "tasker", f"{name} must run the tasker command"
    assert services["migrate"]["image"] == services["worker"]["image"]
    assert compose_argv(services["migrate"]) == ["tasker", "db", "migrate"]
    worker = compose_argv(services["worker"])
    assert worker == ["tasker", "worker", "examples.hello.actors"]
    assert services["worker"]["deploy"]["replicas"] == 2
    assert "container_name" not in services["worker"], "a fixed name prevents replicas"


def test_compose_environment_is_production_settings() -> None:
    services = compose()["services"]
    for name in ("migrate", "worker"):
        env = compose_environment(services[name])
        assert env["TASKER_ENV"] == "production"
        assert env["TASKER_DATABASE__URL"] == "postgresql://tasker:tasker@postgres:5432/tasker"
        assert_settings_variables(list(env), f"docker-compose.yml service {name}")


# ------------------------------------------------------------------------------ Kubernetes


def test_every_manifest_parses_and_names_its_object() -> None:
    objects = all_objects()
    assert objects, "no Kubernetes manifests found"
    expected = {
        "namespace.yaml",
        "configmap.yaml",
        "secret.example.yaml",
        "migrate-job.yaml",
        "worker-deployment.yaml",
        "worker-hpa.yaml",
        "worker-keda-scaledobject.yaml",
    }
    assert expected <= {path.name for path in manifest_files()}
    namespace = one("Namespace")["metadata"]["name"]
    for filename, obj in objects:
        for field in ("apiVersion", "kind"):
            assert obj.get(field), f"{filename}: object without {field}"
        assert obj.get("metadata", {}).get("name"), f"{filename}: {obj['kind']} without a name"
        if obj["kind"] not in CLUSTER_SCOPED_KINDS:
            assert obj["metadata"].get("namespace") == namespace, (
                f"{filename}: {obj['kind']} must be in namespace {namespace}"
            )


def test_job_and_deployment_share_the_image_and_run_tasker() -> None:
    deployment, job = workloads()
    assert container(deployment)["image"] == container(job)["image"]
    assert k8s_argv(container(job)) == ["tasker", "db", "migrate"]
    worker = k8s_argv(container(deployment))
    assert worker[:2] == ["tasker", "worker"]
    assert worker[2:], "the worker must be told which actor modules to load"
    assert pod_spec(job)["restartPolicy"] in {"Never", "OnFailure"}


def test_worker_deployment_resources_and_graceful_shutdown() -> None:
    deployment = one("Deployment")
    ctr = container(deployment)
    for bound in ("requests", "limits"):
        for resource in ("cpu", "memory"):
            assert ctr["resources"][bound][resource], f"worker needs {bound}.{resource}"
    assert pod_spec(deployment)["terminationGracePeriodSeconds"] == 60
    assert "preStop" not in ctr.get("lifecycle", {}), "shutdown relies on SIGTERM, not preStop"
    comment = (K8S / "worker-deployment.yaml").read_text(encoding="utf-8")
    for word in ("SIGTERM", "requeue", "lease", "redeliver"):
        assert word in comment, f"worker-deployment.yaml must document shutdown ({word!r})"
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert "replicas" not in deployment["spec"], "the autoscaler owns the replica count"


def test_pods_run_as_the_images_non_root_user() -> None:
    uid = int(image_user().split(":")[0])
    for obj in workloads():
        security = pod_spec(obj)["securityContext"]
        assert security["runAsNonRoot"] is True
        assert security["runAsUser"] == uid


def test_pods_read_the_configmap_and_secret() -> None:
    configmap = one("ConfigMap")["metadata"]["name"]
    secret = example_secret()["metadata"]["name"]
    for obj in workloads():
        env_from = container(obj)["envFrom"]
        assert {"configMapRef": {"name": configmap}} in env_from
        assert {"secretRef": {"name": secret}} in env_from


def test_configmap_and_secret_hold_valid_settings_variables() -> None:
    data = configmap_env()
    assert data["TASKER_ENV"] == "production"
    assert all(isinstance(value, str) for value in data.values()), "ConfigMap values are strings"
    assert "TASKER_DATABASE__URL" not in data, "the database URL belongs in the Secret"
    assert_settings_variables(list(data), "configmap.yaml")
    secret = example_secret()
    assert list(secret["stringData"]) == ["TASKER_DATABASE__URL"]
    assert_settings_variables(list(secret["stringData"]), "secret.example.yaml")
    for obj in workloads():
        names = [item["name"] for item in container(obj).get("env", [])]
        assert_settings_variables(names, f"{obj['kind']} {obj['metadata']['name']} env")


def test_example_secret_is_clearly_an_example() -> None:
    text = (K8S / "secret.example.yaml").read_text(encoding="utf-8")
    assert text.startswith("# EXAMPLE ONLY")
    assert "CHANGE-ME" in example_secret()["stringData"]["TASKER_DATABASE__URL"]


def test_manifest_settings_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """ConfigMap + Secret + container env give valid production settings (values, not just keys)."""
    for name in list(os.environ):
        if name.startswith("TASKER_"):
            monkeypatch.delenv(name)
    env = {**configmap_env(), **example_secret()["stringData"]}
    env.update({item["name"]: item["value"] for item in container(one("Deployment"))["env"]})
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = load_settings(settings_file=SETTINGS_TOML)
    assert settings.env == "production"
    assert settings.database.url == env["TASKER_DATABASE__URL"]
    assert settings.broker.namespace == env["TASKER_BROKER__NAMESPACE"]


def test_hpa_scales_the_worker_deployment_on_cpu() -> None:
    hpa = one("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", one("Deployment")["metadata"]["name"])
    metrics = hpa["spec"]["metrics"]
    assert any(m["type"] == "Resource" and m["resource"]["name"] == "cpu" for m in metrics)
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


def test_keda_scales_on_the_pgmq_queue_depth() -> None:
    scaled = one("ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert scaled["spec"]["scaleTargetRef"]["name"] == one("Deployment")["metadata"]["name"]
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "postgresql"
    query = trigger["metadata"]["query"]
    assert "pgmq.q_" in query
    namespace = configmap_env().get("TASKER_BROKER__NAMESPACE") or str(
        settings_defaults()["broker"]["namespace"]
    )
    tables = re.findall(r"pgmq\.(q_\w+)", query)
    assert tables, query
    assert all(t.startswith(f"q_{namespace}_") for t in tables), (
        f"queue tables {tables} must belong to the broker namespace {namespace!r}"
    )
    assert "vt <= now()" in query, "count only messages ready to be delivered"
    float(trigger["metadata"]["targetQueryValue"])  # KEDA wants a number in a string
    auth = one("TriggerAuthentication")
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    secret = example_secret()
    for ref in auth["spec"]["secretTargetRef"]:
        assert ref["name"] == secret["metadata"]["name"]
        assert ref["key"] in secret["stringData"]
    assert {ref["parameter"] for ref in auth["spec"]["secretTargetRef"]} == {"connection"}


def test_kustomization_lists_existing_files() -> None:
    kust = kustomization()
    resources = kust["resources"]
    for resource in resources:
        assert (K8S / resource).is_file(), f"kustomization.yaml lists missing file {resource}"
    listed = set(resources)
    text = (K8S / "kustomization.yaml").read_text(encoding="utf-8")
    for path in manifest_files():
        if path.name in NOT_IN_KUSTOMIZATION:
            assert path.name not in listed, f"{path.name} must not be applied by default"
            assert path.name in text, f"kustomization.yaml must explain why {path.name} is left out"
        else:
            assert path.name in listed, f"kustomization.yaml does not list {path.name}"
    assert not {"worker-hpa.yaml", "worker-keda-scaledobject.yaml"} <= listed, (
        "the HPA and the KEDA ScaledObject must not both target the workers"
    )
    image = container(one("Deployment"))["image"].rsplit(":", 1)[0]
    assert [entry["name"] for entry in kust.get("images", [])] in ([], [image])


def test_readme_mentions_only_valid_settings_variables() -> None:
    text = README.read_text(encoding="utf-8")
    names = sorted(set(re.findall(r"\bTASKER_[A-Z0-9_]*[A-Z0-9]\b", text)))
    names = [n for n in names if not n.endswith("__") and "<" not in n]
    assert "TASKER_DATABASE__URL" in names
    assert_settings_variables(names, "deploy/README.md")


# ------------------------------------------------------------------- optional external validators


def _run(argv: list[str], cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
@pytest.mark.parametrize("autoscaler", ["hpa", "keda"])
def test_kustomize_builds(autoscaler: str, tmp_path: Path) -> None:
    directory = K8S
    if autoscaler == "keda":
        directory = tmp_path / "kubernetes"
        shutil.copytree(K8S, directory)
        path = directory / "kustomization.yaml"
        text = path.read_text(encoding="utf-8")
        text = text.replace("  - worker-hpa.yaml\n", "").replace(
            "  # - worker-keda-scaledobject.yaml", "  - worker-keda-scaledobject.yaml"
        )
        path.write_text(text, encoding="utf-8")
    result = _run(["kubectl", "kustomize", str(directory)])
    if result.returncode != 0 and "unknown command" in result.stderr:
        pytest.skip("this kubectl has no kustomize")
    assert result.returncode == 0, result.stderr
    kinds = {doc["kind"] for doc in yaml.safe_load_all(result.stdout) if doc}
    assert {"Namespace", "ConfigMap", "Job", "Deployment"} <= kinds
    assert "Secret" not in kinds
    expected = "HorizontalPodAutoscaler" if autoscaler == "hpa" else "ScaledObject"
    assert expected in kinds


@pytest.mark.skipif(shutil.which("kubeconform") is None, reason="kubeconform is not installed")
def test_kubeconform() -> None:
    files = [str(p) for p in manifest_files()]
    result = _run(["kubeconform", "-strict", "-summary", "-ignore-missing-schemas", *files])
    if result.returncode != 0 and re.search(
        r"dial tcp|no such host|failed (to )?download|could not find schema", result.stdout
    ):
        pytest.skip("kubeconform could not fetch schemas (offline)")
    assert result.returncode == 0, result.stdout + result.stderr


def _docker_compose_available() -> bool:
    if shutil.which("docker") is None:
        return False
    return _run(["docker", "compose", "version"]).returncode == 0


@pytest.mark.skipif(not _docker_compose_available(), reason="docker compose is not installed")
def test_docker_compose_config() -> None:
    result = _run(["docker", "compose", "-f", str(COMPOSE), "config", "--quiet"])
    assert result.returncode == 0, result.stderr
