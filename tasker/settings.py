"""Load and validate Tasker's settings once, at the edge of the program.

Settings come from ``settings/settings.toml`` (Dynaconf, one section per environment), overridden by
``TASKER_``-prefixed environment variables (``TASKER_DATABASE__URL``, ``TASKER_BROKER__NAMESPACE``).
``TASKER_ENV`` picks the environment; it defaults to ``development``. Library classes never read
settings themselves: the CLI and the ``tasker.actors`` entry point call :func:`load_settings` and
pass plain values on.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, NoReturn

import msgspec

from tasker.exceptions import ConfigurationError
from tasker.resources import bundled_path

__all__ = [
    "ApiAuthSettings",
    "ApiKey",
    "ApiSettings",
    "BreakerOverride",
    "BreakerSettings",
    "BrokerSettings",
    "CoordinatorSettings",
    "DatabaseBreakerSettings",
    "DatabaseSettings",
    "EngineSettings",
    "ScalingSettings",
    "SentrySettings",
    "Settings",
    "StalenessSettings",
    "WorkerSettings",
    "load_settings",
    "mask_dsn",
    "number_problem",
]

DEFAULT_ENV = "development"
ENVIRONMENTS = ("development", "test", "production")
SETTINGS_FILE_VAR = "TASKER_SETTINGS_FILE"


class DatabaseSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Where PostgreSQL is and how Tasker connects to it."""

    url: str = ""
    allow_embedded: bool = False
    embedded_dir: str = ".tasker/pgdata"
    pool_min_size: int = 1
    pool_max_size: int = 16
    statement_timeout_ms: int = 30_000
    timeout_s: float = 5.0
    application_name: str = "tasker"


class BrokerSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """How the PGMQ broker leases, wakes up and dead-letters messages."""

    namespace: str = "tasker"
    visibility_timeout_ms: int = 60_000
    heartbeat_interval_ms: int = 0
    max_lease_ms: int = 900_000
    max_deliveries: int = 20
    claim_batch: int = 4
    listen: bool = True
    poll_interval_ms: int = 1_000
    dead_message_ttl_s: int = 604_800
    auto_create_queues: bool = True


class EngineSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """How the workflow engine processes results and finalizes tasks."""

    result_processing: Literal["inline", "decoupled"] = "inline"
    finalization_claim_lease_s: int = 30
    max_payload_bytes: int = 1024 * 1024
    allow_template_replace: bool = False


class StalenessSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Minutes without activity after which the coordinator gives a task up (seed-spec 10.4);
    a template's ``lifecycle`` overrides them."""

    steps_in_process_minutes: int = 30
    waiting_for_retry_minutes: int = 30
    waiting_for_dependencies_minutes: int = 60
    blocked_by_failures_minutes: int = 60
    max_lifetime_minutes: int = 1440


class ScalingSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The scaling rule (docs/operations.md, "Scaling")."""

    processes: int = 2
    threads: int = 8
    target_utilization: float = 0.75
    backlog_per_replica: int = 100
    min_replicas: int = 1
    max_replicas: int = 10
    error_threshold: float = 0.05
    cooldown_s: float = 60.0


class CoordinatorSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The coordinator: its cycle, sweeps, staleness, retention and scaling hints."""

    interval_s: float = 5.0
    in_worker: bool = False
    port: int = 9191
    batch: int = 100
    recovery_grace_s: float = 30.0
    handler_not_found_after_s: float = 600.0
    live_worker_s: float = 60.0
    retention_days: float = 30.0
    retention_batch: int = 500
    retention_every_s: float = 300.0
    staleness: StalenessSettings = StalenessSettings()
    scaling: ScalingSettings = ScalingSettings()


class DatabaseBreakerSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The database breaker of each worker process: outage errors in a row that open it (within
    ``window_s``), and seconds between its probes."""

    failure_threshold: int = 5
    window_s: float = 30.0
    open_s: float = 5.0


class BreakerOverride(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Settings of one step breaker that differ from ``[breakers]`` (unset: the default's)."""

    failure_threshold: int | None = None
    window_s: float | None = None
    open_s: float | None = None
    half_open_successes: int | None = None
    half_open_trials: int | None = None


class BreakerSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Circuit breakers (docs/operations.md, "Circuit breakers"): the step breakers' rule, their
    overrides by name (``[breakers.overrides.<name>]``), and the database breaker."""

    failure_threshold: int = 5
    window_s: float = 30.0
    open_s: float = 30.0
    half_open_successes: int = 2
    half_open_trials: int = 1
    cache_ttl_s: float = 1.0
    max_defer_s: float = 30.0
    database: DatabaseBreakerSettings = DatabaseBreakerSettings()
    overrides: dict[str, BreakerOverride] = {}


class SentrySettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Error reporting to Sentry (docs/operations.md, "Sentry"): off while ``dsn`` is empty.

    ``environment`` empty means the Tasker environment's name; ``release`` empty lets sentry-sdk
    find one (``SENTRY_RELEASE``, the git commit); ``traces_sample_rate`` 0 sends no traces.
    """

    dsn: str = ""
    environment: str = ""
    release: str = ""
    traces_sample_rate: float = 0.0


class WorkerSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``tasker worker``: what its supervisor serves (docs/operations.md, "Worker metrics")."""

    #: /metrics, /health/live and /health/ready of the supervisor (0: any free port).
    metrics_port: int = 9192


class ApiKey(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One API key of ``tasker serve`` (``api.auth.api_keys``), sent as ``X-API-Key``.

    ``permissions`` are seed-spec §9.1's strings (``tasks:create``, ``tasks:*``, ``*:*``);
    ``namespaces`` absent means every namespace, else requests made with the key see and act
    only on tasks of those namespaces (an empty list: none). ``name`` is what logs and audit rows
    show (never the key).
    """

    name: str
    key: str
    permissions: list[str] = []
    namespaces: list[str] | None = None


class ApiAuthSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Who may call the HTTP API (docs/api.md, "Authentication and permissions").

    ``enabled`` unset (None) means on in production and off elsewhere, whatever settings file
    is used; on, ``tasker serve`` refuses to start without an API key or a JWT setting.
    JWTs (``Authorization: Bearer``) are checked with ``jwt_secret`` (HS256),
    ``jwt_public_key`` (PEM, RS256) or the keys at ``jwt_jwks_url`` (RS256); ``jwt_issuer``
    and ``jwt_audience`` are required claims when set. A token's permissions and namespaces
    are the list claims ``permissions_claim`` and ``namespaces_claim``.
    """

    enabled: bool | None = None
    api_keys: list[ApiKey] = []
    jwt_secret: str = ""
    jwt_public_key: str = ""
    jwt_jwks_url: str = ""
    jwt_issuer: str = ""
    jwt_audience: str = ""
    permissions_claim: str = "permissions"
    namespaces_claim: str = "namespaces"
    #: Seconds of clock difference tolerated on ``exp`` / ``nbf``.
    jwt_leeway_s: float = 30.0


class ApiSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``tasker serve``: the HTTP API (docs/api.md)."""

    host: str = "127.0.0.1"
    port: int = 8080
    #: Largest request body, in bytes (413 above it): a 1 MiB context with room for the rest.
    max_body_bytes: int = 2 * 1024 * 1024
    #: ``POST /v1/tasks`` answers 503 with ``Retry-After`` while the deepest queue of this
    #: deployment holds more messages than this (0: never).
    max_queue_depth: int = 10_000
    #: Seconds between two reads of the queues' depth (the check itself is cached between them).
    backpressure_check_s: float = 5.0
    #: ``Retry-After`` seconds of a 503 for a deep queue, and for an unreachable database.
    queue_retry_after_s: int = 60
    database_retry_after_s: int = 30
    #: Threads that run requests (each holds a pooled connection while it works).
    threads: int = 40
    #: Serve the OpenAPI document's UI at ``/api-docs``.
    docs_ui: bool = True
    auth: ApiAuthSettings = ApiAuthSettings()


