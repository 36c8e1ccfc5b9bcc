"""The storage broker's gRPC service: stateless, best-effort pub/sub of `SafekeeperTimelineInfo`
(spec safekeeper-and-broker §5.3, Neon's `storage_broker/src/bin/storage_broker.rs`).

This module owns the broker's in-memory state (who subscribes to what, the broadcast channels),
the `BrokerService` servicer, the optional HTTP status/metrics app and the `Broker` object that
runs both listeners.

Semantics, as Neon's:
* A published message goes to the shared "all keys" channel, then — after its tenant/timeline id
  has been checked — to that timeline's channel if anybody subscribes to the timeline. A missing
  or malformed id fails the publish RPC with INVALID_ARGUMENT (the message has already reached
  the "all" subscribers, as in Neon).
* Nothing is retained: a subscriber sees only messages published after it registered.
* Channels are bounded broadcast rings (tokio's `broadcast` semantics): publishers never wait for
  subscribers. A subscriber that falls more than the capacity behind skips the oldest messages,
  which are counted and warned about at most once a second, and its stream goes on. (Neon does
  not end a lagging stream; the messages are heartbeats, re-sent every second, so skipping is the
  right recovery.) Capacities: 32 per timeline, 16384 for "all keys".
* The broker never ends a subscription stream itself.

Deviation from Neon: Neon serves gRPC (h2c) and HTTP/1 `/metrics` and `/status` on one port,
switching on the request's content-type. grpcio owns its listening socket and cannot hand
HTTP/1 requests to another handler, so gRPC is served on `--listen-addr` and the HTTP endpoints,
when wanted, on a separate `--listen-http` address (aiohttp).

Keepalive: the server pings every `http2_keepalive_interval` (5 s) like Neon's hyper server. Neon's
clients (tonic) also ping every 5 s while idle; grpc-core's server would by default call that
abuse (minimum 5 minutes between data-less pings) and send GOAWAY `too_many_pings`, so those
limits are relaxed to accept them.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import grpc
import structlog
from aiohttp import web
from google.protobuf import empty_pb2
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric

from neon.utils.id import TenantId, TimelineId
from neon.utils.metrics import MetricSet

from .build_proto import ensure_generated

ensure_generated()
from ._generated import broker_pb2, broker_pb2_grpc  # noqa: E402

log = structlog.get_logger("storage_broker")

DEFAULT_LISTEN_ADDR = "127.0.0.1:50051"
DEFAULT_TIMELINE_CHAN_SIZE = 32
DEFAULT_ALL_KEYS_CHAN_SIZE = 16384
DEFAULT_KEEPALIVE_INTERVAL = 5.0  # seconds
KEEPALIVE_TIMEOUT = 20.0  # seconds without a ping ack before the connection is dropped (hyper's default)
LAG_WARN_INTERVAL = 1.0  # seconds between "dropped N messages" warnings per subscriber

T = TypeVar("T")

TenantTimeline = tuple[TenantId, TimelineId]


class InvalidArgument(ValueError):
    """A request the broker refuses; the text becomes the INVALID_ARGUMENT status details."""


def parse_proto_ttid(ttid: broker_pb2.TenantTimelineId) -> TenantTimeline:
    """Protobuf bytes have no fixed size: check that both ids are exactly 16 bytes."""
    try:
        tenant_id = TenantId(ttid.tenant_id)
    except ValueError as e:
        raise InvalidArgument(f"malformed tenant_id: {e}") from None
    try:
        timeline_id = TimelineId(ttid.timeline_id)
    except ValueError as e:
        raise InvalidArgument(f"malformed timeline_id: {e}") from None
    return tenant_id, timeline_id


def parse_subscription_key(request: broker_pb2.SubscribeSafekeeperInfoRequest) -> TenantTimeline | None:
    """None means "all keys"."""
    which = request.WhichOneof("subscription_key")
    if which is None:
        raise InvalidArgument("missing subscription key")
    if which == "all":
        return None
    return parse_proto_ttid(request.tenant_timeline_id)


class Broadcast(Generic[T]):
    """A bounded broadcast ring, like tokio's `broadcast` channel.

    `send` never waits: it overwrites the oldest slot. Each receiver keeps its own position;
    one that has fallen more than `capacity` behind learns how many messages it skipped.
    Everything runs on one event loop, so no locking is needed.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("broadcast capacity must be at least 1")
        self.capacity = capacity
        self._ring: list[T | None] = [None] * capacity
        self._sent = 0  # sequence number of the next message
        self._wakeup: asyncio.Future[None] | None = None
        self.receivers = 0

    def send(self, msg: T) -> bool:
        """Returns whether anybody was subscribed (otherwise the message is just dropped)."""
        if self.receivers == 0:
            return False
        self._ring[self._sent % self.capacity] = msg
        self._sent += 1
        if self._wakeup is not None:
            if not self._wakeup.done():
                self._wakeup.set_result(None)
            self._wakeup = None
        return True

    def subscribe(self) -> BroadcastReceiver[T]:
        self.receivers += 1
        return BroadcastReceiver(self, self._sent)

    async def _wait_beyond(self, seq: int) -> None:
        while self._sent <= seq:
            if self._wakeup is None:
                self._wakeup = asyncio.get_running_loop().create_future()
            # shield: one receiver being cancelled must not cancel the future others wait on.
            await asyncio.shield(self._wakeup)


