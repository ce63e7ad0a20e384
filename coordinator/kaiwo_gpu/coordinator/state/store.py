"""The coordinator's only door to etcd: reads, the watch stream, transactions and leases.

Callers hand over changes as data (`Txn`) and get plain values back; this module turns them
into etcd requests and turns etcd's failures into the project's errors. It uses aetcd's
channel and generated etcd stubs directly: aetcd's own watch helper splits responses into
single events and drops the response revision, which the cluster view needs to know how far
it has caught up. It dials TLS and authenticates to etcd as `EtcdSecurity` says, and sends
the auth token with every call.

Over TLS, several endpoints get a channel each, checked against its own address: members
hold certificates for their own addresses only, and gRPC checks one name per channel. The
store talks to one member at a time and moves to the next when that one cannot be reached,
as etcd's clientv3 does. Plaintext endpoints share one channel, which fails over by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import operator
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aetcd
import grpc
from aetcd import rpc
from aetcd.rpc import AioRpcError, StatusCode

from kaiwo_gpu.common import credentials
from kaiwo_gpu.common.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    KaiwoGpuError,
    NotFoundError,
    PermissionDeniedError,
    UnauthenticatedError,
    UnavailableError,
    is_tls_refusal,
)
from kaiwo_gpu.coordinator.state.changes import Change, KeyValue, Txn, TxnResult
from kaiwo_gpu.coordinator.state.etcd_security import (
    PASSWORD_SOURCES,
    PLAINTEXT,
    TLS,
    EtcdSecurity,
    check_endpoints,
)

T = TypeVar("T")
Metadata = tuple[tuple[str, str], ...]

_UNREACHABLE = frozenset({StatusCode.UNAVAILABLE, StatusCode.DEADLINE_EXCEEDED})
_CHANNEL_OPTIONS = {
    # A hung etcd shows up as a failed call instead of a call that waits forever.
    "grpc.keepalive_time_ms": 10_000,
    "grpc.keepalive_timeout_ms": 5_000,
    "grpc.keepalive_permit_without_calls": 1,
    "grpc.max_receive_message_length": 64 * 1024 * 1024,
}
_HAS_LEADER = (("hasleader", "true"),)
_IDEMPOTENT = frozenset(
    {"kvstub.Range", "maintenancestub.Status", "leasestub.LeaseTimeToLive", "leasestub.LeaseRevoke"}
)
"""Unary calls that may be sent to a second member after the first may have taken them
(a revoked lease is gone either way); a transaction, a lease grant or a compaction may not."""
_NOT_SENT = "failed to connect to all addresses"
"""gRPC's words for a call that failed before it left this process (no connection, or a
refused handshake): safe to send again elsewhere, even a transaction."""
_TOKEN_LAPSED = ("invalid auth token", "revision of auth store is old")
"""What etcd says of a token it no longer takes (a simple token lapses after minutes idle,
any token when users or roles change): authenticate again and retry."""


LEASES_PER_STREAM = 500
"""Renewals per keep-alive stream: a follower forwards each to the leader in turn, so one
stream for thousands of leases could outlast its deadline."""


class _PageCompacted(UnavailableError):
    """The revision a paged read pinned was compacted between pages."""


class _TokenLapsed(UnauthenticatedError):
    """etcd no longer takes the auth token the call carried."""


class _Unreachable(UnavailableError):
    """The member could not be reached. `sent`: the request may have reached it;
    `timed_out`: the call spent its deadline (sending it again would double the wait)."""

    def __init__(self, message: str, *, sent: bool, timed_out: bool) -> None:
        super().__init__(message)
        self.sent = sent
        self.timed_out = timed_out

    def may_resend(self, *, idempotent: bool) -> bool:
        """Whether the call may go to the next member: if it never left, or if sending
        it twice does no harm and the deadline was not spent."""
        return not self.sent or (idempotent and not self.timed_out)


class CompactedError(UnavailableError):
    """The watch asked for history etcd has already compacted; re-list and start over."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"etcd compacted history up to revision {compact_revision}")
        self.compact_revision = compact_revision


