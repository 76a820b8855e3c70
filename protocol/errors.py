"""Errors of the wavecast protocol (PROTOCOL.md §6).

Every error has a stable string ``code`` that travels on the wire; errors that
end the connection also carry a WebSocket close ``close_code``.

Hierarchy::

    WavecastError
    ├── ClientError                 the peer sent something wrong
    │   ├── BadFrame                undecodable msgpack / JSON, not a map
    │   ├── UnknownType             ``type`` is not a known message
    │   ├── InvalidField            a field has the wrong type or is out of range
    │   ├── UnknownModel            ``model`` is not served here
    │   ├── Unsupported             the model cannot do what was asked
    │   ├── DuplicateId             ``id`` is already in flight on this connection
    │   ├── UnknownId               ``cancel`` names no request in flight
    │   ├── TooManyRequests         per-connection in-flight limit reached
    │   └── SlowConsumer            the client does not read fast enough (closes, 1008)
    └── ServerError                 the server failed or is saturated
        ├── Busy                    the request queue is full; try again later
        ├── ShuttingDown            the server is going away (closes, 1001)
        └── InternalError           a model or server fault; details only in the log

Oversized frames are refused by the WebSocket layer itself with close code 1009.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "BadFrame",
    "Busy",
    "ClientError",
    "DuplicateId",
    "InternalError",
    "InvalidField",
    "ServerError",
    "ShuttingDown",
    "SlowConsumer",
    "TextTimeout",
    "TooManyRequests",
    "UnknownId",
    "UnknownModel",
    "UnknownType",
    "Unsupported",
    "WavecastError",
    "error_class",
]

# WebSocket close codes (RFC 6455 §7.4.1) used by wavecast.
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY_VIOLATION = 1008
CLOSE_MESSAGE_TOO_BIG = 1009
CLOSE_INTERNAL_ERROR = 1011
CLOSE_SERVICE_RESTART = 1012


class WavecastError(Exception):
    """Base class of every protocol error.

    Args:
        message: Human-readable explanation, safe to show to the peer.
        field: Dotted name of the offending field, when one is at fault.
        id: The request id the error belongs to, when known.

    Attributes:
        message_type: The ``type`` of the frame at fault, when it could be read.
    """

    code: ClassVar[str] = "error"
    close_code: ClassVar[int | None] = None

    def __init__(self, message: str, *, field: str | None = None, id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.id = id
        self.message_type: str | None = None


class ClientError(WavecastError):
    """The peer sent something wrong; the connection stays open unless noted."""

    code = "client_error"


class BadFrame(ClientError):
    """The frame is not valid msgpack / JSON, or does not hold a map."""

    code = "bad_frame"


class UnknownType(ClientError):
    """The message ``type`` is missing or unknown."""

    code = "unknown_type"


class InvalidField(ClientError):
    """A field is missing, of the wrong type, or out of range."""

    code = "invalid_field"


class UnknownModel(ClientError):
    """The requested model is not served by this server."""

    code = "unknown_model"


class Unsupported(ClientError):
    """The model does not support what the request asks for."""

    code = "unsupported"


class DuplicateId(ClientError):
    """A request with this id is already in flight on the connection."""

    code = "duplicate_id"


class UnknownId(ClientError):
    """A ``cancel`` names an id that is not in flight."""

    code = "unknown_id"


class TooManyRequests(ClientError):
    """The connection already has the maximum number of requests in flight."""

    code = "too_many_requests"


class TextTimeout(ClientError):
    """A request opened with ``text_stream`` waited too long for its next text."""

    code = "text_timeout"


class SlowConsumer(ClientError):
    """The client does not read audio as fast as it is produced."""

    code = "slow_consumer"
    close_code = CLOSE_POLICY_VIOLATION


class ServerError(WavecastError):
    """The server failed, or cannot take the work now."""

    code = "server_error"


class Busy(ServerError):
    """The request queue is full, or the device has no memory for this request now;
    retry later."""

    code = "busy"


class ShuttingDown(ServerError):
    """The server is shutting down."""

    code = "shutting_down"
    close_code = CLOSE_GOING_AWAY


class InternalError(ServerError):
    """Something failed inside the server; the log has the details."""

    code = "internal_error"


_BY_CODE: dict[str, type[WavecastError]] = {
    cls.code: cls
    for cls in (
        BadFrame,
        UnknownType,
        InvalidField,
        UnknownModel,
        Unsupported,
        DuplicateId,
        UnknownId,
        TooManyRequests,
        TextTimeout,
        SlowConsumer,
        Busy,
        ShuttingDown,
        InternalError,
    )
}

ERROR_CODES: frozenset[str] = frozenset(_BY_CODE)


def error_class(code: str) -> type[WavecastError]:
    """Return the error class for a wire ``code`` (``WavecastError`` if unknown)."""
    return _BY_CODE.get(code, WavecastError)