class Settings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The validated settings of one Tasker process."""

    env: str = DEFAULT_ENV
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    database: DatabaseSettings = DatabaseSettings()
    broker: BrokerSettings = BrokerSettings()
    engine: EngineSettings = EngineSettings()
    coordinator: CoordinatorSettings = CoordinatorSettings()
    breakers: BreakerSettings = BreakerSettings()
    sentry: SentrySettings = SentrySettings()
    worker: WorkerSettings = WorkerSettings()
    api: ApiSettings = ApiSettings()


def load_settings(
    env: str | None = None,
    *,
    settings_file: str | Path | None = None,
    need_database: bool = True,
) -> Settings:
    """Read the settings file and ``TASKER_*`` variables for ``env`` and validate them.

    ``env`` defaults to ``$TASKER_ENV`` (else ``development``); ``settings_file`` defaults to
    ``$TASKER_SETTINGS_FILE``, else ``./settings/settings.toml`` when it exists, else the file
    shipped with Tasker. With ``need_database=False`` (a command that never connects, such as
    rendering manifests) an empty ``database.url`` is accepted where the embedded PostgreSQL is
    not allowed. Raises :class:`ConfigurationError` naming the bad key and the fix.
    """
    env = (env or os.environ.get("TASKER_ENV") or DEFAULT_ENV).strip().lower()
    path = _settings_path(settings_file)
    _check_known_environment(env, path)
    raw = _read_with_dynaconf(path, env)
    raw["env"] = env
    try:
        settings = msgspec.convert(raw, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigurationError(_explain(exc, env, path)) from None
    _check_values(settings, path, need_database=need_database)
    return settings


def _settings_path(settings_file: str | Path | None) -> Path:
    chosen = settings_file or os.environ.get(SETTINGS_FILE_VAR)
    if chosen:
        path = Path(chosen)
        if not path.is_file():
            what = "is not a file" if path.exists() else "does not exist"
            raise ConfigurationError(
                f"Settings file {path} {what}; fix {SETTINGS_FILE_VAR} or --settings."
            )
        return path
    local = Path.cwd() / "settings" / "settings.toml"
    return local if local.is_file() else bundled_path("settings") / "settings.toml"


def _read_with_dynaconf(path: Path, env: str) -> dict[str, Any]:
    from dynaconf import Dynaconf

    conf = Dynaconf(
        settings_files=[str(path)],
        environments=True,
        env=env,
        envvar_prefix="TASKER",
        env_switcher="TASKER_ENV",
        merge_enabled=True,
    )
    try:
        data = conf.as_dict()
    except Exception as exc:  # dynaconf raises plain exceptions for unparsable files or values
        raise ConfigurationError(f"Could not read settings from {path}: {exc}") from exc
    lowered: dict[str, Any] = _lower_keys(data)
    # TASKER_SETTINGS_FILE names the file; Dynaconf reads it as a TASKER_* setting too
    lowered.pop(SETTINGS_FILE_VAR.removeprefix("TASKER_").lower(), None)
    return lowered


def _lower_keys(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k).lower(): _lower_keys(v) for k, v in value.items()}
    return value


def _read_toml(path: Path) -> dict[str, Any]:
    """The settings file as TOML; a file that cannot be read or parsed is a
    :class:`ConfigurationError` naming it and the line (never a traceback)."""
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except tomllib.TOMLDecodeError as exc:
        problem = f"is not valid TOML: {exc}"
    except UnicodeDecodeError as exc:
        problem = f"is not UTF-8 text, as TOML must be ({exc.reason} at byte {exc.start})"
    except OSError as exc:
        problem = f"cannot be read: {exc.strerror or exc}"
    raise ConfigurationError(
        f"Settings file {path} {problem}. Fix it, or point {SETTINGS_FILE_VAR} (or --settings) at "
        "another file."
    )


def _check_known_environment(env: str, path: Path) -> None:
    document = _read_toml(path)
    for name, value in document.items():
        if not isinstance(value, dict):
            raise ConfigurationError(
                f"Settings file {path}: {name!r} must be a [{name}] table: the file holds one "
                "table of settings per environment ([default], [development], [production], ...)."
            )
    sections = {name.lower() for name in document} - {"default", "global"}
    known = sorted(sections | set(ENVIRONMENTS))
    if env not in known:
        raise ConfigurationError(
            f"Unknown environment TASKER_ENV={env!r}; use one of: {', '.join(known)}, "
            f"or add a [{env}] section to {path}."
        )


def _explain(exc: msgspec.ValidationError, env: str, path: Path) -> str:
    message = str(exc)
    key = ""
    if " - at `$." in message:
        message, _, where = message.partition(" - at `$.")
        key = where.rstrip("`")
    if "unknown field" in message:
        field = message.split("`")[1] if "`" in message else "?"
        key = f"{key}.{field}" if key else field
        return (
            f"Unknown setting {key!r} in {path} [{env}] or TASKER_* variables; "
            "remove it or check its spelling."
        )
    variable = "TASKER_" + key.upper().replace(".", "__")
    return (
        f"Invalid setting {key!r} for environment {env!r}: {message}. "
        f"Fix it in {path} or in the environment variable {variable}."
    )


#: Inclusive bounds of every number in the settings, by key: ``(low, high)``; ``low_open`` keys
#: exclude ``low`` itself. Every value must also be finite: TOML and the ``TASKER_*`` variables
#: accept ``nan`` and ``inf``, which no setting means. A number setting missing here is still
#: checked to be finite (tests/test_settings.py checks that every one is listed).
_RANGES: dict[str, tuple[float, float]] = {
    "database.pool_min_size": (1, math.inf),
    "database.pool_max_size": (1, math.inf),
    "database.statement_timeout_ms": (1, math.inf),
    # an hour: longer waits are mistakes, and Python's waits overflow beyond about 1e9 s
    "database.timeout_s": (0, 3600),
    "broker.visibility_timeout_ms": (1, math.inf),
    "broker.heartbeat_interval_ms": (0, math.inf),
    "broker.max_lease_ms": (1, math.inf),
    "broker.max_deliveries": (1, math.inf),
    "broker.claim_batch": (1, math.inf),
    "broker.poll_interval_ms": (1, math.inf),
    "broker.dead_message_ttl_s": (1, math.inf),
    "engine.finalization_claim_lease_s": (1, math.inf),
    "engine.max_payload_bytes": (1, math.inf),
    "coordinator.interval_s": (0.1, 3600),
    "coordinator.port": (1, 65535),
    "coordinator.batch": (1, math.inf),
    "coordinator.recovery_grace_s": (0, math.inf),
    "coordinator.handler_not_found_after_s": (0, math.inf),
    "coordinator.live_worker_s": (0, math.inf),
    "coordinator.retention_days": (0, math.inf),
    "coordinator.retention_batch": (1, math.inf),
    "coordinator.retention_every_s": (0, math.inf),
    "coordinator.staleness.steps_in_process_minutes": (1, math.inf),
    "coordinator.staleness.waiting_for_retry_minutes": (1, math.inf),
    "coordinator.staleness.waiting_for_dependencies_minutes": (1, math.inf),
    "coordinator.staleness.blocked_by_failures_minutes": (1, math.inf),
    "coordinator.staleness.max_lifetime_minutes": (1, math.inf),
    "coordinator.scaling.processes": (1, math.inf),
    "coordinator.scaling.threads": (1, math.inf),
    "coordinator.scaling.target_utilization": (0, 1),
    "coordinator.scaling.backlog_per_replica": (1, math.inf),
    "coordinator.scaling.min_replicas": (0, math.inf),
    "coordinator.scaling.max_replicas": (1, math.inf),
    "coordinator.scaling.error_threshold": (0, 1),
    "coordinator.scaling.cooldown_s": (0, math.inf),
    "breakers.failure_threshold": (1, 1000),
    "breakers.window_s": (0, 86_400),
    "breakers.open_s": (0, 86_400),
    "breakers.half_open_successes": (1, 1000),
    "breakers.half_open_trials": (1, 1000),
    "breakers.cache_ttl_s": (0, 60),
    "breakers.max_defer_s": (0, 86_400),
    "breakers.database.failure_threshold": (1, 1000),
    "breakers.database.window_s": (0, 86_400),
    "breakers.database.open_s": (0, 86_400),
    "sentry.traces_sample_rate": (0, 1),
    "worker.metrics_port": (0, 65535),
    "api.port": (0, 65535),
    "api.max_body_bytes": (1024, math.inf),
    "api.max_queue_depth": (0, math.inf),
    "api.backpressure_check_s": (0.1, 3600),
    "api.queue_retry_after_s": (1, 86_400),
    "api.database_retry_after_s": (1, 86_400),
    "api.threads": (1, 1000),
    "api.auth.jwt_leeway_s": (0, 3600),
}
#: Keys whose lower bound is excluded: a duration or share of 0 means nothing there.
_LOW_OPEN = frozenset(
    {
        "database.timeout_s",
        "coordinator.handler_not_found_after_s",
        "coordinator.live_worker_s",
        "coordinator.retention_days",
        "coordinator.scaling.target_utilization",
        "breakers.window_s",
        "breakers.open_s",
        "breakers.cache_ttl_s",
        "breakers.max_defer_s",
        "breakers.database.window_s",
        "breakers.database.open_s",
    }
)


def number_problem(key: str, value: float) -> str | None:
    """Why ``value`` is not a valid number for setting ``key`` (None when it is valid).

    The same check serves the settings and the CLI options that override them (``tasker
    coordinator --interval`` for ``coordinator.interval_s``), so both accept the same values.
    """
    low, high = _RANGES.get(key, (-math.inf, math.inf))
    low_open = key in _LOW_OPEN
    bounds = []
    if low > -math.inf:
        bounds.append(f"greater than {low:g}" if low_open else f"at least {low:g}")
    if high < math.inf:
        bounds.append(f"at most {high:g}")
    wanted = " and ".join(bounds)
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number{', ' + wanted if wanted else ''}, got {value}"
    if (value > low if low_open else value >= low) and value <= high:
        return None
    return f"must be {wanted}, got {value:g}"


def _numbers(value: msgspec.Struct, prefix: str = "") -> dict[str, float]:
    """Every int or float field of ``value`` (nested structs included), by dotted key."""
    found: dict[str, float] = {}
    for name in value.__struct_fields__:
        field = getattr(value, name)
        if isinstance(field, msgspec.Struct):
            found |= _numbers(field, f"{prefix}{name}.")
        elif isinstance(field, (int, float)) and not isinstance(field, bool):
            found[f"{prefix}{name}"] = field
    return found


def _check_values(settings: Settings, path: Path, *, need_database: bool) -> None:
    def _bad(key: str, problem: str) -> NoReturn:
        _invalid(settings.env, path, key, problem)

    db, broker = settings.database, settings.broker
    for key, value in _numbers(settings).items():
        problem = number_problem(key, value)
        if problem is not None:
            _bad(key, problem)
    if db.pool_max_size < db.pool_min_size:
        _bad("database.pool_max_size", "must be at least database.pool_min_size")
    if broker.heartbeat_interval_ms * 2 >= broker.visibility_timeout_ms:
        _bad(
            "broker.heartbeat_interval_ms",
            "must be 0 (automatic) or less than half of broker.visibility_timeout_ms",
        )
    scaling = settings.coordinator.scaling
    if scaling.min_replicas > scaling.max_replicas:
        _bad(
            "coordinator.scaling.min_replicas",
            "must be between 0 and coordinator.scaling.max_replicas",
        )
    _check_breaker_overrides(settings.breakers, _bad)
    problem = _url_problem(db.url)
    if problem is not None:
        _bad("database.url", problem)
    for key, problem in _sentry_problems(settings.sentry):
        _bad(key, problem)
    if need_database and not db.url and not db.allow_embedded:
        _bad(
            "database.url",
            "is empty and the embedded PostgreSQL is not allowed in this environment; "
            "set it to a PostgreSQL URL",
        )


_BREAKER_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}\Z")


def _check_breaker_overrides(
    breakers: BreakerSettings, bad: Callable[[str, str], NoReturn]
) -> None:
    """Each ``[breakers.overrides.<name>]`` names a breaker a step can declare, and its numbers
    obey the ranges of the ``[breakers]`` settings they replace."""
    for name, override in breakers.overrides.items():
        key = f"breakers.overrides.{name}"
        if not _BREAKER_NAME.match(name) or name == "database":
            bad(
                key,
                "must name a step breaker: 1-64 lower-case letters, digits or underscores, "
                "starting with a letter, and not 'database' (that is [breakers.database])",
            )
        for field in override.__struct_fields__:
            value = getattr(override, field)
            problem = None if value is None else number_problem(f"breakers.{field}", value)
            if problem is not None:
                bad(f"{key}.{field}", problem)


def _url_problem(url: str) -> str | None:
    """Why ``url`` is not a PostgreSQL URL libpq can use (its password never shown), or None:
    an unparsable URL never reaches the driver, whose errors and logs may quote it whole, and a
    port that is not a number is a settings error, not "cannot reach PostgreSQL"."""
    if not url:
        return None
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    from tasker.db.errors import redact

    scheme, is_uri, _ = url.partition("://")
    if is_uri and scheme not in ("postgresql", "postgres"):
        return (
            "must be a postgresql:// URL (or postgres://, in lower case) or libpq key=value "
            f"pairs (host=... dbname=...), not a {scheme[:20]}:// URL"
        )
    if not is_uri and "=" not in url:
        return (
            "is neither a postgresql:// URL nor libpq key=value pairs (host=... dbname=...); "
            "e.g. postgresql://user:password@host:5432/dbname"
        )
    try:
        params = conninfo_to_dict(url)
    except psycopg.Error as exc:
        reason = (redact(str(exc).strip(), url).splitlines() or [type(exc).__name__])[0]
        fix = (
            "in a URL, write the password's special characters percent-encoded (% as %25, @ as "
            "%40, / as %2F)"
            if is_uri
            else "in key=value pairs, quote a value that holds spaces in single quotes "
            "(password='a b')"
        )
        return f"is not a PostgreSQL URL libpq can parse ({reason}); {fix}"
    authority = re.split(r"[/?]", url.partition("://")[2], maxsplit=1)[0]
    if authority.count("@") > 1:
        # "user:p@ss@host" reads as password "p" and host "ss@host": never show that host
        return (
            "has more than one @ before the host; a password that holds / : or @ must be "
            "percent-encoded in a URL (/ as %2F, : as %3A, @ as %40)"
        )
    for port in str(params.get("port") or "").split(","):
        if port and not (port.isdigit() and 1 <= int(port) <= 65535):
            if not is_uri:
                return f"has port={port[:20]!r}, which is not a number from 1 to 65535"
            # not quoted: "user:pass/word@host" reads as host "user" and port "pass"
            return (
                "has a port that is not a number from 1 to 65535; a password that holds / : or "
                "@ must be percent-encoded in a URL (/ as %2F, : as %3A, @ as %40)"
            )
    return None


def _invalid(env: str, path: Path, key: str, problem: str) -> NoReturn:
    variable = "TASKER_" + key.upper().replace(".", "__")
    raise ConfigurationError(
        f"Invalid setting {key!r} for environment {env!r}: {problem}. "
        f"Fix it in {path} or in the environment variable {variable}."
    )


def _sentry_problems(sentry: SentrySettings) -> list[tuple[str, str]]:
    """``(key, problem)`` for every invalid ``sentry`` setting (Sentry's own rules for names);
    a DSN is never quoted."""
    problems = {
        "sentry.dsn": _dsn_problem(sentry.dsn),
        "sentry.environment": _name_problem(sentry.environment, 64, "/ \t\r\n", {"None"}),
        "sentry.release": _name_problem(sentry.release, 200, "/\\\t\r\n", {".", ".."}),
    }
    return [(key, problem) for key, problem in problems.items() if problem is not None]


def _name_problem(value: str, limit: int, forbidden: str, reserved: set[str]) -> str | None:
    if len(value) > limit:
        return f"must be at most {limit} characters"
    bad = sorted({repr(c) for c in value if c in forbidden})
    if bad:
        return f"must not contain {', '.join(bad)}"
    if value in reserved:
        return f"must not be {value!r}"
    return None


def _dsn_problem(dsn: str) -> str | None:
    """Why ``dsn`` is not a DSN sentry-sdk accepts (``https://KEY@HOST/PROJECT_ID``), or None;
    the same checks as sentry-sdk's ``Dsn``, which is not imported here."""
    if not dsn:
        return None
    from urllib.parse import urlsplit

    fix = "copy it from the Sentry project's Client Keys (DSN) page"
    try:
        parts = urlsplit(dsn)
        parts.port  # noqa: B018 (raises for a port that is not a number)
    except ValueError:
        return f"is not a URL; {fix}"
    if parts.scheme not in ("http", "https"):
        return f"must be an https:// (or http://) URL; {fix}"
    if not parts.username or not parts.hostname:
        return f"lacks its key or host (https://KEY@HOST/PROJECT_ID); {fix}"
    if not parts.path.rsplit("/", 1)[-1].strip().isdigit():
        return f"must end with the project's number (https://KEY@HOST/PROJECT_ID); {fix}"
    return None


def mask_dsn(dsn: str) -> str:
    """``dsn`` with its key (and secret) replaced by ``***``: ``https://***@HOST/PROJECT_ID``.
    A value that is not such a URL is masked whole."""
    if not dsn:
        return dsn
    scheme, sep, rest = dsn.partition("://")
    userinfo, at, location = rest.rpartition("@")
    if not sep or not at or not userinfo:
        return "***"
    return f"{scheme}://***@{location}"
