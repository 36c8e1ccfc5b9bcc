"""`safekeeper.control` format version 7 (spec safekeeper-and-broker §3.2): exact layout, strict
loading that never touches a bad file, atomic persist, and the initial state of new timelines."""

from __future__ import annotations

import contextlib
import os
import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from neon.postgres.crc32c import crc32c
from neon.safekeeper import control_file
from neon.safekeeper.control_file import (
    CONTROL_FILE_NAME,
    CONTROL_FILE_PARTIAL_NAME,
    MIN_FILE_SIZE,
    SK_FORMAT_VERSION,
    SK_MAGIC,
    AcceptorState,
    ControlFileError,
    PersistedPeerInfo,
    SafeKeeperState,
    ServerInfo,
    initial,
    load,
    persist,
)
from neon.safekeeper.protocol import TermHistory
from neon.utils.id import TenantId, TimelineId
from neon.utils.lsn import Lsn

TENANT = TenantId("cf0480929707ee75372337efaa5ecf96")
TIMELINE = TimelineId("112ded66422aa5e953e5440fa5427ac4")
SERVER = ServerInfo(pg_version=150004, system_id=7, wal_seg_size=16 * 1024 * 1024)


def unhex(text: str) -> bytes:
    return bytes.fromhex("".join(text.split()))


def sample_state(history: TermHistory | None = None) -> SafeKeeperState:
    if history is None:
        history = TermHistory.of((1, 0x1000), (5, 0x2000))
    return SafeKeeperState(
        tenant_id=TENANT,
        timeline_id=TIMELINE,
        acceptor_state=AcceptorState(term=5, term_history=history),
        server=SERVER,
        proposer_uuid=bytes(range(16)),
        timeline_start_lsn=Lsn(0x1000),
        local_start_lsn=Lsn(0x1000),
        commit_lsn=Lsn(0x2500),
        backup_lsn=Lsn(0x1000),
        peer_horizon_lsn=Lsn(0x1800),
        remote_consistent_lsn=Lsn(0x1200),
    )


# --- layout ----------------------------------------------------------------------------------


def test_known_answer_vector() -> None:
    """The state of Neon's bincode round-trip test, v7 fields only, framed by magic/version/CRC."""
    state = SafeKeeperState(
        tenant_id=TENANT,
        timeline_id=TIMELINE,
        acceptor_state=AcceptorState(term=42, term_history=TermHistory.of((41, 1))),
        server=ServerInfo(pg_version=14, system_id=0x1234567887654321, wal_seg_size=0x12345678),
        proposer_uuid=bytes(TIMELINE)[::-1],
        timeline_start_lsn=Lsn(0x12345600),
        local_start_lsn=Lsn(0x12),
        commit_lsn=Lsn(1234567800),
        backup_lsn=Lsn(1234567300),
        peer_horizon_lsn=Lsn(9999999),
        remote_consistent_lsn=Lsn(1234560000),
        peers=(
            (
                1,
                PersistedPeerInfo(
                    backup_lsn=Lsn(1234567000), term=42, flush_lsn=Lsn(1234567800 - 8), commit_lsn=Lsn(1234567600)
                ),
            ),
        ),
    )
    body = unhex(
        """
        2000000000000000 6366303438303932393730376565373533373233333765666161356563663936
        2000000000000000 3131326465643636343232616135653935336535343430666135343237616334
        2a00000000000000
        0100000000000000 2900000000000000 0100000000000000
        0e000000 2143658778563412 78563412
        2000000000000000 6334376134326135306634346535353365396135326134323636656432643131
        0056341200000000 1200000000000000 7802964900000000 8400964900000000 7f96980000000000 00e4954900000000
        0100000000000000
        0100000000000000 58ff954900000000 2a00000000000000 7002964900000000 b001964900000000
        """
    )
    prefix = struct.pack("<II", SK_MAGIC, SK_FORMAT_VERSION)
    expected = prefix + body + struct.pack("<I", crc32c(prefix + body))
    assert state.encode() == expected
    assert SafeKeeperState.decode(expected) == state


