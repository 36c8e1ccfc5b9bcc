"""The asyncio storage-broker client shared by the safekeeper (publish + subscribe-all) and the
pageserver (subscribe per timeline); spec safekeeper-and-broker §5.4-5.6.

It owns the endpoint URL handling (`http://host:port` plaintext, `https://` TLS, as Neon's
`broker_endpoint`), the channel options (HTTP/2 keepalive 5 s also while idle, 5 s connect
timeout), `SafekeeperTimelineInfo` (a typed record of the protobuf message of that name, with
`TenantId`, `TimelineId` and `Lsn` fields) and its conversion to and from protobuf, and the
mapping of gRPC failures to `BrokerError`s. The channel connects lazily, on the first call.
Reconnecting is the caller's business: Neon's callers restart their push/pull task a second after
any failure, and so should ours.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from urllib.parse import urlsplit

# Before grpc is first imported: its fork handlers crashed children the daemons fork to exec
# (initdb, postgres) while gRPC threads ran (a segfault in cygrpc, initdb "exit -11"). Our
# children never use gRPC, so the handlers have nothing to do.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import grpc
import structlog
from google.protobuf import empty_pb2

from neon.utils.id import TenantId, TimelineId
from neon.utils.lsn import Lsn

from .build_proto import ensure_generated

ensure_generated()
from ._generated import broker_pb2, broker_pb2_grpc  # noqa: E402

log = structlog.get_logger("broker_client")

DEFAULT_ENDPOINT = "http://127.0.0.1:50051"
DEFAULT_KEEPALIVE_INTERVAL = 5.0  # seconds, `broker_keepalive_interval` / `--broker-keepalive-interval`
DEFAULT_CONNECT_TIMEOUT = 5.0  # seconds
_KEEPALIVE_TIMEOUT_MS = 20_000

ProtoTimelineInfo = broker_pb2.SafekeeperTimelineInfo
_LSN_ZERO = Lsn(0)  # immutable, so one shared dataclass default is safe


class BrokerError(Exception):
    """A broker call failed; `code` is the gRPC status (None if the failure was not a gRPC one)."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None, details: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.details = details


class BrokerUnavailable(BrokerError):
    """The broker cannot be reached, or the connection to it broke (status UNAVAILABLE)."""


class BrokerInvalidArgument(BrokerError):
    """The broker refused a request or a published message (status INVALID_ARGUMENT)."""


class BrokerMalformedMessage(BrokerError, ValueError):
    """A received message cannot be converted (missing or malformed ids)."""


@dataclass(frozen=True)
class SafekeeperTimelineInfo:
    """One `SafekeeperTimelineInfo`: a safekeeper's view of one timeline (values per spec §5.2)."""

    safekeeper_id: int
    tenant_id: TenantId
    timeline_id: TimelineId
    term: int = 0
    last_log_term: int = 0
    flush_lsn: Lsn = _LSN_ZERO
    commit_lsn: Lsn = _LSN_ZERO
    backup_lsn: Lsn = _LSN_ZERO
    remote_consistent_lsn: Lsn = _LSN_ZERO
    peer_horizon_lsn: Lsn = _LSN_ZERO
    local_start_lsn: Lsn = _LSN_ZERO
    safekeeper_connstr: str = ""
    http_connstr: str = ""
    availability_zone: str | None = None  # proto3 `optional`: None is "not set", not ""

    def to_proto(self) -> ProtoTimelineInfo:
        msg = ProtoTimelineInfo(
            safekeeper_id=self.safekeeper_id,
            tenant_timeline_id=tenant_timeline_to_proto(self.tenant_id, self.timeline_id),
            term=self.term,
            last_log_term=self.last_log_term,
            flush_lsn=int(self.flush_lsn),
            commit_lsn=int(self.commit_lsn),
            backup_lsn=int(self.backup_lsn),
            remote_consistent_lsn=int(self.remote_consistent_lsn),
            peer_horizon_lsn=int(self.peer_horizon_lsn),
            local_start_lsn=int(self.local_start_lsn),
            safekeeper_connstr=self.safekeeper_connstr,
            http_connstr=self.http_connstr,
        )
        if self.availability_zone is not None:
            msg.availability_zone = self.availability_zone
        return msg

    @classmethod
    def from_proto(cls, msg: ProtoTimelineInfo) -> SafekeeperTimelineInfo:
        if not msg.HasField("tenant_timeline_id"):
            raise BrokerMalformedMessage("broker message without tenant_timeline_id")
        tenant_id, timeline_id = tenant_timeline_from_proto(msg.tenant_timeline_id)
        return cls(
            safekeeper_id=msg.safekeeper_id,
            tenant_id=tenant_id,
            timeline_id=timeline_id,
            term=msg.term,
            last_log_term=msg.last_log_term,
            flush_lsn=Lsn(msg.flush_lsn),
            commit_lsn=Lsn(msg.commit_lsn),
            backup_lsn=Lsn(msg.backup_lsn),
            remote_consistent_lsn=Lsn(msg.remote_consistent_lsn),
            peer_horizon_lsn=Lsn(msg.peer_horizon_lsn),
            local_start_lsn=Lsn(msg.local_start_lsn),
            safekeeper_connstr=msg.safekeeper_connstr,
            http_connstr=msg.http_connstr,
            availability_zone=msg.availability_zone if msg.HasField("availability_zone") else None,
        )


