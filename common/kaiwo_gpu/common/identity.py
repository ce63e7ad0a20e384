"""Who is calling: an identity is a role and a name, spelled one way in certificates, tokens
and logs.

A certificate names its holder in a URI subject alternative name, `kaiwo-gpu://ROLE/NAME`
(`kaiwo-gpu://user/alice`, `kaiwo-gpu://agent/gpu-node-07`). A URI SAN rather than the CN,
because the role must be signed by the CA together with the name (a CN holds one string, and
an organisation's CA already fills it with its own conventions); a certificate from such a
CA without our SAN is read as the user its CN names, so the role never comes from a field the
holder's PKI did not mean for it.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from kaiwo_gpu.common.errors import InvalidArgumentError

SCHEME = "kaiwo-gpu"


class Role(enum.StrEnum):
    USER = "user"
    """Allocates for itself; sees and changes only its own allocations."""
    AGENT = "agent"
    """Registers and reports for the one node its name is."""
    SCHEDULER = "scheduler"
    """Allocates on behalf of jobs and pods: owners under its own prefix (`slurm/...`)."""
    ADMIN = "admin"
    """Everything, including other owners' allocations and removing nodes."""
    COORDINATOR = "coordinator"
    """A coordinator's own certificate (it serves with it); as a caller it may only read."""


ROLES = tuple(role.value for role in Role)
IDENTITY_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._@-]{0,126}[A-Za-z0-9])?")
IDENTITY_NAME_RULE = (
    "1-128 characters of [A-Za-z0-9._@-], starting and ending with a letter or digit"
)
DELEGATION_SEPARATOR = "/"
"""A scheduler named `slurm` owns `slurm/<job>`: its name, this, then the job's own id."""


@dataclass(frozen=True, slots=True)
class Identity:
    role: Role
    name: str

    def __str__(self) -> str:
        return f"{self.role.value}/{self.name}"

    @property
    def uri(self) -> str:
        """The URI SAN a certificate for this identity carries."""
        return f"{SCHEME}://{self.role.value}/{self.name}"


ANONYMOUS = Identity(Role.ADMIN, "anonymous")
"""Whoever calls while authorization is off (no TLS client certificates, no tokens): may do
everything, as before identities existed."""


def identity(role: str, name: str, field: str = "identity") -> Identity:
    """An identity from its parts, each checked (a bad one names the field and the rule)."""
    if role not in ROLES:
        raise InvalidArgumentError(f"{field} role", role, ", ".join(ROLES))
    if not isinstance(name, str) or IDENTITY_NAME.fullmatch(name) is None:
        raise InvalidArgumentError(f"{field} name", name, IDENTITY_NAME_RULE)
    return Identity(Role(role), name)


def from_uri(uri: str) -> Identity | None:
    """The identity a `kaiwo-gpu://ROLE/NAME` URI names; None for any other URI (a
    certificate may carry SANs of other schemes too). A URI of our scheme that is not
    well formed is an error, never read as something else."""
    prefix = f"{SCHEME}://"
    if not uri.startswith(prefix):
        return None
    role, sep, name = uri.removeprefix(prefix).partition("/")
    if not sep:
        raise InvalidArgumentError("certificate URI", uri, f"{prefix}ROLE/NAME")
    return identity(role, name, "certificate URI")