def test_sizes() -> None:
    empty = sample_state(TermHistory())
    assert len(empty.encode()) == MIN_FILE_SIZE == 220
    for n in range(1, 5):
        history = TermHistory.from_pairs((t, t * 0x100) for t in range(1, n + 1))
        assert len(sample_state(history).encode()) == 220 + 16 * n
    with_peer = sample_state(TermHistory()).replace(peers=((3, PersistedPeerInfo()),))
    assert len(with_peer.encode()) == 220 + 40


def test_field_offsets() -> None:
    state = sample_state(TermHistory.of((1, 0x1000), (5, 0x2000)))
    data = state.encode()
    n = 2
    assert struct.unpack_from("<II", data, 0) == (0xCAFECEEF, 7)
    assert struct.unpack_from("<Q", data, 8) == (32,)
    assert data[16:48] == str(TENANT).encode()  # hex string, lower case
    assert struct.unpack_from("<Q", data, 48) == (32,)
    assert data[56:88] == str(TIMELINE).encode()
    assert struct.unpack_from("<QQ", data, 88) == (5, n)  # term, then a u64 history count
    assert struct.unpack_from("<QQQQ", data, 104) == (1, 0x1000, 5, 0x2000)
    base = 104 + 16 * n
    assert struct.unpack_from("<IQI", data, base) == (150004, 7, 16 * 1024 * 1024)
    assert struct.unpack_from("<Q", data, base + 16) == (32,)
    assert data[base + 24 : base + 56] == bytes(range(16)).hex().encode()
    assert struct.unpack_from("<QQQQQQ", data, base + 56) == (0x1000, 0x1000, 0x2500, 0x1000, 0x1800, 0x1200)
    assert struct.unpack_from("<Q", data, base + 104) == (0,)  # peers, always empty
    assert base + 112 + 4 == len(data)
    assert struct.unpack_from("<I", data, len(data) - 4) == (crc32c(data[:-4]),)


lsns = st.integers(0, 2**64 - 1).map(Lsn)
u64 = st.integers(0, 2**64 - 1)
states = st.builds(
    SafeKeeperState,
    tenant_id=st.binary(min_size=16, max_size=16).map(TenantId),
    timeline_id=st.binary(min_size=16, max_size=16).map(TimelineId),
    acceptor_state=st.builds(
        AcceptorState, term=u64, term_history=st.lists(st.tuples(u64, u64), max_size=5).map(TermHistory.from_pairs)
    ),
    server=st.builds(
        ServerInfo, pg_version=st.integers(0, 2**32 - 1), system_id=u64, wal_seg_size=st.integers(0, 2**32 - 1)
    ),
    proposer_uuid=st.binary(min_size=16, max_size=16),
    timeline_start_lsn=lsns,
    local_start_lsn=lsns,
    commit_lsn=lsns,
    backup_lsn=lsns,
    peer_horizon_lsn=lsns,
    remote_consistent_lsn=lsns,
    peers=st.lists(
        st.tuples(u64, st.builds(PersistedPeerInfo, backup_lsn=lsns, term=u64, flush_lsn=lsns, commit_lsn=lsns)),
        max_size=2,
    ).map(tuple),
)


@given(states)
def test_round_trip(state: SafeKeeperState) -> None:
    assert SafeKeeperState.decode(state.encode()) == state


@given(st.binary(max_size=300))
def test_random_bytes_only_raise_control_file_errors(data: bytes) -> None:
    for candidate in (data, struct.pack("<II", SK_MAGIC, SK_FORMAT_VERSION) + data):
        with contextlib.suppress(ControlFileError):
            SafeKeeperState.decode(candidate)


@given(st.binary(max_size=300))
def test_random_bodies_with_valid_crc_only_raise_control_file_errors(data: bytes) -> None:
    body = struct.pack("<II", SK_MAGIC, SK_FORMAT_VERSION) + data
    with contextlib.suppress(ControlFileError):
        SafeKeeperState.decode(body + struct.pack("<I", crc32c(body)))


# --- loading refuses bad files and leaves them alone -----------------------------------------


