"""The coordinator's only door to etcd: reads, the watch stream, transactions and leases.

Callers hand over changes as data (`Txn`) and get plain values back; this module turns them
into etcd requests and turns etcd's failures into the project's errors. It uses aetcd's
channel and generated etcd stubs directly: aetcd's own watch helper splits responses into
single events and drops the response revision, which the cluster view needs to know how far
it has caught up. It dials TLS and authenticates to etcd as `EtcdSecurity` says, and sends
the auth token with every call.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
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


class CompactedError(UnavailableError):
    """The watch asked for history etcd has already compacted; re-list and start over."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"etcd compacted history up to revision {compact_revision}")
        self.compact_revision = compact_revision


def parse_endpoints(endpoints: Sequence[str]) -> tuple[str, int, str]:
    """(host, port, target) for aetcd from `host:port` endpoints.

    aetcd dials `host:port`; several endpoints become one gRPC `ipv4:a:p,b:q` target (IP
    addresses only), so the channel fails over between them.
    """
    parsed: list[tuple[str, int]] = []
    for endpoint in endpoints:
        text = endpoint.removeprefix(PLAINTEXT).removeprefix(TLS)
        if "://" in text:
            raise InvalidArgumentError(
                "etcd endpoint", endpoint, "host:port, http://host:port or https://host:port"
            )
        host, sep, port_text = text.rpartition(":")
        if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise InvalidArgumentError("etcd endpoint", endpoint, "host:port, e.g. 127.0.0.1:2379")
        parsed.append((host, int(port_text)))
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


