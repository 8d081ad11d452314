"""Who may call the HTTP API and what they may do (seed-spec §9.1 "Auth"; docs/api.md).

Framework-agnostic: the app hands :meth:`Authenticator.authenticate` the ``X-API-Key`` and
``Authorization`` header values and gets a :class:`Principal`, whose :meth:`Principal.require`
guards each route and :meth:`Principal.sees` each namespace. Credentials are a static API key
(``api.auth.api_keys``) or a JWT checked with the one configured method: HS256 with
``api.auth.jwt_secret``, RS256 with ``api.auth.jwt_public_key`` or with the keys published at
``api.auth.jwt_jwks_url``. The errors map onto HTTP statuses, and no message ever quotes a key,
a token or a secret::

    TaskerError
     ├── AuthenticationError     401: no, unknown or invalid credentials
     ├── PermissionDeniedError   403: valid credentials without the permission a route needs
     └── AuthUnavailableError    503: the JWKS document cannot be fetched

Permissions are §9.1's ``resource:action`` strings (:data:`PERMISSIONS`); ``resource:*`` grants
every action of a resource and ``*:*`` everything.
"""

from __future__ import annotations

import difflib
import hmac
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn
from urllib.error import HTTPError, URLError
from urllib.parse import urlsplit

import jwt
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from tasker.exceptions import ConfigurationError, TaskerError
from tasker.settings import ApiAuthSettings, ApiKey
from tasker.workflow.payloads import payload_problem

__all__ = [
    "ANONYMOUS",
    "PERMISSIONS",
    "AuthUnavailableError",
    "AuthenticationError",
    "Authenticator",
    "PermissionDeniedError",
    "Principal",
    "auth_enabled",
    "check_auth_settings",
]

_ACTIONS = {
    "tasks": ("create", "read", "list", "cancel", "delete", "context_read"),
    "steps": ("read", "resolve"),
    "dlq": ("read", "update", "stats"),
    "templates": ("read", "validate"),
    "system": ("config_read", "handlers_read", "analytics_read"),
    "worker": ("config_read", "templates_read"),
}
#: Every permission string Tasker knows, ``resource:action`` (seed-spec §9.1).
PERMISSIONS: tuple[str, ...] = tuple(f"{r}:{a}" for r, actions in _ACTIONS.items() for a in actions)
_WILDCARDS = ("*:*", *(f"{resource}:*" for resource in _ACTIONS))

_MIN_API_KEY_CHARS = 16
_MIN_JWT_SECRET_BYTES = 32  # HS256 wants a key as long as its hash: 256 bits
_MIN_RSA_BITS = 2048
_JWKS_TIMEOUT_S = 5.0
_JWKS_LIFESPAN_S = 300.0  # the JWKS document is fetched again after this long
_JWT_SETTINGS = ("jwt_secret", "jwt_public_key", "jwt_jwks_url")


class AuthenticationError(TaskerError):
    """No credentials, or credentials that are not valid (HTTP 401); the message says what is
    wrong and never contains the key or token."""


class PermissionDeniedError(TaskerError):
    """Valid credentials that lack the permission a request needs (HTTP 403); the message names
    that permission."""


class AuthUnavailableError(TaskerError):
    """The keys at ``api.auth.jwt_jwks_url`` cannot be fetched (HTTP 503): tokens cannot be
    checked for now."""


@dataclass(frozen=True)
class Principal:
    """Who made a request: an API key's name or a token's ``sub``, the permissions it holds and
    the namespaces it may see (``None``: every namespace)."""

    subject: str
    permissions: frozenset[str]
    namespaces: frozenset[str] | None

    def allows(self, permission: str) -> bool:
        """Whether ``permission`` (``tasks:read``) is held: exactly, as ``tasks:*`` or ``*:*``."""
        resource = permission.partition(":")[0]
        return not self.permissions.isdisjoint({permission, f"{resource}:*", "*:*"})

    def require(self, permission: str) -> None:
        """Raise :class:`PermissionDeniedError` naming ``permission`` unless it is held."""
        if not self.allows(permission):
            held = ", ".join(sorted(self.permissions)) or "none"
            raise PermissionDeniedError(
                f"Permission {permission!r} is required; {self.subject!r} holds: {held}. Grant "
                f"it (or {permission.partition(':')[0] + ':*'!r}) in the API key's permissions "
                "(api.auth.api_keys) or the token's permissions claim."
            )

    def sees(self, namespace: str) -> bool:
        """Whether requests of this principal may see and act on tasks of ``namespace``."""
        return self.namespaces is None or namespace in self.namespaces