@dataclass
class Lagged:
    """What a receiver gets instead of a message when it has fallen behind."""

    skipped: int


class BroadcastReceiver(Generic[T]):
    def __init__(self, chan: Broadcast[T], start: int) -> None:
        self._chan = chan
        self._next = start
        self._closed = False

    async def recv(self) -> T | Lagged:
        chan = self._chan
        await chan._wait_beyond(self._next)
        oldest = chan._sent - chan.capacity
        if self._next < oldest:
            skipped = oldest - self._next
            self._next = oldest
            return Lagged(skipped)
        msg = chan._ring[self._next % chan.capacity]
        self._next += 1
        assert msg is not None
        return msg

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._chan.receivers -= 1


class BrokerMetrics(MetricSet):
    """Neon's three gauges plus message counters; gauges are read from the registry when scraped."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        super().__init__(registry or CollectorRegistry())
        self.published = self.counter("storage_broker_published_messages_total", "Messages received from publishers")
        self.broadcast = self.counter(
            "storage_broker_broadcast_messages_total",
            "Messages handed to a channel with at least one subscriber (all-keys and per-timeline counted apart)",
        )
        self.dropped = self.counter(
            "storage_broker_dropped_messages_total", "Messages skipped by subscribers that fell behind"
        )
        self.register()

    def attach(self, registry: Registry) -> None:
        self.registry.register(_GaugeCollector(registry))  # type: ignore[arg-type]

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _GaugeCollector:
    def __init__(self, registry: Registry) -> None:
        self._r = registry

    def collect(self) -> Iterator[Metric]:
        for name, help_text, value in (
            ("storage_broker_active_publishers", "Number of publications", self._r.num_pubs),
            (
                "storage_broker_per_timeline_active_subscribers",
                "Number of subscriptions to a particular tenant timeline",
                self._r.num_subs_timeline,
            ),
            ("storage_broker_all_keys_active_subscribers", "Number of subscriptions to all keys", self._r.num_subs_all),
        ):
            g = GaugeMetricFamily(name, help_text)
            g.add_metric([], value)
            yield g


@dataclass
class _TimelineChan:
    chan: Broadcast[broker_pb2.SafekeeperTimelineInfo]
    # Counted here rather than taken from chan.receivers so the entry goes exactly with the last
    # registered subscriber.
    subscribers: int = 0


@dataclass
class Registry:
    """Who is publishing and subscribing, and the channels between them."""

    timeline_chan_size: int = DEFAULT_TIMELINE_CHAN_SIZE
    all_keys_chan_size: int = DEFAULT_ALL_KEYS_CHAN_SIZE
    metrics: BrokerMetrics = field(default_factory=BrokerMetrics)
    num_pubs: int = 0
    num_subs_all: int = 0
    num_subs_timeline: int = 0
    _ids: Iterator[int] = field(init=False, default_factory=itertools.count)
    _all: Broadcast[broker_pb2.SafekeeperTimelineInfo] = field(init=False)
    _timelines: dict[TenantTimeline, _TimelineChan] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self._all = Broadcast(self.all_keys_chan_size)
        self.metrics.attach(self)

    def next_id(self) -> int:
        return next(self._ids)

    def register_publisher(self) -> int:
        self.num_pubs += 1
        return self.next_id()

    def unregister_publisher(self) -> None:
        self.num_pubs -= 1

    def publish(self, msg: broker_pb2.SafekeeperTimelineInfo) -> None:
        """Fan one message out; raises InvalidArgument for a bad id (after the "all" send, as Neon)."""
        self.metrics.published.inc()
        if self._all.send(msg):
            self.metrics.broadcast.inc()
        if not msg.HasField("tenant_timeline_id"):
            raise InvalidArgument("missing tenant_timeline_id")
        ttid = parse_proto_ttid(msg.tenant_timeline_id)
        entry = self._timelines.get(ttid)
        if entry is not None and entry.chan.send(msg):
            self.metrics.broadcast.inc()

    def subscribe(self, key: TenantTimeline | None) -> BroadcastReceiver[broker_pb2.SafekeeperTimelineInfo]:
        if key is None:
            self.num_subs_all += 1
            return self._all.subscribe()
        self.num_subs_timeline += 1
        entry = self._timelines.get(key)
        if entry is None:
            entry = self._timelines[key] = _TimelineChan(Broadcast(self.timeline_chan_size))
        entry.subscribers += 1
        return entry.chan.subscribe()

    def unsubscribe(self, key: TenantTimeline | None, rx: BroadcastReceiver[broker_pb2.SafekeeperTimelineInfo]) -> None:
        rx.close()
        if key is None:
            self.num_subs_all -= 1
            return
        self.num_subs_timeline -= 1
        entry = self._timelines[key]
        entry.subscribers -= 1
        if entry.subscribers == 0:
            del self._timelines[key]


def _key_str(key: TenantTimeline | None) -> str:
    return "all" if key is None else f"{key[0]}/{key[1]}"


class BrokerServicer(broker_pb2_grpc.BrokerServiceServicer):
    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    async def PublishSafekeeperInfo(
        self,
        request_iterator: AsyncIterator[broker_pb2.SafekeeperTimelineInfo],
        context: grpc.aio.ServicerContext,
    ) -> empty_pb2.Empty:
        reg = self.registry
        pub_id = reg.register_publisher()
        peer = context.peer()
        log.info("publication started", id=pub_id, addr=peer)
        try:
            async for msg in request_iterator:
                try:
                    reg.publish(msg)
                except InvalidArgument as e:
                    log.warning("publication refused", id=pub_id, addr=peer, error=str(e))
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            return empty_pb2.Empty()
        finally:
            reg.unregister_publisher()
            log.info("publication ended", id=pub_id, addr=peer)

    async def SubscribeSafekeeperInfo(
        self,
        request: broker_pb2.SubscribeSafekeeperInfoRequest,
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[broker_pb2.SafekeeperTimelineInfo]:
        try:
            key = parse_subscription_key(request)
        except InvalidArgument as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            return  # abort() raises; this only tells readers (and type checkers) so
        reg = self.registry
        sub_id = reg.next_id()
        peer = context.peer()
        rx = reg.subscribe(key)
        log.info("subscription started", id=sub_id, key=_key_str(key), addr=peer)
        missed = 0
        last_warn = float("-inf")
        try:
            while True:
                item = await rx.recv()
                if isinstance(item, Lagged):
                    missed += item.skipped
                    reg.metrics.dropped.inc(item.skipped)
                    now = time.monotonic()
                    if now - last_warn >= LAG_WARN_INTERVAL:
                        log.warning(
                            "subscriber dropped messages, channel is full",
                            id=sub_id,
                            key=_key_str(key),
                            addr=peer,
                            dropped=missed,
                        )
                        missed = 0
                        last_warn = now
                    continue
                # Waits only on this stream's flow control; publishers are never held up.
                yield item
        finally:
            reg.unsubscribe(key, rx)
            log.info("subscription ended", id=sub_id, key=_key_str(key), addr=peer)


def make_http_app(registry: Registry) -> web.Application:
    """`GET /metrics` (Prometheus text) and `GET /status` (200, empty body); the rest is 404."""

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=registry.metrics.render(), content_type="text/plain", charset="utf-8")

    async def status(_: web.Request) -> web.Response:
        return web.Response(status=200)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/status", status)
    return app


def grpc_server_options(keepalive_interval: float) -> list[tuple[str, int]]:
    ms = int(keepalive_interval * 1000)
    return [
        ("grpc.keepalive_time_ms", ms),
        ("grpc.keepalive_timeout_ms", int(KEEPALIVE_TIMEOUT * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        # Accept clients that ping as often as we do, idle or not (see the module docstring).
        ("grpc.http2.min_recv_ping_interval_without_data_ms", min(ms, 1000)),
        ("grpc.http2.max_ping_strikes", 0),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def _host_port(addr: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"invalid listen address {addr!r}: expected host:port")
    return host.strip("[]"), int(port)


class Broker:
    """Both listeners around one registry. `start()` binds, `stop()` cancels every stream."""

    def __init__(
        self,
        listen_addr: str = DEFAULT_LISTEN_ADDR,
        *,
        listen_http: str | None = None,
        timeline_chan_size: int = DEFAULT_TIMELINE_CHAN_SIZE,
        all_keys_chan_size: int = DEFAULT_ALL_KEYS_CHAN_SIZE,
        keepalive_interval: float = DEFAULT_KEEPALIVE_INTERVAL,
    ) -> None:
        _host_port(listen_addr)  # fail early on a malformed address
        self.listen_addr = listen_addr
        self.listen_http = listen_http
        self.registry = Registry(timeline_chan_size=timeline_chan_size, all_keys_chan_size=all_keys_chan_size)
        self.keepalive_interval = keepalive_interval
        self.port: int | None = None  # the bound gRPC port (listen_addr may say 0)
        self._server: grpc.aio.Server | None = None
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        server = grpc.aio.server(options=grpc_server_options(self.keepalive_interval))
        broker_pb2_grpc.add_BrokerServiceServicer_to_server(BrokerServicer(self.registry), server)
        try:
            port = server.add_insecure_port(self.listen_addr)
        except RuntimeError as e:  # grpcio reports a failed bind this way
            raise OSError(f"cannot listen on {self.listen_addr}: {e}") from None
        self.port = port
        await server.start()
        self._server = server
        if self.listen_http is not None:
            host, hport = _host_port(self.listen_http)
            runner = web.AppRunner(make_http_app(self.registry), access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, host, hport, reuse_address=True)
            await site.start()
            self._runner = runner

    async def stop(self) -> None:
        # No grace: every RPC is an endless stream, and clients reconnect and re-publish anyway.
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._server is not None:
            await self._server.stop(None)
            self._server = None
