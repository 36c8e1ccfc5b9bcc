"""The per-timeline `safekeeper.control` file (spec safekeeper-and-broker §3.2): format version 7.

This module owns the durable state of one timeline on one safekeeper — `SafeKeeperState` — its
exact on-disk encoding, loading it strictly, and replacing it atomically. Layout (all
little-endian, the bincode encoding Neon uses):

    magic u32 = 0xCAFECEEF · format_version u32 = 7
    tenant_id, timeline_id          u64 length (32) + 32 hex characters each
    acceptor_state.term             u64
    acceptor_state.term_history     u64 count + count x (term u64, lsn u64)
    server.pg_version u32 · server.system_id u64 · server.wal_seg_size u32
    proposer_uuid                   u64 length (32) + 32 hex characters
    timeline_start_lsn, local_start_lsn, commit_lsn, backup_lsn, peer_horizon_lsn,
    remote_consistent_lsn           u64 each
    peers                           u64 count + count x (node_id, backup_lsn, term, flush_lsn, commit_lsn)
    checksum u32                    CRC-32C of every byte before it

With an empty history and no peers the file is 220 bytes; each history entry adds 16.

Older format versions (1-6) are refused with a message naming the version: this implementation
never wrote them, so there is nothing to upgrade.
"""

from __future__ import annotations

import dataclasses
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from neon.postgres.crc32c import crc32c
from neon.safekeeper.protocol import INVALID_TERM, TermHistory, TermLsn
from neon.utils.crashsafe import fsync_path
from neon.utils.id import HexId, TenantId, TimelineId
from neon.utils.lsn import INVALID_LSN, Lsn

SK_MAGIC: Final = 0xCAFECEEF
SK_FORMAT_VERSION: Final = 7
CONTROL_FILE_NAME: Final = "safekeeper.control"
CONTROL_FILE_PARTIAL_NAME: Final = "safekeeper.control.partial"
CHECKSUM_SIZE: Final = 4
# Size of a version-7 file with an empty term history and no peers.
MIN_FILE_SIZE: Final = 220

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_HEADER = struct.Struct("<II")
_TERM_LSN = struct.Struct("<QQ")
_SERVER = struct.Struct("<IQI")
_LSNS = struct.Struct("<QQQQQQ")
_PEER = struct.Struct("<QQQQQ")
_HEX_ID_LEN: Final = 32
_HEX_DIGITS: Final = frozenset(b"0123456789abcdefABCDEF")
_ZERO_UUID: Final = bytes(16)


class ControlFileError(Exception):
    """A control file that cannot be used as it is; the message says which file and why."""


class _OutOfBytes(ControlFileError):
    """The fields ran past the end of the data (a truncated file, or a garbage count)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class AcceptorState:
    """The Paxos acceptor state: the highest term voted for and the history of term switches
    (which can run ahead of the local WAL, as it is adopted from the proposer before recovery)."""

    term: int = INVALID_TERM
    term_history: TermHistory = field(default_factory=TermHistory)

    def last_log_term(self, flush_lsn: int) -> int:
        """The epoch: term of the last switch at or before `flush_lsn` (0 if none)."""
        return self.term_history.last_log_term(flush_lsn)


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerInfo:
    """The Postgres this timeline belongs to; later greetings must match it."""

    pg_version: int  # PG_VERSION_NUM, 0 = unknown
    system_id: int
    wal_seg_size: int


@dataclass(frozen=True, slots=True, kw_only=True)
class PersistedPeerInfo:
    """A peer safekeeper's progress (reserved in the format; always written empty)."""

    backup_lsn: Lsn = INVALID_LSN
    term: int = INVALID_TERM
    flush_lsn: Lsn = INVALID_LSN
    commit_lsn: Lsn = INVALID_LSN


