"""`WalRedoManager`: reconstructs pages for one tenant.

Records are cut into runs of one kind: Neon's own records are applied in Python
(`apply_neon`), Postgres records go to the tenant's helper process, each run's output being the
next run's input. A failed Postgres run kills the process, waits until its stderr is logged,
and is retried once on a fresh process.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from neon.utils.lsn import Lsn
from neon.walredo import apply_neon
from neon.walredo.metrics import WalRedoMetrics
from neon.walredo.process import WalRedoError, WalRedoProcess
from neon.walredo.protocol import PAGE_SIZE, mask_page, redo_request
from neon.walredo.records import BufferTag, PostgresRecord, RedoTarget, WalRecord, is_neon_record

MAX_RETRY_ATTEMPTS = 1

# Starts a helper process; it logs with the given logger (bound to tenant and pg version).
Launcher = Callable[[Any], Awaitable[WalRedoProcess]]


@dataclass(frozen=True)
class RedoRequestContext:
    target: RedoTarget
    lsn: int
    base_lsn: int | None
    records: Sequence[tuple[int, WalRecord]]

    def describe(self, attempt: int) -> str:
        first, last = self.records[0][0], self.records[-1][0]
        nbytes = sum(len(r.rec) for _, r in self.records if isinstance(r, PostgresRecord))
        base = Lsn(self.base_lsn) if self.base_lsn is not None else "none"
        return (
            f"error applying {len(self.records)} WAL records {Lsn(first)}..{Lsn(last)} ({nbytes} bytes) "
            f"to base image with LSN {base} to reconstruct page image at LSN {Lsn(self.lsn)} "
            f"n_attempts={attempt}"
        )


class WalRedoManager:
    def __init__(
        self,
        tenant_id: str,
        launcher: Launcher,
        *,
        timeout: float = 60.0,
        metrics: WalRedoMetrics | None = None,
        pg_version: int = 15,
    ) -> None:
        self.tenant_id = tenant_id
        self.timeout = timeout
        self.metrics = metrics or WalRedoMetrics()
        self.log = structlog.get_logger("walredo").bind(tenant_id=tenant_id, pg_version=pg_version)
        self._launcher = launcher
        self._process: WalRedoProcess | None = None
        self._launch_lock = asyncio.Lock()
        self._closed = False

    # --- public ----------------------------------------------------------------------------
    async def request_redo(
        self,
        target: RedoTarget,
        lsn: int,
        base_image: tuple[int, bytes] | None,
        records: Sequence[tuple[int, WalRecord]],
    ) -> bytes:
        """The page `target` at `lsn`: `base_image` (its LSN and bytes) with `records` applied."""
        if not records:
            raise WalRedoError(f"invalid WAL redo request for {target}: no records")
        image = base_image[1] if base_image else None
        base_lsn = base_image[0] if base_image else None
        start = 0
        while start < len(records):
            neon = is_neon_record(records[start][1])
            end = start
            while end < len(records) and is_neon_record(records[end][1]) == neon:
                end += 1
            run = records[start:end]
            if neon:
                if image is None:
                    raise WalRedoError(f"invalid neon WAL redo request for {target} with no base image")
                image = apply_neon.apply_batch(target, image, run)
            else:
                image = await self._apply_postgres(target, lsn, base_lsn, run, image)
            base_lsn = run[-1][0]
            start = end
        assert image is not None
        return image

    async def mask(self, rmid: int, blkno: int, page: bytes) -> bytes:
        """The page masked by its rmgr's mask function (for comparing reconstructed pages)."""
        proc = await self._get_process()
        try:
            return await proc.request(mask_page(rmid, blkno, page), self.timeout)
        except WalRedoError:
            await self._discard(proc)
            raise

    async def shutdown(self) -> None:
        self._closed = True
        if self._process is not None:
            proc, self._process = self._process, None
            await proc.close()

    @property
    def process(self) -> WalRedoProcess | None:
        return self._process

    # --- Postgres runs ---------------------------------------------------------------------
    async def _apply_postgres(
        self,
        target: RedoTarget,
        lsn: int,
        base_lsn: int | None,
        records: Sequence[tuple[int, WalRecord]],
        image: bytes | None,
    ) -> bytes:
        if not isinstance(target, BufferTag):
            raise WalRedoError(f"Postgres records cannot be applied to {target}: only relation pages")
        if image is not None and len(image) != PAGE_SIZE:
            raise WalRedoError(f"base image for {target} is {len(image)} bytes")
        try:
            request = redo_request(target, image, [(rec_lsn, r.rec) for rec_lsn, r in records])  # type: ignore[union-attr]
        except AttributeError:
            raise WalRedoError("tried to pass a neon WAL record to Postgres WAL redo") from None
        m = self.metrics
        attempt = 0
        while True:
            proc = self._process
            if proc is None or not proc.alive:
                t0 = time.monotonic()
                proc = await self._get_process()
                m.wait_seconds.observe(time.monotonic() - t0)
            t1 = time.monotonic()
            try:
                page = await proc.request(request, self.timeout)
            except WalRedoError as e:
                # The context is only built when it is needed: this is the hot path.
                ctx = RedoRequestContext(target, lsn, base_lsn, records)
                self.log.error(ctx.describe(attempt), error=str(e), pid=proc.pid)
                await self._discard(proc)
                if attempt >= MAX_RETRY_ATTEMPTS or self._closed:
                    m.failures.inc()
                    raise WalRedoError(f"{ctx.describe(attempt)}: {e}") from None
                attempt += 1
                continue
            m.redo_seconds.observe(time.monotonic() - t1)
            m.records.observe(len(records))
            m.replayed_records.inc(len(records))
            if attempt:
                self.log.info("retried walredo succeeded", n_attempts=attempt)
            return page

    async def _get_process(self) -> WalRedoProcess:
        proc = self._process
        if proc is not None and proc.alive:
            return proc
        async with self._launch_lock:
            if self._closed:
                raise WalRedoError("WAL redo manager is shut down")
            proc = self._process
            if proc is not None and not proc.alive:
                await self._discard(proc)
                proc = None
            if proc is None:
                proc = await self._launcher(self.log)
                self._process = proc
                self.log.info("launched walredo process", pid=proc.pid)
            return proc

    async def _discard(self, proc: WalRedoProcess) -> None:
        """Kill a failed process (only if it is still the current one) and wait for its stderr."""
        if self._process is proc:
            self._process = None
            self.metrics.process_restarts.inc()
        await proc.kill()
