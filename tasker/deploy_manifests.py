"""Kubernetes manifests for Tasker's workers: one Deployment per workflow namespace queue.

``tasker deploy workers NAMESPACE... --modules MOD...`` prints what :func:`render_workers` builds:
for each Tasker namespace a worker Deployment consuming ``worker_<namespace>_queue`` (``-Q``), its
PodDisruptionBudget and its autoscaler, and, with ``orchestration=True``, one Deployment for the
four orchestration queues. Every function here is pure: it builds plain dicts, and
:func:`dump_manifests` turns them into a multi-document YAML stream (``yaml.safe_dump_all``).

The autoscaler is one of two alternatives, never both (KEDA creates its own HPA for the
Deployment, and two HPAs on one Deployment fight):

- ``hpa``: an ``autoscaling/v2`` HorizontalPodAutoscaler on the external metric
  ``tasker_desired_workers{queue=...}`` that the coordinator exports (prometheus-adapter serves
  it, see ``deploy/kubernetes/overlays/hpa/prometheus-adapter-rules.yaml``);
- ``keda``: a KEDA ScaledObject whose ``postgresql`` trigger reads ``desired_replicas`` from
  ``tasker.scaling_hints``, the table the coordinator writes, authenticated by the
  TriggerAuthentication ``tasker-database`` (never an inline password).

Both aim at exactly the coordinator's ``desired_replicas`` (target average value 1 per replica)
within ``min_replicas``..``max_replicas``; the orchestration Deployment, which consumes four
queues, scales on the coordinator's row for the pool of them (``orchestration``).

Every worker container serves ``/metrics``, ``/health/live`` and ``/health/ready`` on its port
named ``metrics`` (``--metrics-port``, 9192): the probes use it, and the pod's
``prometheus.io/*`` annotations point Prometheus at it, as the coordinator's do.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import yaml

from tasker import __version__
from tasker.engine.messages import FINALIZE, PROCESS_RESULT, STEP_ENQUEUE, TASK_REQUEST
from tasker.engine.scaling import ORCHESTRATION_POOL
from tasker.exceptions import ConfigurationError
from tasker.settings import WorkerSettings

__all__ = [
    "DEFAULT_IMAGE",
    "DEFAULT_METRICS_PORT",
    "DESIRED_WORKERS_METRIC",
    "ORCHESTRATION_QUEUES",
    "SCALING_CHOICES",
    "RenderOptions",
    "WorkerPool",
    "deployment",
    "dump_manifests",
    "horizontal_pod_autoscaler",
    "kubernetes_name",
    "pod_disruption_budget",
    "render_workers",
    "scaled_object",
    "scaling_query",
    "worker_args",
    "worker_pools",
    "worker_queue",
]

Manifest = dict[str, Any]
Scaling = Literal["hpa", "keda", "none"]

SCALING_CHOICES: tuple[Scaling, ...] = ("hpa", "keda", "none")
DEFAULT_IMAGE = f"tasker:{__version__}"
#: The workers' ``/metrics`` and probes: ``worker.metrics_port``'s default.
DEFAULT_METRICS_PORT = WorkerSettings().metrics_port
#: The coordinator's gauge, one series per queue: ``tasker_desired_workers{queue="..."}``.
DESIRED_WORKERS_METRIC = "tasker_desired_workers"
#: The four orchestration queues, consumed by the ``tasker-orchestration`` Deployment.
ORCHESTRATION_QUEUES: tuple[str, ...] = tuple(
    stage.queue for stage in (TASK_REQUEST, STEP_ENQUEUE, PROCESS_RESULT, FINALIZE)
)
#: Names shared with ``deploy/kubernetes/base``: the ConfigMap, the database Secret (and the KEDA
#: TriggerAuthentication that reads it) and the Kubernetes namespace.
CONFIGMAP = "tasker-config"
DATABASE_SECRET = "tasker-database"
TRIGGER_AUTHENTICATION = "tasker-database"
K8S_NAMESPACE = "tasker"

# Tasker's namespace rule (tasker.workflow.definition) and Kubernetes' limits.
_TASKER_NAMESPACE = re.compile(r"^[a-z][a-z0-9_]{0,63}\Z")
_QUEUE = re.compile(r"^[a-z][a-z0-9_]*\Z")
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?\Z")
_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*\Z")
_MAX_NAME = 63  # object names double as label values here (app.kubernetes.io/instance)
_MAX_LABEL_VALUE = 63


@dataclass(frozen=True)
class RenderOptions:
    """What every rendered worker Deployment shares (the CLI options of ``deploy workers``)."""

    modules: tuple[str, ...]
    image: str = DEFAULT_IMAGE
    scaling: Scaling = "hpa"
    k8s_namespace: str = K8S_NAMESPACE
    min_replicas: int = 1
    max_replicas: int = 10
    shutdown_timeout_s: int = 50
    grace_period_s: int = 60
    scalers_only: bool = False
    #: Worker processes and threads per pod: the capacity the coordinator's rule assumes
    #: (``coordinator.scaling.processes`` and ``threads``).
    processes: int = 2
    threads: int = 8
    #: The port of the workers' ``/metrics`` and probes (``tasker worker --metrics-port``).
    metrics_port: int = DEFAULT_METRICS_PORT


@dataclass(frozen=True)
class WorkerPool:
    """One worker Deployment: its object name, its component label and the queues it consumes."""

    name: str
    component: str
    queues: tuple[str, ...]
    #: The ``tasker.scaling_hints`` row (and ``tasker_desired_workers`` queue label) it scales
    #: on: its queue, or the coordinator's row for the whole orchestration pool.
    hint: str


def worker_queue(namespace: str) -> str:
    """The Dramatiq queue of a Tasker namespace's workflow steps: ``worker_<namespace>_queue``."""
    return f"worker_{namespace}_queue"


