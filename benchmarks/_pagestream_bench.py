"""The server halves of `pagestream.py`, each run in a child process (multiprocessing, spawn).

`serve_pagestream` imports a stopped cluster's data directory into a fresh tenant (default page
cache), serves it with `PqServer(PageServiceHandler(...))` on 127.0.0.1 and reports the port and
ids over its pipe; `serve_echo` is an asyncio TCP server answering every fixed-size request with
an 8 KiB response. Both then answer "stats" and stop on "stop" (or when the pipe closes).
"""

from __future__ import annotations

import asyncio
import time
import traceback
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

ECHO_REQUEST_SIZE = 32  # a GetPage request in its CopyData frame
ECHO_RESPONSE = (bytes(range(256)) * 33)[: 5 + 1 + 8192]  # a GetPage response in its CopyData frame


def _cpu() -> float:
    return time.process_time()


async def _control(pipe: Connection, stats: Any) -> None:
    """Answer the parent until it says stop (or goes away)."""
    while True:
        try:
            msg = await asyncio.to_thread(pipe.recv)
        except (EOFError, OSError):
            return
        if msg == "stop":
            return
        if msg == "stats":
            pipe.send(stats())


def serve_pagestream(pipe: Connection, pgdata: str) -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    try:
        asyncio.run(_serve_pagestream(pipe, Path(pgdata)))
    except BaseException:
        pipe.send(("error", traceback.format_exc()))
        raise


async def _serve_pagestream(pipe: Connection, pgdata: Path) -> None:
    from benchmarks._pageserver_bench import Engine, Scratch, quiet_logging
    from neon.pageserver.page_cache import DEFAULT_PAGE_CACHE_SIZE
    from neon.pageserver.page_service import PageServiceHandler, TenantMapLookup
    from neon.pq.server import PqServer
    from neon.utils.id import TimelineId

    quiet_logging()
    scratch = Scratch("neon-bench-pagestream-srv-")
    engine = Engine.create(scratch, cache_pages=DEFAULT_PAGE_CACHE_SIZE)
    server: PqServer | None = None
    try:
        t0 = time.perf_counter()
        tl = await engine.tenant.import_timeline(TimelineId.generate(), pgdata)
        import_s = time.perf_counter() - t0
        tenant = engine.tenant
        server = await PqServer(PageServiceHandler(TenantMapLookup({tenant.tenant_id: tenant}))).start("127.0.0.1", 0)
        cache = tenant.page_cache
        pipe.send(
            (
                "ready",
                {
                    "port": server.port,
                    "tenant": str(tenant.tenant_id),
                    "timeline": str(tl.timeline_id),
                    "lsn": int(tl.last_record_lsn),
                    "import_s": import_s,
                    "cache_pages": DEFAULT_PAGE_CACHE_SIZE,
                },
            )
        )
        await _control(pipe, lambda: {"hits": cache.hits, "misses": cache.misses, "cpu": _cpu()})
    finally:
        if server is not None:
            await server.stop()
        await engine.close()
        scratch.cleanup()


def serve_echo(pipe: Connection) -> None:
    try:
        asyncio.run(_serve_echo(pipe))
    except BaseException:
        pipe.send(("error", traceback.format_exc()))
        raise


async def _serve_echo(pipe: Connection) -> None:
    async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                await reader.readexactly(ECHO_REQUEST_SIZE)
                writer.write(ECHO_RESPONSE)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
    try:
        pipe.send(("ready", {"port": server.sockets[0].getsockname()[1]}))
        await _control(pipe, lambda: {"cpu": _cpu()})
    finally:
        server.close()
