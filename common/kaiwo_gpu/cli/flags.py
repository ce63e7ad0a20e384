"""Flag types and environment fallbacks of the commands that run services.

Every value is checked by the same parser whether it came from a flag or from its
KAIWO_GPU_* variable, and a bad one is a usage error (exit 2) that says what is allowed.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TypeVar

from kaiwo_gpu.common import credentials, names
from kaiwo_gpu.common.credentials import Credentials
from kaiwo_gpu.common.errors import InvalidArgumentError
from kaiwo_gpu.common.models import MAX_TTL_SECONDS, AllocationRequest, Isolation, freeze_labels
from kaiwo_gpu.common.units import parse_duration_s

T = TypeVar("T")


def duration_within(low_s: int, high_s: int, what: str) -> Callable[[str], int]:
    """An argparse type for a duration (`90s`, `10m`, `2h`) in whole seconds, low-high."""

    def convert(text: str) -> int:
        try:
            seconds = parse_duration_s(text)
        except InvalidArgumentError:
            seconds = -1
        if not low_s <= seconds <= high_s:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return seconds

    return convert


def whole_number(low: int, high: int, what: str) -> Callable[[str], int]:
    def convert(text: str) -> int:
        if not text.isascii() or not text.isdigit() or not low <= int(text) <= high:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what} {low}-{high}")
        return int(text)

    return convert


duration = duration_within(0, MAX_TTL_SECONDS, "a duration like 90s, 10m or 2h, up to 30d")
node_ttl = duration_within(2, 3600, "a node TTL like 15s (2s-1h)")
count = whole_number(1, 1000, "a whole number")
gpu_count = whole_number(1, 64, "a GPU count")


def address(text: str) -> str:
    if text.startswith("unix:") and len(text) > len("unix:"):
        return text  # a Unix socket path, as gRPC spells it
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isascii() or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not host:port, e.g. 127.0.0.1:50051")
    return text


def checked(parse: Callable[[str], T]) -> Callable[[str], T]:
    """An argparse type from one of our parsers: its InvalidArgumentError is a usage error."""

    def convert(text: str) -> T:
        try:
            return parse(text)
        except InvalidArgumentError as error:
            raise argparse.ArgumentTypeError(error.message) from None

    return convert


def one_of(what: str, choices: Iterable[str]) -> Callable[[str], str]:
    """An argparse type that also checks values from the environment (choices= does not)."""
    allowed = sorted(choices)

    def convert(text: str) -> str:
        if text not in allowed:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a {what}; choose from {', '.join(allowed)}"
            )
        return text

    return convert


# The coordinator's modules (and aetcd under them) are imported where a coordinator's flag
# is parsed, not when this module is: a client command's start-up does not pay for them.


def split_endpoints(text: str) -> tuple[str, ...]:
    from kaiwo_gpu.coordinator.state.store import parse_endpoints

    endpoints = tuple(e.strip() for e in text.split(",") if e.strip())
    parse_endpoints(endpoints)
    return endpoints


endpoints = checked(split_endpoints)


def key_prefix(text: str) -> str:
    from kaiwo_gpu.coordinator.state.keys import KeyLayout

    return KeyLayout(text).prefix


prefix = checked(key_prefix)


def strategy_name(text: str) -> str:
    """A well-formed strategy name, by the request model's own rule. Which strategies exist
    is the coordinator's to say (it refuses an unknown one, naming those it has), so a
    client never turns away a strategy a coordinator was given."""
    AllocationRequest(request_id="strategy-check", isolation=Isolation.EXCLUSIVE, strategy=text)
    return text


strategy = checked(strategy_name)
log_format = one_of("log format", ("console", "json"))


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds (0-3600)")
    return value


def env_flag(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    flag: str,
    help_text: str,
    *,
    default: str | None = None,
    parse: Callable[[str], object] = str,
    environment: Mapping[str, str] | None = None,
) -> None:
    """A flag whose default comes from its KAIWO_GPU_* variable; both go through `parse`.
    The variable is looked up in `environment`, by default the coordinator's table."""
    if environment is None:
        from kaiwo_gpu.coordinator.settings import ENVIRONMENT

        environment = ENVIRONMENT
    variable = environment[flag.removeprefix("--").replace("-", "_")]
    shown = "; default %(default)s" if default is not None else ""
    parser.add_argument(
        flag,
        type=parse,
        default=os.environ.get(variable, default),
        help=f"{help_text} (${variable}{shown})",
    )


def interval_ms(text: str) -> int:
    """`500ms`, `1s`, `2` (seconds): the sampling interval, 100 ms to 60 s."""
    try:
        millis = int(text[:-2]) if text.endswith("ms") else parse_duration_s(text) * 1000
    except (InvalidArgumentError, ValueError):
        millis = -1
    if not 100 <= millis <= 60_000:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an interval like 1s or 500ms (100ms-60s)"
        )
    return millis


def node_name(text: str) -> str:
    if not names.is_node_name(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a node name: {names.NODE_NAME_RULE}")
    return text


def addresses(text: str) -> tuple[str, ...]:
    addresses = tuple(address(part.strip()) for part in text.split(",") if part.strip())
    if not addresses:
        raise argparse.ArgumentTypeError(f"{text!r} names no coordinator address")
    return addresses


def labels(text: str) -> tuple[tuple[str, str], ...]:
    pairs: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"{part!r} is not a label key=value")
        pairs[key] = value
    try:
        return freeze_labels(pairs, "--labels")
    except InvalidArgumentError as error:
        raise argparse.ArgumentTypeError(error.message) from None


def default_node_name() -> str:
    """The host name, made a DNS-1123 name (GPU_01 -> gpu-01), so nodes stay distinct."""
    name = re.sub(r"[^a-z0-9.-]+", "-", socket.gethostname().lower()).strip("-.")[:253]
    return name if names.is_node_name(name) else "node"


def add_credential_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup, *, serving: bool = False
) -> None:
    """--tls-ca, --tls-cert, --tls-key (and a client's --token-file), each with its
    KAIWO_GPU_* variable: one set of names for every process."""
    holder = "this coordinator" if serving else "this client"
    helps = {
        "--tls-ca": "CA that client certificates must come from (required with it)"
        if serving
        else "CA to check the coordinator's certificate against (turns TLS on)",
        "--tls-cert": f"certificate {holder} presents",
        "--tls-key": "private key of --tls-cert",
    }
    if not serving:
        helps["--token-file"] = "file holding a bearer token to send (over TLS or loopback)"
    for flag, text in helps.items():
        env_flag(
            parser,
            flag,
            text,
            parse=lambda value: Path(value) if value else None,
            environment=credentials.VARIABLES,
        )


def credentials_of(args: argparse.Namespace) -> Credentials:
    """The credentials the flags (or their variables) name."""
    return Credentials(
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        token_file=getattr(args, "token_file", None),
    )
