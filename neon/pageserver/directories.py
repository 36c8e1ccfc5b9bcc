"""The metadata values of the key space (spec pageserver §2.2-2.3): directories and size values.

This module owns the bincode-BE encodings of DbDirectory, RelDirectory, SlruSegmentDirectory,
TwoPhaseDirectory and AuxFilesDirectory, and the u32 little-endian block counts stored under rel
size and SLRU segment-size keys. Directories are immutable (the no-argument constructor gives an
empty one); `add`/`remove` return new values. Neon stores hash maps/sets, so their order on disk
is arbitrary: decoding accepts any order, and encoding sorts so that equal directories always
give equal bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from neon.postgres.errors import PgFormatError

_COUNT = struct.Struct(">Q")
_DB_ENTRY = struct.Struct(">IIB")  # spcnode, dbnode, relmap-exists bool
_REL_ENTRY = struct.Struct(">IB")  # relnode, forknum
_U32 = struct.Struct(">I")
_NBLOCKS = struct.Struct("<I")  # little-endian, unlike everything else here (Neon stores a native u32)


class DirectoryFormatError(PgFormatError):
    """Bytes that are not a bincode-BE directory (or block count), or entries that do not fit it."""


# --- bincode helpers ---------------------------------------------------------------------------
def _count(buf: bytes | bytearray | memoryview, item_size: int, what: str) -> int:
    if len(buf) < _COUNT.size:
        raise DirectoryFormatError(f"{what} is {len(buf)} bytes, too short for its entry count")
    (n,) = _COUNT.unpack_from(buf, 0)
    if item_size and len(buf) - _COUNT.size < n * item_size:
        raise DirectoryFormatError(f"{what} claims {n} entries, only {len(buf) - _COUNT.size} bytes follow")
    return n


def _fixed_entries(buf: bytes | bytearray | memoryview, st: struct.Struct, what: str) -> list[tuple]:
    n = _count(buf, st.size, what)
    end = _COUNT.size + n * st.size
    if len(buf) != end:
        raise DirectoryFormatError(f"{what}: {len(buf) - end} trailing bytes after {n} entries")
    return [st.unpack_from(buf, _COUNT.size + i * st.size) for i in range(n)]


def _pack(st: struct.Struct, entries: list[tuple], what: str) -> bytes:
    try:
        return _COUNT.pack(len(entries)) + b"".join(st.pack(*e) for e in entries)
    except struct.error as e:
        raise DirectoryFormatError(f"{what} entry out of range: {e}") from None


def _no_duplicates(n: int, unique: int, what: str) -> None:
    # A Rust map/set cannot hold duplicates, so bytes that do are corrupt rather than merely odd.
    if unique != n:
        raise DirectoryFormatError(f"{what} has {n - unique} duplicate entries")


def _u32_set(buf: bytes | bytearray | memoryview, what: str) -> frozenset[int]:
    entries = _fixed_entries(buf, _U32, what)
    out = frozenset(e[0] for e in entries)
    _no_duplicates(len(entries), len(out), what)
    return out


# --- DbDirectory -------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class DbDirectory:
    """Every database with relations or a relmap file: (spcnode, dbnode) -> relmap file exists."""

    dbdirs: Mapping[tuple[int, int], bool] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "dbdirs", MappingProxyType(dict(self.dbdirs)))

    def __hash__(self) -> int:
        return hash(frozenset(self.dbdirs.items()))

    def __contains__(self, spc_db: object) -> bool:
        return spc_db in self.dbdirs

    def __len__(self) -> int:
        return len(self.dbdirs)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        """(spc, db) in key order, as collect_keyspace walks them."""
        return iter(sorted(self.dbdirs))

    def add(self, spc: int, db: int, relmap_exists: bool) -> DbDirectory:
        return DbDirectory({**self.dbdirs, (spc, db): relmap_exists})

    def remove(self, spc: int, db: int) -> DbDirectory:
        """Without (spc, db); unchanged when it is absent (callers decide whether that is an error)."""
        return DbDirectory({k: v for k, v in self.dbdirs.items() if k != (spc, db)})

    def encode(self) -> bytes:
        entries = [(spc, db, int(exists)) for (spc, db), exists in sorted(self.dbdirs.items())]
        for spc, db, _ in entries:
            if not isinstance(spc, int) or not isinstance(db, int):
                raise DirectoryFormatError(f"DbDirectory key must be (int, int), got {(spc, db)!r}")
        return _pack(_DB_ENTRY, entries, "DbDirectory")

    @classmethod
    def decode(cls, buf: bytes | bytearray | memoryview) -> DbDirectory:
        entries = _fixed_entries(buf, _DB_ENTRY, "DbDirectory")
        dbdirs: dict[tuple[int, int], bool] = {}
        for spc, db, flag in entries:
            if flag > 1:
                raise DirectoryFormatError(f"DbDirectory entry ({spc}, {db}) has invalid bool byte {flag:#04x}")
            dbdirs[(spc, db)] = flag == 1
        _no_duplicates(len(entries), len(dbdirs), "DbDirectory")
        return cls(dbdirs)


# --- RelDirectory ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class RelDirectory:
    """The relation forks of one database: {(relnode, forknum)}."""

    rels: frozenset[tuple[int, int]] = frozenset()

    def __post_init__(self) -> None:
        object.__setattr__(self, "rels", frozenset(self.rels))

    def __contains__(self, rel_fork: object) -> bool:
        return rel_fork in self.rels

    def __len__(self) -> int:
        return len(self.rels)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        """(relnode, forknum) in key order."""
        return iter(sorted(self.rels))

    def add(self, rel: int, fork: int) -> RelDirectory:
        return RelDirectory(self.rels | {(rel, fork)})

    def remove(self, rel: int, fork: int) -> RelDirectory:
        return RelDirectory(self.rels - {(rel, fork)})

    def encode(self) -> bytes:
        return _pack(_REL_ENTRY, sorted(self.rels), "RelDirectory")

    @classmethod
    def decode(cls, buf: bytes | bytearray | memoryview) -> RelDirectory:
        entries = _fixed_entries(buf, _REL_ENTRY, "RelDirectory")
        rels = frozenset(entries)
        _no_duplicates(len(entries), len(rels), "RelDirectory")
        return cls(rels)


# --- SlruSegmentDirectory and TwoPhaseDirectory ------------------------------------------------
@dataclass(frozen=True, slots=True)
class SlruSegmentDirectory:
    """The segment numbers of one SLRU."""

    segments: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        object.__setattr__(self, "segments", frozenset(self.segments))

    def __contains__(self, segno: object) -> bool:
        return segno in self.segments

    def __len__(self) -> int:
        return len(self.segments)

    def __iter__(self) -> Iterator[int]:
        return iter(sorted(self.segments))

    def add(self, segno: int) -> SlruSegmentDirectory:
        return SlruSegmentDirectory(self.segments | {segno})

    def remove(self, segno: int) -> SlruSegmentDirectory:
        return SlruSegmentDirectory(self.segments - {segno})

    def encode(self) -> bytes:
        return _pack(_U32, [(s,) for s in sorted(self.segments)], "SlruSegmentDirectory")

    @classmethod
    def decode(cls, buf: bytes | bytearray | memoryview) -> SlruSegmentDirectory:
        return cls(_u32_set(buf, "SlruSegmentDirectory"))


@dataclass(frozen=True, slots=True)
class TwoPhaseDirectory:
    """The xids of the prepared transactions."""

    xids: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        object.__setattr__(self, "xids", frozenset(self.xids))

    def __contains__(self, xid: object) -> bool:
        return xid in self.xids

    def __len__(self) -> int:
        return len(self.xids)

    def __iter__(self) -> Iterator[int]:
        return iter(sorted(self.xids))

    def add(self, xid: int) -> TwoPhaseDirectory:
        return TwoPhaseDirectory(self.xids | {xid})

    def remove(self, xid: int) -> TwoPhaseDirectory:
        return TwoPhaseDirectory(self.xids - {xid})

    def encode(self) -> bytes:
        return _pack(_U32, [(x,) for x in sorted(self.xids)], "TwoPhaseDirectory")

    @classmethod
    def decode(cls, buf: bytes | bytearray | memoryview) -> TwoPhaseDirectory:
        return cls(_u32_set(buf, "TwoPhaseDirectory"))


# --- AuxFilesDirectory -------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class AuxFilesDirectory:
    """Files outside the relation/SLRU model (e.g. logical replication state): path -> content."""

    files: Mapping[str, bytes] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "files", MappingProxyType(dict(self.files)))

    def __hash__(self) -> int:
        return hash(frozenset(self.files.items()))

    def __contains__(self, path: object) -> bool:
        return path in self.files

    def __len__(self) -> int:
        return len(self.files)

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self.files))

    def add(self, path: str, content: bytes) -> AuxFilesDirectory:
        """With `path` set to `content` (replacing an older version)."""
        return AuxFilesDirectory({**self.files, path: bytes(content)})

    def remove(self, path: str) -> AuxFilesDirectory:
        return AuxFilesDirectory({p: c for p, c in self.files.items() if p != path})

    def encode(self) -> bytes:
        parts = [_COUNT.pack(len(self.files))]
        for path, content in sorted(self.files.items()):
            if not isinstance(path, str) or not isinstance(content, bytes | bytearray | memoryview):
                raise DirectoryFormatError(f"AuxFilesDirectory entry must be str -> bytes, got {path!r}")
            raw = path.encode("utf-8")
            parts += [_COUNT.pack(len(raw)), raw, _COUNT.pack(len(content)), bytes(content)]
        return b"".join(parts)

    @classmethod
    def decode(cls, buf: bytes | bytearray | memoryview) -> AuxFilesDirectory:
        # Each entry is at least two u64 lengths, which bounds the count before any allocation.
        n = _count(buf, 2 * _COUNT.size, "AuxFilesDirectory")
        pos = _COUNT.size
        files: dict[str, bytes] = {}

        def chunk(what: str) -> bytes:
            nonlocal pos
            if len(buf) - pos < _COUNT.size:
                raise DirectoryFormatError(f"AuxFilesDirectory truncated in the length of {what} at offset {pos}")
            (size,) = _COUNT.unpack_from(buf, pos)
            pos += _COUNT.size
            if len(buf) - pos < size:
                raise DirectoryFormatError(f"AuxFilesDirectory {what} claims {size} bytes, {len(buf) - pos} left")
            out = bytes(buf[pos : pos + size])
            pos += size
            return out

        for i in range(n):
            raw = chunk(f"path of entry {i}")
            try:
                path = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DirectoryFormatError(f"AuxFilesDirectory path of entry {i} is not UTF-8: {raw!r}") from None
            files[path] = chunk(f"content of {path!r}")
        if pos != len(buf):
            raise DirectoryFormatError(f"AuxFilesDirectory: {len(buf) - pos} trailing bytes after {n} entries")
        _no_duplicates(n, len(files), "AuxFilesDirectory")
        return cls(files)


# --- block counts ------------------------------------------------------------------------------
def encode_nblocks(nblocks: int) -> bytes:
    """The value of a rel size or SLRU segment-size key: u32 little-endian."""
    try:
        return _NBLOCKS.pack(nblocks)
    except struct.error:
        raise DirectoryFormatError(f"block count {nblocks} does not fit in a u32") from None


def decode_nblocks(buf: bytes | bytearray | memoryview) -> int:
    if len(buf) != _NBLOCKS.size:
        raise DirectoryFormatError(f"a block count is {_NBLOCKS.size} bytes, got {len(buf)}")
    return _NBLOCKS.unpack(buf)[0]