def _write(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / CONTROL_FILE_NAME
    path.write_bytes(data)
    return path


def _with_crc(body: bytes) -> bytes:
    return body + struct.pack("<I", crc32c(body))


def _assert_refused(path: Path, match: str) -> None:
    before = path.read_bytes()
    stat = path.stat()
    with pytest.raises(ControlFileError, match=match) as info:
        load(path)
    assert str(path) in str(info.value)
    assert path.read_bytes() == before
    assert path.stat().st_mtime_ns == stat.st_mtime_ns
    assert not (path.parent / CONTROL_FILE_PARTIAL_NAME).exists()


def test_load_round_trip(tmp_path: Path) -> None:
    state = sample_state()
    persist(tmp_path / CONTROL_FILE_NAME, state)
    assert load(tmp_path / CONTROL_FILE_NAME) == state
    assert load(tmp_path) == state  # the timeline directory works as well


def test_bad_crc_is_refused(tmp_path: Path) -> None:
    data = bytearray(sample_state().encode())
    data[100] ^= 0x01
    _assert_refused(_write(tmp_path, bytes(data)), "safekeeper control file checksum mismatch")


def test_bad_stored_crc_is_refused(tmp_path: Path) -> None:
    data = bytearray(sample_state().encode())
    data[-1] ^= 0xFF
    _assert_refused(_write(tmp_path, bytes(data)), "checksum mismatch")


def test_bad_magic_is_refused(tmp_path: Path) -> None:
    data = sample_state().encode()
    wrong = _with_crc(struct.pack("<I", 0xDEADBEEF) + data[4:-4])
    _assert_refused(_write(tmp_path, wrong), "bad control file magic 0XDEADBEEF, expected 0XCAFECEEF")


def test_unknown_version_is_refused(tmp_path: Path) -> None:
    data = sample_state().encode()
    newer = _with_crc(struct.pack("<II", SK_MAGIC, 8) + data[8:-4])
    _assert_refused(_write(tmp_path, newer), "unknown control file format version 8")


@pytest.mark.parametrize("version", [1, 5, 6])
def test_older_versions_are_refused_by_name(tmp_path: Path, version: int) -> None:
    data = sample_state().encode()
    older = _with_crc(struct.pack("<II", SK_MAGIC, version) + data[8:-4])
    _assert_refused(_write(tmp_path, older), f"format version {version} is older than 7")


def test_truncated_files_are_refused(tmp_path: Path) -> None:
    data = sample_state().encode()
    for cut in range(len(data)):
        _assert_refused(_write(tmp_path, data[:cut]), "truncated")


def test_trailing_bytes_are_refused(tmp_path: Path) -> None:
    data = sample_state().encode()
    _assert_refused(_write(tmp_path, _with_crc(data[:-4] + b"\0" * 8)), "8 unexpected trailing bytes")


def test_bad_hex_and_bad_lengths_are_refused(tmp_path: Path) -> None:
    data = bytearray(sample_state().encode()[:-4])
    data[16:18] = b"zz"
    _assert_refused(_write(tmp_path, _with_crc(bytes(data))), "tenant_id is not hex")
    data[16:18] = b"  "  # bytes.fromhex would skip these
    _assert_refused(_write(tmp_path, _with_crc(bytes(data))), "tenant_id is not hex")
    data = bytearray(sample_state().encode()[:-4])
    struct.pack_into("<Q", data, 48, 31)
    _assert_refused(_write(tmp_path, _with_crc(bytes(data))), "timeline_id must be a 32-character hex string")
    data = bytearray(sample_state().encode()[:-4])
    struct.pack_into("<Q", data, 96, 2**40)
    _assert_refused(_write(tmp_path, _with_crc(bytes(data))), "term_history claims 1099511627776 entries")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ControlFileError, match="failed to read control file"):
        load(tmp_path / CONTROL_FILE_NAME)
    assert list(tmp_path.iterdir()) == []


# --- atomic persist --------------------------------------------------------------------------