def kubernetes_name(prefix: str, namespace: str) -> str:
    """A DNS-1123 object name for ``namespace``: ``prefix-<namespace with _ as ->``.

    Tasker names may end with ``_`` or be up to 64 characters long; a name that would end with
    ``-`` or exceed 63 characters is shortened and ends with 8 hex digits of the namespace's
    SHA-256 instead, so different namespaces never share a name.
    """
    name = f"{prefix}-{namespace.replace('_', '-')}"
    if len(name) <= _MAX_NAME and _DNS1123_LABEL.match(name):
        return name
    digest = hashlib.sha256(namespace.encode()).hexdigest()[:8]
    return f"{name[: _MAX_NAME - len(digest) - 1].rstrip('-')}-{digest}"


def worker_pools(namespaces: Sequence[str], *, orchestration: bool) -> list[WorkerPool]:
    """The Deployments to render: one per namespace, then the orchestration one if asked for.

    Raises :class:`ConfigurationError` for an invalid or repeated namespace, or for nothing to
    render.
    """
    if not namespaces and not orchestration:
        raise ConfigurationError("name at least one NAMESPACE, or pass --orchestration")
    for namespace in namespaces:
        _check_namespace(namespace)
    repeated = sorted({n for n in namespaces if list(namespaces).count(n) > 1})
    if repeated:
        raise ConfigurationError(f"namespace {repeated[0]!r} is named more than once")
    pools = [
        WorkerPool(
            kubernetes_name("tasker-worker", n), "worker", (worker_queue(n),), worker_queue(n)
        )
        for n in namespaces
    ]
    if orchestration:
        pools.append(
            WorkerPool(
                "tasker-orchestration", "orchestration", ORCHESTRATION_QUEUES, ORCHESTRATION_POOL
            )
        )
    names = [pool.name for pool in pools]
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise ConfigurationError(f"two namespaces map to the Kubernetes name {clash[0]!r}")
    return pools


