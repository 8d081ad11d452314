"""Checks shared by the tests of the Kubernetes files and of ``tasker deploy workers``.

- :func:`kustomize_build` assembles a kustomization directory the way ``kubectl kustomize`` does,
  for the subset of kustomize the repository uses (``resources``, ``namespace``, ``images``); it
  refuses any other field, so it cannot silently disagree with the real tool.
- :func:`validate_kubernetes` validates a core object against the Kubernetes JSON schemas shipped
  by ``kubernetes-validate`` (strict: unknown fields are errors), for the oldest and newest
  Kubernetes versions we claim.
- KEDA's ScaledObject and TriggerAuthentication have no schema there: :func:`check_scaled_object`
  and :func:`check_trigger_authentication` check their required fields and references.
"""

from __future__ import annotations

import copy
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml

from tasker.cli import _parser

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "kubernetes"
BASE = K8S / "base"
OVERLAYS = K8S / "overlays"

#: The oldest Kubernetes we support (PodDisruptionBudget.unhealthyPodEvictionPolicy is on by
#: default since 1.27) and the newest the pinned kubernetes-validate ships schemas for.
KUBERNETES_VERSIONS = ("1.28.0", "1.37.0")
CLUSTER_SCOPED_KINDS = {"Namespace"}
KEDA_KINDS = {"ScaledObject", "TriggerAuthentication"}
KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "namespace", "resources", "images"}
DESIRED_WORKERS = "tasker_desired_workers"

Obj = dict[str, Any]


def scaling_row(deployment: Obj) -> str:
    """The tasker.scaling_hints row a worker Deployment scales on: its queue, or the
    coordinator's row for the pool of the four orchestration queues."""
    from tasker.deploy_manifests import ORCHESTRATION_QUEUES
    from tasker.engine.scaling import ORCHESTRATION_POOL

    queues = worker_command(deployment).queues
    if set(queues) == set(ORCHESTRATION_QUEUES):
        return ORCHESTRATION_POOL
    (queue,) = queues
    return str(queue)


def store_desired_replicas(conn: Any, desired: dict[str, int]) -> None:
    """Replace tasker.scaling_hints (created by the migrations) with one row per queue holding
    ``desired[queue]`` replicas, as the coordinator would."""
    conn.execute("DELETE FROM tasker.scaling_hints")
    for queue, replicas in desired.items():
        conn.execute(
            "INSERT INTO tasker.scaling_hints (queue, depth, oldest_age_s, in_flight, "
            "completions_per_s, live_replicas, error_rate, desired_replicas, updated_at, "
            "changed_at) VALUES (%s, 0, 0, 0, 0, 0, 0, %s, now(), now())",
            (queue, replicas),
        )


# -- loading and kustomize ----------------------------------------------------------------------


def load_docs(path: Path) -> list[Obj]:
    """The YAML documents of ``path`` (empty ones dropped); each must be a mapping."""
    return parse_docs(path.read_text(encoding="utf-8"), path.name)


def parse_docs(text: str, where: str = "stream") -> list[Obj]:
    """The YAML documents of a multi-document stream (empty ones dropped)."""
    docs = [doc for doc in yaml.safe_load_all(text) if doc is not None]
    for doc in docs:
        assert isinstance(doc, dict), f"{where}: every YAML document must be a mapping"
    return docs


def kustomization(directory: Path) -> Obj:
    """The ``kustomization.yaml`` of ``directory``."""
    return load_docs(directory / "kustomization.yaml")[0]


