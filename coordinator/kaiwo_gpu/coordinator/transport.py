"""How the coordinator's gRPC port is secured: TLS from its certificate files (read again
when they change, so a renewed certificate serves without a restart), client certificates
required when it has a CA, and plaintext only where it cannot leave the machine."""

from __future__ import annotations

import threading

import grpc
import structlog

from kaiwo_gpu.common import credentials, pki
from kaiwo_gpu.common.credentials import Credentials
from kaiwo_gpu.common.errors import FailedPreconditionError

log = structlog.get_logger(__name__)


def check_plaintext(listen: str, insecure: bool) -> None:
    """Refuses to serve plaintext beyond loopback unless the operator said --insecure."""
    if credentials.is_loopback(listen):
        return
    if not insecure:
        raise FailedPreconditionError(
            f"refusing to serve plaintext on {listen}: give --tls-cert and --tls-key (and "
            "--tls-ca to require client certificates; `kaiwo-gpu certs` makes them), listen "
            "on 127.0.0.1 or a unix: socket, or pass --insecure on a network you trust"
        )
    log.warning(
        "serving plaintext beyond loopback (--insecure): anyone who can reach the port "
        "can read and change every allocation",
        listen=listen,
    )


class ServingCertificates:
    """The certificate, key and client CA the port serves with, read again on the first
    handshake after any of the files changed. A set that does not load (a rotation caught
    between writing the key and the certificate) is logged and the previous one kept."""

    def __init__(self, files: Credentials) -> None:
        if files.tls_cert is None or files.tls_key is None:
            raise FailedPreconditionError(
                "--tls-ca needs --tls-cert and --tls-key: the coordinator's own certificate"
            )
        self.files = files
        self._lock = threading.Lock()
        self._stamp = self._current_stamp()
        self.loaded = self._load()  # a bad set at start stops the coordinator here
        self.reloads = 0

    def _current_stamp(self) -> credentials.FileStamp:
        return credentials.stamp(self.files.tls_cert, self.files.tls_key, self.files.tls_ca)

    def _load(self) -> grpc.ServerCertificateConfiguration:
        certificate = credentials.read(self.files.tls_cert, "--tls-cert")
        key = credentials.read(self.files.tls_key, "--tls-key")
        ca = credentials.read(self.files.tls_ca, "--tls-ca")
        assert certificate is not None
        assert key is not None
        problem = pki.pair_problem(certificate, key)
        if problem is not None:
            raise FailedPreconditionError(
                f"--tls-cert {str(self.files.tls_cert)!r} and --tls-key "
                f"{str(self.files.tls_key)!r}: {problem}"
            )
        ca_problem = None if ca is None else pki.ca_problem(ca)
        if ca_problem is not None:
            raise FailedPreconditionError(f"--tls-ca {str(self.files.tls_ca)!r}: {ca_problem}")
        return grpc.ssl_server_certificate_configuration([(key, certificate)], ca)

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC asks before each handshake: None keeps what it has."""
        with self._lock:
            now = self._current_stamp()
            if now == self._stamp:
                return None
            self._stamp = now
            try:
                self.loaded = self._load()
            except FailedPreconditionError as error:
                log.error(
                    "new TLS files not loaded; serving the previous ones", error=error.message
                )
                return None
            self.reloads += 1
            log.info("TLS files read again", certificate=str(self.files.tls_cert))
            return self.loaded

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self.loaded,
            self._fetch,  # type: ignore[arg-type]  # gRPC documents None as "no change"
            require_client_authentication=self.files.tls_ca is not None,
        )
