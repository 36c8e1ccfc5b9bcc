"""Crafted WAL tails: against a running PG15 server, end its WAL in a chosen shape.

This module owns the Python counterpart of Neon's `wal_craft` tool (`libs/postgres_ffi/wal_craft`):
one function per shape, each writing WAL through ordinary SQL on a psycopg connection and
returning the LSNs it produced, plus the list of settings the server needs
(`required_postgres_config()`, Neon's `wal_craft print-postgres-config`). The shapes:

* `simple`: a plain transaction; the WAL ends with its commit record.
* `last_wal_record_xlog_switch`: the WAL ends with an XLOG_SWITCH (`pg_switch_wal()`), so it
  ends at the next segment boundary with the rest of the segment zeroed.
* `last_wal_record_xlog_switch_ends_on_page_boundary`: a logical message pads the WAL so that
  the XLOG_SWITCH after it ends exactly on a WAL page boundary.
* `wal_record_crossing_segment_followed_by_small_one`: a transactional logical message crosses a
  segment boundary and its small commit record follows.
* `last_wal_record_crossing_segment`: a non-transactional logical message crosses a segment
  boundary and is the last record.

Message sizes come from the record layout (spec postgres15-formats.md §1-§2, §4.11): an XLogRecord
header, a 2- or 5-byte main-data header, `xl_logical_message`, the prefix with its NUL and the
message, MAXALIGNed, with a page header on every WAL page the record touches. Each function
checks what the server reports against the layout, so a layout mistake (or a record some other
session slipped in) raises `WalCraftError` instead of producing some other shape.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg

from neon.postgres.constants import DEFAULT_WAL_SEGMENT_SIZE, SIZE_OF_XLOG_RECORD, XLOG_BLCKSZ, maxalign
from neon.postgres.walformat import page_header_size, skip_page_header
from neon.utils.lsn import Lsn

__all__ = [
    "CRAFTERS",
    "CraftedWal",
    "WalCraftError",
    "craft",
    "ensure_server_config",
    "logical_message_record_size",
    "logical_message_size_for",
    "record_end_lsn",
    "required_postgres_config",
    "usable_bytes",
]

# offsetof(xl_logical_message, message): dbId (4), transactional (1) + 3 padding, prefix_size (8),
# message_size (8).
SIZE_OF_LOGICAL_MESSAGE = 24
# Main data shorter than 256 bytes: XLR_BLOCK_ID_DATA_SHORT + 1 length byte; else DATA_LONG + 4.
MAIN_DATA_SHORT_HEADER = 2
MAIN_DATA_LONG_HEADER = 5

# Our own prefix: Neon's pageserver gives `neon-test` and `neon-file:` a meaning.
PREFIX = "wal-craft"
# How far past the segment boundary the segment-crossing message ends: several whole pages of
# continuation in the new segment, as in Neon (its check is "more than 4 pages past").
CROSSING_PAGES_INTO_NEXT_SEGMENT = 5
FLUSH_TIMEOUT = 60.0


class WalCraftError(Exception):
    """The server did not produce the shape (layout mismatch, concurrent WAL, wrong settings)."""


@dataclass(frozen=True)
class CraftedWal:
    shape: str
    initial_lsn: Lsn
    """The insert LSN before crafting: where the crafted records begin."""
    end_lsn: Lsn
    """Where the WAL ends once crafted: the server's flush LSN (a segment boundary after XLOG_SWITCH)."""
    record_lsns: list[Lsn] = field(default_factory=list)
    """Start LSNs of the crafted records of interest, in WAL order (the last one is the last
    record, except in `wal_record_crossing_segment_followed_by_small_one`: message, commit)."""
    intermediate_lsns: list[Lsn] = field(default_factory=list)
    """Valid positions one may start reading from (Neon's first output): `initial_lsn` first."""


def required_postgres_config() -> list[str]:
    """The settings the crafters need, as `postgresql.conf` lines (`wal_craft print-postgres-config`).

    Neon's list also has `shared_preload_libraries=neon` (its extension, for `neon_xlogflush`) and
    `wal_writer_delay=10s`; stock Postgres has neither the extension nor another way to flush a
    non-transactional message without writing more WAL, so the WAL writer's normal cycle must
    flush it and its delay stays at the default."""
    return [
        # Old WAL stays readable (by pg_waldump and by readers starting at the crafted LSNs).
        "wal_keep_size = '50MB'",
        # Fewer background records between and after the crafted ones.
        "autovacuum = off",
    ]


