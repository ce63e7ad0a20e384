"""The coordinator's startup, liveness and readiness probe: one gRPC health check over the
pod's own mutual TLS, since the kubelet's `grpc:` probe dials plaintext and shows no client
certificate, which a coordinator that requires client certificates refuses.

    python health_probe.py ADDRESS SERVER_NAME [SERVICE]

exits 0 when SERVICE (default "", the whole server) is SERVING, 1 otherwise, saying why.
It presents the coordinator's own certificate ($KAIWO_GPU_TLS_CERT and _KEY, whose
extended key usage must allow client auth) and checks the server's against $KAIWO_GPU_TLS_CA
under SERVER_NAME, the name agents dial, which the certificate must carry.
"""

from __future__ import annotations

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

TIMEOUT_S = 3.0


def _read(variable: str) -> bytes:
    with open(os.environ[variable], "rb") as handle:
        return handle.read()


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print(__doc__, file=sys.stderr)
        return 2
    address, server_name = argv[:2]
    service = argv[2] if len(argv) == 3 else ""
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read("KAIWO_GPU_TLS_CA"),
        private_key=_read("KAIWO_GPU_TLS_KEY"),
        certificate_chain=_read("KAIWO_GPU_TLS_CERT"),
    )
    options = [("grpc.ssl_target_name_override", server_name)]
    with grpc.secure_channel(address, credentials, options=options) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT_S
            )
        except grpc.RpcError as error:
            print(f"{address}: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{service or 'server'} at {address}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
