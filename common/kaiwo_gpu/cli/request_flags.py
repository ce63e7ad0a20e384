"""The allocation flags of `allocate` and `run`, and the request they describe.

Values are checked when parsed (a usage error, exit 2) and again by the request model, whose
errors are renamed to the flag that carried the value.
"""

from __future__ import annotations

import argparse
import getpass
import os
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from kaiwo_gpu.cli import flags
from kaiwo_gpu.client.support import new_request_id
from kaiwo_gpu.common.annotations import AmdGpuUnit
from kaiwo_gpu.common.errors import InvalidArgumentError
from kaiwo_gpu.common.models import (
    ISOLATION_ALIASES,
    MAX_TTL_SECONDS,
    AllocationRequest,
    Isolation,
    Selector,
    parse_isolation,
)
from kaiwo_gpu.common.request_builder import build_request
from kaiwo_gpu.common.units import parse_fraction_millis, parse_memory_mib

ttl = flags.duration_within(1, MAX_TTL_SECONDS, "a duration like 90s, 10m or 2h, up to 30d")


def _isolation_name(text: str) -> str:
    """An isolation as the annotation takes it (parse_isolation: aliases, case, spaces)."""
    parse_isolation(text, "isolation kind")
    return text


def key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not key=value")
    return key, value


def _validated(parse: Callable[[str], object]) -> Callable[[str], str]:
    """Checks a value at parse time (a usage error) and keeps the text for the builder."""

    def convert(text: str) -> str:
        flags.checked(parse)(text)
        return text

    return convert


