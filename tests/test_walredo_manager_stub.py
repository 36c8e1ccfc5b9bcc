"""The redo manager against a stub helper: pipelining, the stderr race, faults, retries."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
import structlog

from neon.walredo.manager import WalRedoManager
from neon.walredo.process import WalRedoError, WalRedoProcess
from neon.walredo.records import BufferTag, PostgresRecord
from tests.walredo_stub import stub_apply

STUB = Path(__file__).with_name("walredo_stub.py")
TAG = BufferTag(1663, 5, 16384, 0, 7)


async def launch_stub(log: Any) -> WalRedoProcess:
    return await WalRedoProcess.launch([sys.executable, str(STUB)], env={"PATH": os.environ.get("PATH", "")}, log=log)


def expected(base: bytes, records: list[tuple[int, bytes]]) -> bytes:
    page = base
    for lsn, rec in records:
        page = stub_apply(page, lsn, rec)
    return page


def recs(n: int, salt: int) -> list[tuple[int, PostgresRecord]]:
    return [(0x1000000 + 8 * i, PostgresRecord(False, f"rec-{salt}-{i}".encode())) for i in range(n)]


async def test_concurrent_requests_and_stderr_lines() -> None:
    mgr = WalRedoManager("t" * 32, launch_stub, timeout=30)
    base = bytes(range(256)) * 32
    n_tasks, per_task = 8, 250

    async def worker(w: int) -> None:
        for j in range(per_task):
            r = recs(1 + (j % 5), w * 100000 + j)
            page = await mgr.request_redo(TAG, r[-1][0], (0x100, base), r)
            assert page == expected(base, [(lsn, x.rec) for lsn, x in r])

    with structlog.testing.capture_logs() as logs:
        await asyncio.gather(*(worker(w) for w in range(n_tasks)))
        proc = mgr.process
        assert proc is not None
        await mgr.shutdown()
    lines = [e for e in logs if e["event"] == "received output"]
    # Start-up line, 3 lines per request, and the exit line: all logged, with pid and tenant.
    assert len(lines) == 1 + 3 * n_tasks * per_task + 1, len(lines)
    assert all(e["pid"] == proc.pid and e["tenant_id"] == "t" * 32 and e["pg_version"] == 15 for e in lines)
    assert mgr.metrics.process_restarts.value == 0
    assert not [e for e in logs if e["log_level"] == "error"]


async def test_crash_is_reported_and_next_request_succeeds() -> None:
    mgr = WalRedoManager("t" * 32, launch_stub, timeout=30)
    base = bytes(8192)
    with (
        structlog.testing.capture_logs() as logs,
        pytest.raises(WalRedoError, match=r"error applying 1 WAL records .* n_attempts=1"),
    ):
        await mgr.request_redo(TAG, 0x2000000, (0x100, base), [(0x2000000, PostgresRecord(False, b"CRASH"))])
    # Both attempts failed, each process's stderr was fully logged before the error surfaced.
    crashes = [e for e in logs if e["event"] == "received output" and "cannot apply" in e["output"]]
    assert len(crashes) == 2 and crashes[0]["pid"] != crashes[1]["pid"]
    assert mgr.metrics.process_restarts.value == 2
    r = recs(3, 1)
    assert await mgr.request_redo(TAG, 1, (0, base), r) == expected(base, [(lsn, x.rec) for lsn, x in r])
    await mgr.shutdown()


async def test_sigkill_mid_request_is_retried_on_a_fresh_process() -> None:
    mgr = WalRedoManager("t" * 32, launch_stub, timeout=30)
    base = bytes(8192)
    r = recs(2, 2)
    await mgr.request_redo(TAG, 1, (0, base), r)
    first = mgr.process
    assert first is not None
    # The next request hangs in the helper; kill it from outside while it is in flight.
    hang = [(0x10, PostgresRecord(False, b"HANG"))]
    task = asyncio.create_task(mgr.request_redo(TAG, 1, (0, base), hang))
    while first.stderr_lines < 1:
        await asyncio.sleep(0.01)
    os.kill(first.pid, signal.SIGKILL)
    # The retry hangs too (same record) and is bounded by the timeout; a valid request then works.
    mgr.timeout = 1.0
    with pytest.raises(WalRedoError):
        await task
    assert await mgr.request_redo(TAG, 1, (0, base), r) == expected(base, [(lsn, x.rec) for lsn, x in r])
    assert mgr.process is not None and mgr.process.pid != first.pid
    await mgr.shutdown()


async def test_sigkill_between_requests_retries_transparently() -> None:
    mgr = WalRedoManager("t" * 32, launch_stub, timeout=30)
    base = bytes(8192)
    r = recs(2, 3)
    await mgr.request_redo(TAG, 1, (0, base), r)
    first = mgr.process
    assert first is not None
    os.kill(first.pid, signal.SIGKILL)
    await first.proc.wait()
    assert await mgr.request_redo(TAG, 1, (0, base), r) == expected(base, [(lsn, x.rec) for lsn, x in r])
    await mgr.shutdown()


async def test_sigstop_times_out_and_replaces_the_process() -> None:
    mgr = WalRedoManager("t" * 32, launch_stub, timeout=1.0)
    base = bytes(8192)
    r = recs(1, 4)
    await mgr.request_redo(TAG, 1, (0, base), r)
    first = mgr.process
    assert first is not None
    first.stop_process()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    page = await mgr.request_redo(TAG, 1, (0, base), r)  # attempt 1 times out, the retry succeeds
    assert loop.time() - t0 < 5
    assert page == expected(base, [(lsn, x.rec) for lsn, x in r])
    assert first.proc.returncode is not None
    assert mgr.process is not None and mgr.process.pid != first.pid
    await mgr.shutdown()


async def test_no_records_and_mixed_batches() -> None:
    from neon.walredo.records import ClearVisibilityMapFlags

    mgr = WalRedoManager("t" * 32, launch_stub, timeout=5)
    with pytest.raises(WalRedoError, match="no records"):
        await mgr.request_redo(TAG, 1, None, [])
    vm = BufferTag(1663, 5, 16384, 2, 0)
    with pytest.raises(WalRedoError, match="no base image"):
        await mgr.request_redo(vm, 1, None, [(1, ClearVisibilityMapFlags(1, None, 3))])
    await mgr.shutdown()
