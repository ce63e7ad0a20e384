"""Allocate over mutual TLS beside plaintext, in the same run: round trip, throughput and the
cost of a new connection, with the ratios mTLS / plaintext.

A throwaway etcd (fsync on, temp data dir, 127.0.0.1) and two `kaiwo-gpu coordinator`
subprocesses on it, each under its own key prefix with the same synthetic inventory, sized
so it never fills: one serving plaintext, one mutual TLS (`--tls-ca --tls-cert --tls-key`
from a throwaway CA; client certificates required, each call's caller read from its
certificate). The client holds a certificate for the scheduler `bench`, which may name the
owner `bench/...`, so both coordinators get the same requests and write the same records.
Every channel has a connection of its own (gRPC would otherwise share one among the
channels to an address). The calls are the allocate suite's. Each round runs every phase
for plaintext and mTLS in turn, which goes first alternating by round, so machine noise
and etcd's growth hit both:

1. sequential Allocate over one warm connection (a new request_id each, 100 millis, no
   TTL), each followed by an untimed Release; only the Allocate is timed.
2. new connection: a new channel (its credential files read, as a CLI process reads them),
   connected (TCP and, for mTLS, the handshake with both certificates), then its first
   Allocate; timed to the connection being ready and to the first reply. Released and
   closed untimed. Short-lived CLI processes and Slurm tasks pay this on every run.
3. throughput: N concurrent clients (warm connections, one each) Allocate without
   releasing until a fixed count is done (or the time limit passes); allocations/s, and
   the CPU the coordinator and this process used per allocation. Released (untimed).

Printed: each transport's figures with every round's samples pooled, and mTLS / plaintext.

Run from the repository root:

    .venv/bin/python -m bench tls [--samples 500] [--warmup 50] [--rounds 4]
        [--connections 100] [--allocations 2000] [--clients 32] [--nodes 8]
        [--time-limit 120] [--quick] [--json FILE]
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import platform
import time
from pathlib import Path

from bench.allocate_calls import (
    FRACTION_MILLIS,
    GPU_MODEL,
    GPUS_PER_NODE,
    PER_GPU,
    Store,
    write_inventory,
)
from bench.lib import HOST, SERVING_TIMEOUT_S, Outcome, positive_int, run_in_workdir
from bench.suites import SuiteSpec
from bench.tls_measure import Client, Options, Transport, measure
from bench.tls_report import report
from kaiwo_gpu.common import pki
from kaiwo_gpu.common.credentials import Credentials
from kaiwo_gpu.common.identity import Identity, Role
from kaiwo_gpu.coordinator.local.coordinator_process import CoordinatorProcess
from kaiwo_gpu.coordinator.local.etcd import LocalEtcd

PLAINTEXT, MTLS = "plaintext", "mTLS"
PREFIXES = {PLAINTEXT: "/bench-tls-plaintext/v1/", MTLS: "/bench-tls-mtls/v1/"}
CLIENT = Identity(Role.SCHEDULER, "bench")
"""Who the client's certificate names: a scheduler may name the owner `bench/...`, the
owner the allocate suite's requests carry (a user could name only itself)."""


def transports(workdir: Path, etcd: LocalEtcd, inventory: Path) -> tuple[Transport, Transport]:
    """The plaintext and the mTLS coordinator (not started yet), and their clients' keys."""
    directory = workdir / "tls"
    ca = pki.load_or_make_ca(directory)
    served = pki.issue_into(directory, ca, Identity(Role.COORDINATOR, "coordinator"))
    presented = pki.issue_into(directory, ca, CLIENT)
    ca_path = directory / f"{pki.CA_NAME}.crt"

    def coordinator(name: str, extra_args: tuple[str, ...]) -> CoordinatorProcess:
        return CoordinatorProcess(
            etcd.endpoint,
            PREFIXES[name],
            inventory,
            workdir / f"coordinator-{name}.log",
            extra_args=extra_args,
        )

    serving = (f"--tls-ca={ca_path}", f"--tls-cert={served[0]}", f"--tls-key={served[1]}")
    return (
        Transport(PLAINTEXT, coordinator(PLAINTEXT, ()), Credentials()),
        Transport(
            MTLS,
            coordinator(MTLS, serving),
            Credentials(tls_ca=ca_path, tls_cert=presented[0], tls_key=presented[1]),
        ),
    )