# --- the record layout ---------------------------------------------------------------------------
def logical_message_record_size(prefix: str, message_len: int) -> int:
    """`xl_tot_len` of a LogicalMessage record (no block references, no origin)."""
    main_len = SIZE_OF_LOGICAL_MESSAGE + len(prefix.encode()) + 1 + message_len
    header = MAIN_DATA_SHORT_HEADER if main_len < 256 else MAIN_DATA_LONG_HEADER
    return SIZE_OF_XLOG_RECORD + header + main_len


def record_end_lsn(start: int, tot_len: int, seg_size: int = DEFAULT_WAL_SEGMENT_SIZE) -> Lsn:
    """Where a record of `tot_len` bytes starting at `start` ends, MAXALIGNed: Postgres' EndRecPtr
    (a page boundary when it ends there, not the position after the next page's header)."""
    pos = skip_page_header(start, seg_size)
    left = tot_len
    while True:
        if pos % XLOG_BLCKSZ == 0:
            pos += page_header_size(pos, seg_size)
        room = XLOG_BLCKSZ - pos % XLOG_BLCKSZ
        if left <= room:
            return Lsn(maxalign(pos + left))
        left -= room
        pos += room


def usable_bytes(start: int, end: int, seg_size: int = DEFAULT_WAL_SEGMENT_SIZE) -> int:
    """Record bytes between `start` and `end`: the distance less the page headers of the pages
    beginning strictly inside it (a record ending on a page boundary does not touch that page)."""
    start = skip_page_header(start, seg_size)
    if end < start or (end % XLOG_BLCKSZ and end % XLOG_BLCKSZ < page_header_size(end - end % XLOG_BLCKSZ, seg_size)):
        raise ValueError(f"no record can span {Lsn(start)}..{Lsn(end)}")
    total = end - start
    page = start - start % XLOG_BLCKSZ + XLOG_BLCKSZ
    while page < end:
        total -= page_header_size(page, seg_size)
        page += XLOG_BLCKSZ
    return total


def logical_message_size_for(start: int, end: int, prefix: str, seg_size: int = DEFAULT_WAL_SEGMENT_SIZE) -> int:
    """The message length making a LogicalMessage record at `start` end exactly at `end` (both
    8-aligned). Raises ValueError when the span is too short for any message."""
    tot_len = usable_bytes(start, end, seg_size)
    if tot_len % 8:
        raise ValueError(f"{Lsn(start)}..{Lsn(end)} is not a MAXALIGNed span")
    fixed = SIZE_OF_XLOG_RECORD + SIZE_OF_LOGICAL_MESSAGE + len(prefix.encode()) + 1
    for header in (MAIN_DATA_LONG_HEADER, MAIN_DATA_SHORT_HEADER):
        message_len = tot_len - fixed - header
        if message_len >= 0 and logical_message_record_size(prefix, message_len) == tot_len:
            return message_len
    raise ValueError(f"no logical message fills {Lsn(start)}..{Lsn(end)} ({tot_len} bytes)")


def _next_segment(lsn: int, seg_size: int) -> Lsn:
    return Lsn(lsn - lsn % seg_size + seg_size)


# --- talking to the server -----------------------------------------------------------------------
def _scalar(conn: psycopg.Connection[Any], query: str, params: tuple[Any, ...] = ()) -> Any:
    row = conn.execute(query, params).fetchone()  # type: ignore[arg-type]
    assert row is not None
    return row[0]


def _insert_lsn(conn: psycopg.Connection[Any]) -> Lsn:
    return Lsn(_scalar(conn, "SELECT pg_current_wal_insert_lsn()::text"))


def _flush_lsn(conn: psycopg.Connection[Any]) -> Lsn:
    return Lsn(_scalar(conn, "SELECT pg_current_wal_flush_lsn()::text"))


def _emit_message(conn: psycopg.Connection[Any], transactional: bool, message_len: int) -> Lsn:
    """pg_logical_emit_message of `message_len` bytes built on the server; returns its end LSN."""
    return Lsn(
        _scalar(
            conn,
            "SELECT pg_logical_emit_message(%s, %s, repeat('a', %s))::text",
            (transactional, PREFIX, message_len),
        )
    )


