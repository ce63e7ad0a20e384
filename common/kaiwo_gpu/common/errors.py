"""The one error tree of kaiwo-gpu.

Every error carries words a user can act on and the name of the gRPC status it maps to, so
servicers turn it into a status and the client turns a status back into the same class
without this module importing grpc.
"""

from __future__ import annotations

from collections.abc import Iterable

QUOTED_CHARS = 64
"""How much of an offending value a message quotes: enough to recognise it, never so much
that a 1 MB value makes a 1 MB status (which gRPC refuses, and clients then misread)."""
STATUS_MESSAGE_CHARS = 1024
"""The longest message a gRPC status carries from us; any longer is cut."""


def quoted(value: object) -> str:
    """`repr(value)` (so control characters are escaped), cut to its first and last few
    characters (QUOTED_CHARS in all: the end of a path is what names the file)."""
    text = repr(value)
    if len(text) <= QUOTED_CHARS:
        return text
    size = len(value) if isinstance(value, str | bytes) else len(text)
    tail = QUOTED_CHARS // 3
    return f"{text[: QUOTED_CHARS - tail]}...{text[-tail:]} ({size} characters)"


class KaiwoGpuError(Exception):
    """Base of every error kaiwo-gpu raises on purpose."""

    status_code: str = "UNKNOWN"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    @property
    def status_message(self) -> str:
        """The message as a gRPC status carries it, cut to STATUS_MESSAGE_CHARS."""
        if len(self.message) <= STATUS_MESSAGE_CHARS:
            return self.message
        return self.message[: STATUS_MESSAGE_CHARS - 3] + "..."


class InvalidArgumentError(KaiwoGpuError):
    """A field of a request is out of range or malformed; the message names field and range.

    A `value` of None is a field that was not given, and the message says "missing".
    """

    status_code = "INVALID_ARGUMENT"

    def __init__(self, field: str, value: object, allowed: str) -> None:
        found = "missing" if value is None else f"{quoted(value)} is not allowed"
        super().__init__(f"{field}: {found}; expected {allowed}")
        self.field = field
        self.value = value
        self.allowed = allowed


class NoCapacityError(KaiwoGpuError):
    """No GPU can take the request now; `reasons` says why, per constraint."""

    status_code = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, reasons: Iterable[tuple[str, int]] = ()) -> None:
        super().__init__(message)
        self.reasons = tuple(reasons)


class NotFoundError(KaiwoGpuError):
    status_code = "NOT_FOUND"


class AlreadyExistsError(KaiwoGpuError):
    status_code = "ALREADY_EXISTS"


class ConflictError(KaiwoGpuError):
    """Concurrent writers kept winning; the caller may retry with the same request_id."""

    status_code = "ABORTED"


class FailedPreconditionError(KaiwoGpuError):
    status_code = "FAILED_PRECONDITION"


class PermissionDeniedError(KaiwoGpuError):
    status_code = "PERMISSION_DENIED"


class UnauthenticatedError(KaiwoGpuError):
    status_code = "UNAUTHENTICATED"


class UnavailableError(KaiwoGpuError):
    """A dependency (etcd, the coordinator) cannot be reached; nothing was changed."""

    status_code = "UNAVAILABLE"


class DeadlineExceededError(KaiwoGpuError):
    status_code = "DEADLINE_EXCEEDED"


class InternalError(KaiwoGpuError):
    status_code = "INTERNAL"


_BY_STATUS: dict[str, type[KaiwoGpuError]] = {
    cls.status_code: cls
    for cls in (
        NoCapacityError,
        NotFoundError,
        AlreadyExistsError,
        ConflictError,
        FailedPreconditionError,
        PermissionDeniedError,
        UnauthenticatedError,
        UnavailableError,
        DeadlineExceededError,
        InternalError,
    )
}


class RemoteInvalidArgumentError(InvalidArgumentError):
    """An INVALID_ARGUMENT that came back over the wire: only the server's words are known."""

    def __init__(self, message: str) -> None:
        KaiwoGpuError.__init__(self, message)
        self.field = ""
        self.value = None
        self.allowed = ""


def error_from_status(status_code: str, message: str) -> KaiwoGpuError:
    """Turns a gRPC status name and message back into the matching error class."""
    if status_code == InvalidArgumentError.status_code:
        return RemoteInvalidArgumentError(message)
    cls = _BY_STATUS.get(status_code)
    if cls is None:
        error = KaiwoGpuError(message)
        error.status_code = status_code
        return error
    return cls(message)


REFUSAL_STATUSES = frozenset({"PERMISSION_DENIED", "UNAUTHENTICATED"})


TLS_FAILURE_SIGNS = ("handshake", "tsi_", "ssl", "certificate")
"""How grpc's words for a refused TLS session start (they vary with which side gives up)."""
CLOSED_ON_CONNECT = "socket closed"
"""What grpc reports when the server ends the connection as it opens: a TLS server that got
plaintext, or a mutual-TLS server that got no client certificate."""
TLS_HINT = (
    "if the coordinator serves TLS, give --tls-ca (KAIWO_GPU_TLS_CA), and with mutual TLS "
    "--tls-cert and --tls-key from the CA it trusts"
)


def is_tls_refusal(detail: str) -> bool:
    """Whether a transport failure reads like a TLS session the other end refused."""
    lowered = detail.lower()
    return any(sign in lowered for sign in TLS_FAILURE_SIGNS)


def described(error: KaiwoGpuError) -> str:
    """The message for a person: a refusal leads with its status, so who reads it (or
    greps a job's log) sees the coordinator said no to the caller, not that it failed. A
    connection closed or refused at the TLS handshake says which flags to check."""
    if error.status_code in REFUSAL_STATUSES:
        return f"{error.status_code}: {error.message}"
    if error.status_code == "UNAVAILABLE" and (
        CLOSED_ON_CONNECT in error.message.lower() or is_tls_refusal(error.message)
    ):
        return f"{error.message} ({TLS_HINT})"
    return error.message