def render_workers(
    namespaces: Sequence[str], options: RenderOptions, *, orchestration: bool = False
) -> list[Manifest]:
    """Every manifest for the worker pools: Deployment, PodDisruptionBudget and scaler each.

    With ``options.scaling == "none"`` no scaler is rendered; with ``options.scalers_only`` only
    the scalers are (for an overlay whose base already holds the Deployments).
    """
    _check_options(options)
    pools = worker_pools(namespaces, orchestration=orchestration)
    if options.scaling == "hpa":
        for pool in pools:
            _check_label_values(pool)
    manifests: list[Manifest] = []
    for pool in pools:
        if not options.scalers_only:
            manifests += [deployment(pool, options), pod_disruption_budget(pool, options)]
        manifests += _scalers(pool, options)
    return manifests


class _Dumper(yaml.SafeDumper):
    """Safe dumping without anchors (shared dicts are written out) and with indented lists."""

    def ignore_aliases(self, data: Any) -> bool:
        return True

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)


def dump_manifests(manifests: Iterable[Manifest]) -> str:
    """A multi-document YAML stream (``---`` before each document), keys in the order built."""
    return yaml.dump_all(
        list(manifests), Dumper=_Dumper, sort_keys=False, explicit_start=True, width=100
    )


# -- objects -----------------------------------------------------------------------------------


def deployment(pool: WorkerPool, options: RenderOptions) -> Manifest:
    """The worker Deployment of ``pool``: ``tasker worker MODULES -Q QUEUES``.

    It has no ``replicas`` (the autoscaler owns the count; a fixed number would reset it on every
    apply), never lowers capacity during a rollout (``maxUnavailable: 0``: a new pod must be
    ready, every worker process booted, before an old one stops), and stops with SIGTERM:
    ``--shutdown-timeout`` stays below ``terminationGracePeriodSeconds``.
    """
    labels = _labels(pool)
    annotations = {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(options.metrics_port),
        "prometheus.io/path": "/metrics",
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(pool.name, options, labels),
        "spec": {
            "revisionHistoryLimit": 5,
            "minReadySeconds": 10,
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": 0},
            },
            "selector": {"matchLabels": _selector(pool)},
            "template": {
                "metadata": {"labels": labels, "annotations": annotations},
                "spec": _pod_spec(pool, options),
            },
        },
    }


