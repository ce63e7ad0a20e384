"""Channels to a coordinator, plaintext or TLS by the caller's credentials: one home for
the clients and the agent's uplink (the one module of `common` that imports grpc)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc

from kaiwo_gpu.common import credentials
from kaiwo_gpu.common.credentials import Credentials

Options = Sequence[tuple[str, Any]]


def channel_credentials(held: Credentials) -> grpc.ChannelCredentials | None:
    """TLS that checks the coordinator against the CA (the system's roots without one) and
    presents the client's certificate when it has one; None for plaintext."""
    if not held.tls:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=credentials.read(held.tls_ca, "--tls-ca"),
        private_key=credentials.read(held.tls_key, "--tls-key"),
        certificate_chain=credentials.read(held.tls_cert, "--tls-cert"),
    )


def open_channel(target: str, held: Credentials, options: Options) -> grpc.Channel:
    secure = channel_credentials(held)
    if secure is None:
        return grpc.insecure_channel(target, options=options)
    return grpc.secure_channel(
        target, secure, options=[*options, *credentials.tls_name_options(target)]
    )


def open_aio_channel(target: str, held: Credentials, options: Options) -> grpc.aio.Channel:
    secure = channel_credentials(held)
    if secure is None:
        return grpc.aio.insecure_channel(target, options=options)
    return grpc.aio.secure_channel(
        target, secure, options=[*options, *credentials.tls_name_options(target)]
    )