def ensure_server_config(conn: psycopg.Connection[Any]) -> int:
    """Check the settings of `required_postgres_config()` and an autocommit session; returns
    the server's WAL segment size."""
    if not conn.autocommit:
        raise WalCraftError("wal_craft needs an autocommit connection: each statement is its own transaction")
    if _scalar(conn, "SHOW autovacuum") != "off":
        raise WalCraftError("autovacuum must be off (see required_postgres_config())")
    if _scalar(conn, "SELECT pg_size_bytes(current_setting('wal_keep_size'))") < 50 * 1024 * 1024:
        raise WalCraftError("wal_keep_size must be at least 50MB (see required_postgres_config())")
    if int(_scalar(conn, "SELECT current_setting('wal_block_size')")) != XLOG_BLCKSZ:
        raise WalCraftError(f"the server's WAL block size is not {XLOG_BLCKSZ}")
    return int(_scalar(conn, "SELECT setting::bigint FROM pg_settings WHERE name = 'wal_segment_size'"))


def _wait_flushed(conn: psycopg.Connection[Any], lsn: Lsn) -> Lsn:
    """Until the server's flush LSN reaches `lsn`. A non-transactional message is flushed by the WAL
    writer within its delay; stock Postgres has no SQL call to flush it without writing WAL."""
    deadline = time.monotonic() + FLUSH_TIMEOUT
    while (flushed := _flush_lsn(conn)) < lsn:
        if time.monotonic() > deadline:
            raise WalCraftError(f"WAL not flushed to {lsn} in {FLUSH_TIMEOUT} s (flush LSN {flushed})")
        time.sleep(0.02)  # polling the server's flush position: it has no notification for it
    return flushed


def _finish(conn: psycopg.Connection[Any], result: CraftedWal, seg_size: int) -> CraftedWal:
    """Check nothing was written after the crafted records and wait until they are flushed."""
    insert = _insert_lsn(conn)
    # The next record goes at the end, or past the page header when the end is a page boundary
    # (after XLOG_SWITCH: the next segment's long header).
    expected_insert = skip_page_header(result.end_lsn, seg_size)
    if insert != expected_insert:
        raise WalCraftError(f"{result.shape}: insert LSN {insert} after crafting, expected {expected_insert}")
    flushed = _wait_flushed(conn, result.end_lsn)
    if flushed != result.end_lsn:
        raise WalCraftError(f"{result.shape}: flushed to {flushed}, past the crafted end {result.end_lsn}")
    return result


# --- the shapes ----------------------------------------------------------------------------------
def craft_simple(conn: psycopg.Connection[Any]) -> CraftedWal:
    """A plain committed transaction: the WAL ends with its commit record."""
    seg_size = ensure_server_config(conn)
    initial = _insert_lsn(conn)
    conn.execute("CREATE TABLE IF NOT EXISTS wal_craft_simple (x int)")
    conn.execute("INSERT INTO wal_craft_simple VALUES (1)")
    # A commit is flushed before it returns: the flush LSN is the end of the commit record.
    result = CraftedWal("simple", initial, _flush_lsn(conn), [], [initial])
    return _finish(conn, result, seg_size)


def _switch(conn: psycopg.Connection[Any], shape: str, initial: Lsn, seg_size: int, extra: list[Lsn]) -> CraftedWal:
    """pg_switch_wal() as the last record: the WAL ends at the next segment boundary."""
    switch_start = skip_page_header(_insert_lsn(conn), seg_size)
    switch_end = Lsn(_scalar(conn, "SELECT pg_switch_wal()::text"))
    # pg_switch_wal() returns the end of the 24-byte record, past the page header when the record
    # ends on a page boundary.
    if switch_end != skip_page_header(record_end_lsn(switch_start, SIZE_OF_XLOG_RECORD, seg_size), seg_size):
        raise WalCraftError(f"{shape}: XLOG_SWITCH at {Lsn(switch_start)} ended at {switch_end}")
    next_segment = _next_segment(switch_start, seg_size)
    if switch_end >= next_segment:
        raise WalCraftError(f"{shape}: XLOG_SWITCH ended at {switch_end}, not before {next_segment}")
    # The switch reserves (and pg_switch_wal() flushes) the rest of the segment.
    result = CraftedWal(shape, initial, next_segment, [*extra, Lsn(switch_start)], [initial, Lsn(switch_start)])
    return _finish(conn, result, seg_size)


def craft_last_wal_record_xlog_switch(conn: psycopg.Connection[Any]) -> CraftedWal:
    """A transaction, then XLOG_SWITCH: the WAL ends at a segment boundary, its tail zeroed."""
    seg_size = ensure_server_config(conn)
    initial = _insert_lsn(conn)
    conn.execute("CREATE TABLE IF NOT EXISTS wal_craft_switch (x int)")
    conn.execute("INSERT INTO wal_craft_switch VALUES (1)")
    return _switch(conn, "last_wal_record_xlog_switch", initial, seg_size, [])