def pod_disruption_budget(pool: WorkerPool, options: RenderOptions) -> Manifest:
    """At most a quarter of the pool's pods (rounded up, so at least one) evicted at a time."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(pool.name, options, _labels(pool)),
        "spec": {
            "maxUnavailable": "25%",
            "selector": {"matchLabels": _selector(pool)},
            # A crash-looping pod must not block node drains.
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    }


def horizontal_pod_autoscaler(pool: WorkerPool, options: RenderOptions) -> Manifest:
    """An HPA on ``tasker_desired_workers{queue=<pool.hint>}``.

    ``AverageValue: 1`` makes the HPA aim at exactly the metric's value: desired replicas =
    ceil(``tasker_desired_workers`` / 1).
    """
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": _metadata(pool.name, options, _labels(pool)),
        "spec": {
            "scaleTargetRef": _target(pool),
            "minReplicas": options.min_replicas,
            "maxReplicas": options.max_replicas,
            "metrics": [
                {
                    "type": "External",
                    "external": {
                        "metric": {
                            "name": DESIRED_WORKERS_METRIC,
                            "selector": {"matchLabels": {"queue": pool.hint}},
                        },
                        "target": {"type": "AverageValue", "averageValue": "1"},
                    },
                }
            ],
            "behavior": {
                "scaleUp": {
                    "stabilizationWindowSeconds": 0,
                    "policies": [{"type": "Percent", "value": 100, "periodSeconds": 30}],
                },
                "scaleDown": _slow_scale_down(),
            },
        },
    }


def scaled_object(pool: WorkerPool, options: RenderOptions) -> Manifest:
    """A KEDA ScaledObject reading ``desired_replicas`` from ``tasker.scaling_hints``."""
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": _metadata(pool.name, options, _labels(pool)),
        "spec": {
            "scaleTargetRef": _target(pool),
            "minReplicaCount": options.min_replicas,
            "maxReplicaCount": options.max_replicas,
            "pollingInterval": 15,
            "cooldownPeriod": 300,
            "advanced": {
                "horizontalPodAutoscalerConfig": {"behavior": {"scaleDown": _slow_scale_down()}}
            },
            "triggers": [
                {
                    "type": "postgresql",
                    "metadata": {
                        "query": scaling_query(pool.hint),
                        # One replica per unit of desired_replicas: the coordinator's number.
                        "targetQueryValue": "1",
                        "activationTargetQueryValue": "0",
                    },
                    "authenticationRef": {"name": TRIGGER_AUTHENTICATION},
                }
            ],
        },
    }


def scaling_query(hint: str) -> str:
    """The KEDA query: the coordinator's ``desired_replicas`` in the ``tasker.scaling_hints`` row
    ``hint`` (a queue, or ``orchestration`` for the pool of the four orchestration queues).

    No row (the coordinator has not seen the queue yet) makes the query fail, and KEDA then leaves
    the replica count alone, as the HPA does when the metric is missing.
    """
    if not _QUEUE.match(hint):
        raise ConfigurationError(f"invalid queue name {hint!r}")
    return f"SELECT desired_replicas FROM tasker.scaling_hints WHERE queue = '{hint}'"


# -- parts -------------------------------------------------------------------------------------


def _scalers(pool: WorkerPool, options: RenderOptions) -> list[Manifest]:
    if options.scaling == "hpa":
        return [horizontal_pod_autoscaler(pool, options)]
    if options.scaling == "keda":
        return [scaled_object(pool, options)]
    return []


def _pod_spec(pool: WorkerPool, options: RenderOptions) -> Manifest:
    return {
        "terminationGracePeriodSeconds": options.grace_period_s,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 10001,
            "runAsGroup": 10001,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [_container(pool, options)],
        "volumes": [{"name": "tmp", "emptyDir": {}}],
    }


def _container(pool: WorkerPool, options: RenderOptions) -> Manifest:
    return {
        "name": "worker",
        "image": options.image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["tasker"],
        "args": worker_args(pool, options),
        "ports": [{"name": "metrics", "containerPort": options.metrics_port, "protocol": "TCP"}],
        "envFrom": [
            {"configMapRef": {"name": CONFIGMAP}},
            {"secretRef": {"name": DATABASE_SECRET}},
        ],
        "env": [{"name": "TASKER_DATABASE__APPLICATION_NAME", "value": pool.name}],
        **_probes(),
        "resources": {  # per worker process: requests 500m / 256Mi, limits 1 CPU / 512Mi
            "requests": {
                "cpu": f"{options.processes * 500}m",
                "memory": f"{options.processes * 256}Mi",
            },
            "limits": {"cpu": str(options.processes), "memory": f"{options.processes * 512}Mi"},
        },
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }


def _probes() -> Manifest:
    """The supervisor serves HTTP from its start: live while its loop turns, ready once every
    worker process booted, not ready again from the first SIGTERM (docs/operations.md)."""

    def get(path: str) -> Manifest:
        return {"path": path, "port": "metrics"}

    return {
        "startupProbe": {
            "httpGet": get("/health/live"),
            "periodSeconds": 2,
            "failureThreshold": 30,
        },
        "livenessProbe": {
            "httpGet": get("/health/live"),
            "periodSeconds": 10,
            "timeoutSeconds": 2,
            "failureThreshold": 3,
        },
        "readinessProbe": {
            "httpGet": get("/health/ready"),
            "periodSeconds": 5,
            "timeoutSeconds": 2,
            "failureThreshold": 3,
        },
    }


def worker_args(pool: WorkerPool, options: RenderOptions) -> list[str]:
    """``worker MODULES -Q QUEUES -p PROCESSES -t THREADS --shutdown-timeout SECONDS
    --metrics-port PORT`` (after the ``tasker`` command): the pod's capacity is the one the
    coordinator's scaling rule assumes."""
    return [
        "worker",
        *options.modules,
        "-Q",
        *pool.queues,
        "-p",
        str(options.processes),
        "-t",
        str(options.threads),
        "--shutdown-timeout",
        str(options.shutdown_timeout_s),
        "--metrics-port",
        str(options.metrics_port),
    ]


