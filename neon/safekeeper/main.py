"""`neon-safekeeper`: the safekeeper daemon (spec safekeeper-and-broker §3.1, §7, Appendix A;
control-plane Part 3.3 for the flags).

    neon-safekeeper -D <datadir> --id <n> [--listen-pg 127.0.0.1:5454] [--listen-http 127.0.0.1:7676]
                    [--advertise-pg host:port] [--broker-endpoint http://127.0.0.1:50051] [--no-sync]

Start-up: change into the data directory, check or write `safekeeper.id`, lock `safekeeper.pid`,
load every timeline (a corrupt control file aborts the start with a message naming it; the file
is left untouched), then serve the WAL service (libpq), the HTTP API and the broker publisher.
SIGTERM / SIGINT: stop listening, end connections, persist lagging control-file values, exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import sys
from pathlib import Path

from aiohttp import web

from neon.pq.server import PqServer
from neon.safekeeper import control_file
from neon.safekeeper.broker_push import AdvertisedAddresses, BrokerPuller, BrokerPusher
from neon.safekeeper.control_file import ControlFileError
from neon.safekeeper.http import HttpContext, make_app
from neon.safekeeper.timeline import Timelines
from neon.safekeeper.wal_service import WalServiceHandler, WalServiceStats
from neon.utils.crashsafe import fsync_path
from neon.utils.logging import get_logger, setup_logging
from neon.utils.pidfile import PidFile, PidFileLocked

ID_FILE = "safekeeper.id"
PID_FILE = "safekeeper.pid"
DEFAULT_PG_LISTEN = "127.0.0.1:5454"
DEFAULT_HTTP_LISTEN = "127.0.0.1:7676"
DEFAULT_BROKER_ENDPOINT = "http://127.0.0.1:50051"
WAL_SERVICE_READ_TIMEOUT = 600.0  # a silent peer is dropped after 10 minutes (§2.1)

log = get_logger("safekeeper")


class StartupError(Exception):
    """The daemon cannot start; the message says why."""


def _duration(text: str) -> float:
    """Seconds from a humantime-like value: '5000ms', '5s', '1m', or a bare number of seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*", text)
    if m is None:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}")
    scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}[m.group(2)]
    return float(m.group(1)) * scale


def _bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes", "on"):
        return True
    if text.lower() in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"invalid boolean {text!r}")


def _host_port(addr: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise StartupError(f"invalid listen address {addr!r}, expected host:port")
    return host.strip("[]") or "0.0.0.0", int(port)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="neon-safekeeper", description="The Neon safekeeper (Python).")
    p.add_argument("-D", "--datadir", type=Path, default=Path("./"), help="data directory (default ./)")
    p.add_argument("--id", type=int, help="node id; required on first start, stored in safekeeper.id")
    p.add_argument("--init", action="store_true", help="write the id file and exit")
    p.add_argument("-l", "--listen-pg", default=DEFAULT_PG_LISTEN, help="WAL service address")
    p.add_argument("--listen-pg-tenant-only", help="a second WAL service address (no auth: same as --listen-pg)")
    p.add_argument("--listen-http", default=DEFAULT_HTTP_LISTEN, help="HTTP API address")
    p.add_argument("--advertise-pg", help="WAL service address published to the broker (default: --listen-pg)")
    p.add_argument("--availability-zone", help="published to the broker")
    p.add_argument("-n", "--no-sync", action="store_true", help="skip fsync (unsafe; tests)")
    p.add_argument("--broker-endpoint", default=DEFAULT_BROKER_ENDPOINT)
    p.add_argument("--broker-keepalive-interval", type=_duration, default=5.0)
    p.add_argument("--heartbeat-timeout", type=_duration, default=5.0, help="accepted; peers are not tracked")
    p.add_argument("--peer-recovery", type=_bool, default=False, help="accepted; only false is supported")
    p.add_argument("--remote-storage", help="WAL offload target (not supported)")
    p.add_argument("--max-offloader-lag", type=int, default=128 * 1024 * 1024, help="accepted, unused")
    p.add_argument("--wal-backup-parallel-jobs", type=int, default=5, help="accepted, unused")
    p.add_argument("--backup-threads", type=int, help="accepted, unused")
    p.add_argument("--disable-wal-backup", action="store_true", help="accepted (there is no WAL backup)")
    p.add_argument("--pg-auth-public-key-path", default="")
    p.add_argument("--pg-tenant-only-auth-public-key-path", default="")
    p.add_argument("--http-auth-public-key-path", default="")
    p.add_argument("--log-format", choices=("plain", "json"), default="plain")
    p.add_argument("--current-thread-runtime", action="store_true", help="accepted (always one event loop)")
    p.add_argument("--dump-control-file", type=Path, metavar="PATH", help="print a control file as JSON and exit")
    return p


def dump_control_file(path: Path) -> str:
    """The decoded state as Neon's --dump-control-file prints it (LSNs as integers)."""
    s = control_file.load(path)
    doc = {
        "tenant_id": str(s.tenant_id),
        "timeline_id": str(s.timeline_id),
        "acceptor_state": {
            "term": s.acceptor_state.term,
            "term_history": [{"term": e.term, "lsn": int(e.lsn)} for e in s.term_history],
        },
        "server": {
            "pg_version": s.server.pg_version,
            "system_id": s.server.system_id,
            "wal_seg_size": s.server.wal_seg_size,
        },
        "proposer_uuid": bytes(s.proposer_uuid).hex(),
        "timeline_start_lsn": int(s.timeline_start_lsn),
        "local_start_lsn": int(s.local_start_lsn),
        "commit_lsn": int(s.commit_lsn),
        "backup_lsn": int(s.backup_lsn),
        "peer_horizon_lsn": int(s.peer_horizon_lsn),
        "remote_consistent_lsn": int(s.remote_consistent_lsn),
        "peers": [
            [
                node_id,
                {
                    "backup_lsn": int(p.backup_lsn),
                    "term": p.term,
                    "flush_lsn": int(p.flush_lsn),
                    "commit_lsn": int(p.commit_lsn),
                },
            ]
            for node_id, p in s.peers
        ],
    }
    return json.dumps(doc, indent=2)