@dataclass(frozen=True, slots=True, kw_only=True)
class SafeKeeperState:
    """Everything a safekeeper persists for one timeline. Immutable: derive changed copies with
    `replace()` and persist them; `commit_lsn`, `backup_lsn`, `peer_horizon_lsn` and
    `remote_consistent_lsn` here are the *persisted* values, which lag the in-memory ones."""

    tenant_id: TenantId
    timeline_id: TimelineId
    acceptor_state: AcceptorState = field(default_factory=AcceptorState)
    server: ServerInfo
    proposer_uuid: bytes = _ZERO_UUID
    timeline_start_lsn: Lsn = INVALID_LSN
    local_start_lsn: Lsn = INVALID_LSN
    commit_lsn: Lsn = INVALID_LSN
    backup_lsn: Lsn = INVALID_LSN
    peer_horizon_lsn: Lsn = INVALID_LSN
    remote_consistent_lsn: Lsn = INVALID_LSN
    peers: tuple[tuple[int, PersistedPeerInfo], ...] = ()

    def replace(self, **changes: Any) -> SafeKeeperState:
        return dataclasses.replace(self, **changes)

    @property
    def term(self) -> int:
        return self.acceptor_state.term

    @property
    def term_history(self) -> TermHistory:
        return self.acceptor_state.term_history

    def encode(self) -> bytes:
        """The complete file contents: magic, version, state, CRC-32C."""
        try:
            body = b"".join(
                (
                    _HEADER.pack(SK_MAGIC, SK_FORMAT_VERSION),
                    _hex_string(self.tenant_id),
                    _hex_string(self.timeline_id),
                    _U64.pack(self.acceptor_state.term),
                    _U64.pack(len(self.acceptor_state.term_history)),
                    *(_TERM_LSN.pack(e.term, e.lsn) for e in self.acceptor_state.term_history),
                    _SERVER.pack(self.server.pg_version, self.server.system_id, self.server.wal_seg_size),
                    _hex_string(self.proposer_uuid),
                    _LSNS.pack(
                        self.timeline_start_lsn,
                        self.local_start_lsn,
                        self.commit_lsn,
                        self.backup_lsn,
                        self.peer_horizon_lsn,
                        self.remote_consistent_lsn,
                    ),
                    _U64.pack(len(self.peers)),
                    *(
                        _PEER.pack(node_id, p.backup_lsn, p.term, p.flush_lsn, p.commit_lsn)
                        for node_id, p in self.peers
                    ),
                )
            )
        except struct.error as e:
            raise ValueError(f"SafeKeeperState: field out of range: {e}") from None
        return body + _U32.pack(crc32c(body))

    @classmethod
    def decode(cls, data: bytes, source: str = "safekeeper control file") -> SafeKeeperState:
        """Parse complete file contents; every problem is a `ControlFileError` naming `source`."""
        if len(data) < _HEADER.size:
            raise ControlFileError(f"{source}: truncated: {len(data)} bytes, too short for magic and version")
        magic, version = _HEADER.unpack_from(data)
        if magic != SK_MAGIC:
            raise ControlFileError(f"{source}: bad control file magic {magic:#X}, expected {SK_MAGIC:#X}")
        if len(data) < _HEADER.size + CHECKSUM_SIZE:
            raise ControlFileError(f"{source}: truncated: {len(data)} bytes, too short for a checksum")
        stored = _U32.unpack_from(data, len(data) - CHECKSUM_SIZE)[0]
        computed = crc32c(data[:-CHECKSUM_SIZE])
        if stored != computed:
            if version == SK_FORMAT_VERSION:
                needed = _v7_size_needed(data)
                if needed is not None and needed > len(data):
                    raise ControlFileError(
                        f"{source}: truncated: {len(data)} bytes, its fields need at least {needed} "
                        f"(safekeeper control file checksum mismatch)"
                    )
            raise ControlFileError(
                f"{source}: safekeeper control file checksum mismatch: stored {stored:#010x}, computed {computed:#010x}"
            )
        if version != SK_FORMAT_VERSION:
            if 1 <= version < SK_FORMAT_VERSION:
                raise ControlFileError(
                    f"{source}: control file format version {version} is older than {SK_FORMAT_VERSION}; "
                    "upgrading old formats is not supported"
                )
            raise ControlFileError(
                f"{source}: unknown control file format version {version} (this build reads {SK_FORMAT_VERSION})"
            )
        reader = _Reader(data, _HEADER.size, len(data) - CHECKSUM_SIZE, source)
        state = reader.state()
        reader.end()
        return state