def _unavailable(error: Exception, target: str) -> UnavailableError:
    detail = (error.details() if isinstance(error, AioRpcError) else str(error)) or ""
    hint = (
        " (etcd refused the TLS handshake: check --etcd-ca, and that --etcd-cert comes "
        "from the CA etcd trusts)"
        if is_tls_refusal(detail)
        else ""
    )
    return UnavailableError(f"etcd at {target} is unavailable: {detail}{hint}")


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
        options: dict[str, Any] = {
            "host": host,
            "port": port,
            "timeout": timeout_s,
            "options": dict(_CHANNEL_OPTIONS),
        }
        tls = check_endpoints(endpoints, security)
        if tls:  # several members: one name checked for all (credentials.tls_name_options)
            options["options"].update(credentials.tls_name_options(self.target))
        if self._security.user and not tls and not credentials.is_loopback(self.target):
            raise FailedPreconditionError(
                f"--etcd-user would send its password to etcd at {self.target} in plaintext: "
                "give --etcd-ca (TLS to etcd), or reach etcd on loopback"
            )
        self._client: Any = (
            _TlsClient(_channel_credentials(self._security), **options)
            if tls
            else aetcd.Client(**options)
        )
        self._token: Metadata | None = None if self._security.user else ()
        """What every call carries: etcd's auth token (None: not authenticated yet)."""
        self._authenticating = asyncio.Lock()

    async def connect(self) -> None:
        await self._client.connect()
        if self._token is None:
            await self._authenticate(None)

    async def close(self) -> None:
        await self._client.close()
        if self._security.user:
            self._token = None  # a new channel authenticates anew

    async def _authenticate(self, lapsed: Metadata | None) -> None:
        """Gets a new token unless another call already replaced the `lapsed` one."""
        async with self._authenticating:
            if self._token != lapsed:
                return
            request = rpc.AuthenticateRequest(
                name=self._security.user, password=self._security.password
            )
            try:
                reply = await rpc.AuthStub(self._client.channel).Authenticate(
                    request, timeout=self._timeout_s
                )
            except AioRpcError as error:
                detail = error.details() or ""
                if "authentication is not enabled" in detail:
                    self._token = ()  # etcd takes every call without a token
                    return
                if "authentication failed" in detail:
                    raise UnauthenticatedError(
                        f"etcd at {self.target} refused --etcd-user {self._security.user!r}: "
                        f"wrong user name or password (check {PASSWORD_SOURCES})"
                    ) from None
                raise self._translate(error) from None
            self._token = (("token", reply.token),)

    async def _with_token(self, attempt: Callable[[Metadata], Awaitable[T]]) -> T:
        """Runs `attempt` with the auth token and, if etcd no longer takes that token,
        once more with a new one: a lapsed token is never the caller's problem."""
        token = self._token or ()
        try:
            return await attempt(token)
        except _TokenLapsed:
            if not self._security.user:
                raise
        await self._authenticate(token)
        return await attempt(self._token or ())

    async def _call(self, stub_method: Any, request: Any) -> Any:
        """Runs one unary etcd call; callers connect first (the stubs exist once connected)."""

        async def attempt(token: Metadata) -> Any:
            try:
                return await stub_method(request, timeout=self._timeout_s, metadata=token)
            except AioRpcError as error:
                raise self._translate(error) from None

        return await self._with_token(attempt)

    def _who(self) -> str:
        if self._security.user:
            return f"--etcd-user {self._security.user!r}"
        return "this coordinator's certificate" if self._security.cert else "an anonymous client"

    def _translate(self, error: AioRpcError) -> KaiwoGpuError:
        """Every etcd failure becomes one of ours, in words, never a gRPC repr."""
        code, detail = error.code(), error.details() or ""
        if any(words in detail for words in _TOKEN_LAPSED):
            return _TokenLapsed(f"etcd at {self.target} refused the auth token: {detail}")
        if code is StatusCode.UNAUTHENTICATED or "user name is empty" in detail:
            return UnauthenticatedError(
                f"etcd at {self.target} requires authentication ({detail}): give --etcd-user "
                f"and its password ({PASSWORD_SOURCES}), or --etcd-cert with a certificate "
                "whose common name is an etcd user"
            )
        if code is StatusCode.PERMISSION_DENIED:
            return PermissionDeniedError(
                f"etcd at {self.target} denied {self._who()} ({detail}): grant its role "
                "read and write on the coordinator's key prefix"
            )
        if code is StatusCode.NOT_FOUND:  # e.g. a put on a lease that has expired
            return NotFoundError(f"etcd: {detail}")
        if code is StatusCode.RESOURCE_EXHAUSTED and "space" in detail:
            return UnavailableError(
                f"etcd at {self.target} is out of space ({detail}); compact and defragment it "
                "and disarm the NOSPACE alarm"
            )
        if code is StatusCode.OUT_OF_RANGE:
            return _PageCompacted(f"etcd at {self.target}: {detail}")
        if code in _UNREACHABLE:
            return _unavailable(error, self.target)
        # CANCELLED, UNKNOWN, INTERNAL...: the call may or may not have taken effect.
        return UnavailableError(f"etcd at {self.target} failed ({code.name}): {detail}")

    async def read_prefix(self, prefix: bytes, page_size: int = 5000) -> tuple[int, list[KeyValue]]:
        """Every key under `prefix` at one revision, and that revision.

        Read in pages, all at the first page's revision, so a large cluster never meets
        the message size limit and the result is still one consistent snapshot.
        """
        await self.connect()
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
                self._client.kvstub.Range,
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
        await self.connect()
        response = await self._call(self._client.kvstub.Range, rpc.RangeRequest(key=key))
        if not response.kvs:
            return int(response.header.revision), None
        kv = response.kvs[0]
        return int(response.header.revision), KeyValue(kv.key, kv.value, kv.mod_revision, kv.lease)

    async def revision(self) -> int:
        """etcd's current revision (a linearizable read of nothing)."""
        await self.connect()
        response = await self._call(
            self._client.kvstub.Range, rpc.RangeRequest(key=b"\0", count_only=True)
        )
        return int(response.header.revision)

    async def commit(self, txn: Txn) -> TxnResult:
        await self.connect()
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
            self._client.kvstub.Txn,
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
        await self.connect()
        await self._call(self._client.kvstub.Compact, rpc.CompactionRequest(revision=revision))

    async def grant_lease(self, ttl_s: int) -> tuple[int, int]:
        """(lease id, granted TTL in seconds)."""
        await self.connect()
        response = await self._call(
            self._client.leasestub.LeaseGrant, rpc.LeaseGrantRequest(TTL=ttl_s)
        )
        return int(response.ID), int(response.TTL)

    async def refresh_lease(self, lease_id: int) -> int:
        """Renews the lease; returns its TTL in seconds, 0 when it no longer exists."""
        await self.connect()
        return (await self._refresh_chunk([lease_id]))[lease_id]

    async def refresh_leases(self, lease_ids: Sequence[int]) -> dict[int, int]:
        """Renews many leases: lease id -> TTL (0: gone). Chunks of LEASES_PER_STREAM go
        over concurrent keep-alive streams, each with its own deadline; a lease whose chunk
        failed is left out (unknown), and only when every chunk failed does this raise."""
        unique = list(dict.fromkeys(lease_ids))
        if not unique:
            return {}
        await self.connect()
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
        async def attempt(token: Metadata) -> dict[int, int]:
            replies: dict[int, int] = {}
            try:
                call = self._client.leasestub.LeaseKeepAlive(
                    iter([rpc.LeaseKeepAliveRequest(ID=lease_id) for lease_id in lease_ids]),
                    timeout=self._timeout_s,
                    metadata=token,
                )
                async for reply in call:
                    replies[int(reply.ID)] = int(reply.TTL)
                    if len(replies) == len(lease_ids):
                        break
            except AioRpcError as error:
                raise self._translate(error) from None
            return replies

        replies = await self._with_token(attempt)
        return {lease_id: max(replies.get(lease_id, 0), 0) for lease_id in lease_ids}

    async def db_size(self) -> int:
        """The size of etcd's database in bytes, as the member this store talks to has it."""
        await self.connect()
        response = await self._call(self._client.maintenancestub.Status, rpc.StatusRequest())
        return int(response.dbSize)

    async def lease_ttl(self, lease_id: int) -> int:
        """Seconds the lease has left, read from etcd; 0 when it no longer exists."""
        await self.connect()
        response = await self._call(
            self._client.leasestub.LeaseTimeToLive, rpc.LeaseTimeToLiveRequest(ID=lease_id)
        )
        return max(int(response.TTL), 0)

    async def revoke_lease(self, lease_id: int) -> None:
        """Drops the lease and every key on it; a lease that is already gone is fine."""
        await self.connect()
        with contextlib.suppress(NotFoundError):
            await self._call(
                self._client.leasestub.LeaseRevoke, rpc.LeaseRevokeRequest(ID=lease_id)
            )

    async def _open_watch(self, request: Any, token: Metadata) -> tuple[Any, Any]:
        """A watch stream and its first response. etcd checks the token as the watch is
        created and cancels it if refused; etcd 3.5.1 says "permission denied" for a
        lapsed token too, so with an etcd user that also means: authenticate again."""
        call = rpc.WatchStub(self._client.channel).Watch(metadata=_HAS_LEADER + token)
        try:
            await call.write(request)
            response = await call.read()
        except AioRpcError as error:
            call.cancel()
            raise _unavailable(error, self.target) from None
        except BaseException:
            call.cancel()
            raise
        reason = getattr(response, "cancel_reason", "")
        refusals = _TOKEN_LAPSED + (("permission denied",) if self._security.user else ())
        if getattr(response, "canceled", False) and any(w in reason for w in refusals):
            call.cancel()
            raise _TokenLapsed(f"etcd at {self.target} cancelled the watch: {reason}")
        return call, response

    async def watch(
        self, prefix: bytes, start_revision: int
    ) -> AsyncIterator[tuple[int, list[Change]]]:
        """(revision, changes) per watch response, from `start_revision` on.

        The revision is the newest change's, or for a progress notice the header's; the
        response that confirms the watch comes as (0, []).

        Ends with UnavailableError when the stream breaks (etcd restarted, no leader), and
        CompactedError when `start_revision` is no longer in etcd's history.
        """
        await self.connect()
        request = rpc.WatchRequest(
            create_request=rpc.WatchCreateRequest(
                key=prefix,
                range_end=aetcd.utils.prefix_range_end(prefix),
                start_revision=start_revision,
                progress_notify=True,
            )
        )
        try:
            call, response = await self._with_token(functools.partial(self._open_watch, request))
        except _TokenLapsed as refused:  # again with a new token: etcd denies the watch
            raise UnavailableError(refused.message) from None
        try:
            while True:
                if response is None or not isinstance(response, rpc.WatchResponse):
                    raise UnavailableError(f"etcd at {self.target} closed the watch stream")
                if response.compact_revision:
                    raise CompactedError(response.compact_revision)
                if response.canceled:
                    raise UnavailableError(
                        f"etcd at {self.target} cancelled the watch: {response.cancel_reason}"
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
            raise _unavailable(error, self.target) from None
        finally:
            call.cancel()
            await asyncio.sleep(0)