def default_owner() -> str:
    """`user@host`, so `kaiwo-gpu list --owner` finds what a person holds."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # a container user without a passwd entry
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


def _owner(args: argparse.Namespace) -> str:
    """--owner, else none when the credentials name the caller (the coordinator sets the
    owner from their identity), else `user@host`."""
    if args.owner is not None:
        return str(args.owner)
    return "" if flags.credentials_of(args).identifies else default_owner()


def add_allocation_flags(parser: argparse.ArgumentParser) -> None:
    """What to ask for; shared by `allocate` and `run`."""
    group = parser.add_argument_group("allocation")
    group.add_argument(
        "--fraction",
        metavar="F",
        type=_validated(parse_fraction_millis),
        help="compute share per GPU, 0.1-1.0",
    )
    group.add_argument(
        "--memory",
        metavar="SIZE",
        type=_validated(parse_memory_mib),
        help="VRAM per GPU: 4Gi, 512Mi or MiB",
    )
    group.add_argument(
        "--count", metavar="N", type=flags.gpu_count, help="GPUs on one node (default 1)"
    )
    group.add_argument(
        "--isolation",
        metavar="KIND",
        type=flags.checked(_isolation_name),
        help=" | ".join(kind.value for kind in Isolation)
        + " ("
        + ", ".join(
            f"{alias} is mapped to {to.value}" for alias, (to, _) in ISOLATION_ALIASES.items()
        )
        + ")",
    )
    group.add_argument(
        "--no-sharing", action="store_true", help="nobody else may share the GPUs granted"
    )
    group.add_argument(
        "--ttl", metavar="DURATION", type=ttl, help="lease, e.g. 10m; renew it or lose it"
    )
    group.add_argument(
        "--label",
        metavar="K=V",
        type=key_value,
        action="append",
        default=[],
        help="a label on the allocation (repeat for more)",
    )
    group.add_argument("--strategy", metavar="NAME", type=flags.strategy, help="placement strategy")
    group.add_argument(
        "--owner",
        help="who holds it (default: the identity of --tls-cert or --token-file, else user@host)",
    )
    group.add_argument("--request-id", metavar="ID", help="makes a retried allocate idempotent")
    group.add_argument(
        "--node",
        metavar="NAME",
        type=flags.node_name,
        action="append",
        default=[],
        help="only this node (repeat for a choice of nodes)",
    )
    group.add_argument(
        "--node-selector",
        metavar="K=V",
        type=key_value,
        action="append",
        default=[],
        help="only nodes with this label",
    )
    group.add_argument(
        "--gpu-model", metavar="MODEL", action="append", default=[], help="e.g. MI300X"
    )


def request_from_flags(
    args: argparse.Namespace, *, default_nodes: Sequence[str] = ()
) -> AllocationRequest:
    """The request the allocation flags describe; InvalidArgumentError names the flag."""
    try:
        return build_request(
            args.request_id or new_request_id(),
            fraction=args.fraction,
            memory=args.memory,
            count=args.count or 1,
            isolation=args.isolation or "",
            sharing=not args.no_sharing,
            ttl=args.ttl,
            owner=_owner(args),
            labels=args.label,
            strategy=args.strategy,
            nodes=args.node or default_nodes,
            node_labels=args.node_selector,
            gpu_models=args.gpu_model,
        )
    except InvalidArgumentError as error:
        if error.field == "fraction_millis" and error.value is None:
            raise InvalidArgumentError(
                "--fraction/--memory", "neither", "--fraction 0.5, --memory 16Gi or both"
            ) from None
        raise InvalidArgumentError(_flag_for(error.field), error.value, error.allowed) from None


_FLAG_FOR_FIELD = {
    "request_id": "--request-id",
    "fraction_millis": "--fraction",
    "owner": "--owner",
    "labels": "--label",
    "selector.node_labels": "--node-selector",
    "selector.gpu_models": "--gpu-model",
    "selector.nodes": "--node",
}


def _flag_for(field: str) -> str:
    base = field.split("[", maxsplit=1)[0].removesuffix(".key")
    return _FLAG_FOR_FIELD.get(base, f"--{base.replace('_', '-')}")


_POD_CONFLICTS = (
    "fraction",
    "memory",
    "count",
    "isolation",
    "node_selector",
    "gpu_model",
)


def request_from_pod_flags(args: argparse.Namespace) -> AllocationRequest:
    """A request from `--from-pod`; flags may add a TTL, strategy, labels or narrow the nodes.

    A manifest with a uid (a pod read back from the cluster) always asks under the same
    request id; one without (a file written by hand) gets a fresh id each time, since a
    released request id cannot be reused for a while.
    """
    from kaiwo_gpu.common.pods import load_manifest, request_from_pod

    for name in _POD_CONFLICTS:
        if getattr(args, name):
            flag = "--" + name.replace("_", "-")
            raise InvalidArgumentError(
                flag, getattr(args, name), "nothing with --from-pod: the pod says how much"
            )
    source = "<stdin>" if args.from_pod == "-" else args.from_pod
    try:
        text = sys.stdin.read() if args.from_pod == "-" else Path(args.from_pod).read_text()
    except (OSError, UnicodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else "not UTF-8 text"
        raise InvalidArgumentError(
            "--from-pod", args.from_pod, f"a readable file ({reason})"
        ) from None
    manifest = load_manifest(text, source)
    metadata = manifest.get("metadata")
    has_uid = isinstance(metadata, Mapping) and bool(metadata.get("uid"))
    request_id = args.request_id or (None if has_uid else new_request_id())
    pod = request_from_pod(
        manifest, amd_gpu_unit=AmdGpuUnit(args.amd_gpu_unit), request_id=request_id
    )
    labels = dict(pod.labels)
    for key, value in args.label:
        if labels.get(key, value) != value:
            raise InvalidArgumentError(
                "--label", f"{key}={value}", f"{key}={labels[key]}, as the pod says"
            )
        labels[key] = value
    return replace(
        pod,
        ttl_seconds=args.ttl or pod.ttl_seconds,
        strategy=args.strategy or pod.strategy,
        owner=pod.owner if args.owner is None else args.owner,
        labels=tuple(labels.items()),
        sharing=pod.sharing and not args.no_sharing,
        selector=_narrowed(pod.selector, args.node),
    )


def _narrowed(selector: Selector, nodes: Sequence[str]) -> Selector:
    """`--node` may only narrow where the pod may go, never widen it."""
    if not nodes:
        return selector
    wanted = frozenset(nodes)
    allowed = wanted & selector.nodes if selector.nodes else wanted
    allowed -= selector.exclude_nodes
    if not allowed:
        raise InvalidArgumentError(
            "--node",
            ",".join(sorted(wanted)),
            "a node the pod's nodeName, nodeSelector or affinity allows",
        )
    return replace(selector, nodes=allowed)