# --- reading ---------------------------------------------------------------------------------


class _Reader:
    """Strict cursor over the state part of the file (between version and checksum)."""

    def __init__(self, data: bytes, pos: int, end: int, source: str) -> None:
        self._data = data
        self._pos = pos
        self._end = end
        self._source = source

    @property
    def position(self) -> int:
        return self._pos

    def _fail(self, what: str) -> ControlFileError:
        return ControlFileError(f"{self._source}: {what}")

    def take(self, n: int, field_name: str) -> bytes:
        if self._pos + n > self._end:
            raise _OutOfBytes(
                f"{self._source}: "
                f"truncated at {field_name} (offset {self._pos}): needs {n} bytes, {self._end - self._pos} left"
            )
        chunk = self._data[self._pos : self._pos + n]
        self._pos += n
        return chunk

    def unpack(self, s: struct.Struct, field_name: str) -> tuple[int, ...]:
        return s.unpack(self.take(s.size, field_name))

    def u64(self, field_name: str) -> int:
        return self.unpack(_U64, field_name)[0]

    def count(self, item_size: int, field_name: str) -> int:
        n = self.u64(f"{field_name} count")
        left = self._end - self._pos
        # Bound the count by the bytes present before building anything for it.
        if n * item_size > left:
            raise _OutOfBytes(
                f"{self._source}: {field_name} claims {n} entries ({n * item_size} bytes), only {left} bytes left"
            )
        return n

    def hex_id(self, field_name: str) -> bytes:
        length = self.u64(f"{field_name} length")
        if length != _HEX_ID_LEN:
            raise self._fail(f"{field_name} must be a {_HEX_ID_LEN}-character hex string, length is {length}")
        text = self.take(_HEX_ID_LEN, field_name)
        # Checked by hand: bytes.fromhex would also skip whitespace.
        if not all(c in _HEX_DIGITS for c in text):
            raise self._fail(f"{field_name} is not hex: {text!r}")
        return bytes.fromhex(text.decode("ascii"))

    def state(self) -> SafeKeeperState:
        tenant = self.hex_id("tenant_id")
        timeline = self.hex_id("timeline_id")
        term = self.u64("acceptor_state.term")
        n_history = self.count(_TERM_LSN.size, "acceptor_state.term_history")
        history = TermHistory(
            tuple(TermLsn(t, Lsn(lsn)) for t, lsn in (self.unpack(_TERM_LSN, "term history") for _ in range(n_history)))
        )
        pg_version, system_id, wal_seg_size = self.unpack(_SERVER, "server")
        proposer_uuid = self.hex_id("proposer_uuid")
        lsns = [Lsn(v) for v in self.unpack(_LSNS, "LSNs")]
        n_peers = self.count(_PEER.size, "peers")
        peers = []
        for _ in range(n_peers):
            node_id, backup, peer_term, flush, commit = self.unpack(_PEER, "peers")
            info = PersistedPeerInfo(
                backup_lsn=Lsn(backup), term=peer_term, flush_lsn=Lsn(flush), commit_lsn=Lsn(commit)
            )
            peers.append((node_id, info))
        return SafeKeeperState(
            tenant_id=TenantId(tenant),
            timeline_id=TimelineId(timeline),
            acceptor_state=AcceptorState(term=term, term_history=history),
            server=ServerInfo(pg_version=pg_version, system_id=system_id, wal_seg_size=wal_seg_size),
            proposer_uuid=proposer_uuid,
            timeline_start_lsn=lsns[0],
            local_start_lsn=lsns[1],
            commit_lsn=lsns[2],
            backup_lsn=lsns[3],
            peer_horizon_lsn=lsns[4],
            remote_consistent_lsn=lsns[5],
            peers=tuple(peers),
        )

    def end(self) -> None:
        if self._pos != self._end:
            raise self._fail(f"{self._end - self._pos} unexpected trailing bytes after the state (offset {self._pos})")


