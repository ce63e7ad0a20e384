"""`kaiwo-gpu coordinator` and `kaiwo-gpu agent`: the commands that run a service each.

Flags fall back to KAIWO_GPU_* environment variables, so a systemd unit or a container can
configure the coordinator either way; the settings are built once here and passed down.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from kaiwo_gpu.agent.service import BACKEND_CHOICES, AgentSettings, NodeAgent, run_until_signalled
from kaiwo_gpu.agent.service import ENVIRONMENT as AGENT_ENVIRONMENT
from kaiwo_gpu.cli import flags
from kaiwo_gpu.common import credentials, tracing
from kaiwo_gpu.common.errors import FailedPreconditionError, KaiwoGpuError
from kaiwo_gpu.common.gpu_models import GPU_MODELS
from kaiwo_gpu.common.logs import configure_logging
from kaiwo_gpu.common.units import parse_memory_mib
from kaiwo_gpu.coordinator.placement.strategies import BUILTIN_STRATEGIES, DEFAULT_STRATEGY
from kaiwo_gpu.coordinator.server import serve
from kaiwo_gpu.coordinator.settings import (
    DEFAULT_ETCD,
    DEFAULT_LISTEN,
    ENVIRONMENT,
    CoordinatorSettings,
)
from kaiwo_gpu.coordinator.state.etcd_security import EtcdSecurity, check_endpoints
from kaiwo_gpu.coordinator.state.keys import DEFAULT_PREFIX

if TYPE_CHECKING:
    Subcommands = argparse._SubParsersAction[argparse.ArgumentParser]


def add_service_flags(parser: argparse.ArgumentParser) -> None:
    flags.env_flag(
        parser, "--listen", "host:port to serve on", default=DEFAULT_LISTEN, parse=flags.address
    )
    flags.env_flag(
        parser,
        "--strategy",
        f"default placement strategy: {', '.join(sorted(BUILTIN_STRATEGIES))}",
        default=DEFAULT_STRATEGY,
        # A coordinator's own default must be one of the strategies it runs.
        parse=flags.one_of("strategy", BUILTIN_STRATEGIES),
    )
    flags.env_flag(
        parser,
        "--default-ttl",
        "lease for requests without ttl_seconds, e.g. 90s or 10m; 0 = no lease",
        default="0",
        parse=flags.duration,
    )
    flags.env_flag(
        parser,
        "--log-format",
        "console for people, json for log collectors",
        default="console",
        parse=flags.log_format,
    )


def _metrics_flag(
    parser: argparse.ArgumentParser, environment: Mapping[str, str] = ENVIRONMENT
) -> None:
    flags.env_flag(
        parser,
        "--metrics-listen",
        "host:port to serve Prometheus /metrics on, e.g. 0.0.0.0:9400 (default: none)",
        parse=flags.address,
        environment=environment,
    )


def add_security_flags(parser: argparse.ArgumentParser) -> None:
    security = parser.add_argument_group(
        "security", "TLS on the gRPC port, and who may call (off without --tls-ca or --tokens)"
    )
    flags.add_credential_flags(security, serving=True)
    flags.env_flag(
        security,
        "--tokens",
        "file of 'SHA256-HEX NAME ROLE' lines: the bearer tokens accepted and whom they "
        "stand for (re-read when it changes)",
        parse=Path,
    )
    variable = ENVIRONMENT["insecure"]
    security.add_argument(
        "--insecure",
        action="store_true",
        default=os.environ.get(variable, "").strip().lower() in {"1", "true", "yes"},
        help="serve plaintext beyond loopback (refused without it; for networks you trust) "
        f"(${variable}=1)",
    )


def add_coordinator_parser(commands: Subcommands) -> None:
    parser = commands.add_parser(
        "coordinator",
        help="serve the allocation API, keeping state in etcd",
        description="Serves Allocate, Release, KeepAlive, Get, List, Watch, ListNodes, "
        "GetClusterStats and RemoveNode over gRPC, with gRPC health and reflection, keeping "
        "allocations in etcd. Several coordinators may share one etcd and never over-commit a GPU. "
        "SIGTERM stops it gracefully. Each flag can also come from the environment "
        "variable named in its help.",
        epilog="example: kaiwo-gpu coordinator --etcd 10.0.0.5:2379,10.0.0.6:2379 "
        "--inventory /etc/kaiwo-gpu/nodes.yaml --default-ttl 10m",
    )
    flags.env_flag(
        parser,
        "--etcd",
        "comma-separated etcd endpoints",
        default=DEFAULT_ETCD,
        parse=flags.endpoints,
    )
    flags.env_flag(
        parser, "--prefix", "etcd key prefix", default=DEFAULT_PREFIX, parse=flags.prefix
    )
    flags.env_flag(parser, "--inventory", "YAML file of static nodes to register")
    flags.env_flag(
        parser,
        "--node-ttl",
        "how long an agent's node stays schedulable after its coordinator last heard of it",
        default="15s",
        parse=flags.node_ttl,
    )
    flags.env_flag(
        parser,
        "--sample-interval",
        "the telemetry interval agents are asked for, e.g. 1s or 500ms",
        default="1s",
        parse=flags.interval_ms,
    )
    flags.env_flag(
        parser,
        "--etcd-quota",
        "etcd's --quota-backend-bytes, e.g. 8Gi: the coordinator warns at 80%% of it",
        default="2Gi",
        parse=flags.checked(lambda text: parse_memory_mib(text, "--etcd-quota") * 2**20),
    )
    etcd_security = parser.add_argument_group(
        "etcd security", "TLS to etcd (with --etcd-ca) and etcd's user/password authentication"
    )
    for flag, text in {
        "--etcd-ca": "CA of etcd's certificate: TLS to etcd (host:port endpoints dial https)",
        "--etcd-cert": "client certificate to show etcd (its --client-cert-auth)",
        "--etcd-key": "private key of --etcd-cert",
        "--etcd-password-file": "file holding the password of --etcd-user (or give "
        f"${ENVIRONMENT['etcd_password']}; never a flag)",
    }.items():
        flags.env_flag(
            etcd_security, flag, text, parse=lambda value: Path(value) if value else None
        )
    flags.env_flag(etcd_security, "--etcd-user", "etcd user to authenticate as")
    parser.set_defaults(usage_error=parser.error)
    flags.env_flag(
        parser,
        "--expire-agentless-nodes",
        "remove an agent-registered node whose agent has been gone this long (and that "
        "holds no allocation), e.g. 7d; 0 = never",
        default="0",
        parse=flags.duration,
    )
    _metrics_flag(parser)
    add_security_flags(parser)
    parser.add_argument(
        "--etcd-wait",
        type=flags.seconds,
        default=30.0,
        help="seconds to wait for etcd at startup before giving up (default %(default)s)",
    )
    add_service_flags(parser)


def _etcd_security(args: argparse.Namespace) -> EtcdSecurity | None:
    """The etcd flags as settings; a bad combination is a usage error (exit 2)."""
    try:
        password = os.environ.get(ENVIRONMENT["etcd_password"]) or None
        if args.etcd_password_file is not None:
            if password is not None:
                raise FailedPreconditionError(
                    f"give the etcd password once: --etcd-password-file or "
                    f"${ENVIRONMENT['etcd_password']}, not both"
                )
            password = _read_password(args.etcd_password_file)
        security = EtcdSecurity(
            ca=args.etcd_ca,
            cert=args.etcd_cert,
            key=args.etcd_key,
            user=args.etcd_user or None,
            password=password,
        )
        check_endpoints(args.etcd, security)
        return security if security != EtcdSecurity() else None
    except KaiwoGpuError as error:
        args.usage_error(error.message)  # exits 2
        raise


def _read_password(path: Path) -> str:
    """The first line of a password file (a trailing newline is not the password's)."""
    data = credentials.read(path, "--etcd-password-file") or b""
    password = data.decode("utf-8", "replace").split("\n", 1)[0].rstrip("\r")
    if not password:
        raise FailedPreconditionError(f"--etcd-password-file {str(path)!r} is empty")
    return password


def run_coordinator(args: argparse.Namespace) -> None:
    etcd_security = _etcd_security(args)  # before logging is set up: a usage error exits
    configure_logging(args.log_format)
    tracing.configure(tracing.COORDINATOR_SERVICE)
    settings = CoordinatorSettings(
        listen=args.listen,
        etcd_endpoints=args.etcd,
        prefix=args.prefix,
        default_strategy=args.strategy,
        default_ttl_s=args.default_ttl or None,
        inventory=Path(args.inventory) if args.inventory else None,
        startup_wait_s=args.etcd_wait,
        node_ttl_s=args.node_ttl,
        sample_interval_ms=args.sample_interval,
        etcd_quota_bytes=args.etcd_quota,
        etcd_security=etcd_security,
        agentless_node_expiry_s=args.expire_agentless_nodes or None,
        metrics_listen=args.metrics_listen or None,
        tls=flags.credentials_of(args),
        tokens=args.tokens,
        insecure=args.insecure,
    )
    try:
        serve(settings)  # on uvloop's loop: less CPU per allocation (docs/performance.md)
    finally:
        tracing.shutdown()


def add_agent_parser(commands: Subcommands) -> None:
    parser = commands.add_parser(
        "agent",
        help="run the node agent: sample this node's GPUs and stream them to a coordinator",
        description="Discovers this node's GPUs through amdsmi (or a simulated backend), "
        "registers them with a coordinator and streams one telemetry batch per interval, "
        "with each GPU's health. Reconnects to the next coordinator address with jittered "
        "backoff. While it is connected the node is schedulable. Each flag can also come "
        "from the environment variable named in its help.",
        epilog="examples:\n  kaiwo-gpu agent --coordinator 10.0.0.2:50051,10.0.0.3:50051\n"
        "  kaiwo-gpu agent --backend simulated --node sim-0 --model MI250X --gpus 8",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    flag = functools.partial(flags.env_flag, parser, environment=AGENT_ENVIRONMENT)
    flag("--node", "this node's name", default=flags.default_node_name(), parse=flags.node_name)
    flag(
        "--coordinator",
        "comma-separated coordinator addresses, tried in turn",
        default=DEFAULT_LISTEN,
        parse=flags.addresses,
    )
    flag(
        "--backend",
        "auto (amdsmi, failing when it cannot load), amdsmi or simulated",
        default="auto",
        parse=flags.one_of("backend", BACKEND_CHOICES),
    )
    flag(
        "--interval",
        "sampling interval until the coordinator sets one",
        default="1s",
        parse=flags.interval_ms,
    )
    flag("--labels", "node labels, k=v,k=v", default="", parse=flags.labels)
    flag("--log-format", "console or json", default="console", parse=flags.log_format)
    _metrics_flag(parser, AGENT_ENVIRONMENT)
    flags.add_credential_flags(
        parser.add_argument_group(
            "security",
            "TLS to the coordinator; its certificate (URI SAN kaiwo-gpu://agent/NODE) or "
            "token proves the node",
        )
    )
    simulated = parser.add_argument_group("simulated backend")
    simulated.add_argument("--model", choices=sorted(GPU_MODELS), default="MI300X")
    simulated.add_argument("--gpus", type=flags.gpu_count, default=8, help="GPUs on the node")
    simulated.add_argument(
        "--faults",
        type=Path,
        help="YAML file of injected faults, e.g. '0: overheat' (overheat, ecc, vanish, "
        "none); re-read when it changes",
    )
    simulated.add_argument("--seed", type=int, default=0)


def run_agent(args: argparse.Namespace) -> None:
    configure_logging(args.log_format)
    tracing.configure(tracing.AGENT_SERVICE)
    settings = AgentSettings(
        node=args.node,
        coordinators=args.coordinator,
        backend=args.backend,
        interval_ms=args.interval,
        labels=args.labels,
        simulated_model=args.model,
        simulated_gpus=args.gpus,
        faults_file=args.faults,
        seed=args.seed,
        metrics_listen=args.metrics_listen or None,
        credentials=flags.credentials_of(args),
    )
    agent = NodeAgent(settings)  # fails here, with the reason, when the backend cannot run
    try:
        asyncio.run(run_until_signalled(agent))
    finally:
        tracing.shutdown()