def craft_last_wal_record_xlog_switch_ends_on_page_boundary(conn: psycopg.Connection[Any]) -> CraftedWal:
    """A padding message sized so that the XLOG_SWITCH after it ends exactly on a page boundary."""
    shape = "last_wal_record_xlog_switch_ends_on_page_boundary"
    seg_size = ensure_server_config(conn)
    initial = _insert_lsn(conn)
    start = skip_page_header(initial, seg_size)
    # The switch record (24 bytes, no data) must occupy the last 24 bytes of a page that is not
    # the segment's last (there the switch would end the segment and leave no zeroed tail).
    page_end = start - start % XLOG_BLCKSZ + XLOG_BLCKSZ
    while True:
        switch_start = page_end - SIZE_OF_XLOG_RECORD
        if page_end % seg_size != 0:
            try:
                message_len = logical_message_size_for(start, switch_start, PREFIX, seg_size)
                break
            except ValueError:
                pass  # too close for a message: pad to the next page
        page_end += XLOG_BLCKSZ
    padding_end = _emit_message(conn, False, message_len)
    if padding_end != switch_start:
        raise WalCraftError(f"{shape}: the padding message ended at {padding_end}, expected {Lsn(switch_start)}")
    result = _switch(conn, shape, initial, seg_size, [Lsn(start)])
    if result.record_lsns[-1] != switch_start:
        raise WalCraftError(f"{shape}: XLOG_SWITCH at {result.record_lsns[-1]}, expected {Lsn(switch_start)}")
    return result


def _crossing_segment(conn: psycopg.Connection[Any], shape: str, transactional: bool) -> CraftedWal:
    seg_size = ensure_server_config(conn)
    initial = _insert_lsn(conn)
    start = skip_page_header(initial, seg_size)
    # End a few pages into the next segment: the message starts in this segment and its
    # continuation fills the new segment's long-header first page and more.
    end = _next_segment(start, seg_size) + CROSSING_PAGES_INTO_NEXT_SEGMENT * XLOG_BLCKSZ + 1024
    message_len = logical_message_size_for(start, end, PREFIX, seg_size)
    message_end = _emit_message(conn, transactional, message_len)
    if message_end != end:
        raise WalCraftError(f"{shape}: the message at {Lsn(start)} ended at {message_end}, expected {Lsn(end)}")
    if not transactional:
        return _finish(conn, CraftedWal(shape, initial, Lsn(end), [Lsn(start)], [initial]), seg_size)
    # The transaction's commit record follows the message; the commit flushed both.
    commit_start = skip_page_header(message_end, seg_size)
    after = _flush_lsn(conn)
    if after <= commit_start:
        raise WalCraftError(f"{shape}: no commit record after the message (flush LSN {after})")
    result = CraftedWal(shape, initial, after, [Lsn(start), Lsn(commit_start)], [initial, Lsn(commit_start)])
    return _finish(conn, result, seg_size)


def craft_wal_record_crossing_segment_followed_by_small_one(conn: psycopg.Connection[Any]) -> CraftedWal:
    """A transactional message crossing a segment boundary, then its small commit record."""
    return _crossing_segment(conn, "wal_record_crossing_segment_followed_by_small_one", True)


def craft_last_wal_record_crossing_segment(conn: psycopg.Connection[Any]) -> CraftedWal:
    """A non-transactional message crossing a segment boundary, as the last record."""
    return _crossing_segment(conn, "last_wal_record_crossing_segment", False)


CRAFTERS: dict[str, Callable[[psycopg.Connection[Any]], CraftedWal]] = {
    "simple": craft_simple,
    "last_wal_record_xlog_switch": craft_last_wal_record_xlog_switch,
    "last_wal_record_xlog_switch_ends_on_page_boundary": craft_last_wal_record_xlog_switch_ends_on_page_boundary,
    "wal_record_crossing_segment_followed_by_small_one": craft_wal_record_crossing_segment_followed_by_small_one,
    "last_wal_record_crossing_segment": craft_last_wal_record_crossing_segment,
}


def craft(conn: psycopg.Connection[Any], shape: str) -> CraftedWal:
    """Write the WAL tail `shape` (a key of CRAFTERS) on `conn` (Neon's `wal_craft in-existing`)."""
    try:
        crafter = CRAFTERS[shape]
    except KeyError:
        raise ValueError(f"unknown WAL shape {shape!r}; known: {', '.join(CRAFTERS)}") from None
    return crafter(conn)
