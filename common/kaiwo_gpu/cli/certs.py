"""`kaiwo-gpu certs`: a development CA, certificates for each role, and bearer tokens.

`init` makes the CA, `issue` a certificate and key for an identity, `token` a bearer token
and the line a coordinator's --tokens file needs for it. For development and small
clusters; with an organisation's CA, issue certificates whose URI SAN is
`kaiwo-gpu://ROLE/NAME` instead.
"""

from __future__ import annotations

import argparse
import secrets
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from kaiwo_gpu.cli import flags
from kaiwo_gpu.common import credentials, pki
from kaiwo_gpu.common.errors import FailedPreconditionError
from kaiwo_gpu.common.identity import IDENTITY_NAME_RULE, ROLES, Role, identity

if TYPE_CHECKING:
    Subcommands = argparse._SubParsersAction[argparse.ArgumentParser]

T = TypeVar("T")
days = flags.whole_number(1, 36500, "a number of days")


def _name(text: str) -> str:
    flags.checked(lambda value: identity(Role.USER.value, value, "NAME"))(text)
    return text


def add_certs_parser(commands: Subcommands) -> None:
    parser = commands.add_parser(
        "certs",
        help="make a development CA, certificates and bearer tokens",
        description="A development CA and the certificates kaiwo-gpu's processes prove "
        "themselves with: each certificate names ROLE and NAME in its URI SAN "
        "kaiwo-gpu://ROLE/NAME. Keys are written with mode 0600.",
        epilog="example:\n  kaiwo-gpu certs init --dir tls\n"
        "  kaiwo-gpu certs issue --dir tls --role coordinator coord-1 --san coord-1.example\n"
        "  kaiwo-gpu certs issue --dir tls --role agent gpu-node-07\n"
        "  kaiwo-gpu certs issue --dir tls --role user alice\n"
        "  kaiwo-gpu certs token --dir tls --role scheduler slurm --tokens tokens.txt",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = parser.add_subparsers(dest="certs_command", required=True, metavar="ACTION")
    init = actions.add_parser("init", help="make the CA (ca.crt, ca.key) in --dir")
    init.add_argument("--dir", type=Path, required=True)
    init.add_argument("--days", type=days, default=pki.DEFAULT_CA_DAYS)
    issue = actions.add_parser("issue", help="issue NAME.crt and NAME.key, signed by the CA")
    token = actions.add_parser("token", help="make NAME.token and its --tokens file line")
    for action in (issue, token):
        action.add_argument("name", metavar="NAME", type=_name, help=IDENTITY_NAME_RULE)
        action.add_argument("--dir", type=Path, required=True)
        action.add_argument("--role", choices=ROLES, default=Role.USER.value)
    issue.add_argument(
        "--san",
        action="append",
        default=[],
        help="a DNS name or IP address clients reach a coordinator by (repeatable; "
        f"default for a coordinator: {', '.join(pki.LOCAL_NAMES)})",
    )
    issue.add_argument("--days", type=days, default=pki.DEFAULT_DAYS)
    token.add_argument("--tokens", type=Path, help="append the line to this --tokens file")
    for action in (issue, token):
        action.add_argument(
            "--force", action="store_true", help="replace NAME's files if they exist"
        )


def _refusing_overwrite(write: Callable[[], T]) -> T:
    """Runs `write`, turning a refusal to replace a file into a message that says why."""
    try:
        return write()
    except FileExistsError as error:
        raise FailedPreconditionError(
            f"{error.filename} exists (or the name is the CA's): issuing again would replace "
            "a key in use, perhaps by a running process; pick another NAME, or pass --force"
        ) from None


def run_certs(args: argparse.Namespace) -> int:
    directory: Path = args.dir
    if args.certs_command == "init":
        if (directory / f"{pki.CA_NAME}.key").exists():
            raise FailedPreconditionError(
                f"{directory / pki.CA_NAME}.key exists: a second CA would orphan every "
                "certificate the first one signed; remove it first to start over"
            )
        certificate, key = _refusing_overwrite(
            lambda: pki.write_pair(
                directory, pki.CA_NAME, pki.new_ca(days=args.days), replace=False
            )
        )
        print(f"CA: {certificate} (key {key}, keep it private)")
        return 0
    holder = identity(args.role, args.name)
    if args.certs_command == "issue":
        try:
            ca = pki.read_pair(directory, pki.CA_NAME)
        except OSError:
            raise FailedPreconditionError(
                f"no CA in {directory}: run `kaiwo-gpu certs init --dir {directory}` first"
            ) from None
        certificate, key = _refusing_overwrite(
            lambda: pki.issue_into(
                directory, ca, holder, sans=tuple(args.san), days=args.days, replace=args.force
            )
        )
        print(f"{holder.uri}: {certificate} and {key} (CA {directory / pki.CA_NAME}.crt)")
        return 0
    token = secrets.token_urlsafe(32)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{holder.name}.token"
    _refusing_overwrite(
        lambda: pki.write_file(path, (token + "\n").encode(), 0o600, replace=args.force)
    )
    line = f"{credentials.token_digest(token)} {holder.name} {holder.role.value}"
    if args.tokens is not None:
        with args.tokens.open("a") as handle:
            handle.write(line + "\n")
        print(f"{holder.uri}: token in {path}; its line appended to {args.tokens}")
    else:
        print(
            f"{holder.uri}: token in {path}; add this line to the --tokens file:", file=sys.stderr
        )
        print(line)
    return 0