def tenant_timeline_to_proto(tenant_id: TenantId, timeline_id: TimelineId) -> broker_pb2.TenantTimelineId:
    return broker_pb2.TenantTimelineId(tenant_id=bytes(tenant_id), timeline_id=bytes(timeline_id))


def tenant_timeline_from_proto(ttid: broker_pb2.TenantTimelineId) -> tuple[TenantId, TimelineId]:
    try:
        return TenantId(ttid.tenant_id), TimelineId(ttid.timeline_id)
    except ValueError as e:
        raise BrokerMalformedMessage(f"malformed tenant/timeline id in broker message: {e}") from None


def subscribe_request(
    tenant_id: TenantId | None = None, timeline_id: TimelineId | None = None
) -> broker_pb2.SubscribeSafekeeperInfoRequest:
    """Both ids: that timeline only; neither: everything. One without the other is a usage error."""
    if tenant_id is None and timeline_id is None:
        return broker_pb2.SubscribeSafekeeperInfoRequest(all=empty_pb2.Empty())
    if tenant_id is None or timeline_id is None:
        raise ValueError("subscribe: give both tenant_id and timeline_id, or neither (all timelines)")
    return broker_pb2.SubscribeSafekeeperInfoRequest(
        tenant_timeline_id=tenant_timeline_to_proto(TenantId(tenant_id), TimelineId(timeline_id))
    )


@dataclass(frozen=True)
class Endpoint:
    target: str  # grpc target, host:port
    tls: bool


def parse_endpoint(endpoint: str) -> Endpoint:
    """`http://host:port[/]` → plaintext, `https://...` → TLS; the port defaults as in URLs."""
    url = urlsplit(endpoint.strip())
    if url.scheme not in ("http", "https"):
        raise ValueError(f"invalid broker endpoint {endpoint!r}: expected http://host:port or https://host:port")
    if not url.hostname:
        raise ValueError(f"invalid broker endpoint {endpoint!r}: no host")
    if url.path not in ("", "/") or url.query or url.fragment:
        raise ValueError(f"invalid broker endpoint {endpoint!r}: unexpected path or query")
    try:
        port = url.port
    except ValueError:
        raise ValueError(f"invalid broker endpoint {endpoint!r}: bad port") from None
    tls = url.scheme == "https"
    if port is None:
        port = 443 if tls else 80
    host = f"[{url.hostname}]" if ":" in url.hostname else url.hostname
    return Endpoint(f"{host}:{port}", tls)


def _channel_options(keepalive_interval: float, connect_timeout: float) -> list[tuple[str, int]]:
    return [
        ("grpc.keepalive_time_ms", int(keepalive_interval * 1000)),
        ("grpc.keepalive_timeout_ms", _KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),  # like tonic's keep_alive_while_idle(true)
        ("grpc.http2.max_pings_without_data", 0),  # keep pinging a quiet subscription
        # grpc-core takes its connect deadline from this (and also uses it as the minimum backoff).
        ("grpc.min_reconnect_backoff_ms", int(connect_timeout * 1000)),
        ("grpc.enable_retries", 0),  # failures surface to the caller, who owns the retry policy
    ]


