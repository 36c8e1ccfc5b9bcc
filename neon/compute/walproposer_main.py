"""`neon-walproposer`: the WAL proposer beside a compute, or `--sync-safekeepers` (spec §2.8, §10).

Normal mode streams the compute's WAL to the safekeepers until SIGTERM/SIGINT (exit 0), electing
again whenever a term ends. `--sync-safekeepers` needs no compute: it runs one election, brings
the quorum's committed LSN up to the donor's flush, prints that LSN as `X/X` on stdout (`0/0` for
a timeline no safekeeper has WAL for) and exits 0. Logs go to stderr (JSON unless
`--log-format plain`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import faulthandler
import signal
import sys

from neon.utils.id import TenantId, TimelineId
from neon.utils.logging import setup_logging
from neon.utils.lsn import Lsn

from .walproposer import ProposerConf, ProposerFatal, WalProposer, parse_safekeepers


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="neon-walproposer", description=__doc__.split("\n\n")[0])
    ap.add_argument("--safekeepers", required=True, help="host:port,host:port,… (neon.safekeepers)")
    ap.add_argument("--tenant-id", required=True)
    ap.add_argument("--timeline-id", required=True)
    ap.add_argument("--sync-safekeepers", action="store_true", help="elect, sync, print the LSN and exit")
    ap.add_argument("--pg-host", help="the compute's host or unix socket directory (normal mode)")
    ap.add_argument("--pg-port", type=int, default=5432)
    ap.add_argument("--pg-user", default="cloud_admin")
    ap.add_argument("--basebackup-lsn", help="LSN of the compute's basebackup (where a new timeline starts)")
    ap.add_argument("--pg-version", type=int, default=150000, help="server_version_num sent in sync mode")
    ap.add_argument("--reconnect-timeout-ms", type=int, default=1000)
    ap.add_argument("--connect-timeout-ms", type=int, default=10000)
    ap.add_argument(
        "--max-spool-mb", type=float, default=256, help="WAL kept in memory for lagging safekeepers (older: catch-up)"
    )
    ap.add_argument("--log-format", choices=["json", "plain"], default="json")
    return ap


def conf_from_args(args: argparse.Namespace) -> ProposerConf:
    if not args.sync_safekeepers and not args.pg_host:
        raise ValueError("--pg-host is required unless --sync-safekeepers is given")
    return ProposerConf(
        safekeepers=parse_safekeepers(args.safekeepers),
        tenant_id=TenantId(args.tenant_id),
        timeline_id=TimelineId(args.timeline_id),
        pg_host=None if args.sync_safekeepers else args.pg_host,
        pg_port=args.pg_port,
        pg_user=args.pg_user,
        basebackup_lsn=Lsn.parse(args.basebackup_lsn) if args.basebackup_lsn else None,
        pg_version=args.pg_version,
        reconnect_timeout=args.reconnect_timeout_ms / 1000,
        connect_timeout=args.connect_timeout_ms / 1000,
        max_spool_bytes=int(args.max_spool_mb * 1024 * 1024),
    )


async def _run(proposer: WalProposer, sync: bool) -> int:
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None
    for sig in (signal.SIGTERM, signal.SIGINT):
        # Normal mode ends its term cleanly (the safekeepers learn the last commit LSN first).
        loop.add_signal_handler(sig, main.cancel if sync else proposer.stop)
    try:
        if sync:
            lsn = await proposer.sync_safekeepers()
            sys.stdout.write(f"{lsn}\n")
            sys.stdout.flush()
        else:
            await proposer.run()
    except asyncio.CancelledError:
        return 0
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1` dumps every thread's stack to stderr
    setup_logging("console" if args.log_format == "plain" else "json")
    try:
        conf = conf_from_args(args)
    except ValueError as e:
        print(f"neon-walproposer: {e}", file=sys.stderr)
        return 2
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    try:
        return asyncio.run(_run(WalProposer(conf), args.sync_safekeepers))
    except ProposerFatal as e:
        print(f"neon-walproposer: FATAL: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