def _metadata(name: str, options: RenderOptions, labels: dict[str, str]) -> Manifest:
    return {"name": name, "namespace": options.k8s_namespace, "labels": labels}


def _selector(pool: WorkerPool) -> dict[str, str]:
    return {"app.kubernetes.io/name": "tasker", "app.kubernetes.io/instance": pool.name}


def _labels(pool: WorkerPool) -> dict[str, str]:
    return {
        **_selector(pool),
        "app.kubernetes.io/component": pool.component,
        "app.kubernetes.io/part-of": "tasker",
    }


def _target(pool: WorkerPool) -> dict[str, str]:
    return {"apiVersion": "apps/v1", "kind": "Deployment", "name": pool.name}


def _slow_scale_down() -> Manifest:
    # Every removed pod drains gracefully, so remove one a minute after a five-minute window.
    return {
        "stabilizationWindowSeconds": 300,
        "policies": [{"type": "Pods", "value": 1, "periodSeconds": 60}],
    }


# -- checks ------------------------------------------------------------------------------------


def _check_namespace(namespace: str) -> None:
    if not _TASKER_NAMESPACE.match(namespace):
        raise ConfigurationError(
            f"invalid namespace {namespace!r}: a Tasker namespace is a lowercase letter followed "
            "by up to 63 lowercase letters, digits or underscores"
        )


def _check_label_values(pool: WorkerPool) -> None:
    for queue in pool.queues:
        if len(queue) > _MAX_LABEL_VALUE:
            raise ConfigurationError(
                f"queue {queue!r} is {len(queue)} characters, but an HPA metric selector value "
                f"holds at most {_MAX_LABEL_VALUE}: use --scaling keda or a shorter namespace"
            )


def _check_options(options: RenderOptions) -> None:
    if not options.modules:
        raise ConfigurationError("name the actor modules the workers load (--modules)")
    for module in options.modules:
        if not _MODULE.match(module):
            raise ConfigurationError(f"invalid module name {module!r} (e.g. myapp.flows)")
    if options.scaling not in SCALING_CHOICES:
        raise ConfigurationError(f"--scaling must be one of {', '.join(SCALING_CHOICES)}")
    if options.scalers_only and options.scaling == "none":
        raise ConfigurationError("--scalers-only needs --scaling hpa or keda")
    if not 1 <= options.min_replicas <= options.max_replicas:
        raise ConfigurationError(
            f"need 1 <= --min-replicas <= --max-replicas, got {options.min_replicas} and "
            f"{options.max_replicas}"
        )
    if not 0 <= options.shutdown_timeout_s < options.grace_period_s:
        raise ConfigurationError(
            f"--shutdown-timeout ({options.shutdown_timeout_s}) must be below "
            f"--termination-grace-period ({options.grace_period_s}), so handlers finish before "
            "the kubelet's SIGKILL"
        )
    if len(options.k8s_namespace) > _MAX_NAME or not _DNS1123_LABEL.match(options.k8s_namespace):
        raise ConfigurationError(
            f"invalid Kubernetes namespace {options.k8s_namespace!r} (DNS-1123 label)"
        )
    if not 1 <= options.metrics_port <= 65535:
        raise ConfigurationError(
            f"--metrics-port must be a TCP port from 1 to 65535, got {options.metrics_port}"
        )
    if not options.image or any(c.isspace() for c in options.image):
        raise ConfigurationError(f"invalid image {options.image!r}")
