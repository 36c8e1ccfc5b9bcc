"""This safekeeper and the storage broker (spec safekeeper-and-broker §5.5).

`BrokerPusher` publishes: one long-lived publish stream; once a second, one
`SafekeeperTimelineInfo` per *active* timeline (inactive ones are not published at all). It never
touches the timeline lock, so it cannot hold up WAL service.

`BrokerPuller` consumes: one subscription to all timelines; a message about a timeline loaded
here feeds `Timeline.record_peer_info` (a peer's commit LSN in the same epoch, its backup,
remote-consistent and horizon LSNs), so a safekeeper learns commit positions without a compute.

Both reconnect after a failure, waiting 1 s, doubling up to 10 s (reset after a stream that lived
long enough).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from neon.broker.client import BrokerClient, SafekeeperTimelineInfo
from neon.safekeeper.timeline import Timelines
from neon.utils.logging import get_logger

log = get_logger("safekeeper.broker_push")

PUSH_INTERVAL = 1.0
RETRY_MIN = 1.0
RETRY_MAX = 10.0


@dataclass(frozen=True, slots=True)
class AdvertisedAddresses:
    pg_connstr: str  # --advertise-pg, else --listen-pg
    http_connstr: str  # --listen-http
    availability_zone: str | None = None


class BrokerPusher:
    def __init__(
        self,
        endpoint: str,
        timelines: Timelines,
        *,
        node_id: int,
        addresses: AdvertisedAddresses,
        interval: float = PUSH_INTERVAL,
        client_factory: Callable[[str], BrokerClient] = BrokerClient,
    ) -> None:
        self.endpoint = endpoint
        self.timelines = timelines
        self.node_id = node_id
        self.addresses = addresses
        self.interval = interval
        self.client_factory = client_factory
        self.pushed = 0  # messages handed to the stream (metrics)

    def infos(self) -> list[SafekeeperTimelineInfo]:
        a = self.addresses
        return [
            tl.broker_info(
                node_id=self.node_id,
                pg_connstr=a.pg_connstr,
                http_connstr=a.http_connstr,
                availability_zone=a.availability_zone,
            )
            for tl in self.timelines.active()
        ]

    async def _messages(self) -> AsyncIterator[SafekeeperTimelineInfo]:
        while True:
            for info in self.infos():
                yield info
                self.pushed += 1
            await asyncio.sleep(self.interval)  # the publishing period, not synchronisation

    async def run(self) -> None:
        """Publish forever (until cancelled)."""

        async def publish(client: BrokerClient) -> None:
            await client.publish(self._messages())
            log.warning("broker publish stream ended", endpoint=self.endpoint)

        await _with_reconnects(self.endpoint, self.client_factory, "publish", publish)


class BrokerPuller:
    def __init__(
        self,
        endpoint: str,
        timelines: Timelines,
        *,
        client_factory: Callable[[str], BrokerClient] = BrokerClient,
    ) -> None:
        self.endpoint = endpoint
        self.timelines = timelines
        self.client_factory = client_factory
        self.received = 0  # messages about timelines loaded here (metrics)

    async def run(self) -> None:
        """Consume forever (until cancelled)."""

        async def consume(client: BrokerClient) -> None:
            async for info in client.subscribe():
                tl = self.timelines.find(info.tenant_id, info.timeline_id)
                if tl is None or tl.cancelled:
                    continue  # not a timeline of ours
                self.received += 1
                await tl.record_peer_info(info)

        await _with_reconnects(self.endpoint, self.client_factory, "subscription", consume)


async def _with_reconnects(
    endpoint: str,
    client_factory: Callable[[str], BrokerClient],
    what: str,
    body: Callable[[BrokerClient], Awaitable[None]],
) -> None:
    """Run `body` with a fresh client forever, backing off after each failure or end."""
    loop = asyncio.get_running_loop()
    delay = RETRY_MIN
    while True:
        started = loop.time()
        client = client_factory(endpoint)
        try:
            await body(client)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.warning(f"broker {what} failed", endpoint=endpoint, error=str(e), retry_in=delay)
        finally:
            with contextlib.suppress(Exception):
                await client.close()
        if loop.time() - started > 2 * RETRY_MAX:
            delay = RETRY_MIN
        await asyncio.sleep(delay)  # reconnect back-off
        delay = min(delay * 2, RETRY_MAX)