#: The principal of every request while ``api.auth.enabled`` is false: everything allowed.
ANONYMOUS = Principal(subject="anonymous", permissions=frozenset({"*:*"}), namespaces=None)


def auth_enabled(auth: ApiAuthSettings, env: str) -> bool:
    """Whether requests must authenticate: ``api.auth.enabled`` when it is set, else true in
    production only (so a settings file that leaves it out cannot open a production API)."""
    return auth.enabled if auth.enabled is not None else env == "production"


def check_auth_settings(auth: ApiAuthSettings, env: str) -> None:
    """Check ``api.auth`` for environment ``env`` before serving.

    Raises :class:`ConfigurationError` naming the setting key, its ``TASKER_*`` variable and the
    fix (never a key or secret): auth enabled without any API key or JWT setting; more than one
    JWT setting; an API key shorter than 16 characters, repeated, or with an empty or repeated
    name; an unknown permission or malformed wildcard; an empty namespace; a ``jwt_public_key``
    that is not an RSA PEM public key; a ``jwt_jwks_url`` that is not http(s); a ``jwt_secret``
    shorter than 32 bytes while auth is enabled; an empty claim name.
    """

    def bad(key: str, problem: str) -> NoReturn:
        variable = "TASKER_" + key.partition("[")[0].upper().replace(".", "__")
        raise ConfigurationError(
            f"Invalid setting {key!r} for environment {env!r}: {problem}. Fix it in the "
            f"settings file or in the environment variable {variable}."
        )

    enabled = auth_enabled(auth, env)
    chosen = _jwt_settings_set(auth)
    if enabled and not auth.api_keys and not chosen:
        why = "is true" if auth.enabled else "is not set (on by default in production)"
        raise ConfigurationError(
            f"api.auth.enabled {why}, and environment {env!r} then requires credentials to "
            "check: set api.auth.api_keys (TASKER_API__AUTH__API_KEYS) or one of "
            "api.auth.jwt_secret / jwt_public_key / jwt_jwks_url (TASKER_API__AUTH__JWT_SECRET, "
            "...), or set TASKER_API__AUTH__ENABLED=false to run without auth (only behind "
            "another gateway that authenticates every request)."
        )
    if len(chosen) > 1:
        bad(
            f"api.auth.{chosen[1]}",
            f"is set together with api.auth.{chosen[0]}; keep only one: jwt_jwks_url for the "
            "keys your identity provider publishes (RS256), jwt_public_key for one PEM public "
            "key (RS256), jwt_secret for a secret shared with the token issuer (HS256)",
        )
    for index, key in enumerate(auth.api_keys):
        _check_api_key(index, key, auth.api_keys[:index], bad)
    _check_jwt_settings(auth, enabled, bad)


def _jwt_settings_set(auth: ApiAuthSettings) -> list[str]:
    values = (auth.jwt_secret, auth.jwt_public_key, auth.jwt_jwks_url)
    return [name for name, value in zip(_JWT_SETTINGS, values, strict=True) if value]


def _check_api_key(
    index: int, key: ApiKey, earlier: list[ApiKey], bad: Callable[[str, str], NoReturn]
) -> None:
    where = f"api.auth.api_keys[{index}]"
    if not key.name.strip():
        bad(f"{where}.name", "is empty; name every key (logs show the name, never the key)")
    if len(key.key) < _MIN_API_KEY_CHARS:
        bad(
            f"{where}.key",
            f"is shorter than {_MIN_API_KEY_CHARS} characters; use a random key, for example "
            "from: python -c 'import secrets; print(secrets.token_urlsafe(32))'",
        )
    for other, previous in enumerate(earlier):
        if previous.name == key.name:
            bad(f"{where}.name", f"repeats the name of api.auth.api_keys[{other}]; rename one")
        if previous.key == key.key:
            bad(f"{where}.key", f"repeats the key of api.auth.api_keys[{other}]; use another")
    for permission in key.permissions:
        problem = _permission_problem(permission)
        if problem is not None:
            bad(f"{where}.permissions", problem)
    if any(not namespace.strip() for namespace in key.namespaces or ()):
        bad(
            f"{where}.namespaces",
            "holds an empty namespace; name namespaces, or leave namespaces out for all",
        )