def _host_port(endpoint: str) -> tuple[str, int]:
    text = endpoint.removeprefix(PLAINTEXT).removeprefix(TLS)
    if "://" in text:
        raise InvalidArgumentError(
            "etcd endpoint", endpoint, "host:port, http://host:port or https://host:port"
        )
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise InvalidArgumentError("etcd endpoint", endpoint, "host:port, e.g. 127.0.0.1:2379")
    return host, int(port_text)


def parse_endpoints(endpoints: Sequence[str]) -> tuple[str, int, str]:
    """(host, port, target) for aetcd from `host:port` endpoints.

    aetcd dials `host:port`; several endpoints become one gRPC `ipv4:a:p,b:q` target (IP
    addresses only), so a plaintext channel fails over between them.
    """
    parsed = [_host_port(endpoint) for endpoint in endpoints]
    if not parsed:
        raise InvalidArgumentError("etcd endpoints", "", "at least one host:port")
    if len(parsed) == 1:
        host, port = parsed[0]
        return host, port, f"{host}:{port}"
    for host, _ in parsed:
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise InvalidArgumentError(
                "etcd endpoints", host, "IPv4 addresses when more than one endpoint is given"
            ) from None
    head = ",".join(f"{h}:{p}" for h, p in parsed[:-1])
    last_host, last_port = parsed[-1]
    return f"ipv4:{head},{last_host}", last_port, f"ipv4:{head},{last_host}:{last_port}"


def _unavailable(error: Exception, target: str) -> _Unreachable:
    detail = (error.details() if isinstance(error, AioRpcError) else str(error)) or ""
    hint = (
        " (etcd refused the TLS handshake: check --etcd-ca, and that --etcd-cert comes "
        "from the CA etcd trusts)"
        if is_tls_refusal(detail)
        else ""
    )
    return _Unreachable(
        f"etcd at {target} is unavailable: {detail}{hint}",
        sent=_NOT_SENT not in detail,
        timed_out=isinstance(error, AioRpcError) and error.code() is StatusCode.DEADLINE_EXCEEDED,
    )


class _TlsClient(aetcd.Client):  # type: ignore[misc]
    """aetcd's client over TLS: aetcd 1.0's `connect` only dials plaintext. The store
    authenticates by itself (again whenever etcd drops its token), so this opens the
    channel and the stubs the store uses, and nothing else."""

    def __init__(self, channel_credentials: grpc.ChannelCredentials, **options: Any) -> None:
        super().__init__(**options)
        self._channel_credentials = channel_credentials

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        self.channel = rpc.secure_channel(
            f"{self._host}:{self._port}",
            self._channel_credentials,
            options=list(self._options.items()),
        )
        self.kvstub = rpc.KVStub(self.channel)
        self.leasestub = rpc.LeaseStub(self.channel)
        self.maintenancestub = rpc.MaintenanceStub(self.channel)
        self._connected.set()


def _channel_credentials(security: EtcdSecurity) -> grpc.ChannelCredentials:
    """The CA to check etcd against and the client certificate to show it, read now."""
    ca = credentials.read(security.ca, "--etcd-ca")
    cert = credentials.read(security.cert, "--etcd-cert")
    key = credentials.read(security.key, "--etcd-key")
    return grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )


@dataclass(eq=False, slots=True)
class _Member:
    """One channel to etcd (a member over TLS) and the auth token it was given (None: not
    authenticated yet); a token is asked of, and sent to, the member that issued it."""

    target: str
    client: Any
    token: Metadata | None
    authenticating: asyncio.Lock = field(default_factory=asyncio.Lock)


