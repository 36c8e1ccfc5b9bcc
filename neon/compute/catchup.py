"""WAL for a safekeeper that lags behind what the proposer's spool still holds (spec §10.6).

The spool keeps a bounded tail of the WAL. A safekeeper that was away longer gets the older WAL
over a replication connection of its own: from the compute (it keeps that WAL for the proposer's
retention slot, which stays at `truncateLsn`) for WAL of the compute's term, or from the donor
safekeeper (as `wal_proposer_recovery`) for WAL older than the term's start. Reads are sequential,
as a safekeeper's stream is; a jump reopens the connection at the new position.
"""

from __future__ import annotations

import contextlib

from neon.pq.client import PgConnection, ReplicationStream, connect
from neon.pq.replication import XLogData
from neon.utils.lsn import Lsn

PG_TLI = 1


class CatchUpError(Exception):
    """The source could not serve the WAL (gone, removed, or the stream ended early)."""


class CatchUpReader:
    def __init__(
        self,
        host: str,
        port: int,
        *,
        user: str = "cloud_admin",
        application_name: str,
        options: str | None = None,
        connect_timeout: float = 10.0,
    ) -> None:
        self.host, self.port, self.user = host, port, user
        self.application_name = application_name
        self.options = options
        self.connect_timeout = connect_timeout
        self._conn: PgConnection | None = None
        self._stream: ReplicationStream | None = None
        self._buf_start = Lsn(0)
        self._buf = bytearray()

    def __str__(self) -> str:
        return f"{self.host}:{self.port} ({self.application_name})"

    async def read(self, lsn: int, max_bytes: int) -> bytes:
        """Up to `max_bytes` (at least one) of WAL from `lsn`."""
        if self._stream is None or not self._buf_start <= lsn <= self._buf_start + len(self._buf):
            await self._open(Lsn(lsn))
        del self._buf[: lsn - self._buf_start]
        self._buf_start = Lsn(lsn)
        assert self._stream is not None
        try:
            while not self._buf:
                msg = await anext(self._stream)
                if isinstance(msg, XLogData) and msg.data:
                    if msg.wal_start != self._buf_start + len(self._buf):
                        raise CatchUpError(f"{self}: WAL jumped to {Lsn(msg.wal_start)}")
                    self._buf += msg.data
        except StopAsyncIteration:
            raise CatchUpError(f"{self}: the stream ended at {self._buf_start}") from None
        except CatchUpError:
            raise
        except Exception as e:
            raise CatchUpError(f"{self}: {type(e).__name__}: {e}") from e
        return bytes(self._buf[:max_bytes])

    async def _open(self, lsn: Lsn) -> None:
        await self.close()
        try:
            self._conn = await connect(
                self.host,
                self.port,
                self.user,
                replication=True,
                application_name=self.application_name,
                options=self.options,
                connect_timeout=self.connect_timeout,
            )
            self._stream = await self._conn.start_replication(lsn, timeline=PG_TLI)
        except Exception as e:
            await self.close()
            raise CatchUpError(f"{self}: cannot stream from {lsn}: {type(e).__name__}: {e}") from e
        self._buf_start, self._buf = lsn, bytearray()

    async def close(self) -> None:
        conn, self._conn, self._stream = self._conn, None, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()