def test_persist_leaves_no_partial_and_replaces(tmp_path: Path) -> None:
    first = sample_state()
    persist(tmp_path, first)
    second = first.replace(
        commit_lsn=Lsn(0x3000), acceptor_state=AcceptorState(term=6, term_history=first.term_history)
    )
    persist(tmp_path, second)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONTROL_FILE_NAME]
    assert load(tmp_path) == second
    assert (tmp_path / CONTROL_FILE_NAME).read_bytes() == second.encode()


def test_leftover_partial_is_ignored_and_then_replaced(tmp_path: Path) -> None:
    state = sample_state()
    persist(tmp_path, state)
    (tmp_path / CONTROL_FILE_PARTIAL_NAME).write_bytes(b"half a write")
    assert load(tmp_path) == state
    newer = state.replace(commit_lsn=Lsn(0x2600))
    persist(tmp_path, newer)
    assert load(tmp_path) == newer
    assert not (tmp_path / CONTROL_FILE_PARTIAL_NAME).exists()


def test_crash_before_rename_keeps_the_old_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old = sample_state()
    persist(tmp_path, old)

    def crash(src: object, dst: object) -> None:
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(control_file.os, "rename", crash)
    with pytest.raises(OSError, match="simulated crash"):
        persist(tmp_path, old.replace(commit_lsn=Lsn(0x9000)))
    monkeypatch.undo()
    # The new bytes sit complete in .partial, but only safekeeper.control counts.
    assert (tmp_path / CONTROL_FILE_PARTIAL_NAME).exists()
    assert load(tmp_path) == old


def test_persist_fsyncs_file_then_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def record_fsync(fd: int) -> None:
        synced.append("partial fd")
        real_fsync(fd)

    monkeypatch.setattr(control_file.os, "fsync", record_fsync)
    monkeypatch.setattr(control_file, "fsync_path", lambda p: synced.append(Path(p).name))
    persist(tmp_path, sample_state())
    assert synced == ["partial fd", CONTROL_FILE_NAME, tmp_path.name]
    synced.clear()
    persist(tmp_path, sample_state(), no_sync=True)
    assert synced == []
    assert load(tmp_path) == sample_state()


# --- initial values --------------------------------------------------------------------------


def test_initial_for_implicit_creation() -> None:
    state = initial(TENANT, TIMELINE, SERVER)
    assert state.term == 0 and state.term_history == TermHistory()
    assert state.proposer_uuid == bytes(16)
    assert (state.timeline_start_lsn, state.local_start_lsn, state.commit_lsn) == (0, 0, 0)
    assert (state.backup_lsn, state.peer_horizon_lsn, state.remote_consistent_lsn) == (0, 0, 0)
    assert state.peers == ()
    assert state.server == SERVER and state.tenant_id == TENANT and state.timeline_id == TIMELINE


def test_initial_for_http_creation() -> None:
    commit = Lsn("0/3000123")
    state = initial(TENANT, TIMELINE, SERVER, commit_lsn=commit)
    assert state.commit_lsn == commit
    assert state.local_start_lsn == state.backup_lsn == state.peer_horizon_lsn == Lsn("0/3000000")
    assert state.timeline_start_lsn == 0 and state.remote_consistent_lsn == 0
    explicit = initial(TENANT, TIMELINE, SERVER, commit_lsn=commit, local_start_lsn=0x2000000)
    assert explicit.local_start_lsn == explicit.backup_lsn == explicit.peer_horizon_lsn == 0x2000000


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"server": ServerInfo(pg_version=150004, system_id=0, wal_seg_size=0)}, "wal_seg_size 0"),
        ({"server": ServerInfo(pg_version=0, system_id=0, wal_seg_size=1 << 24)}, "pg_version 0"),
        ({"tenant_id": TenantId(bytes(16))}, "zero ids"),
        ({"timeline_id": TimelineId(bytes(16))}, "zero ids"),
        ({"commit_lsn": 0x100, "local_start_lsn": 0x200}, "below local_start_lsn"),
    ],
)
def test_initial_refusals(kwargs: dict[str, object], match: str) -> None:
    args: dict[str, object] = {"tenant_id": TENANT, "timeline_id": TIMELINE, "server": SERVER}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        initial(**args)  # type: ignore[arg-type]