class EtcdStore:
    """One etcd client for the process; every call maps etcd outages to UnavailableError."""

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        timeout_s: float = 5.0,
        security: EtcdSecurity | None = None,
    ) -> None:
        host, port, self.target = parse_endpoints(endpoints)
        self._timeout_s = timeout_s
        self._security = security or EtcdSecurity()
        tls = check_endpoints(endpoints, security)
        if self._security.user and not tls and not credentials.is_loopback(self.target):
            raise FailedPreconditionError(
                f"--etcd-user would send its password to etcd at {self.target} in plaintext: "
                "give --etcd-ca (TLS to etcd), or reach etcd on loopback"
            )
        addresses = [_host_port(endpoint) for endpoint in endpoints] if tls else [(host, port)]
        self._members = [self._member(h, p, tls=tls) for h, p in addresses]
        self._current = 0
        """The member every call goes to until it cannot be reached."""

    def _member(self, host: str, port: int, *, tls: bool) -> _Member:
        options = {
            "host": host,
            "port": port,
            "timeout": self._timeout_s,
            "options": dict(_CHANNEL_OPTIONS),
        }
        client = (
            _TlsClient(_channel_credentials(self._security), **options)
            if tls
            else aetcd.Client(**options)
        )
        target = f"{host}:{port}" if tls else self.target
        return _Member(target, client, None if self._security.user else ())

    @property
    def _token(self) -> Metadata | None:
        """The auth token of the member in use."""
        return self._members[self._current].token

    @_token.setter
    def _token(self, token: Metadata | None) -> None:
        self._members[self._current].token = token

    async def connect(self) -> None:
        async def nothing(member: _Member, token: Metadata) -> None:
            return None

        await self._on_a_member(nothing, idempotent=True)

    async def close(self) -> None:
        for member in self._members:
            await member.client.close()
            if self._security.user:
                member.token = None  # a new channel authenticates anew

    def _move_on(self, member: _Member) -> None:
        """The next member serves from now on, unless another call moved on already."""
        index = self._members.index(member)
        if index == self._current:
            self._current = (index + 1) % len(self._members)

    async def _on_a_member(
        self, attempt: Callable[[_Member, Metadata], Awaitable[T]], *, idempotent: bool
    ) -> T:
        """Runs `attempt` on the member in use; when that member cannot be reached, moves
        on to the next and, where `_Unreachable.may_resend` allows, sends it there too
        (each member once). Otherwise the caller learns the outcome is unknown."""
        for _ in range(len(self._members) - 1):
            try:
                return await self._on(self._members[self._current], attempt)
            except _Unreachable as error:
                if not error.may_resend(idempotent=idempotent):
                    raise
        return await self._on(self._members[self._current], attempt)

    async def _on(self, member: _Member, attempt: Callable[[_Member, Metadata], Awaitable[T]]) -> T:
        try:
            await member.client.connect()
            if member.token is None:
                try:
                    await self._authenticate(member, None)
                except _Unreachable as error:  # the call itself never left: safe elsewhere
                    raise _Unreachable(error.message, sent=False, timed_out=False) from None
            return await self._with_token(member, attempt)
        except _Unreachable:
            self._move_on(member)
            raise

    async def _authenticate(self, member: _Member, lapsed: Metadata | None) -> None:
        """Gets a new token unless another call already replaced the `lapsed` one."""
        async with member.authenticating:
            if member.token != lapsed:
                return
            request = rpc.AuthenticateRequest(
                name=self._security.user, password=self._security.password
            )
            try:
                reply = await rpc.AuthStub(member.client.channel).Authenticate(
                    request, timeout=self._timeout_s
                )
            except AioRpcError as error:
                detail = error.details() or ""
                if "authentication is not enabled" in detail:
                    member.token = ()  # etcd takes every call without a token
                    return
                if "authentication failed" in detail:
                    raise UnauthenticatedError(
                        f"etcd at {member.target} refused --etcd-user {self._security.user!r}: "
                        f"wrong user name or password (check {PASSWORD_SOURCES})"
                    ) from None
                raise self._translate(error, member.target) from None
            member.token = (("token", reply.token),)

    async def _with_token(
        self, member: _Member, attempt: Callable[[_Member, Metadata], Awaitable[T]]
    ) -> T:
        """Runs `attempt` with the member's auth token and, if etcd no longer takes that
        token, once more with a new one: a lapsed token is never the caller's problem."""
        token = member.token or ()
        try:
            return await attempt(member, token)
        except _TokenLapsed:
            if not self._security.user:
                raise
        await self._authenticate(member, token)
        return await attempt(member, member.token or ())

    async def _call(self, stub_method: str, request: Any) -> Any:
        """Runs one unary etcd call: `stub_method` names it on the client, e.g. `kvstub.Range`."""
        method = operator.attrgetter(stub_method)

        async def attempt(member: _Member, token: Metadata) -> Any:
            try:
                return await method(member.client)(request, timeout=self._timeout_s, metadata=token)
            except AioRpcError as error:
                raise self._translate(error, member.target) from None

        return await self._on_a_member(attempt, idempotent=stub_method in _IDEMPOTENT)

    def _who(self) -> str:
        if self._security.user:
            return f"--etcd-user {self._security.user!r}"
        return "this coordinator's certificate" if self._security.cert else "an anonymous client"

    def _translate(self, error: AioRpcError, target: str) -> KaiwoGpuError:
        """Every etcd failure becomes one of ours, in words, never a gRPC repr."""
        code, detail = error.code(), error.details() or ""
        if any(words in detail for words in _TOKEN_LAPSED):
            return _TokenLapsed(f"etcd at {target} refused the auth token: {detail}")
        if code is StatusCode.UNAUTHENTICATED or "user name is empty" in detail:
            return UnauthenticatedError(
                f"etcd at {target} requires authentication ({detail}): give --etcd-user "
                f"and its password ({PASSWORD_SOURCES}), or --etcd-cert with a certificate "
                "whose common name is an etcd user"
            )
        if code is StatusCode.PERMISSION_DENIED:
            return PermissionDeniedError(
                f"etcd at {target} denied {self._who()} ({detail}): grant its role "
                "read and write on the coordinator's key prefix"
            )
        if code is StatusCode.NOT_FOUND:  # e.g. a put on a lease that has expired
            return NotFoundError(f"etcd: {detail}")
        if code is StatusCode.RESOURCE_EXHAUSTED and "space" in detail:
            return UnavailableError(
                f"etcd at {target} is out of space ({detail}); compact and defragment it "
                "and disarm the NOSPACE alarm"
            )
        if code is StatusCode.OUT_OF_RANGE:
            return _PageCompacted(f"etcd at {target}: {detail}")
        if code in _UNREACHABLE:
            return _unavailable(error, target)
        # CANCELLED, UNKNOWN, INTERNAL...: the call may or may not have taken effect.
        return UnavailableError(f"etcd at {target} failed ({code.name}): {detail}")

    async def read_prefix(self, prefix: bytes, page_size: int = 5000) -> tuple[int, list[KeyValue]]:
        """Every key under `prefix` at one revision, and that revision.

        Read in pages, all at the first page's revision, so a large cluster never meets
        the message size limit and the result is still one consistent snapshot.
        """
        for _ in range(3):  # history compacted between pages: start again, at once
            with contextlib.suppress(_PageCompacted):
                return await self._read_pages(prefix, page_size)
        return await self._read_pages(prefix, page_size)

    async def _read_pages(self, prefix: bytes, page_size: int) -> tuple[int, list[KeyValue]]:
        end = aetcd.utils.prefix_range_end(prefix)
        start, revision = prefix, 0
        kvs: list[KeyValue] = []
        while True:
            response = await self._call(
                "kvstub.Range",
                rpc.RangeRequest(key=start, range_end=end, limit=page_size, revision=revision),
            )
            revision = revision or int(response.header.revision)
            kvs += [KeyValue(kv.key, kv.value, kv.mod_revision, kv.lease) for kv in response.kvs]
            if not response.more or not response.kvs:
                return revision, kvs
            start = response.kvs[-1].key + b"\0"

    async def get(self, key: bytes) -> KeyValue | None:
        return (await self.read(key))[1]

    async def read(self, key: bytes) -> tuple[int, KeyValue | None]:
        """(etcd's revision at the read, the key's value or None)."""
        response = await self._call("kvstub.Range", rpc.RangeRequest(key=key))
        if not response.kvs:
            return int(response.header.revision), None
        kv = response.kvs[0]
        return int(response.header.revision), KeyValue(kv.key, kv.value, kv.mod_revision, kv.lease)

    async def revision(self) -> int:
        """etcd's current revision (a linearizable read of nothing)."""
        response = await self._call("kvstub.Range", rpc.RangeRequest(key=b"\0", count_only=True))
        return int(response.header.revision)

    async def commit(self, txn: Txn) -> TxnResult:
        compares = [
            rpc.Compare(
                key=key, target=rpc.Compare.MOD, result=rpc.Compare.EQUAL, mod_revision=revision
            )
            for key, revision in txn.expect_mod_revision
        ]
        compares += [
            rpc.Compare(key=key, target=rpc.Compare.VERSION, result=rpc.Compare.GREATER, version=0)
            for key in txn.expect_present
        ]
        success = [
            rpc.RequestOp(request_put=rpc.PutRequest(key=put.key, value=put.value, lease=put.lease))
            for put in txn.puts
        ]
        success += [
            rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=key))
            for key in txn.deletes
        ]
        failure = [
            rpc.RequestOp(request_range=rpc.RangeRequest(key=key)) for key in txn.read_on_failure
        ]
        response = await self._call(
            "kvstub.Txn",
            rpc.TxnRequest(compare=compares, success=success, failure=failure),
        )
        current: dict[bytes, KeyValue] = {}
        if not response.succeeded:
            for op in response.responses:
                for kv in op.response_range.kvs:
                    current[kv.key] = KeyValue(kv.key, kv.value, kv.mod_revision, kv.lease)
        return TxnResult(response.succeeded, response.header.revision, current)

    async def compact(self, revision: int) -> None:
        """Drops history before `revision` (what etcd's auto-compaction does on a timer)."""
        await self._call("kvstub.Compact", rpc.CompactionRequest(revision=revision))

    async def grant_lease(self, ttl_s: int) -> tuple[int, int]:
        """(lease id, granted TTL in seconds)."""
        response = await self._call("leasestub.LeaseGrant", rpc.LeaseGrantRequest(TTL=ttl_s))
        return int(response.ID), int(response.TTL)

    async def refresh_lease(self, lease_id: int) -> int:
        """Renews the lease; returns its TTL in seconds, 0 when it no longer exists."""
        return (await self._refresh_chunk([lease_id]))[lease_id]

    async def refresh_leases(self, lease_ids: Sequence[int]) -> dict[int, int]:
        """Renews many leases: lease id -> TTL (0: gone). Chunks of LEASES_PER_STREAM go
        over concurrent keep-alive streams, each with its own deadline; a lease whose chunk
        failed is left out (unknown), and only when every chunk failed does this raise."""
        unique = list(dict.fromkeys(lease_ids))
        if not unique:
            return {}
        chunks = [
            unique[start : start + LEASES_PER_STREAM]
            for start in range(0, len(unique), LEASES_PER_STREAM)
        ]
        outcomes = await asyncio.gather(
            *(self._refresh_chunk(chunk) for chunk in chunks), return_exceptions=True
        )
        ttls: dict[int, int] = {}
        failures: list[BaseException] = []
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                failures.append(outcome)
            else:
                ttls.update(outcome)
        if failures and not ttls:
            raise failures[0]
        return ttls

    async def _refresh_chunk(self, lease_ids: list[int]) -> dict[int, int]:
        async def attempt(member: _Member, token: Metadata) -> dict[int, int]:
            replies: dict[int, int] = {}
            try:
                call = member.client.leasestub.LeaseKeepAlive(
                    iter([rpc.LeaseKeepAliveRequest(ID=lease_id) for lease_id in lease_ids]),
                    timeout=self._timeout_s,
                    metadata=token,
                )
                async for reply in call:
                    replies[int(reply.ID)] = int(reply.TTL)
                    if len(replies) == len(lease_ids):
                        break
            except AioRpcError as error:
                raise self._translate(error, member.target) from None
            return replies

        replies = await self._on_a_member(attempt, idempotent=True)  # renewing twice is fine
        return {lease_id: max(replies.get(lease_id, 0), 0) for lease_id in lease_ids}

    async def db_size(self) -> int:
        """The size of etcd's database in bytes, as the member this store talks to has it."""
        response = await self._call("maintenancestub.Status", rpc.StatusRequest())
        return int(response.dbSize)

    async def lease_ttl(self, lease_id: int) -> int:
        """Seconds the lease has left, read from etcd; 0 when it no longer exists."""
        response = await self._call(
            "leasestub.LeaseTimeToLive", rpc.LeaseTimeToLiveRequest(ID=lease_id)
        )
        return max(int(response.TTL), 0)

    async def revoke_lease(self, lease_id: int) -> None:
        """Drops the lease and every key on it; a lease that is already gone is fine."""
        with contextlib.suppress(NotFoundError):
            await self._call("leasestub.LeaseRevoke", rpc.LeaseRevokeRequest(ID=lease_id))

    async def _open_watch(
        self, request: Any, member: _Member, token: Metadata
    ) -> tuple[Any, Any, _Member]:
        """A watch stream, its first response and the member it is on. etcd checks the
        token as the watch is created and cancels it if refused; etcd 3.5.1 says
        "permission denied" for a lapsed token too, so with an etcd user that also means:
        authenticate again."""
        call = rpc.WatchStub(member.client.channel).Watch(metadata=_HAS_LEADER + token)
        try:
            await call.write(request)
            response = await call.read()
        except AioRpcError as error:
            call.cancel()
            raise _unavailable(error, member.target) from None
        except BaseException:
            call.cancel()
            raise
        reason = getattr(response, "cancel_reason", "")
        refusals = _TOKEN_LAPSED + (("permission denied",) if self._security.user else ())
        if getattr(response, "canceled", False) and any(w in reason for w in refusals):
            call.cancel()
            raise _TokenLapsed(f"etcd at {member.target} cancelled the watch: {reason}")
        return call, response, member

    async def watch(
        self, prefix: bytes, start_revision: int
    ) -> AsyncIterator[tuple[int, list[Change]]]:
        """(revision, changes) per watch response, from `start_revision` on.

        The revision is the newest change's, or for a progress notice the header's; the
        response that confirms the watch comes as (0, []).

        Ends with UnavailableError when the stream breaks (etcd restarted, no leader), and
        CompactedError when `start_revision` is no longer in etcd's history. A watch that
        breaks moves the store on to the next member, so the caller's next watch finds one
        that serves.
        """
        request = rpc.WatchRequest(
            create_request=rpc.WatchCreateRequest(
                key=prefix,
                range_end=aetcd.utils.prefix_range_end(prefix),
                start_revision=start_revision,
                progress_notify=True,
            )
        )
        try:
            call, response, member = await self._on_a_member(
                functools.partial(self._open_watch, request), idempotent=True
            )
        except _TokenLapsed as refused:  # again with a new token: etcd denies the watch
            raise UnavailableError(refused.message) from None
        try:
            while True:
                if response is None or not isinstance(response, rpc.WatchResponse):
                    raise UnavailableError(f"etcd at {member.target} closed the watch stream")
                if response.compact_revision:
                    raise CompactedError(response.compact_revision)
                if response.canceled:  # e.g. the member lost its leader (hasleader)
                    raise UnavailableError(
                        f"etcd at {member.target} cancelled the watch: {response.cancel_reason}"
                    )
                changes = [
                    Change(
                        event.kv.key,
                        None if event.type == rpc.Event.DELETE else event.kv.value,
                        event.kv.mod_revision,
                        event.kv.lease,
                    )
                    for event in response.events
                ]
                if changes:
                    yield max(change.revision for change in changes), changes
                elif response.created:
                    # The watch is up; its header revision cannot be trusted while
                    # history is still replaying, so it moves nothing forward.
                    yield 0, changes
                else:
                    # A progress notice: every change up to this revision has been sent.
                    yield response.header.revision, changes
                response = await call.read()
        except AioRpcError as error:
            self._move_on(member)
            raise _unavailable(error, member.target) from None
        except CompactedError:
            raise
        except UnavailableError:
            self._move_on(member)
            raise
        finally:
            call.cancel()
            await asyncio.sleep(0)
