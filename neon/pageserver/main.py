"""`neon-pageserver`: the pageserver daemon (spec control-plane Part 3.2, pageserver §7, §9).

    neon-pageserver -D <workdir> --init -c id=1 [-c key=value ...]   write pageserver.toml, exit
    neon-pageserver -D <workdir> [-c key=value ...]                 run

Running: take the pid-file lock (one daemon per workdir), load every tenant, serve the page
service (libpq) on `listen_pg_addr` and the management API on `listen_http_addr`, run on uvloop.
SIGTERM or SIGINT: stop accepting, flush every timeline's open layer, exit 0.

`FAILPOINTS=name=actions;...` in the environment arms failpoints at start (`neon.utils.failpoints`);
the variable is removed from the environment so that child processes (initdb, WAL redo) do not see it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from pathlib import Path

import structlog
from aiohttp import web

from neon.broker.client import BrokerClient
from neon.pq.server import PqServer
from neon.utils.failpoints import Failpoints
from neon.utils.id import TenantId, TimelineId
from neon.utils.logging import setup_logging
from neon.utils.pidfile import PidFile, PidFileLocked

from .config import PageServerConf, PageServerConfError, init_workdir, load_config
from .http import make_app
from .page_service import PageServiceHandler, TenantNotFound
from .tenant_manager import TenantManager, TenantManagerError
from .timeline import Timeline

PID_FILE = "pageserver.pid"
log = structlog.get_logger("pageserver")


class ManagerLookup:
    """The page service's view of the tenant manager: active tenants' timelines."""

    def __init__(self, manager: TenantManager) -> None:
        self.manager = manager

    def get_timeline(self, tenant_id: TenantId, timeline_id: TimelineId) -> Timeline:
        try:
            tenant = self.manager.get_tenant(tenant_id, active=True)
        except KeyError:
            raise
        except TenantManagerError as e:
            raise TenantNotFound(str(e)) from None
        return tenant.get_timeline(timeline_id)


def _host_port(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)


async def serve(
    conf: PageServerConf,
    workdir: Path,
    *,
    ready: asyncio.Event | None = None,
    failpoints: Failpoints | None = None,
) -> None:
    """Run the daemon until SIGTERM or SIGINT; `ready` is set once both listeners accept."""
    broker = BrokerClient(conf.broker_endpoint, keepalive_interval=conf.broker_keepalive_interval.total_seconds())
    manager = TenantManager(conf, workdir, broker=broker, failpoints=failpoints)
    await manager.load_all()
    runner = web.AppRunner(make_app(manager, conf), access_log=None)
    await runner.setup()
    http_host, http_port = _host_port(conf.listen_http_addr)
    site = web.TCPSite(runner, http_host, http_port, reuse_address=True)
    pg_host, pg_port = _host_port(conf.listen_pg_addr)
    handler = PageServiceHandler(
        ManagerLookup(manager), wait_lsn_timeout=conf.wait_lsn_timeout.total_seconds(), metrics=manager.metrics
    )
    page_service = PqServer(handler)
    lag = asyncio.get_running_loop().create_task(manager.metrics.measure_event_loop_lag())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await site.start()
        await page_service.start(pg_host, pg_port)
        log.info(
            "pageserver started",
            id=conf.id,
            listen_pg_addr=conf.listen_pg_addr,
            listen_http_addr=conf.listen_http_addr,
            tenants=len(manager.list_tenants()),
        )
        if ready is not None:
            ready.set()
        await stop.wait()
        log.info("shutting down")
    finally:
        lag.cancel()
        await page_service.stop(grace=5.0)
        await runner.cleanup()
        await manager.shutdown()  # flushes every timeline's open layer
        await broker.close()
        log.info("pageserver stopped")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="neon-pageserver", description="The Neon pageserver (Python).")
    parser.add_argument(
        "-D", "--workdir", required=True, type=Path, help="working directory (pageserver.toml, tenants/)"
    )
    parser.add_argument("--init", action="store_true", help="write pageserver.toml from -c overrides and exit")
    parser.add_argument("-c", "--config-override", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    workdir: Path = args.workdir.absolute()
    try:
        if args.init:
            init_workdir(workdir, args.config_override)
            print(f"pageserver: initialised {workdir}")
            return 0
        conf = load_config(workdir, args.config_override)
        conf.refuse_unsupported()
    except PageServerConfError as e:
        print(f"pageserver: {e}", file=sys.stderr)
        return 2
    setup_logging("console" if conf.log_format.value == "plain" else "json")
    try:
        failpoints = Failpoints.from_env()
    except ValueError as e:
        print(f"pageserver: {e}", file=sys.stderr)
        return 2
    os.environ.pop("FAILPOINTS", None)
    pid = PidFile(workdir / PID_FILE, "pageserver uses this workdir")
    try:
        pid.acquire()
    except PidFileLocked as e:
        raise SystemExit(f"pageserver: {e}") from None
    try:
        try:
            import uvloop

            uvloop.install()
        except ImportError:  # pragma: no cover - uvloop is a dependency, but the daemon runs without it
            pass
        asyncio.run(serve(conf, workdir, failpoints=failpoints))
    finally:
        pid.release()
    return 0


if __name__ == "__main__":
    sys.exit(main())
