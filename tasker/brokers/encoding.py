"""Store Dramatiq messages in PGMQ's jsonb columns without ever changing them.

With Dramatiq's default JSON encoder the message is stored as a jsonb object, so it can be read and
queried in SQL. jsonb cannot hold everything JSON can say exactly: it rejects ``NaN``, ``Infinity``,
``\\u0000`` and lone surrogates, turns ``-0.0`` into ``0`` and prints ``1e16`` as an integer. Such
messages, and every message of a non-JSON encoder (pickle, msgpack), are stored instead as an
envelope ``{"data": "<encoder output>"}``, text or base64, and decoded by that encoder. Either way
the message reads back exactly as it was sent.
"""

from __future__ import annotations

import base64
import json
import math
from dataclasses import dataclass
from typing import Any

import dramatiq
from dramatiq.encoder import JSONEncoder
from dramatiq.message import Message

from tasker.exceptions import PayloadError

__all__ = ["EncodedMessage", "decode_message", "encode_message", "headers_json"]

FORMAT_VERSION = 1


@dataclass(frozen=True)
class EncodedMessage:
    """A message as the text of its ``message`` and ``headers`` jsonb columns."""

    payload: str
    headers: str


def encode_message(message: Message[Any], **extra_headers: Any) -> EncodedMessage:
    """Encode ``message`` for a PGMQ row; extra headers (error details) are added as given."""
    fields = message.asdict()
    encoder = dramatiq.get_encoder()
    if type(encoder) is JSONEncoder and _jsonb_exact(fields):
        try:
            payload = json.dumps(fields, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise _unserialisable(message, exc) from exc
        return EncodedMessage(payload, headers_json(message, "json", **extra_headers))
    try:
        data = encoder.encode(fields)
    except (TypeError, ValueError) as exc:
        raise _unserialisable(message, exc) from exc
    try:
        text = data.decode("utf-8")
        if "\x00" in text:
            raise UnicodeError("NUL byte")
        envelope, kind = {"data": text}, "text"
    except UnicodeError:
        envelope, kind = {"data": base64.b64encode(data).decode("ascii")}, "base64"
    return EncodedMessage(json.dumps(envelope), headers_json(message, kind, **extra_headers))


def headers_json(message: Message[Any], kind: str, **extra: Any) -> str:
    """The ``headers`` column: who the message is for and how its payload is encoded."""
    headers = {
        "actor": message.actor_name,
        "message_id": message.message_id,
        "enc": kind,
        "v": FORMAT_VERSION,
        **extra,
    }
    return json.dumps(headers, default=str)


def decode_message(payload: str, headers: dict[str, Any]) -> Message[Any]:
    """Rebuild the Dramatiq message of a PGMQ row; raise :class:`PayloadError` if impossible."""
    try:
        kind = headers.get("enc", "json")
        document = json.loads(payload)
        if kind == "json":
            fields = document
        elif kind == "text":
            fields = dramatiq.get_encoder().decode(document["data"].encode("utf-8"))
        elif kind == "base64":
            fields = dramatiq.get_encoder().decode(base64.b64decode(document["data"]))
        else:
            raise ValueError(f"unknown payload encoding {kind!r}")
        fields["args"] = tuple(fields["args"])
        return Message(**fields)
    except Exception as exc:
        raise PayloadError(f"Cannot decode message payload: {exc}") from exc


def _jsonb_exact(value: Any) -> bool:
    """True when jsonb stores ``value`` so that it reads back identical."""
    if isinstance(value, str):
        return _text_ok(value)
    if isinstance(value, bool) or value is None or isinstance(value, int):
        return True
    if isinstance(value, float):
        return math.isfinite(value) and "e" not in repr(value) and math.copysign(1, value) > 0
    if isinstance(value, dict):
        return all(_text_ok(str(k)) and _jsonb_exact(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(_jsonb_exact(v) for v in value)
    return True  # not JSON at all: json.dumps raises the usual TypeError


def _text_ok(text: str) -> bool:
    if "\x00" in text:
        return False
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates
        return False
    return True


def _unserialisable(message: Message[Any], exc: Exception) -> PayloadError:
    return PayloadError(
        f"Message for actor {message.actor_name!r} cannot be encoded ({exc}); pass JSON-"
        "serialisable arguments (str, int, float, bool, None, list, dict) or set a custom "
        "dramatiq encoder with dramatiq.set_encoder()."
    )
