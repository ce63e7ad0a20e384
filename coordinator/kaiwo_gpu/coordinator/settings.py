"""The coordinator's settings: one frozen value built in the entry point, then passed down."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from kaiwo_gpu.common import credentials
from kaiwo_gpu.common.credentials import Credentials
from kaiwo_gpu.coordinator.placement.strategies import DEFAULT_STRATEGY
from kaiwo_gpu.coordinator.state.etcd_security import EtcdSecurity
from kaiwo_gpu.coordinator.state.keys import DEFAULT_PREFIX

DEFAULT_LISTEN = "127.0.0.1:50051"
DEFAULT_ETCD = "127.0.0.1:2379"

ENVIRONMENT = {
    "listen": "KAIWO_GPU_LISTEN",
    "etcd": "KAIWO_GPU_ETCD_ENDPOINTS",
    "prefix": "KAIWO_GPU_ETCD_PREFIX",
    "strategy": "KAIWO_GPU_DEFAULT_STRATEGY",
    "default_ttl": "KAIWO_GPU_DEFAULT_TTL",
    "inventory": "KAIWO_GPU_INVENTORY",
    "log_format": "KAIWO_GPU_LOG_FORMAT",
    "node_ttl": "KAIWO_GPU_NODE_TTL",
    "sample_interval": "KAIWO_GPU_SAMPLE_INTERVAL",
    "etcd_quota": "KAIWO_GPU_ETCD_QUOTA",
    "etcd_ca": "KAIWO_GPU_ETCD_CA",
    "etcd_cert": "KAIWO_GPU_ETCD_CERT",
    "etcd_key": "KAIWO_GPU_ETCD_KEY",
    "etcd_user": "KAIWO_GPU_ETCD_USER",
    "etcd_password_file": "KAIWO_GPU_ETCD_PASSWORD_FILE",
    "etcd_password": "KAIWO_GPU_ETCD_PASSWORD",  # no flag: `ps` would show it
    "expire_agentless_nodes": "KAIWO_GPU_EXPIRE_AGENTLESS_NODES",
    "metrics_listen": "KAIWO_GPU_METRICS_LISTEN",
    **credentials.VARIABLES,
    "tokens": "KAIWO_GPU_TOKENS",
    "insecure": "KAIWO_GPU_INSECURE",
}
"""Flag destination -> environment variable that supplies its default."""


@dataclass(frozen=True, slots=True)
class CoordinatorSettings:
    listen: str = DEFAULT_LISTEN
    etcd_endpoints: tuple[str, ...] = (DEFAULT_ETCD,)
    prefix: str = DEFAULT_PREFIX
    default_strategy: str = DEFAULT_STRATEGY
    default_ttl_s: int | None = None
    inventory: Path | None = None
    etcd_timeout_s: float = 5.0
    startup_wait_s: float = 30.0
    shutdown_grace_s: float = 5.0
    node_ttl_s: int = 15
    """An agent's node stays schedulable this long after its coordinator last heard of it."""
    sample_interval_ms: int = 1000
    """The telemetry interval the coordinator asks its agents for."""
    etcd_security: EtcdSecurity | None = None
    """TLS to etcd and its user/password (None: plaintext, no etcd user)."""
    etcd_quota_bytes: int = 2 * 1024**3
    """etcd's --quota-backend-bytes (etcd's default is 2 GiB): the coordinator warns when
    the database reaches 80% of it."""
    space_check_s: float = 30.0
    """How often the coordinator reads etcd's database size."""
    agentless_node_expiry_s: int | None = None
    """Remove an agent-registered node that has had no agent this long (None: never)."""
    metrics_listen: str | None = None
    """host:port to serve Prometheus /metrics on (None: no metrics server)."""
    tls: Credentials = field(default_factory=Credentials)
    """The certificate and key the gRPC port serves with, and the CA that client
    certificates must come from (`token_file` is not read: clients send tokens)."""
    tokens: Path | None = None
    """The file of bearer-token digests and the identities they stand for."""
    insecure: bool = False
    """Serve plaintext beyond loopback (a warning at start; refused without it)."""