def resolve_node_id(datadir: Path, given: int | None) -> int:
    """The id from safekeeper.id, checked against --id; written (and fsynced) on first start."""
    path = datadir / ID_FILE
    if path.exists():
        text = path.read_text().strip()
        try:
            stored = int(text)
        except ValueError:
            raise StartupError(f"{path}: invalid node id {text!r}") from None
        if given is not None and given != stored:
            raise StartupError(f"safekeeper id mismatch: --id {given} but {path} holds {stored}")
        return stored
    if given is None:
        raise StartupError(f"{path} does not exist: --id is required on the first start")
    tmp = path.with_name(ID_FILE + ".tmp")
    with open(tmp, "w") as f:
        f.write(str(given))
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)
    fsync_path(datadir)
    return given


async def serve(args: argparse.Namespace, datadir: Path, node_id: int, timelines: Timelines) -> None:
    stats = WalServiceStats()
    addresses = AdvertisedAddresses(
        pg_connstr=args.advertise_pg or args.listen_pg,
        http_connstr=args.listen_http,
        availability_zone=args.availability_zone,
    )
    pusher = BrokerPusher(args.broker_endpoint, timelines, node_id=node_id, addresses=addresses)
    puller = BrokerPuller(args.broker_endpoint, timelines)
    ctx = HttpContext(
        node_id=node_id, timelines=timelines, wal_service_stats=stats, broker_pushed=lambda: pusher.pushed
    )
    runner = web.AppRunner(make_app(ctx), access_log=None)
    await runner.setup()
    handler = WalServiceHandler(timelines, node_id=node_id, stats=stats)
    pg_servers = [PqServer(handler, idle_timeout=WAL_SERVICE_READ_TIMEOUT)]
    if args.listen_pg_tenant_only:
        pg_servers.append(PqServer(handler, idle_timeout=WAL_SERVICE_READ_TIMEOUT))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    broker_tasks: list[asyncio.Task[None]] = []
    try:
        http_host, http_port = _host_port(args.listen_http)
        await web.TCPSite(runner, http_host, http_port, reuse_address=True).start()
        for server, addr in zip(pg_servers, [args.listen_pg, args.listen_pg_tenant_only], strict=False):
            host, port = _host_port(addr)
            await server.start(host, port)
        broker_tasks = [
            asyncio.create_task(pusher.run(), name="broker-push"),
            asyncio.create_task(puller.run(), name="broker-pull"),
        ]
        log.info(
            "safekeeper started",
            id=node_id,
            datadir=str(datadir),
            listen_pg=args.listen_pg,
            listen_http=args.listen_http,
            broker_endpoint=args.broker_endpoint,
            timelines=len(timelines.all()),
            no_sync=args.no_sync,
        )
        await stop.wait()
        log.info("shutting down")
    finally:
        for task in broker_tasks:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        for server in pg_servers:
            await server.stop(grace=2.0)
        await runner.cleanup()
        await timelines.shutdown()
        log.info("safekeeper stopped")


def _refuse_unsupported(args: argparse.Namespace) -> None:
    for flag in ("pg_auth_public_key_path", "pg_tenant_only_auth_public_key_path", "http_auth_public_key_path"):
        if getattr(args, flag):
            raise StartupError(f"--{flag.replace('_', '-')}: JWT authentication is not supported by this safekeeper")
    if args.peer_recovery:
        raise StartupError("--peer-recovery=true is not supported by this safekeeper")
    if args.remote_storage:
        raise StartupError("--remote-storage: WAL backup to remote storage is not supported by this safekeeper")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.dump_control_file is not None:
        try:
            print(dump_control_file(args.dump_control_file))
        except ControlFileError as e:
            print(f"safekeeper: {e}", file=sys.stderr)
            return 1
        return 0
    setup_logging("json" if args.log_format == "json" else "console")
    datadir: Path = args.datadir.absolute()
    pid: PidFile | None = None
    try:
        _refuse_unsupported(args)
        datadir.mkdir(parents=True, exist_ok=True)
        os.chdir(datadir)
        node_id = resolve_node_id(datadir, args.id)
        if args.init:
            print(f"safekeeper: initialised {datadir} with id {node_id}")
            return 0
        pid = PidFile(datadir / PID_FILE, "safekeeper uses this datadir")
        try:
            pid.acquire()
        except PidFileLocked as e:
            raise StartupError(str(e)) from None
        timelines = Timelines(datadir, node_id=node_id, no_sync=args.no_sync)
        try:
            timelines.load_all()
        except (ControlFileError, OSError) as e:
            raise StartupError(f"failed to load timelines: {e}") from None
    except StartupError as e:
        log.error("safekeeper failed to start", error=str(e))
        print(f"safekeeper: {e}", file=sys.stderr)
        if pid is not None:
            pid.release()
        return 1
    try:
        try:
            import uvloop

            uvloop.install()
        except ImportError:  # pragma: no cover - uvloop is a dependency; run without it anyway
            pass
        asyncio.run(serve(args, datadir, node_id, timelines))
    except StartupError as e:
        print(f"safekeeper: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"safekeeper: {e}", file=sys.stderr)
        return 1
    finally:
        pid.release()
    return 0


if __name__ == "__main__":
    sys.exit(main())
