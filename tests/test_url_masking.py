"""A database URL is never printed or logged with its password, whatever form it is written in."""

from __future__ import annotations

from urllib.parse import quote

import psycopg
import pytest
from hypothesis import given
from hypothesis import strategies as st
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from tasker.db.errors import database_error, mask_url


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("postgresql://app:s3cret@db.internal/app", "postgresql://app:***@db.internal/app"),
        ("postgresql://app@db.internal/app", "postgresql://app@db.internal/app"),
        ("postgresql://db/app?password=s3cret", "postgresql://db/app?password=***"),
        (
            "postgres://app@db/app?sslmode=require&password=s3cret&application_name=a%20b",
            "postgres://app@db/app?sslmode=require&password=***&application_name=a%20b",
        ),
        (
            "postgresql://app:s3cret@h1:5432,h2:5433/app?sslpassword=k3yphrase",
            "postgresql://app:***@h1:5432,h2:5433/app?sslpassword=***",
        ),
        ("host=db password=s3cret dbname=app", "host=db password=*** dbname=app"),
        ("host=db password='a b c' dbname=app", "host=db password=*** dbname=app"),
        (r"host=db password='it\'s' dbname=app", "host=db password=*** dbname=app"),
        ("host = db  password = s3cret", "host = db  password = ***"),
        ("host=/tmp port=5432 dbname=app", "host=/tmp port=5432 dbname=app"),
        ("", ""),
    ],
)
def test_every_form_of_password_is_masked(url: str, masked: str) -> None:
    assert mask_url(url) == masked


@pytest.mark.parametrize(
    "url",
    [
        "host=db password=s3cret dbname",  # missing "="
        "postgresql://app:s3cret@[::1/app",  # unclosed IPv6 bracket
        "postgresql://app:s3cret@db/app?bogus=1",  # unknown parameter
        "postgresql://app@db/app?bogus=1&password=s3cret",
        "host=db password='s3cret",  # unterminated quote
    ],
)
def test_an_unparsable_url_is_masked_too(url: str) -> None:
    with pytest.raises(psycopg.ProgrammingError):
        conninfo_to_dict(url)
    assert "s3cret" not in mask_url(url)
    assert "***" in mask_url(url)


_PASSWORDS = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=1
).map(lambda s: "S3cr" + s)


@given(password=_PASSWORDS, form=st.sampled_from(["userinfo", "query", "key_value"]))
def test_masking_keeps_every_other_parameter(password: str, form: str) -> None:
    if form == "userinfo":
        url = f"postgresql://app:{quote(password, safe='')}@db.internal:6432/app?sslmode=prefer"
    elif form == "query":
        url = f"postgresql://app@db.internal:6432/app?password={quote(password, safe='')}"
    else:
        url = make_conninfo(host="db.internal", port=6432, user="app", password=password)
    params = conninfo_to_dict(url)
    assert params["password"] == password
    masked = mask_url(url)
    assert password not in masked
    assert conninfo_to_dict(masked) == {**params, "password": "***"}


def test_database_errors_name_the_masked_url_even_when_the_driver_quotes_it() -> None:
    url = "postgresql://app:s3cret@[::1/app"
    with pytest.raises(psycopg.Error) as raised:
        psycopg.connect(url)
    assert "s3cret" in str(raised.value)  # libpq quotes the whole URL
    error = database_error(raised.value, url=url)
    assert "s3cret" not in str(error)
    assert "postgresql://app:***@[::1/app" in str(error)
    assert "fix database.url (TASKER_DATABASE__URL)" in str(error)


def test_an_unreachable_server_is_named_by_its_masked_url() -> None:
    url = "host=127.0.0.1 port=1 dbname=nowhere user=app password='s3cret word'"
    with pytest.raises(psycopg.OperationalError) as raised:
        psycopg.connect(url, connect_timeout=2)
    message = str(database_error(raised.value, url=url))
    assert "s3cret" not in message and "\n" not in message
    assert "host=127.0.0.1 port=1 dbname=nowhere user=app password=***" in message


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://app:s3cret%PW@127.0.0.1/app",  # a raw % in the password
        "postgresql://app:s3cret%zz@127.0.0.1/app",
        "app:s3cretPW@127.0.0.1/app",  # no scheme: read as key=value
        "host=db password=s3cret dbname",
        "host=db password='s3cret",
        "postgresql://app:s3cret@[::1/app",
        "postgresql://app:s3cret/word@127.0.0.1/app",  # a raw / : "app" is a host, "s3cret" a port
        "postgresql://app:s3c@ret@127.0.0.1/app",  # a raw @: "ret@127.0.0.1" is a host
        "mysql://app:s3cret@127.0.0.1/app",
    ],
)
def test_an_unparsable_database_url_setting_never_shows_its_password(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tasker.exceptions import ConfigurationError
    from tasker.settings import load_settings

    monkeypatch.setenv("TASKER_DATABASE__URL", url)
    with pytest.raises(ConfigurationError, match=r"Invalid setting 'database\.url'") as caught:
        load_settings("test")
    assert "s3cret" not in str(caught.value)
