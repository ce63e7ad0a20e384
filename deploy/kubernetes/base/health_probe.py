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

from kaiwo_gpu.common import channels, credentials
from kaiwo_gpu.common.errors import KaiwoGpuError

TIMEOUT_S = 3.0


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print(__doc__, file=sys.stderr)
        return 2
    address, server_name = argv[:2]
    service = argv[2] if len(argv) == 3 else ""
    held = credentials.from_environment(os.environ)  # the variables every process reads
    if not (held.tls_ca and held.tls_cert and held.tls_key):
        names = ", ".join(credentials.VARIABLES[n] for n in ("tls_ca", "tls_cert", "tls_key"))
        print(f"the probe needs mutual TLS: set {names}", file=sys.stderr)
        return 2
    options = [("grpc.ssl_target_name_override", server_name)]
    try:
        with channels.open_channel(address, held, options) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT_S
            )
    except KaiwoGpuError as error:  # a credential file that cannot be read
        print(error.message, file=sys.stderr)
        return 1
    except grpc.RpcError as error:
        print(f"{address}: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{service or 'server'} at {address}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