async def run_cluster(options: Options, workdir: Path) -> Outcome:
    # Sized so a throughput phase (which releases only when it is over) cannot fill the
    # cluster; every other phase releases each allocation before it makes the next.
    needed = options.allocations + 2 * options.clients
    nodes = max(options.nodes, math.ceil(needed / (GPUS_PER_NODE * PER_GPU)) + 1)
    inventory = workdir / "nodes.yaml"
    gpus = write_inventory(inventory, nodes)
    etcd = LocalEtcd(workdir / "etcd", host=HOST, log_path=workdir / "etcd.log")
    started: list[Transport] = []
    clients: list[Client] = []
    store: Store | None = None
    try:
        etcd.start()
        for transport in transports(workdir, etcd, inventory):
            transport.coordinator.start()
            started.append(transport)
        for transport in started:
            await transport.wait_serving(SERVING_TIMEOUT_S)
        store = Store([etcd.endpoint])
        await store.connect()
        print(
            f"etcd {etcd.endpoint} (data in {workdir}); "
            + ", ".join(
                f"{t.name} coordinator pid {t.coordinator.pid} on {t.coordinator.address}"
                for t in started
            )
            + f"; each {nodes} nodes x {GPUS_PER_NODE} {GPU_MODEL} = {gpus} GPUs",
            flush=True,
        )
        clients = [Client.open(transport, options.clients, store) for transport in started]
        await measure(options, clients)
        for transport in started:
            if not transport.coordinator.alive():
                print(f"the {transport.name} coordinator exited early:")
                print(transport.coordinator.log_tail())
                return Outcome(1)
        figures = report(
            (PLAINTEXT, MTLS), (clients[0].measured, clients[1].measured), options.clients
        )
        return Outcome(0, {"inventory": {"nodes": nodes, "gpus": gpus}} | figures)
    finally:
        for client in clients:
            await client.close()
        if store is not None:
            await store.close()
        for transport in started:
            transport.coordinator.stop()
        etcd.stop()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--samples",
        type=positive_int,
        default=500,
        help="timed sequential Allocates per transport and round (default 500)",
    )
    parser.add_argument(
        "--warmup", type=positive_int, default=50, help="untimed Allocates first (default 50)"
    )
    parser.add_argument(
        "--rounds", type=positive_int, default=4, help="rounds of both transports (default 4)"
    )
    parser.add_argument(
        "--connections",
        type=positive_int,
        default=100,
        help="new connections (each with a first Allocate) per transport and round (default 100)",
    )
    parser.add_argument(
        "--allocations",
        type=positive_int,
        default=2000,
        help="allocations in each throughput phase (default 2000)",
    )
    parser.add_argument(
        "--clients", type=positive_int, default=32, help="concurrent clients (default 32)"
    )
    parser.add_argument(
        "--nodes",
        type=positive_int,
        default=8,
        help=f"inventory nodes of {GPUS_PER_NODE} {GPU_MODEL}, raised if too few (default 8)",
    )
    parser.add_argument(
        "--time-limit",
        type=float,
        default=120.0,
        help="seconds each measured phase may run before it stops early (default 120)",
    )


def run(args: argparse.Namespace) -> Outcome:
    options = Options(
        samples=args.samples,
        warmup=args.warmup,
        rounds=args.rounds,
        connections=args.connections,
        allocations=args.allocations,
        clients=args.clients,
        nodes=args.nodes,
        time_limit_s=args.time_limit,
    )
    started = time.perf_counter()
    print(
        f"mTLS against plaintext: python {platform.python_version()} on {platform.machine()}, "
        f"{os.cpu_count()} CPUs shared by etcd, two coordinators and client; {options.rounds} "
        f"rounds of {options.samples} sequential Allocates, {options.connections} new "
        f"connections and {options.allocations} allocations x {options.clients} clients per "
        f"transport, {FRACTION_MILLIS} millis each"
    )
    return run_in_workdir(functools.partial(run_cluster, options), started)


SUITE = SuiteSpec(
    description=__doc__ or "",
    add_arguments=add_arguments,
    run=run,
    quick={
        "samples": 20,
        "warmup": 5,
        "rounds": 2,
        "connections": 5,
        "allocations": 100,
        "clients": 4,
        "nodes": 2,
        "time_limit": 20.0,
    },
)