def _map_rpc_error(what: str, e: grpc.aio.AioRpcError) -> BrokerError:
    code, details = e.code(), e.details() or ""
    message = f"broker {what} failed: {code.name}: {details}"
    if code == grpc.StatusCode.UNAVAILABLE:
        return BrokerUnavailable(message, code, details)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return BrokerInvalidArgument(message, code, details)
    return BrokerError(message, code, details)


class BrokerClient:
    """A lazily connected channel to one broker. Safe to share between tasks of one event loop."""

    def __init__(
        self,
        endpoint: str = DEFAULT_ENDPOINT,
        *,
        keepalive_interval: float = DEFAULT_KEEPALIVE_INTERVAL,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    ) -> None:
        self.endpoint = endpoint
        ep = parse_endpoint(endpoint)
        options = _channel_options(keepalive_interval, connect_timeout)
        if ep.tls:
            self._channel = grpc.aio.secure_channel(ep.target, grpc.ssl_channel_credentials(), options=options)
        else:
            self._channel = grpc.aio.insecure_channel(ep.target, options=options)
        self._stub = broker_pb2_grpc.BrokerServiceStub(self._channel)

    async def wait_ready(self, timeout: float) -> None:
        """Connect now instead of on the first call; BrokerUnavailable if not connected in time."""
        try:
            await asyncio.wait_for(self._channel.channel_ready(), timeout)
        except TimeoutError:
            raise BrokerUnavailable(f"broker {self.endpoint} not reachable within {timeout} s") from None

    async def publish(self, messages: AsyncIterable[SafekeeperTimelineInfo | ProtoTimelineInfo]) -> None:
        """Stream `messages` to the broker until the iterable ends (one long-lived call).

        Items are our records or, already built, protobuf messages (sent as they are).

        Raises BrokerError (BrokerUnavailable when the broker goes away); an exception raised by
        `messages` itself is re-raised as is.
        """
        source_error: list[BaseException] = []

        async def requests() -> AsyncIterator[ProtoTimelineInfo]:
            try:
                async for info in messages:
                    yield info if isinstance(info, ProtoTimelineInfo) else info.to_proto()
            except Exception as e:
                # grpc swallows request-iterator errors into a CANCELLED call; keep the real one.
                source_error.append(e)
                raise

        try:
            await self._stub.PublishSafekeeperInfo(requests())
        except grpc.aio.AioRpcError as e:
            if source_error:
                raise source_error[0] from None
            raise _map_rpc_error("publish", e) from None
        except asyncio.CancelledError:
            # grpc cancels the call when the request iterator fails; that is not our cancellation.
            task = asyncio.current_task()
            if source_error and (task is None or not task.cancelling()):
                raise source_error[0] from None
            raise
        if source_error:
            raise source_error[0]

    async def subscribe(
        self, tenant_id: TenantId | None = None, timeline_id: TimelineId | None = None
    ) -> AsyncIterator[SafekeeperTimelineInfo]:
        """Messages published from now on: all timelines, or the one given by both ids.

        Never ends by itself while the broker runs; a broken stream raises BrokerError. Messages
        the broker relays with malformed ids (possible on the all-keys stream) are skipped.
        """
        call = self._stub.SubscribeSafekeeperInfo(subscribe_request(tenant_id, timeline_id))
        try:
            async for msg in call:
                try:
                    info = SafekeeperTimelineInfo.from_proto(msg)
                except BrokerMalformedMessage as e:
                    log.warning("skipping malformed broker message", error=str(e), safekeeper_id=msg.safekeeper_id)
                    continue
                yield info
        except grpc.aio.AioRpcError as e:
            raise _map_rpc_error("subscribe", e) from None
        finally:
            call.cancel()
        # The broker never ends a stream; an orderly end means it is shutting down.
        raise BrokerUnavailable("broker subscribe stream ended", grpc.StatusCode.UNAVAILABLE)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> BrokerClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
