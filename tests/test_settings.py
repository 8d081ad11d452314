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


def test_missing_settings_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="does not exist"):
        load_settings(settings_file=tmp_path / "nope.toml")
