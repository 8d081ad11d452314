from __future__ import annotations

from pathlib import Path

import pytest

from tasker.exceptions import ConfigurationError
from tasker.settings import load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("TASKER_"):
            monkeypatch.delenv(key)


def test_defaults_are_development_with_embedded_database() -> None:
    settings = load_settings()
    assert settings.env == "development"
    assert settings.database.url == ""
    assert settings.database.allow_embedded is True
    assert settings.broker.namespace == "tasker"


def test_tasker_env_picks_the_section(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKER_ENV", "test")
    settings = load_settings()
    assert settings.env == "test"
    assert settings.broker.visibility_timeout_ms == 10_000
    assert settings.database.embedded_dir == ".tasker/pgdata-test"


def test_environment_variables_override_nested_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKER_DATABASE__URL", "postgresql://app@db/app")
    monkeypatch.setenv("TASKER_BROKER__CLAIM_BATCH", "8")
    monkeypatch.setenv("TASKER_BROKER__LISTEN", "false")
    settings = load_settings("production")
    assert settings.database.url == "postgresql://app@db/app"
    assert settings.broker.claim_batch == 8
    assert settings.broker.listen is False
    assert settings.database.pool_max_size == 20  # from [production]


def test_settings_are_frozen() -> None:
    settings = load_settings()
    with pytest.raises(AttributeError):
        settings.env = "production"  # type: ignore[misc]


def test_unknown_environment_names_the_choices() -> None:
    with pytest.raises(ConfigurationError, match=r"TASKER_ENV='staging'.*development"):
        load_settings("staging")


def test_wrong_type_names_the_key_and_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKER_BROKER__CLAIM_BATCH", "many")
    with pytest.raises(ConfigurationError) as error:
        load_settings()
    assert "broker.claim_batch" in str(error.value)
    assert "TASKER_BROKER__CLAIM_BATCH" in str(error.value)


def test_unknown_key_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKER_BROKER__VISIBILITY_TIMEOUT", "5")
    with pytest.raises(ConfigurationError, match=r"Unknown setting 'broker.visibility_timeout'"):
        load_settings()


@pytest.mark.parametrize(
    ("variable", "value", "key"),
    [
        ("TASKER_BROKER__CLAIM_BATCH", "0", "broker.claim_batch"),
        ("TASKER_BROKER__HEARTBEAT_INTERVAL_MS", "40000", "broker.heartbeat_interval_ms"),
        ("TASKER_DATABASE__POOL_MAX_SIZE", "0", "database.pool_max_size"),
        ("TASKER_LOG_LEVEL", "LOUD", "log_level"),
    ],
)
def test_invalid_values_are_rejected(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, key: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigurationError, match=key):
        load_settings()


def test_production_requires_a_database_url() -> None:
    with pytest.raises(ConfigurationError, match="TASKER_DATABASE__URL"):
        load_settings("production")


def test_custom_settings_file_and_extra_environment(tmp_path: Path) -> None:
    path = tmp_path / "settings.toml"
    path.write_text(
        "[default.broker]\nnamespace = 'shop'\n"
        "[staging.database]\nurl = 'postgresql://staging/db'\n"
    )
    settings = load_settings("staging", settings_file=path)
    assert settings.broker.namespace == "shop"
    assert settings.database.url == "postgresql://staging/db"


@pytest.mark.parametrize("how", ["variable", "option"])
def test_a_settings_file_named_by_the_variable_or_the_option_is_read(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    how: str,
) -> None:
    """TASKER_SETTINGS_FILE (set by --settings too) names the file; it is not a setting."""
    from tasker.cli import main

    path = tmp_path / "settings.toml"
    path.write_text("[default.broker]\nnamespace = 'shop'\n")
    monkeypatch.delenv("TASKER_SETTINGS_FILE", raising=False)
    monkeypatch.setenv("TASKER_DATABASE__URL", "postgresql://app@db/app")
    if how == "variable":
        monkeypatch.setenv("TASKER_SETTINGS_FILE", str(path))
        assert load_settings("development").broker.namespace == "shop"
        argv = ["settings"]
    else:
        argv = ["--settings", str(path), "settings"]
    assert main(argv) == 0
    assert '"namespace": "shop"' in capsys.readouterr().out


def test_missing_settings_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="does not exist"):
        load_settings(settings_file=tmp_path / "nope.toml")


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("TASKER_COORDINATOR__INTERVAL_S", "nan"),
        ("TASKER_COORDINATOR__INTERVAL_S", "inf"),
        ("TASKER_COORDINATOR__INTERVAL_S", "-inf"),
        ("TASKER_COORDINATOR__INTERVAL_S", "1e400"),
        ("TASKER_COORDINATOR__INTERVAL_S", "-1"),
        ("TASKER_COORDINATOR__INTERVAL_S", "0"),
        ("TASKER_COORDINATOR__INTERVAL_S", "0.01"),
        ("TASKER_COORDINATOR__INTERVAL_S", "86400"),
        ("TASKER_DATABASE__TIMEOUT_S", "nan"),
        ("TASKER_DATABASE__TIMEOUT_S", "inf"),
        ("TASKER_DATABASE__TIMEOUT_S", "0"),
        ("TASKER_COORDINATOR__RECOVERY_GRACE_S", "nan"),
        ("TASKER_COORDINATOR__RECOVERY_GRACE_S", "-1"),
        ("TASKER_COORDINATOR__HANDLER_NOT_FOUND_AFTER_S", "-5"),
        ("TASKER_COORDINATOR__LIVE_WORKER_S", "inf"),
        ("TASKER_COORDINATOR__RETENTION_DAYS", "nan"),
        ("TASKER_COORDINATOR__RETENTION_EVERY_S", "-1"),
        ("TASKER_COORDINATOR__PORT", "0"),
        ("TASKER_COORDINATOR__PORT", "65536"),
        ("TASKER_COORDINATOR__STALENESS__MAX_LIFETIME_MINUTES", "-3"),
        ("TASKER_COORDINATOR__STALENESS__STEPS_IN_PROCESS_MINUTES", "0"),
        ("TASKER_COORDINATOR__SCALING__ERROR_THRESHOLD", "-0.1"),
        ("TASKER_COORDINATOR__SCALING__ERROR_THRESHOLD", "1.5"),
        ("TASKER_COORDINATOR__SCALING__ERROR_THRESHOLD", "nan"),
        ("TASKER_COORDINATOR__SCALING__COOLDOWN_S", "-60"),
        ("TASKER_COORDINATOR__SCALING__TARGET_UTILIZATION", "nan"),
        ("TASKER_COORDINATOR__SCALING__MIN_REPLICAS", "-1"),
        ("TASKER_BROKER__HEARTBEAT_INTERVAL_MS", "-1"),
    ],
)
def test_numbers_out_of_range_or_not_finite_are_rejected(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigurationError) as error:
        load_settings()
    key = variable.removeprefix("TASKER_").lower().replace("__", ".")
    assert f"Invalid setting {key!r}" in str(error.value)
    assert variable in str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("TASKER_COORDINATOR__INTERVAL_S", "0.1"),
        ("TASKER_COORDINATOR__INTERVAL_S", "3600"),
        ("TASKER_COORDINATOR__RECOVERY_GRACE_S", "0"),
        ("TASKER_COORDINATOR__RETENTION_EVERY_S", "0"),
        ("TASKER_COORDINATOR__SCALING__ERROR_THRESHOLD", "0"),
        ("TASKER_COORDINATOR__SCALING__ERROR_THRESHOLD", "1"),
        ("TASKER_COORDINATOR__SCALING__COOLDOWN_S", "0"),
        ("TASKER_COORDINATOR__SCALING__MIN_REPLICAS", "0"),
    ],
)
def test_numbers_at_their_bounds_are_accepted(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    load_settings()


def test_the_error_names_the_settings_file_in_use(tmp_path: Path) -> None:
    path = tmp_path / "settings.toml"
    path.write_text("[default.coordinator]\ninterval_s = nan\n")
    with pytest.raises(ConfigurationError, match=f"Fix it in {path} or"):
        load_settings(settings_file=path)


def test_every_number_setting_has_a_range() -> None:
    from tasker.settings import _RANGES, Settings, _numbers

    assert set(_numbers(Settings())) == set(_RANGES)


def test_number_problem_is_the_check_the_cli_shares() -> None:
    from tasker.settings import number_problem

    assert number_problem("coordinator.interval_s", 0.5) is None
    assert number_problem("coordinator.interval_s", float("nan")) == (
        "must be a finite number, at least 0.1 and at most 3600, got nan"
    )
    assert number_problem("coordinator.interval_s", 0) == (
        "must be at least 0.1 and at most 3600, got 0"
    )
    assert number_problem("coordinator.live_worker_s", 0) == "must be greater than 0, got 0"


@pytest.mark.parametrize(
    "url",
    [
        "host=db password=s3cret dbname",
        "postgresql://app:s3cret@db/app?bogus=1",
        "postgresql://app:s3cret@[::1/app",
    ],
)
def test_a_database_url_libpq_cannot_parse_is_rejected_without_its_password(
    monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    monkeypatch.setenv("TASKER_DATABASE__URL", url)
    with pytest.raises(ConfigurationError, match=r"Invalid setting 'database\.url'") as error:
        load_settings("production")
    assert "s3cret" not in str(error.value)
    assert "TASKER_DATABASE__URL" in str(error.value)
