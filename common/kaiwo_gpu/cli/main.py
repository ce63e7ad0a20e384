"""Entry point of the `kaiwo-gpu` command.

Bad arguments exit with status 2 and one line on stderr; errors of the services exit with
status 1 and their message, and the client commands with the statuses in EXIT_CODES; never
a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, NoReturn, cast

from kaiwo_gpu.common.errors import KaiwoGpuError, described
from kaiwo_gpu.common.gpu_models import GPU_MODELS

if TYPE_CHECKING:
    Subcommands = argparse._SubParsersAction[argparse.ArgumentParser]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
CLIENT_COMMANDS = frozenset(
    {"allocate", "release", "get", "list", "nodes", "watch", "stats", "top", "node"}
)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line that says where to look, not the whole usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _version() -> str:
    from importlib import metadata  # ~25 ms: only `--version` pays for it

    try:
        return metadata.version("kaiwo-gpu")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


class _VersionAction(argparse.Action):
    """argparse's version action, but the version is read when asked for, not on every run."""

    def __init__(self, option_strings: Sequence[str], dest: str, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        print(f"kaiwo-gpu {_version()}")  # on stdout, as argparse's own version action
        parser.exit()


def _add_offline_parsers(commands: Subcommands) -> None:
    from kaiwo_gpu.coordinator.placement.strategies import BUILTIN_STRATEGIES, DEFAULT_STRATEGY

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


# The module and function that add each command's parser, in the order --help lists them.
# Only the module a command line names is imported: a client command, `run` in a Slurm task
# or `--version` does not pay for the imports of the coordinator, the agent and `up`.
PARSER_ADDERS: Mapping[str, tuple[str, str]] = {
    "demo": (__name__, "_add_offline_parsers"),
    "strategies": (__name__, "_add_offline_parsers"),
    "coordinator": ("kaiwo_gpu.cli.serve", "add_coordinator_parser"),
    "agent": ("kaiwo_gpu.cli.serve", "add_agent_parser"),
    "up": ("kaiwo_gpu.cli.up", "add_up_parser"),
    "certs": ("kaiwo_gpu.cli.certs", "add_certs_parser"),
    **dict.fromkeys(
        sorted(CLIENT_COMMANDS), ("kaiwo_gpu.cli.client_commands", "add_client_parsers")
    ),
    "run": ("kaiwo_gpu.cli.run", "add_run_parser"),
}


def _adders_for(argv: Sequence[str] | None) -> list[tuple[str, str]]:
    """The parser adders a command line needs: its command's alone when it starts with
    one, none for `--version`, and all of them otherwise: `--help` (or `--he`, which
    argparse takes for it), `--`, no command, or one that does not exist (whose error
    lists the commands)."""
    first = argv[0] if argv else ""
    if first == "--version":
        return []
    if first in PARSER_ADDERS:
        return [PARSER_ADDERS[first]]
    return list(dict.fromkeys(PARSER_ADDERS.values()))


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The `kaiwo-gpu` parser: every command, or only what `argv` needs (see _adders_for)."""
    parser = OneLineParser(
        prog="kaiwo-gpu",
        description="Fractional GPU allocation for AMD GPU clusters.",
        epilog="exit status of the client commands: 0 ok, 1 other error, 2 bad flag or "
        "request, 3 not found, 4 no capacity, 5 coordinator unavailable or timed out, "
        "6 request id reused or conflict, 130 interrupted; `run` exits with its command's.",
    )
    parser.add_argument("--version", action=_VersionAction, help="show the version and exit")
    commands = cast(
        "Subcommands", parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    )
    for module, function in _adders_for(argv):
        getattr(importlib.import_module(module), function)(commands)
    return parser


def _client_command(args: argparse.Namespace) -> int:
    if args.command == "run":
        from kaiwo_gpu.cli.run import run_command

        return run_command(args)
    from kaiwo_gpu.cli.client_commands import run_client_command

    try:
        return run_client_command(args)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser(sys.argv[1:] if argv is None else argv).parse_args(argv)
    except KeyboardInterrupt:  # Ctrl-C while the parser's imports load
        return EXIT_INTERRUPTED
    if args.command in CLIENT_COMMANDS or args.command == "run":
        import logging

        from kaiwo_gpu.common.logs import configure_logging

        # Only the client library's warnings (a failed renewal), and on stderr: stdout is
        # the command's (run) or the answer's (-o json).
        configure_logging("console", logging.WARNING, deferred=True)
        from kaiwo_gpu.common import tracing

        tracing.quiet_exporter_logs()
        tracing.configure(tracing.CLI_SERVICE)
        try:
            return _client_command(args)
        finally:
            tracing.shutdown()  # the command's spans leave before the process does
    try:
        if args.command == "demo":
            from kaiwo_gpu.coordinator.local.demo import run_demo

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
            from kaiwo_gpu.coordinator.placement.strategies import (
                BUILTIN_STRATEGIES,
                DEFAULT_STRATEGY,
            )

            for name, strategy in BUILTIN_STRATEGIES.items():
                marker = " (default)" if name == DEFAULT_STRATEGY else ""
                doc = (type(strategy).__doc__ or "").strip().splitlines()[0]
                print(f"{name:<14} {doc}{marker}")
        elif args.command == "coordinator":
            from kaiwo_gpu.cli.serve import run_coordinator

            run_coordinator(args)
        elif args.command == "agent":
            from kaiwo_gpu.cli.serve import run_agent

            run_agent(args)
        elif args.command == "up":
            from kaiwo_gpu.cli.up import run_up

            run_up(args)
        elif args.command == "certs":
            from kaiwo_gpu.cli.certs import run_certs

            return run_certs(args)
    except KaiwoGpuError as error:
        print(f"kaiwo-gpu: {described(error)}", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:
        return EXIT_OK
    except KeyboardInterrupt:  # Ctrl-C before a service installed its own handler
        return EXIT_INTERRUPTED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