def _v7_size_needed(data: bytes) -> int | None:
    """How long a v7 file whose fields start like `data` must be, or None if the fields read
    fine (then a checksum mismatch is corruption, not truncation)."""
    reader = _Reader(data, _HEADER.size, len(data), "")
    try:
        reader.state()
    except _OutOfBytes:
        return max(MIN_FILE_SIZE, len(data) + 1)
    except ControlFileError:
        return None
    needed = reader.position + CHECKSUM_SIZE
    return needed if needed > len(data) else None


def _hex_string(value: bytes) -> bytes:
    if len(value) != 16:
        raise ValueError(f"SafeKeeperState: ids are 16 bytes, got {len(value)}")
    return _U64.pack(_HEX_ID_LEN) + bytes(value).hex().encode("ascii")


# --- files -----------------------------------------------------------------------------------


def control_file_path(path: str | os.PathLike[str]) -> Path:
    """`path` itself, or `path/safekeeper.control` when `path` is a (timeline) directory."""
    p = Path(path)
    return p / CONTROL_FILE_NAME if p.is_dir() else p


def load(path: str | os.PathLike[str]) -> SafeKeeperState:
    """Read and strictly decode a control file (or the one in timeline directory `path`).

    Only `safekeeper.control` is read — a leftover `.partial` from an interrupted persist is
    ignored — and nothing is ever written, so a bad file stays as it was for inspection."""
    target = control_file_path(path)
    try:
        data = target.read_bytes()
    except OSError as e:
        raise ControlFileError(f"failed to read control file {target}: {e.strerror or e}") from e
    return SafeKeeperState.decode(data, source=f"control file {target}")


def persist(path: str | os.PathLike[str], state: SafeKeeperState, *, no_sync: bool = False) -> None:
    """Replace the control file atomically (§3.2.2): write `safekeeper.control.partial` next to
    it, fsync it, rename it over `safekeeper.control`, fsync the file and then its directory.
    `no_sync` (the safekeeper's `--no-sync`) skips the fsyncs, never the rename."""
    target = control_file_path(path)
    partial = target.with_name(target.name + ".partial")
    data = state.encode()
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if not no_sync:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(partial, target)
    if not no_sync:
        # Postgres' durable_rename also syncs the renamed file; then the directory entry.
        fsync_path(target)
        fsync_path(target.parent)


def initial(
    tenant_id: TenantId,
    timeline_id: TimelineId,
    server: ServerInfo,
    *,
    commit_lsn: int = 0,
    local_start_lsn: int | None = None,
) -> SafeKeeperState:
    """The state of a newly created timeline (§3.2.4).

    Implicit creation on a ProposerGreeting passes no LSNs (everything starts at 0); HTTP creation
    passes `commit_lsn` and optionally `local_start_lsn` (default: start of the segment holding
    `commit_lsn`). Raises ValueError for the inputs Neon refuses."""
    if bytes(tenant_id) == bytes(HexId.LENGTH) or bytes(timeline_id) == bytes(HexId.LENGTH):
        raise ValueError(f"cannot create a timeline with zero ids: tenant {tenant_id}, timeline {timeline_id}")
    if server.wal_seg_size == 0:
        raise ValueError("cannot create a timeline with wal_seg_size 0")
    if server.pg_version == 0:
        raise ValueError("cannot create a timeline with unknown pg_version 0")
    commit = Lsn(commit_lsn)
    local_start = commit.segment_start(server.wal_seg_size) if local_start_lsn is None else Lsn(local_start_lsn)
    if commit < local_start:
        raise ValueError(f"commit_lsn {commit} is below local_start_lsn {local_start}")
    return SafeKeeperState(
        tenant_id=tenant_id,
        timeline_id=timeline_id,
        acceptor_state=AcceptorState(),
        server=server,
        proposer_uuid=_ZERO_UUID,
        timeline_start_lsn=Lsn(0),
        local_start_lsn=local_start,
        commit_lsn=commit,
        backup_lsn=local_start,
        peer_horizon_lsn=local_start,
        remote_consistent_lsn=Lsn(0),
        peers=(),
    )
