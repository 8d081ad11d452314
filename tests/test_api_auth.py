"""Authentication and permissions of the HTTP API (tasker/api/auth.py): API keys, JWTs (HS256,
RS256 with a PEM key or a JWKS URL), the settings' checks, and no secret in any message."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tasker.api.auth import (
    ANONYMOUS,
    PERMISSIONS,
    AuthenticationError,
    Authenticator,
    AuthUnavailableError,
    PermissionDeniedError,
    Principal,
    check_auth_settings,
)
from tasker.exceptions import ConfigurationError
from tasker.settings import ApiAuthSettings, ApiKey

READER_KEY = "reader-key-7f3a9c2e5b1d4086"
ADMIN_KEY = "admin-key-0d8e6b4a2c9f1375"
SECRET = "hs256-secret-4b7e1a9d3c6f8205e2a7b0c4d9f1e3a6"
KEYS = [
    ApiKey(name="reader", key=READER_KEY, permissions=["tasks:read", "dlq:*"]),
    ApiKey(name="admin", key=ADMIN_KEY, permissions=["*:*"], namespaces=["billing", "ops"]),
]


def _settings(**overrides: Any) -> ApiAuthSettings:
    values: dict[str, Any] = {"enabled": True, "api_keys": KEYS}
    return ApiAuthSettings(**(values | overrides))


def _claims(**claims: Any) -> dict[str, Any]:
    defaults = {"sub": "alice", "exp": int(time.time()) + 300, "permissions": ["tasks:read"]}
    return {name: value for name, value in (defaults | claims).items() if value is not None}


def _hs256(secret: str = SECRET, **claims: Any) -> str:
    return jwt.encode(_claims(**claims), secret, algorithm="HS256")


def _rs256(key: rsa.RSAPrivateKey, kid: str | None = None, **claims: Any) -> str:
    headers = {"kid": kid} if kid else None
    return jwt.encode(_claims(**claims), key, algorithm="RS256", headers=headers)


def _forged_hs256(secret: bytes, kid: str | None = None) -> str:
    """An HS256 token whose HMAC secret is ``secret`` (the RS256 public key, in the attack)."""

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    header = {"alg": "HS256", "typ": "JWT"} | ({"kid": kid} if kid else {})
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(_claims()).encode())}"
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


def _pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def _refused(
    auth: Authenticator,
    *,
    api_key: str | None = None,
    token: str | None = None,
    authorization: str | None = None,
    error: type[Exception] = AuthenticationError,
) -> str:
    """The message of the error ``auth`` raises for these credentials, checked to quote none of
    them and no configured key or secret."""
    if token is not None:
        authorization = f"Bearer {token}"
    with pytest.raises(error) as caught:
        auth.authenticate(api_key=api_key, authorization=authorization)
    message = str(caught.value)
    credential = (authorization or "").strip().partition(" ")[2] or authorization
    for secret in (api_key, token, credential, SECRET, READER_KEY, ADMIN_KEY):
        if secret and secret.strip().lower() != "bearer":  # the scheme alone is no secret
            assert secret not in message
    return message


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def other_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


# -- API keys, permissions, namespaces ----------------------------------------------------------


def test_permissions_are_the_seed_strings() -> None:
    assert {"tasks:create", "tasks:read", "tasks:list", "tasks:cancel", "steps:read"} <= set(
        PERMISSIONS
    )
    assert {"steps:resolve", "dlq:read", "dlq:update", "dlq:stats", "templates:read"} <= set(
        PERMISSIONS
    )
    assert {"system:config_read", "tasks:delete", "worker:templates_read"} <= set(PERMISSIONS)
    assert len(PERMISSIONS) == len(set(PERMISSIONS)) == 18


def test_an_api_key_holds_its_permissions_only() -> None:
    principal = Authenticator(_settings()).authenticate(api_key=READER_KEY, authorization=None)
    assert principal.subject == "reader"
    assert principal.allows("tasks:read") and principal.allows("dlq:update")
    assert not principal.allows("tasks:create") and not principal.allows("steps:read")
    principal.require("dlq:stats")
    with pytest.raises(PermissionDeniedError, match="'tasks:create'") as caught:
        principal.require("tasks:create")
    assert READER_KEY not in str(caught.value)


def test_wildcards() -> None:
    everything = Principal("root", frozenset({"*:*"}), None)
    tasks = Principal("tasks", frozenset({"tasks:*"}), None)
    assert all(everything.allows(permission) for permission in PERMISSIONS)
    assert all(tasks.allows(p) for p in PERMISSIONS if p.startswith("tasks:"))
    assert not any(tasks.allows(p) for p in PERMISSIONS if not p.startswith("tasks:"))
    assert not Principal("odd", frozenset({"*:read"}), None).allows("tasks:read")
    assert ANONYMOUS.allows("system:config_read") and ANONYMOUS.sees("any")


def test_namespaces_of_a_key() -> None:
    auth = Authenticator(_settings())
    admin = auth.authenticate(api_key=ADMIN_KEY, authorization=None)
    assert admin.namespaces == {"billing", "ops"}
    assert admin.sees("billing") and not admin.sees("shipping")
    reader = auth.authenticate(api_key=READER_KEY, authorization=None)
    assert reader.namespaces is None and reader.sees("shipping")


def test_missing_and_unknown_credentials() -> None:
    auth = Authenticator(_settings())
    for api_key, authorization in [(None, None), ("", ""), ("  ", None)]:
        message = _refused(auth, api_key=api_key, authorization=authorization)
        assert "X-API-Key" in message and "Bearer" in message
    assert "Unknown API key" in _refused(auth, api_key="not-a-key-but-long-enough")
    assert "Unknown API key" in _refused(auth, api_key=READER_KEY[:-1])
    assert "not a known API key" in _refused(auth, token="some-other-token-value")
    for authorization in ["Basic " + READER_KEY, READER_KEY, "Bearer ", "Bearer"]:
        assert "Bearer <token>" in _refused(auth, authorization=authorization)


def test_bearer_api_keys_and_the_key_header_wins() -> None:
    auth = Authenticator(_settings())
    for scheme in ("Bearer", "bearer", "BEARER"):
        principal = auth.authenticate(api_key=None, authorization=f"{scheme} {ADMIN_KEY}")
        assert principal.subject == "admin"
    both = auth.authenticate(api_key=READER_KEY, authorization=f"Bearer {ADMIN_KEY}")
    assert both.subject == "reader"
    _refused(auth, api_key="wrong-key-0123456789", authorization=f"Bearer {ADMIN_KEY}")


def test_disabled_auth_is_anonymous_and_unchecked() -> None:
    settings = ApiAuthSettings(enabled=False, api_keys=[ApiKey(name="x", key="short")])
    auth = Authenticator(settings, "production")
    assert auth.authenticate(api_key=None, authorization=None) is ANONYMOUS
    assert auth.authenticate(api_key="anything", authorization="Bearer junk") is ANONYMOUS
    assert auth.describe() == {"enabled": False, "api_keys": ["x"], "jwt": None}


def test_describe_names_keys_and_method_but_no_secret(rsa_key: rsa.RSAPrivateKey) -> None:
    cases = [
        ({"jwt_secret": SECRET}, "HS256"),
        ({"jwt_public_key": _pem(rsa_key)}, "RS256 (public key)"),
        ({"jwt_jwks_url": "https://issuer.example/jwks.json"}, "RS256 (JWKS)"),
        ({}, None),
    ]
    for overrides, method in cases:
        described = Authenticator(_settings(**overrides)).describe()
        assert described == {"enabled": True, "api_keys": ["reader", "admin"], "jwt": method}
        assert SECRET not in repr(described) and READER_KEY not in repr(described)


# -- HS256 --------------------------------------------------------------------------------------


def test_hs256_token_gives_its_subject_permissions_and_namespaces() -> None:
    auth = Authenticator(_settings(jwt_secret=SECRET))
    token = _hs256(permissions=["tasks:*"], namespaces=["billing"])
    principal = auth.authenticate(api_key=None, authorization=f"Bearer {token}")
    assert principal == Principal("alice", frozenset({"tasks:*"}), frozenset({"billing"}))
    plain = auth.authenticate(api_key=None, authorization=f"Bearer {_hs256(permissions=None)}")
    assert plain.permissions == frozenset() and plain.namespaces is None
    with pytest.raises(PermissionDeniedError, match="'tasks:read'"):
        plain.require("tasks:read")


def test_hs256_time_claims() -> None:
    now = int(time.time())
    auth = Authenticator(_settings(jwt_secret=SECRET, jwt_leeway_s=30.0))
    assert "expired" in _refused(auth, token=_hs256(exp=now - 120))
    assert "not valid yet" in _refused(auth, token=_hs256(nbf=now + 120))
    assert "not valid yet" in _refused(auth, token=_hs256(iat=now + 120))
    assert "'exp'" in _refused(auth, token=_hs256(exp=None))
    assert "exp" in _refused(auth, token=_hs256(exp="tomorrow"))
    # within the leeway: accepted; without leeway: refused
    auth.authenticate(api_key=None, authorization=f"Bearer {_hs256(exp=now - 5)}")
    strict = Authenticator(_settings(jwt_secret=SECRET, jwt_leeway_s=0.0))
    assert "expired" in _refused(strict, token=_hs256(exp=now - 5))


def test_hs256_signature_and_algorithm(rsa_key: rsa.RSAPrivateKey) -> None:
    auth = Authenticator(_settings(jwt_secret=SECRET))
    other = "another-secret-of-enough-length-9c1e5a7b3d"
    assert "bad signature" in _refused(auth, token=_hs256(secret=other))
    unsigned = jwt.encode(_claims(), None, algorithm="none")
    assert "only HS256" in _refused(auth, token=unsigned)
    assert "only HS256" in _refused(auth, token=_rs256(rsa_key))
    tampered = _hs256().rsplit(".", 1)[0] + "." + _hs256(secret=other).rsplit(".", 1)[1]
    assert "bad signature" in _refused(auth, token=tampered)
    assert "Malformed token" in _refused(auth, token="not.a.jwt")
    assert "Malformed token" in _refused(auth, token="garbage-that-is-no-key")


def test_issuer_and_audience_when_configured() -> None:
    auth = Authenticator(
        _settings(jwt_secret=SECRET, jwt_issuer="https://issuer.example", jwt_audience="tasker")
    )
    good = _hs256(iss="https://issuer.example", aud="tasker")
    assert auth.authenticate(api_key=None, authorization=f"Bearer {good}").subject == "alice"
    assert "wrong issuer" in _refused(auth, token=_hs256(iss="https://evil.example", aud="tasker"))
    assert "wrong audience" in _refused(
        auth, token=_hs256(iss="https://issuer.example", aud="other")
    )
    assert "'iss'" in _refused(auth, token=_hs256(aud="tasker"))
    assert "'aud'" in _refused(auth, token=_hs256(iss="https://issuer.example"))
    # not configured: not checked
    lenient = Authenticator(_settings(jwt_secret=SECRET))
    lenient.authenticate(api_key=None, authorization=f"Bearer {_hs256(iss='x', aud='y')}")


def test_claims_of_the_wrong_type() -> None:
    auth = Authenticator(_settings(jwt_secret=SECRET))
    for permissions in [7, {"tasks": "read"}, ["tasks:read", 1], True]:
        assert "'permissions'" in _refused(auth, token=_hs256(permissions=permissions))
    for namespaces in ["billing", [None], 3]:
        assert "'namespaces'" in _refused(auth, token=_hs256(namespaces=namespaces))
    assert "Subject" in _refused(auth, token=_hs256(sub=12))


def test_space_separated_scope_and_custom_claims() -> None:
    settings = _settings(jwt_secret=SECRET, permissions_claim="scope", namespaces_claim="ns")
    auth = Authenticator(settings)
    token = _hs256(scope="openid tasks:read  dlq:*", ns=["ops"], permissions=None)
    principal = auth.authenticate(api_key=None, authorization=f"Bearer {token}")
    assert principal.permissions == {"openid", "tasks:read", "dlq:*"}
    assert principal.allows("dlq:stats") and not principal.allows("tasks:create")
    assert principal.namespaces == {"ops"}
    assert "'scope'" in _refused(auth, token=_hs256(scope=["tasks:read", 2]))


# -- RS256 with a PEM public key ----------------------------------------------------------------


def test_rs256_with_a_public_key(
    rsa_key: rsa.RSAPrivateKey, other_rsa_key: rsa.RSAPrivateKey
) -> None:
    auth = Authenticator(_settings(jwt_public_key=_pem(rsa_key)))
    principal = auth.authenticate(api_key=None, authorization=f"Bearer {_rs256(rsa_key)}")
    assert principal.subject == "alice" and principal.allows("tasks:read")
    assert "bad signature" in _refused(auth, token=_rs256(other_rsa_key))
    assert "only RS256" in _refused(auth, token=_hs256())
    assert "only RS256" in _refused(auth, token=jwt.encode(_claims(), None, algorithm="none"))
    assert "expired" in _refused(auth, token=_rs256(rsa_key, exp=int(time.time()) - 300))


def test_hs256_signed_with_the_public_key_is_refused(rsa_key: rsa.RSAPrivateKey) -> None:
    pem = _pem(rsa_key)
    auth = Authenticator(_settings(jwt_public_key=pem))
    assert "only RS256" in _refused(auth, token=_forged_hs256(pem.encode()))


# -- RS256 with a JWKS URL ----------------------------------------------------------------------


@dataclass
class JwksServer:
    base: str
    paths: list[str] = field(default_factory=list)


@pytest.fixture
def jwks_server(
    rsa_key: rsa.RSAPrivateKey, monkeypatch: pytest.MonkeyPatch
) -> Iterator[JwksServer]:
    """A JWKS document of ``rsa_key`` (kid ``k1``) at /jwks.json, a 500 at /broken and a text
    that is not JSON at /not-json, from 127.0.0.1 (no proxy)."""
    for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    jwk = jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key.public_key(), as_dict=True)
    documents = {
        "/jwks.json": (200, json.dumps({"keys": [jwk | {"kid": "k1", "use": "sig"}]}).encode()),
        "/not-json": (200, b"hello"),
    }
    served = JwksServer(base="")

    class Handler(BaseHTTPRequestHandler):
        timeout = 10

        def do_GET(self) -> None:
            served.paths.append(self.path)
            status, body = documents.get(self.path, (500, b"broken"))
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    served.base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield served
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
        assert not thread.is_alive()


def test_jwks_token_with_its_kid(jwks_server: JwksServer, rsa_key: rsa.RSAPrivateKey) -> None:
    auth = Authenticator(_settings(jwt_jwks_url=f"{jwks_server.base}/jwks.json"))
    for _ in range(3):
        token = _rs256(rsa_key, kid="k1", namespaces=["billing"])
        principal = auth.authenticate(api_key=None, authorization=f"Bearer {token}")
        assert principal.subject == "alice" and principal.namespaces == {"billing"}
    assert jwks_server.paths == ["/jwks.json"]  # fetched once, then cached


def test_jwks_refuses_unknown_kids_and_other_algorithms(
    jwks_server: JwksServer, rsa_key: rsa.RSAPrivateKey, other_rsa_key: rsa.RSAPrivateKey
) -> None:
    auth = Authenticator(_settings(jwt_jwks_url=f"{jwks_server.base}/jwks.json"))
    assert "key id" in _refused(auth, token=_rs256(rsa_key, kid="k2"))
    assert "kid" in _refused(auth, token=_rs256(rsa_key))
    assert "bad signature" in _refused(auth, token=_rs256(other_rsa_key, kid="k1"))
    assert "only RS256" in _refused(auth, token=_forged_hs256(_pem(rsa_key).encode(), kid="k1"))
    unsigned = jwt.encode(_claims(), None, algorithm="none", headers={"kid": "k1"})
    assert "only RS256" in _refused(auth, token=unsigned)
    assert "Malformed token" in _refused(auth, token="not-a-jwt-nor-a-key")


def test_jwks_that_cannot_be_fetched_is_unavailable(
    jwks_server: JwksServer, rsa_key: rsa.RSAPrivateKey
) -> None:
    token = _rs256(rsa_key, kid="k1")
    with socket.socket() as unused:  # bound, not listening: connections are refused
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
        down = f"http://127.0.0.1:{port}/jwks.json?token=url-secret-0123456789"
        auth = Authenticator(_settings(jwt_jwks_url=down))
        message = _refused(auth, token=token, error=AuthUnavailableError)
    assert "api.auth.jwt_jwks_url" in message and "url-secret" not in message
    for path, reason in [("/broken", "HTTP 500"), ("/not-json", "not a JWKS document")]:
        auth = Authenticator(_settings(jwt_jwks_url=jwks_server.base + path))
        message = _refused(auth, token=token, error=AuthUnavailableError)
        assert "api.auth.jwt_jwks_url" in message and reason in message
    # API keys keep working while the JWKS is down
    assert auth.authenticate(api_key=READER_KEY, authorization=None).subject == "reader"


# -- check_auth_settings ------------------------------------------------------------------------


def _config_error(settings: ApiAuthSettings, env: str = "production") -> str:
    with pytest.raises(ConfigurationError) as caught:
        check_auth_settings(settings, env)
    with pytest.raises(ConfigurationError):
        Authenticator(settings, env)
    return str(caught.value)


def test_enabled_auth_needs_credentials_to_check() -> None:
    message = _config_error(ApiAuthSettings(enabled=True))
    for part in ["'production'", "api.auth.api_keys", "jwt_jwks_url", "ENABLED=false"]:
        assert part in message
    check_auth_settings(ApiAuthSettings(enabled=False), "production")
    check_auth_settings(_settings(), "production")
    check_auth_settings(_settings(api_keys=[], jwt_secret=SECRET), "production")


def test_one_jwt_method_only(rsa_key: rsa.RSAPrivateKey) -> None:
    message = _config_error(_settings(jwt_secret=SECRET, jwt_jwks_url="https://i.example/jwks"))
    assert "'api.auth.jwt_jwks_url'" in message and "keep only one" in message
    assert SECRET not in message
    message = _config_error(_settings(jwt_secret=SECRET, jwt_public_key=_pem(rsa_key)))
    assert "'api.auth.jwt_public_key'" in message and _pem(rsa_key) not in message


@pytest.mark.parametrize(
    ("keys", "where", "words"),
    [
        ([ApiKey(name="ci", key="short-key")], "api_keys[0].key", "16 characters"),
        ([ApiKey(name=" ", key=READER_KEY)], "api_keys[0].name", "empty"),
        (
            [ApiKey(name="a", key=READER_KEY), ApiKey(name="b", key=READER_KEY)],
            "api_keys[1].key",
            "api_keys[0]",
        ),
        (
            [ApiKey(name="a", key=READER_KEY), ApiKey(name="a", key=ADMIN_KEY)],
            "api_keys[1].name",
            "api_keys[0]",
        ),
        (
            [ApiKey(name="a", key=READER_KEY, permissions=["tasks:raed"])],
            "api_keys[0].permissions",
            "did you mean 'tasks:read'",
        ),
        (
            [ApiKey(name="a", key=READER_KEY, permissions=["tasks:read", "cookies"])],
            "api_keys[0].permissions",
            "system:config_read",
        ),
        (
            [ApiKey(name="a", key=READER_KEY, permissions=["*:read"])],
            "api_keys[0].permissions",
            "malformed wildcard",
        ),
        (
            [ApiKey(name="a", key=READER_KEY, permissions=["jobs:*"])],
            "api_keys[0].permissions",
            "malformed wildcard",
        ),
        (
            [ApiKey(name="a", key=READER_KEY, namespaces=["billing", ""])],
            "api_keys[0].namespaces",
            "empty namespace",
        ),
    ],
)
def test_bad_api_keys(keys: list[ApiKey], where: str, words: str) -> None:
    message = _config_error(_settings(api_keys=keys))
    assert f"'api.auth.{where}'" in message and words in message
    assert "TASKER_API__AUTH__API_KEYS" in message
    for key in keys:
        assert key.key not in message


def test_bad_jwt_settings(rsa_key: rsa.RSAPrivateKey) -> None:
    short = "too-short-secret"
    message = _config_error(_settings(jwt_secret=short))
    assert "'api.auth.jwt_secret'" in message and "256 bits" in message
    assert short not in message and "TASKER_API__AUTH__JWT_SECRET" in message
    check_auth_settings(ApiAuthSettings(enabled=False, jwt_secret=short), "production")

    private_pem = rsa_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    not_a_key = "-----BEGIN PUBLIC KEY-----\nbm90IGEga2V5\n-----END PUBLIC KEY-----\n"
    for pem in [private_pem, not_a_key, "hello"]:
        message = _config_error(_settings(jwt_public_key=pem))
        assert "'api.auth.jwt_public_key'" in message and "PEM public key" in message
        assert pem not in message and "bm90IGEga2V5" not in message
        assert private_pem.splitlines()[1] not in message
    ec_key = ec.generate_private_key(ec.SECP256R1())
    assert "not an RSA" in _config_error(_settings(jwt_public_key=_pem(ec_key)))
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    assert "1024 bits" in _config_error(_settings(jwt_public_key=_pem(small)))

    for url in ["file:///etc/passwd", "ftp://issuer.example/jwks", "issuer.example", "http://"]:
        message = _config_error(_settings(jwt_jwks_url=url))
        assert "'api.auth.jwt_jwks_url'" in message and "https://" in message
    message = _config_error(_settings(jwt_secret=SECRET, permissions_claim=""))
    assert "'api.auth.permissions_claim'" in message
