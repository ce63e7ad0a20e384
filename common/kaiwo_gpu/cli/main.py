"""Entry point of the `kaiwo-gpu` command.

Bad arguments exit with status 2 and one line on stderr (argparse's convention); errors of
kaiwo-gpu exit with status 1 and their message, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib import metadata

from kaiwo_gpu.common.errors import KaiwoGpuError
from kaiwo_gpu.common.gpu_models import GPU_MODELS

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def _version() -> str:
    try:
        return metadata.version("kaiwo-gpu")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    from kaiwo_gpu.coordinator.strategies import BUILTIN_STRATEGIES, DEFAULT_STRATEGY

    parser = argparse.ArgumentParser(
        prog="kaiwo-gpu",
        description="Fractional GPU allocation for AMD GPU clusters.",
    )
    parser.add_argument("--version", action="version", version=f"kaiwo-gpu {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="place a seeded stream of requests on a synthetic cluster (no etcd needed)",
        description="Runs the strategy engine offline over a synthetic cluster and prints "
        "every placement, its grant and HSA_CU_MASK where cu-mask isolation applies.",
        epilog="example: kaiwo-gpu demo --nodes 2 --gpus 8 --model MI300X --strategy best-fit",
    )
    demo.add_argument("--nodes", type=_positive, default=2)
    demo.add_argument("--gpus", type=_positive, default=8, help="GPUs per node")
    demo.add_argument("--model", choices=sorted(GPU_MODELS), default="MI300X")
    demo.add_argument("--strategy", choices=sorted(BUILTIN_STRATEGIES), default=DEFAULT_STRATEGY)
    demo.add_argument("--requests", type=_positive, default=40)
    demo.add_argument("--seed", type=int, default=1)

    commands.add_parser("strategies", help="list the placement strategies")
    _add_coordinator_parser(commands)
    return parser


def _add_coordinator_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    import os

    from kaiwo_gpu.coordinator.keys import DEFAULT_PREFIX
    from kaiwo_gpu.coordinator.settings import DEFAULT_ETCD, DEFAULT_LISTEN, ENVIRONMENT
    from kaiwo_gpu.coordinator.strategies import BUILTIN_STRATEGIES, DEFAULT_STRATEGY

    env = os.environ.get
    coordinator = commands.add_parser(
        "coordinator",
        help="serve the allocation API, keeping state in etcd",
        description="Serves Allocate, Release, KeepAlive, Get, List, Watch, ListNodes and "
        "GetClusterStats over gRPC (with health and reflection), with allocation state in "
        "etcd. Several coordinators may share one etcd. Stops gracefully on SIGTERM. Every "
        "flag can also be set through the environment variable named in its help.",
        epilog="example: kaiwo-gpu coordinator --etcd 127.0.0.1:2379 --inventory nodes.yaml",
    )
    coordinator.add_argument(
        "--listen",
        default=env(ENVIRONMENT["listen"], DEFAULT_LISTEN),
        help=f"host:port to serve on (${ENVIRONMENT['listen']}; default %(default)s)",
    )
    coordinator.add_argument(
        "--etcd",
        default=env(ENVIRONMENT["etcd"], DEFAULT_ETCD),
        help=f"comma-separated etcd endpoints (${ENVIRONMENT['etcd']}; default %(default)s)",
    )
    coordinator.add_argument(
        "--prefix",
        default=env(ENVIRONMENT["prefix"], DEFAULT_PREFIX),
        help=f"etcd key prefix (${ENVIRONMENT['prefix']}; default %(default)s)",
    )
    coordinator.add_argument(
        "--strategy",
        choices=sorted(BUILTIN_STRATEGIES),
        default=env(ENVIRONMENT["strategy"], DEFAULT_STRATEGY),
        help=f"default placement strategy (${ENVIRONMENT['strategy']}; default %(default)s)",
    )
    coordinator.add_argument(
        "--default-ttl",
        type=_duration_s,
        default=env(ENVIRONMENT["default_ttl"], "0"),
        help="lease for requests without ttl_seconds, e.g. 90s, 10m; 0 = no lease "
        f"(${ENVIRONMENT['default_ttl']}; default %(default)s)",
    )
    coordinator.add_argument(
        "--inventory",
        default=env(ENVIRONMENT["inventory"]),
        help=f"YAML file of static nodes to register (${ENVIRONMENT['inventory']})",
    )
    coordinator.add_argument(
        "--log-format", choices=("console", "json"), default=env("KAIWO_GPU_LOG_FORMAT", "console")
    )


_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600}


def _duration_s(text: str) -> int:
    """Whole seconds from `90`, `90s`, `10m` or `2h`."""
    number = text.rstrip("smh")
    unit = text[len(number) :]
    if not number.isascii() or not number.isdigit() or unit not in _DURATION_UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 90s, 10m or 2h")
    return int(number) * _DURATION_UNITS[unit]


def _run_coordinator(args: argparse.Namespace) -> None:
    import asyncio
    from pathlib import Path

    from kaiwo_gpu.common.logs import configure_logging
    from kaiwo_gpu.coordinator.server import Coordinator
    from kaiwo_gpu.coordinator.settings import CoordinatorSettings

    configure_logging(args.log_format)
    settings = CoordinatorSettings(
        listen=args.listen,
        etcd_endpoints=tuple(e.strip() for e in args.etcd.split(",") if e.strip()),
        prefix=args.prefix,
        default_strategy=args.strategy,
        default_ttl_s=args.default_ttl or None,
        inventory=Path(args.inventory) if args.inventory else None,
    )

    async def serve() -> None:
        # Built inside the loop: grpc.aio objects belong to the loop that creates them.
        await Coordinator(settings).run()

    asyncio.run(serve())


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            from kaiwo_gpu.coordinator.demo import run_demo

            for line in run_demo(
                node_count=args.nodes,
                gpus_per_node=args.gpus,
                model=args.model,
                strategy=args.strategy,
                requests=args.requests,
                seed=args.seed,
            ):
                print(line)
        elif args.command == "strategies":
            from kaiwo_gpu.coordinator.strategies import BUILTIN_STRATEGIES, DEFAULT_STRATEGY

            for name, strategy in BUILTIN_STRATEGIES.items():
                marker = " (default)" if name == DEFAULT_STRATEGY else ""
                doc = (type(strategy).__doc__ or "").strip().splitlines()[0]
                print(f"{name:<14} {doc}{marker}")
        elif args.command == "coordinator":
            _run_coordinator(args)
    except KaiwoGpuError as error:
        print(f"kaiwo-gpu: {error.message}", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:
        return EXIT_OK
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
