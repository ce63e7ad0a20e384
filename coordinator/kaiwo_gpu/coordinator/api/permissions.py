"""Who may do what: pure rules over the caller's identity and the owner an allocation has.

A user owns what it allocates and sees and changes only that; a scheduler allocates for the
jobs it runs, owners under its own name (`slurm/1234` for the scheduler `slurm`), and sees
and changes those; an agent speaks for its own node only; an admin may do everything. No
routine path needs admin: Slurm and Kubernetes run as schedulers. While authorization is
off every caller is `ANONYMOUS` and everything is allowed, as before identities existed.
"""

from __future__ import annotations

from kaiwo_gpu.common.errors import PermissionDeniedError
from kaiwo_gpu.common.identity import ANONYMOUS, DELEGATION_SEPARATOR, Identity, Role


def owns(caller: Identity, owner: str) -> bool:
    """Whether `caller` may see and change an allocation owned by `owner`."""
    if caller.role is Role.ADMIN:
        return True
    if caller.role is Role.USER:
        return owner == caller.name
    if caller.role is Role.SCHEDULER:
        return owner == caller.name or owner.startswith(caller.name + DELEGATION_SEPARATOR)
    return False


def owner_for(caller: Identity, requested: str) -> str:
    """The owner an allocation `caller` asks for gets: its own name unless it may name
    another (a scheduler, under its prefix; an admin, anyone)."""
    if caller == ANONYMOUS:
        return requested
    if caller.role not in (Role.USER, Role.SCHEDULER, Role.ADMIN):
        raise PermissionDeniedError(f"{caller} may not allocate: it is not a user's identity")
    if not requested:
        return caller.name
    if not owns(caller, requested):
        allowed = (
            f"owner {caller.name!r} or {caller.name}{DELEGATION_SEPARATOR}..."
            if caller.role is Role.SCHEDULER
            else f"owner {caller.name!r}, its own"
        )
        raise PermissionDeniedError(
            f"{caller} may not allocate for owner {requested!r}; it may use {allowed}"
        )
    return requested


def check_owns(caller: Identity, owner: str, action: str, allocation_id: str) -> None:
    """Refuses `action` on another owner's allocation (the message names neither the owner
    nor more of the allocation than the caller gave)."""
    if not owns(caller, owner):
        raise PermissionDeniedError(
            f"{caller} may not {action} allocation {allocation_id!r}: it belongs to another owner"
        )


def check_listing(caller: Identity, owner: str) -> None:
    """A listing or watch filtered by `owner` needs the right to see that owner's."""
    if owner and not owns(caller, owner):
        raise PermissionDeniedError(f"{caller} may not list the allocations of owner {owner!r}")


def check_speaks_for(caller: Identity, node: str) -> None:
    """An agent registers and reports only for the node its identity names."""
    if caller.role is Role.ADMIN or (caller.role is Role.AGENT and caller.name == node):
        return
    if caller.role is Role.AGENT:
        raise PermissionDeniedError(
            f"{caller} may register and report only for node {caller.name!r}, not {node!r}"
        )
    raise PermissionDeniedError(f"{caller} may not register node {node!r}: it is not an agent")


def check_admin(caller: Identity, action: str) -> None:
    if caller.role is not Role.ADMIN:
        raise PermissionDeniedError(f"{caller} may not {action}: that takes the admin role")