def kustomize_build(directory: Path) -> list[Obj]:
    """The objects ``kubectl kustomize directory`` prints, for the kustomize subset used here."""
    kust = kustomization(directory)
    unknown = set(kust) - KUSTOMIZATION_FIELDS
    assert not unknown, f"{directory}: this test's kustomize does not implement {sorted(unknown)}"
    assert kust["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kust["kind"] == "Kustomization"
    objects: list[Obj] = []
    for entry in kust["resources"]:
        path = (directory / entry).resolve()
        objects += kustomize_build(path) if path.is_dir() else load_docs(path)
    objects = copy.deepcopy(objects)
    if "namespace" in kust:
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED_KINDS:
                obj["metadata"]["namespace"] = kust["namespace"]
    for image in kust.get("images", []):
        for obj in objects:
            _set_image(obj, image)
    ids = Counter(object_id(obj) for obj in objects)
    duplicated = [key for key, count in ids.items() if count > 1]
    assert not duplicated, f"{directory}: kustomize refuses duplicate objects {duplicated}"
    return objects


def object_id(obj: Obj) -> tuple[str, str, str]:
    """(kind, namespace, name): what kustomize and the API server identify an object by."""
    meta = obj["metadata"]
    return obj["kind"], meta.get("namespace", ""), meta["name"]


def _set_image(obj: Obj, image: Obj) -> None:
    template = obj.get("spec", {}).get("template", {}).get("spec", {})
    for ctr in [*template.get("containers", []), *template.get("initContainers", [])]:
        name = re.split(r"[:@]", ctr["image"], maxsplit=1)[0]
        if name == image["name"]:
            ctr["image"] = f"{image.get('newName', name)}:{image['newTag']}"


def of_kind(objects: Iterable[Obj], kind: str) -> list[Obj]:
    """The objects of one kind."""
    return [obj for obj in objects if obj["kind"] == kind]


def named(objects: Iterable[Obj], kind: str, name: str) -> Obj:
    """The one object of ``kind`` called ``name``."""
    found = [obj for obj in of_kind(objects, kind) if obj["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


# -- pods and workers ---------------------------------------------------------------------------


def pod_spec(obj: Obj) -> Obj:
    """The pod template spec of a Deployment or Job."""
    spec = obj["spec"]["template"]["spec"]
    assert isinstance(spec, dict)
    return spec


def container(obj: Obj) -> Obj:
    """The one container of a workload."""
    containers = pod_spec(obj)["containers"]
    assert len(containers) == 1, f"{obj['metadata']['name']}: expected one container"
    result = containers[0]
    assert isinstance(result, dict)
    return result


def worker_command(deployment: Obj) -> Any:
    """The worker's ``tasker worker ...`` arguments, parsed by the real ``tasker`` parser."""
    ctr = container(deployment)
    assert ctr["command"] == ["tasker"]
    assert ctr["args"][0] == "worker"
    return _parser().parse_args(ctr["args"])


def is_worker(deployment: Obj) -> bool:
    """Whether a Deployment runs ``tasker worker`` (and not the coordinator)."""
    return bool(container(deployment).get("args", [None])[0] == "worker")


def selects(selector: Obj, labels: dict[str, str]) -> bool:
    """Whether a ``matchLabels`` selector matches ``labels``."""
    assert set(selector) == {"matchLabels"}, "only matchLabels selectors are used"
    return all(labels.get(key) == value for key, value in selector["matchLabels"].items())


# -- schemas and structure -----------------------------------------------------------------------


def validate_kubernetes(obj: Obj) -> None:
    """Validate a core object against the strict Kubernetes schemas of every claimed version."""
    assert obj["kind"] not in KEDA_KINDS, "KEDA objects have no schema in kubernetes-validate"
    for version in KUBERNETES_VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(part) for part in exc.path)
            raise AssertionError(
                f"{obj['kind']} {obj['metadata'].get('name')} is invalid for Kubernetes "
                f"{version}: {path}: {exc.message}"
            ) from None


def validate_any(obj: Obj, objects: list[Obj]) -> None:
    """Schema-validate a core object; structurally check a KEDA object against ``objects``."""
    if obj["kind"] == "ScaledObject":
        check_scaled_object(obj, objects)
    elif obj["kind"] == "TriggerAuthentication":
        check_trigger_authentication(obj, objects)
    else:
        validate_kubernetes(obj)


def check_name(obj: Obj) -> None:
    """Object names are DNS-1123 labels here (they double as label values)."""
    name = obj["metadata"]["name"]
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name), f"{name} is not DNS-1123"
    assert len(name) <= 63, f"{name} is longer than 63 characters"


def _target_deployment(obj: Obj, objects: list[Obj]) -> Obj:
    ref = obj["spec"]["scaleTargetRef"]
    assert ref.get("apiVersion", "apps/v1") == "apps/v1"
    assert ref.get("kind", "Deployment") == "Deployment"
    namespace = obj["metadata"]["namespace"]
    found = [
        d for d in of_kind(objects, "Deployment") if object_id(d)[1:] == (namespace, ref["name"])
    ]
    assert len(found) == 1, f"{obj['kind']} {obj['metadata']['name']}: no Deployment {ref['name']}"
    assert "replicas" not in found[0]["spec"], f"{ref['name']}: the autoscaler owns replicas"
    return found[0]


def _behavior_is_valid(behavior: Obj) -> None:
    # KEDA passes this to the HPA it creates: validate it as an HPA's behavior.
    validate_kubernetes(
        {
            "apiVersion": "autoscaling/v2",
            "kind": "HorizontalPodAutoscaler",
            "metadata": {"name": "behavior-check"},
            "spec": {
                "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "x"},
                "maxReplicas": 1,
                "behavior": behavior,
            },
        }
    )


SCALED_OBJECT_SPEC = {
    "scaleTargetRef",
    "pollingInterval",
    "cooldownPeriod",
    "initialCooldownPeriod",
    "idleReplicaCount",
    "minReplicaCount",
    "maxReplicaCount",
    "fallback",
    "advanced",
    "triggers",
}


def check_scaled_object(obj: Obj, objects: list[Obj]) -> None:
    """The fields KEDA needs, and that its target, trigger and authentication fit together."""
    assert obj["apiVersion"] == "keda.sh/v1alpha1"
    check_name(obj)
    spec = obj["spec"]
    assert set(spec) <= SCALED_OBJECT_SPEC, (
        f"unknown ScaledObject fields {set(spec) - SCALED_OBJECT_SPEC}"
    )
    deployment = _target_deployment(obj, objects)
    low, high = spec.get("minReplicaCount", 0), spec.get("maxReplicaCount", 100)
    assert isinstance(low, int) and isinstance(high, int)
    assert 0 <= low <= high and 1 <= high <= 100, f"replica bounds {low}..{high}"
    for field in ("pollingInterval", "cooldownPeriod"):
        assert isinstance(spec.get(field, 30), int) and spec.get(field, 30) > 0
    behavior = spec.get("advanced", {}).get("horizontalPodAutoscalerConfig", {}).get("behavior")
    if behavior is not None:
        _behavior_is_valid(behavior)
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "postgresql"
    metadata = trigger["metadata"]
    assert all(isinstance(v, str) for v in metadata.values()), "KEDA metadata values are strings"
    assert set(metadata) <= {"query", "targetQueryValue", "activationTargetQueryValue"}, (
        "the connection must come from the TriggerAuthentication, not the trigger's metadata"
    )
    assert float(metadata["targetQueryValue"]) > 0
    float(metadata.get("activationTargetQueryValue", "0"))
    assert re.findall(r"'([a-z0-9_]+)'", metadata["query"]) == [scaling_row(deployment)], (
        f"{obj['metadata']['name']}: the query must read the row of what the Deployment consumes"
    )
    assert "tasker.scaling_hints" in metadata["query"]
    auths = [
        a
        for a in of_kind(objects, "TriggerAuthentication")
        if object_id(a)[1:] == (obj["metadata"]["namespace"], trigger["authenticationRef"]["name"])
    ]
    assert len(auths) == 1, f"no TriggerAuthentication {trigger['authenticationRef']['name']}"


def check_trigger_authentication(obj: Obj, objects: list[Obj]) -> None:
    """A TriggerAuthentication reads ``connection`` from the database Secret, nothing inline."""
    assert obj["apiVersion"] == "keda.sh/v1alpha1"
    check_name(obj)
    assert set(obj["spec"]) == {"secretTargetRef"}, "only secret references, never literal values"
    refs = obj["spec"]["secretTargetRef"]
    assert {ref["parameter"] for ref in refs} == {"connection"}
    secrets = {s["metadata"]["name"]: s for s in of_kind(objects, "Secret")}
    for ref in refs:
        assert set(ref) == {"parameter", "name", "key"}
        assert ref["name"] in secrets, f"TriggerAuthentication reads unknown Secret {ref['name']}"
        assert ref["key"] in secrets[ref["name"]]["stringData"]


def check_hpa(hpa: Obj, objects: list[Obj]) -> None:
    """Beyond the schema: the target exists, and the metric selects the target's queues."""
    validate_kubernetes(hpa)
    check_name(hpa)
    deployment = _target_deployment(hpa, objects)
    spec = hpa["spec"]
    assert 1 <= spec["minReplicas"] <= spec["maxReplicas"] <= 100
    (metric,) = spec["metrics"]
    assert metric["type"] == "External"
    assert metric["external"]["metric"]["name"] == DESIRED_WORKERS
    assert metric["external"]["target"] == {"type": "AverageValue", "averageValue": "1"}
    selector = metric["external"]["metric"]["selector"]
    assert set(selector) == {"matchLabels"} and set(selector["matchLabels"]) == {"queue"}
    selected = {selector["matchLabels"]["queue"]}
    assert selected == {scaling_row(deployment)}
    for value in selected:
        assert len(value) <= 63 and re.fullmatch(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?", value)


def check_one_autoscaler_each(objects: list[Obj]) -> None:
    """Every worker Deployment has exactly one autoscaler, and never both an HPA and KEDA."""
    targets = Counter(
        (obj["metadata"]["namespace"], obj["spec"]["scaleTargetRef"]["name"])
        for obj in objects
        if obj["kind"] in {"HorizontalPodAutoscaler", "ScaledObject"}
    )
    kinds = {obj["kind"] for obj in objects}
    assert not {"HorizontalPodAutoscaler", "ScaledObject"} <= kinds, "HPA and KEDA: pick one"
    for deployment in of_kind(objects, "Deployment"):
        key = (deployment["metadata"]["namespace"], deployment["metadata"]["name"])
        expected = 1 if is_worker(deployment) else 0
        assert targets[key] == expected, f"{key[1]}: {targets[key]} autoscalers"


def check_pdbs(objects: list[Obj]) -> None:
    """Each Deployment has exactly one PodDisruptionBudget, selecting only its pods."""
    deployments = of_kind(objects, "Deployment")
    covered: Counter[str] = Counter()
    for pdb in of_kind(objects, "PodDisruptionBudget"):
        matched = [
            d["metadata"]["name"]
            for d in deployments
            if selects(pdb["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"])
        ]
        assert len(matched) == 1, f"PDB {pdb['metadata']['name']} selects {matched}"
        assert pdb["spec"]["selector"] == matched_selector(objects, matched[0])
        covered[matched[0]] += 1
        assert "minAvailable" not in pdb["spec"], "maxUnavailable never blocks a drain forever"
        # The schemas have no enums: check the value here. Crash-looping pods must not block.
        assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    for deployment in deployments:
        assert covered[deployment["metadata"]["name"]] == 1, deployment["metadata"]["name"]


def matched_selector(objects: list[Obj], name: str) -> Obj:
    """The pod selector of the Deployment ``name``."""
    (deployment,) = [d for d in of_kind(objects, "Deployment") if d["metadata"]["name"] == name]
    selector = deployment["spec"]["selector"]
    assert isinstance(selector, dict)
    return selector


def check_worker_deployment(deployment: Obj) -> None:
    """Resources, SIGTERM shutdown inside the grace period, no replicas, no capacity drop."""
    ctr = container(deployment)
    for bound in ("requests", "limits"):
        for resource in ("cpu", "memory"):
            assert ctr["resources"][bound][resource], f"worker needs {bound}.{resource}"
    assert "preStop" not in ctr.get("lifecycle", {}), "shutdown relies on SIGTERM, not preStop"
    command = worker_command(deployment)
    assert command.modules, "the worker must be told which actor modules to load"
    assert command.queues, "each worker Deployment consumes named queues (-Q)"
    grace = pod_spec(deployment)["terminationGracePeriodSeconds"]
    assert 0 <= command.shutdown_timeout < grace, "--shutdown-timeout must be below the grace"
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert "replicas" not in deployment["spec"], "the autoscaler owns the replica count"
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selects(deployment["spec"]["selector"], labels)
    check_worker_probes(deployment)


def check_worker_probes(deployment: Obj) -> None:
    """The supervisor's port is named ``metrics``, probed on /health/live and /health/ready, and
    announced to Prometheus by the pod's annotations (as the coordinator's is)."""
    ctr = container(deployment)
    (port,) = ctr["ports"]
    assert port["name"] == "metrics" and port["protocol"] == "TCP"
    assert worker_command(deployment).metrics_port == port["containerPort"]
    paths = {kind: ctr[kind]["httpGet"] for kind in ("startupProbe", "livenessProbe")}
    paths["readinessProbe"] = ctr["readinessProbe"]["httpGet"]
    assert {kind: get["path"] for kind, get in paths.items()} == {
        "startupProbe": "/health/live",
        "livenessProbe": "/health/live",
        "readinessProbe": "/health/ready",
    }
    assert all(get["port"] == "metrics" for get in paths.values())
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(port["containerPort"]),
        "prometheus.io/path": "/metrics",
    }
