"""`global/pg_control` (catalog/pg_control.h; spec §8): decode with validation, encode byte-exactly.

The file is 8192 bytes; `ControlFileData` is its first 296 bytes (CRC-32C of bytes 0..287 stored at
288), the rest is zero. Decoding a real pg_control and encoding it again reproduces it exactly.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import struct
from dataclasses import dataclass

from neon.postgres.checkpoint import SIZE_OF_CHECKPOINT, CheckPoint
from neon.postgres.constants import (
    BLCKSZ,
    CATALOG_VERSION_NO,
    MAXIMUM_ALIGNOF,
    PG_CONTROL_FILE_SIZE,
    PG_CONTROL_VERSION,
    RELSEG_SIZE,
    XLOG_BLCKSZ,
)
from neon.postgres.crc32c import crc32c
from neon.postgres.errors import PgFormatError

# 35 values in field order, checkPointCopy as an 88-byte string; padding gaps are the 'x's.
CONTROL_FILE_STRUCT = struct.Struct("<QIII4xqQ88sQQI4xQQ?3xi?3xiiiii?3xIdIIIIIIII?3xI32sI4x")
SIZE_OF_CONTROL_FILE_DATA = CONTROL_FILE_STRUCT.size  # 296, sizeof(ControlFileData)
CONTROL_FILE_CRC_OFFSET = 288  # offsetof(ControlFileData, crc)
_CRC = struct.Struct("<I")

# Build constants the server compares with its own (spec §10.2 item 4).
FLOAT_FORMAT = 1234567.0
NAMEDATALEN = 64
INDEX_MAX_KEYS = 32
TOAST_MAX_CHUNK_SIZE = 1996
LOBLKSIZE = 2048
FIRST_NORMAL_UNLOGGED_LSN = 1000
MOCK_AUTH_NONCE_LEN = 32


class DBState(enum.IntEnum):
    STARTUP = 0
    SHUTDOWNED = 1
    SHUTDOWNED_IN_RECOVERY = 2
    SHUTDOWNING = 3
    IN_CRASH_RECOVERY = 4
    IN_ARCHIVE_RECOVERY = 5
    IN_PRODUCTION = 6


# What pg_controldata prints for each state.
DB_STATE_NAMES = {
    DBState.STARTUP: "starting up",
    DBState.SHUTDOWNED: "shut down",
    DBState.SHUTDOWNED_IN_RECOVERY: "shut down in recovery",
    DBState.SHUTDOWNING: "shutting down",
    DBState.IN_CRASH_RECOVERY: "in crash recovery",
    DBState.IN_ARCHIVE_RECOVERY: "in archive recovery",
    DBState.IN_PRODUCTION: "in production",
}


class WalLevel(enum.IntEnum):
    MINIMAL = 0
    REPLICA = 1
    LOGICAL = 2


class ControlFileError(PgFormatError):
    """A pg_control that is too short or long, of another version, or fails its CRC."""


def is_valid_wal_segment_size(size: int) -> bool:
    """A power of two between 1 MiB and 1 GiB (IsValidWalSegSize)."""
    return 1 << 20 <= size <= 1 << 30 and size & (size - 1) == 0


@dataclass(frozen=True, slots=True)
class ControlFileData:
    system_identifier: int
    pg_control_version: int
    catalog_version_no: int
    state: int
    """A `DBState` value (kept as a plain int so unknown values survive a round trip)."""
    time: int
    """pg_time_t of the last update: Unix seconds."""
    checkpoint: int
    """Start LSN of the latest checkpoint record."""
    checkpoint_copy: CheckPoint
    unlogged_lsn: int
    min_recovery_point: int
    min_recovery_point_tli: int
    backup_start_point: int
    backup_end_point: int
    backup_end_required: bool
    wal_level: int
    wal_log_hints: bool
    max_connections: int
    max_worker_processes: int
    max_wal_senders: int
    max_prepared_xacts: int
    max_locks_per_xact: int
    track_commit_timestamp: bool
    max_align: int
    float_format: float
    blcksz: int
    relseg_size: int
    xlog_blcksz: int
    xlog_seg_size: int
    name_data_len: int
    index_max_keys: int
    toast_max_chunk_size: int
    loblksize: int
    float8_by_val: bool
    data_checksum_version: int
    mock_authentication_nonce: bytes
    crc: int
    """The CRC as read; `encode` always recomputes it."""

    # --- decoding ----------------------------------------------------------------------------
    @classmethod
    def decode(cls, buf: bytes | bytearray | memoryview, *, verify: bool = True) -> ControlFileData:
        """Parse a pg_control image. With `verify`, check version, CRC and catalog version as the
        server does (in that order) and raise `ControlFileError` on any mismatch."""
        n = len(buf)
        # The server reads only sizeof(ControlFileData) bytes (a truncated file is accepted).
        if n < SIZE_OF_CONTROL_FILE_DATA:
            raise ControlFileError(
                f"pg_control is {n} bytes, shorter than ControlFileData ({SIZE_OF_CONTROL_FILE_DATA})"
            )
        if n > PG_CONTROL_FILE_SIZE:
            raise ControlFileError(f"pg_control is {n} bytes, longer than {PG_CONTROL_FILE_SIZE}")
        values = list(CONTROL_FILE_STRUCT.unpack_from(buf, 0))
        cf = cls(
            *values[:6],
            CheckPoint.unpack(values[6]),
            *values[7:],
        )
        if verify:
            cf._verify(buf)
        return cf

    def _verify(self, buf: bytes | bytearray | memoryview) -> None:
        if self.pg_control_version != PG_CONTROL_VERSION:
            swapped = int.from_bytes(self.pg_control_version.to_bytes(4, "little"), "big")
            hint = " (byte order mismatch?)" if swapped == PG_CONTROL_VERSION else ""
            raise ControlFileError(
                f"pg_control version is {self.pg_control_version}, expected {PG_CONTROL_VERSION}{hint}"
            )
        expected = crc32c(memoryview(buf)[:CONTROL_FILE_CRC_OFFSET])
        if self.crc != expected:
            raise ControlFileError(f"incorrect checksum in pg_control: stored {self.crc:08X}, computed {expected:08X}")
        if self.catalog_version_no != CATALOG_VERSION_NO:
            raise ControlFileError(
                f"pg_control catalog version is {self.catalog_version_no}, expected {CATALOG_VERSION_NO}"
            )

    def check_build_compatibility(self) -> None:
        """Raise unless the build constants are those of the PG15 server we run (spec §10.2)."""
        wanted = {
            "max_align": MAXIMUM_ALIGNOF,
            "float_format": FLOAT_FORMAT,
            "blcksz": BLCKSZ,
            "relseg_size": RELSEG_SIZE,
            "xlog_blcksz": XLOG_BLCKSZ,
            "name_data_len": NAMEDATALEN,
            "index_max_keys": INDEX_MAX_KEYS,
            "toast_max_chunk_size": TOAST_MAX_CHUNK_SIZE,
            "loblksize": LOBLKSIZE,
            "float8_by_val": True,
        }
        for name, value in wanted.items():
            if getattr(self, name) != value:
                raise ControlFileError(f"pg_control {name} is {getattr(self, name)!r}, this build needs {value!r}")
        if not is_valid_wal_segment_size(self.xlog_seg_size):
            raise ControlFileError(f"pg_control has invalid WAL segment size {self.xlog_seg_size}")

    # --- encoding ----------------------------------------------------------------------------
    def encode(self) -> bytes:
        """The 8192-byte file: struct, CRC recomputed over bytes 0..287, zero fill."""
        if len(self.mock_authentication_nonce) != MOCK_AUTH_NONCE_LEN:
            raise ControlFileError(
                f"mock_authentication_nonce must be {MOCK_AUTH_NONCE_LEN} bytes, "
                f"got {len(self.mock_authentication_nonce)}"
            )
        out = bytearray(PG_CONTROL_FILE_SIZE)
        try:
            CONTROL_FILE_STRUCT.pack_into(
                out,
                0,
                self.system_identifier,
                self.pg_control_version,
                self.catalog_version_no,
                self.state,
                self.time,
                self.checkpoint,
                self.checkpoint_copy.pack(),
                self.unlogged_lsn,
                self.min_recovery_point,
                self.min_recovery_point_tli,
                self.backup_start_point,
                self.backup_end_point,
                self.backup_end_required,
                self.wal_level,
                self.wal_log_hints,
                self.max_connections,
                self.max_worker_processes,
                self.max_wal_senders,
                self.max_prepared_xacts,
                self.max_locks_per_xact,
                self.track_commit_timestamp,
                self.max_align,
                self.float_format,
                self.blcksz,
                self.relseg_size,
                self.xlog_blcksz,
                self.xlog_seg_size,
                self.name_data_len,
                self.index_max_keys,
                self.toast_max_chunk_size,
                self.loblksize,
                self.float8_by_val,
                self.data_checksum_version,
                self.mock_authentication_nonce,
                0,
            )
        except struct.error as e:
            raise ControlFileError(f"pg_control field out of range: {e}") from None
        _CRC.pack_into(out, CONTROL_FILE_CRC_OFFSET, crc32c(memoryview(out)[:CONTROL_FILE_CRC_OFFSET]))
        return bytes(out)

    def replace(self, **changes: object) -> ControlFileData:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    # --- conveniences ------------------------------------------------------------------------
    @property
    def state_name(self) -> str:
        """The state as pg_controldata prints it ("shut down", "in production", ...)."""
        try:
            return DB_STATE_NAMES[DBState(self.state)]
        except ValueError:
            return "unrecognized status code"

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> ControlFileData:
        with open(path, "rb") as f:
            return cls.decode(f.read(PG_CONTROL_FILE_SIZE + 1))


def control_file_path(datadir: str | os.PathLike[str]) -> str:
    return os.path.join(datadir, "global", "pg_control")


# The layout above must match sizeof(ControlFileData) and sizeof(CheckPoint) of the PG15 build.
assert SIZE_OF_CONTROL_FILE_DATA == 296 and SIZE_OF_CHECKPOINT == 88