def _permission_problem(permission: str) -> str | None:
    """Why ``permission`` is not a permission string settings may grant (None when it is)."""
    if permission in PERMISSIONS or permission in _WILDCARDS:
        return None
    if "*" in permission:
        return (
            f"{permission!r} is a malformed wildcard; the wildcards are '*:*' (everything) and "
            f"'<resource>:*': {', '.join(_WILDCARDS[1:])}"
        )
    close = difflib.get_close_matches(permission, PERMISSIONS + _WILDCARDS, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    known = ", ".join(PERMISSIONS + _WILDCARDS)
    return f"{permission!r} is not a known permission; {hint}The known ones: {known}"


def _check_jwt_settings(
    auth: ApiAuthSettings, enabled: bool, bad: Callable[[str, str], NoReturn]
) -> None:
    if enabled and auth.jwt_secret and len(auth.jwt_secret.encode()) < _MIN_JWT_SECRET_BYTES:
        bad(
            "api.auth.jwt_secret",
            f"is shorter than {_MIN_JWT_SECRET_BYTES} bytes: HS256 needs a secret of at least "
            "256 bits; generate one with: python -c 'import secrets; print(secrets.token_hex(32))'",
        )
    if auth.jwt_public_key:
        problem = _public_key_problem(auth.jwt_public_key)
        if problem is not None:
            bad("api.auth.jwt_public_key", problem)
    if auth.jwt_jwks_url and not _is_http_url(auth.jwt_jwks_url):
        bad(
            "api.auth.jwt_jwks_url",
            "must be the http:// or https:// URL of a JWKS document, for example "
            "https://issuer.example/.well-known/jwks.json",
        )
    for name, claim in (
        ("permissions_claim", auth.permissions_claim),
        ("namespaces_claim", auth.namespaces_claim),
    ):
        if not claim.strip():
            bad(f"api.auth.{name}", "is empty; name the token claim to read")


def _public_key_problem(pem: str) -> str | None:
    try:
        key = load_pem_public_key(pem.encode())
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return (
            "is not a PEM public key that can be loaded; give the issuer's public key with its "
            "line breaks (-----BEGIN PUBLIC KEY----- ...), not a private key or a certificate"
        )
    if not isinstance(key, RSAPublicKey):
        return "is not an RSA public key; RS256 needs one"
    if key.key_size < _MIN_RSA_BITS:
        return f"is an RSA key of {key.key_size} bits; RS256 needs at least {_MIN_RSA_BITS}"
    return None


def _is_http_url(url: str) -> bool:
    try:
        parts = urlsplit(url)
        return parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:
        return False


class Authenticator:
    """Turns a request's credentials into a :class:`Principal`, with the ``api.auth`` settings.

    While authentication is off (:func:`auth_enabled`) every request is :data:`ANONYMOUS`; when
    it is on the settings are checked first (:func:`check_auth_settings` raises
    :class:`ConfigurationError`). Safe to share between threads.
    """

    def __init__(self, auth: ApiAuthSettings, env: str = "development") -> None:
        self.enabled = auth_enabled(auth, env)
        if self.enabled:
            check_auth_settings(auth, env)
        self._auth = auth
        self._keys = tuple((key.key.encode(), _key_principal(key)) for key in auth.api_keys)
        self._tokens = _TokenChecker(auth) if self.enabled and _jwt_settings_set(auth) else None

    def authenticate(self, *, api_key: str | None, authorization: str | None) -> Principal:
        """The principal of a request with these ``X-API-Key`` and ``Authorization`` values.

        The API key wins when both are given. ``Authorization`` must be ``Bearer <token>``; the
        token is one of the API keys or a JWT. Raises :class:`AuthenticationError` (missing,
        unknown or invalid credentials, a claim of the wrong type) or
        :class:`AuthUnavailableError` (the JWKS document cannot be fetched).
        """
        if not self.enabled:
            return ANONYMOUS
        if api_key and api_key.strip():
            principal = self._by_key(api_key.strip())
            if principal is None:
                raise AuthenticationError(
                    "Unknown API key (X-API-Key); check the key, or have it added to "
                    "api.auth.api_keys."
                )
            return principal
        if authorization and authorization.strip():
            token = _bearer_token(authorization)
            principal = self._by_key(token)
            if principal is not None:
                return principal
            if self._tokens is None:
                raise AuthenticationError(
                    "The bearer token is not a known API key, and this API accepts no JWTs "
                    "(none of api.auth.jwt_secret, jwt_public_key or jwt_jwks_url is set)."
                )
            return self._tokens.principal(token)
        raise AuthenticationError(
            "Missing credentials: send X-API-Key: <key> or Authorization: Bearer <JWT> "
            "(or Bearer <key>)."
        )

    def describe(self) -> dict[str, Any]:
        """What is configured, without secrets: ``{"enabled": bool, "api_keys": [names], "jwt":
        "HS256" | "RS256 (public key)" | "RS256 (JWKS)" | None}``."""
        chosen = _jwt_settings_set(self._auth)
        methods = {
            "jwt_secret": "HS256",
            "jwt_public_key": "RS256 (public key)",
            "jwt_jwks_url": "RS256 (JWKS)",
        }
        return {
            "enabled": self.enabled,
            "api_keys": [key.name for key in self._auth.api_keys],
            "jwt": methods[chosen[0]] if chosen else None,
        }

    def _by_key(self, candidate: str) -> Principal | None:
        """The principal of the API key equal to ``candidate``; every key is compared, in
        constant time, so the time taken does not tell which one matched."""
        given = candidate.encode()
        found = None
        for key, principal in self._keys:
            if hmac.compare_digest(given, key):
                found = principal
        return found


def _key_principal(key: ApiKey) -> Principal:
    return Principal(
        subject=key.name,
        permissions=frozenset(key.permissions),
        namespaces=frozenset(key.namespaces) if key.namespaces is not None else None,
    )


def _bearer_token(authorization: str) -> str:
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationError(
            "The Authorization header must be 'Bearer <token>', the token a JWT or an API key."
        )
    return token.strip()


class _TokenChecker:
    """Checks JWTs with the one method configured and reads their claims into principals."""

    def __init__(self, auth: ApiAuthSettings) -> None:
        self._auth = auth
        self._setting = f"api.auth.{_jwt_settings_set(auth)[0]}"
        self._algorithm = "HS256" if auth.jwt_secret else "RS256"
        self._key: Any = auth.jwt_secret or (
            load_pem_public_key(auth.jwt_public_key.encode()) if auth.jwt_public_key else None
        )
        self._jwks = (
            jwt.PyJWKClient(auth.jwt_jwks_url, lifespan=_JWKS_LIFESPAN_S, timeout=_JWKS_TIMEOUT_S)
            if auth.jwt_jwks_url
            else None
        )

    def principal(self, token: str) -> Principal:
        claims = self._claims(token)
        auth = self._auth
        permissions = _string_list(claims, auth.permissions_claim, spaced=True)
        namespaces = _string_list(claims, auth.namespaces_claim, spaced=False)
        subject = claims.get("sub") or "anonymous"
        if not isinstance(subject, str):
            raise AuthenticationError("Invalid token: claim 'sub' must be a string.")
        for claim, values in (
            ("sub", [subject]),
            (auth.permissions_claim, permissions or []),
            (auth.namespaces_claim, namespaces or []),
        ):
            if any(payload_problem(value) is not None for value in values):
                raise AuthenticationError(
                    f"Invalid token: claim {claim!r} holds text that cannot be stored (a NUL "
                    "character or a lone surrogate)."
                )
        return Principal(
            subject=subject,
            permissions=frozenset(permissions or ()),
            namespaces=None if namespaces is None else frozenset(namespaces),
        )

    def _claims(self, token: str) -> dict[str, Any]:
        key = self._key if self._jwks is None else self._jwks_key(self._jwks, token)
        auth = self._auth
        try:
            return jwt.decode(
                token,
                key,
                algorithms=[self._algorithm],
                audience=auth.jwt_audience or None,
                issuer=auth.jwt_issuer or None,
                leeway=auth.jwt_leeway_s,
                options={
                    "require": ["exp"],
                    "verify_aud": bool(auth.jwt_audience),
                    "enforce_minimum_key_length": True,
                },
            )
        except jwt.PyJWTError as exc:
            raise AuthenticationError(self._problem(exc)) from None

    def _jwks_key(self, client: jwt.PyJWKClient, token: str) -> Any:
        try:
            kid = jwt.get_unverified_header(token).get("kid")
        except jwt.PyJWTError as exc:
            raise AuthenticationError(self._problem(exc)) from None
        if not isinstance(kid, str) or not kid:
            raise AuthenticationError(
                "The token has no key id (kid header); the keys of api.auth.jwt_jwks_url are "
                "found by kid."
            )
        try:
            client.get_signing_keys()  # fetched, or cached for _JWKS_LIFESPAN_S
        except (jwt.PyJWTError, ValueError) as exc:  # ValueError: not JSON
            raise AuthUnavailableError(_jwks_problem(exc)) from exc
        try:
            return client.get_signing_key(kid).key
        except jwt.PyJWKClientConnectionError as exc:
            raise AuthUnavailableError(_jwks_problem(exc)) from exc
        except jwt.PyJWTError:
            raise AuthenticationError(
                "No key of the JWKS document at api.auth.jwt_jwks_url has the token's key id "
                "(kid); the token was issued by someone else, or with a key not published yet."
            ) from None

    def _problem(self, exc: jwt.PyJWTError) -> str:
        """What is wrong with a token, from PyJWT's exception (whose messages quote no token)."""
        problems: tuple[tuple[type[jwt.PyJWTError], str], ...] = (
            (jwt.ExpiredSignatureError, "the token has expired (exp); get a new one"),
            (
                jwt.ImmatureSignatureError,
                "the token is not valid yet (nbf or iat in the future); check the clocks",
            ),
            (
                jwt.InvalidAlgorithmError,
                f"the token's algorithm (alg) is refused; only {self._algorithm} is accepted",
            ),
            (
                jwt.InvalidSignatureError,
                f"bad signature: the token was not signed with the key of {self._setting}",
            ),
            (
                jwt.InvalidIssuerError,
                "wrong issuer (iss): tokens must come from api.auth.jwt_issuer",
            ),
            (
                jwt.InvalidAudienceError,
                "wrong audience (aud): tokens must be issued for api.auth.jwt_audience",
            ),
            (jwt.InvalidKeyError, f"the key of {self._setting} cannot check this token"),
        )
        for kind, problem in problems:
            if isinstance(exc, kind):
                return f"Invalid token: {problem}."
        if isinstance(exc, jwt.MissingRequiredClaimError):
            return f"Invalid token: it lacks the required claim {exc.claim!r}."
        if isinstance(exc, jwt.DecodeError):
            return f"Malformed token ({exc}): send a JWT (header.payload.signature) or an API key."
        return f"Invalid token: {exc}."


def _string_list(claims: dict[str, Any], claim: str, *, spaced: bool) -> list[str] | None:
    """Claim ``claim`` as a list of strings (None when absent); with ``spaced``, one string of
    space-separated values (OAuth ``scope``) too. Any other type is an AuthenticationError."""
    value = claims.get(claim)
    if value is None:
        return None
    if spaced and isinstance(value, str):
        return value.split()
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return value
    shape = "a list of strings" + (" or a space-separated string" if spaced else "")
    raise AuthenticationError(f"Invalid token: claim {claim!r} must be {shape}.")


def _jwks_problem(exc: Exception) -> str:
    cause = exc.__cause__
    if isinstance(cause, HTTPError):
        reason = f"HTTP {cause.code}"
    elif isinstance(cause, URLError):
        reason = str(cause.reason)
    elif isinstance(exc, jwt.PyJWKClientConnectionError):
        reason = "no answer"
    else:
        reason = "the answer is not a JWKS document with signing keys"
    return (
        f"The signing keys at api.auth.jwt_jwks_url cannot be fetched ({reason}), so tokens "
        "cannot be checked; check that the URL is right and reachable from this server."
    )
