"""Unit tests for neon.postgres.records: the spec's real byte examples (§3.10), hand-built payloads
for every parser, CheckPoint round trips, every XACT xinfo chunk combination, VM clears (§4.9),
and fuzzing that only PayloadError can come out of a parser."""

from __future__ import annotations

import contextlib
import itertools
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from neon.postgres.constants import (
    RM_CLOG_ID,
    RM_COMMIT_TS_ID,
    RM_DBASE_ID,
    RM_HEAP2_ID,
    RM_HEAP_ID,
    RM_LOGICALMSG_ID,
    RM_MULTIXACT_ID,
    RM_RELMAP_ID,
    RM_REPLORIGIN_ID,
    RM_SMGR_ID,
    RM_STANDBY_ID,
    RM_TBLSPC_ID,
    RM_XACT_ID,
    RM_XLOG_ID,
)
from neon.postgres.crc32c import crc32c, wal_record_crc
from neon.postgres.errors import PayloadError
from neon.postgres.records import (
    RelFileNode,
    clog,
    dbase,
    describe,
    heap,
    logicalmsg,
    misc,
    multixact,
    relmap,
    smgr,
    standby,
    tblspc,
    xact,
    xlog,
)

# --- helpers -------------------------------------------------------------------------------


def rnode_bytes(spc: int, db: int, rel: int) -> bytes:
    return struct.pack("<III", spc, db, rel)


def maxalign_pad(b: bytes) -> bytes:
    return b + b"\0" * (-len(b) % 8)


# --- spec §3.10 worked examples ------------------------------------------------------------


def test_nextoid_record_from_spec() -> None:
    rec = bytes.fromhex("1e00000000000000001b51010000000030000000f9f7717dff0400600000")
    # The transcription is faithful: the record's own CRC checks out.
    assert wal_record_crc(rec) == struct.unpack_from("<I", rec, 20)[0]
    assert rec[24] == 0xFF and rec[25] == 4
    main = rec[26:]
    assert describe(rec[17], rec[16], main) == xlog.NextOid(24576)
    assert xlog.NextOid.unpack(main).next_oid == 24576


def test_smgr_create_from_spec() -> None:
    main = bytes.fromhex("7f060000050000000040000000000000")
    got = describe(RM_SMGR_ID, 0x11, main)  # 0x11 = CREATE + XLR_SPECIAL_REL_UPDATE
    assert got == smgr.SmgrCreate(RelFileNode(1663, 5, 16384), 0)
    assert got.rnode.path() == "base/5/16384"


def test_heap_insert_from_spec() -> None:
    main = bytes.fromhex("050001")
    got = describe(RM_HEAP_ID, 0x00, main)
    assert got == heap.HeapInsert(offnum=5, flags=heap.XLH_INSERT_ALL_VISIBLE_CLEARED)
    # The record's block 0 is heap block 0 of 1663/5/16384.
    assert heap.vm_bits_cleared(RM_HEAP_ID, 0x00, main, {0: 0}) == [(0, 0x03)]


def test_heap2_visible_from_spec() -> None:
    main = bytes.fromhex("d802000001")
    assert describe(RM_HEAP2_ID, 0x40, main) == heap.HeapVisible(cutoff_xid=728, flags=0x01)
    # VISIBLE sets bits; it clears none.
    assert heap.vm_bits_cleared(RM_HEAP2_ID, 0x40, main, {0: 0, 1: 10}) == []


def test_xact_commit_with_subxact_from_spec() -> None:
    xact_time = 820_000_000_000_000
    main = struct.pack("<qIiI", xact_time, xact.XACT_XINFO_HAS_SUBXACTS, 1, 732)
    assert len(main) == 0x14  # the record's short main-data header says 20 bytes
    got = describe(RM_XACT_ID, 0x80, main)
    assert isinstance(got, xact.XactCommitAbort)
    assert got.opcode == xact.XLOG_XACT_COMMIT and got.is_commit and not got.is_prepared
    assert got.xact_time == xact_time
    assert got.xinfo == 0x2
    assert got.subxacts == (732,)
    assert got.rels == () and got.stats_items == () and got.n_invals == 0
    assert got.decided_xid(731) == 731
    assert got.decided_xids(731) == (731, 732)


def test_xact_commit_without_info_is_just_the_time() -> None:
    got = xact.XactCommitAbort.unpack(0x00, struct.pack("<q", 12345))
    assert got.xact_time == 12345 and got.xinfo == 0 and got.subxacts == () and got.gid is None


# --- XLOG ----------------------------------------------------------------------------------

BOOTSTRAP_CHECKPOINT = xlog.CheckPoint.initial(0x1000028, time=1_700_000_000)


def test_checkpoint_layout_and_round_trip() -> None:
    raw = BOOTSTRAP_CHECKPOINT.pack()
    assert len(raw) == 88 == xlog.CHECKPOINT_SIZE
    # Field offsets of spec §4.1, padding zero.
    assert struct.unpack_from("<Q", raw, 0)[0] == 0x1000028
    assert raw[16] == 1 and raw[17:24] == b"\0" * 7
    assert struct.unpack_from("<Q", raw, 24)[0] == 3
    assert struct.unpack_from("<I", raw, 32)[0] == 10000
    assert raw[60:64] == b"\0" * 4
    assert struct.unpack_from("<q", raw, 64)[0] == 1_700_000_000
    assert raw[84:88] == b"\0" * 4
    assert xlog.CheckPoint.unpack(raw) == BOOTSTRAP_CHECKPOINT
    assert describe(RM_XLOG_ID, xlog.XLOG_CHECKPOINT_SHUTDOWN, raw) == BOOTSTRAP_CHECKPOINT
    assert describe(RM_XLOG_ID, xlog.XLOG_CHECKPOINT_ONLINE, raw) == BOOTSTRAP_CHECKPOINT
    # Embedded in a larger buffer (pg_control keeps it at offset 40).
    assert xlog.CheckPoint.unpack(b"\xaa" * 40 + raw + b"\xbb" * 8, 40) == BOOTSTRAP_CHECKPOINT


def test_checkpoint_epoch_split() -> None:
    cp = xlog.CheckPoint.unpack(
        struct.pack("<QII?7xQIIIIIII4xqIII4x", 0, 1, 1, False, (7 << 32) | 731, *([0] * 7), -5, 0, 0, 0)
    )
    assert cp.next_xid_epoch == 7 and cp.next_xid_xid == 731 and cp.time == -5


@given(st.binary(min_size=88, max_size=88))
def test_checkpoint_pack_unpack_byte_identical(data: bytes) -> None:
    # Zero the padding and make the bool 0/1, as Postgres writes them.
    b = bytearray(data)
    b[16] &= 1
    b[17:24] = bytes(7)
    b[60:64] = bytes(4)
    b[84:88] = bytes(4)
    raw = bytes(b)
    assert xlog.CheckPoint.unpack(raw).pack() == raw


def test_checkpoint_ignores_garbage_padding_on_read() -> None:
    raw = bytearray(BOOTSTRAP_CHECKPOINT.pack())
    raw[17:24] = b"\xff" * 7
    assert xlog.CheckPoint.unpack(bytes(raw)) == BOOTSTRAP_CHECKPOINT


def test_xlog_small_records() -> None:
    assert describe(RM_XLOG_ID, xlog.XLOG_SWITCH, b"") == xlog.Switch()
    assert describe(RM_XLOG_ID, xlog.XLOG_BACKUP_END, struct.pack("<Q", 0x2000028)) == xlog.BackupEnd(0x2000028)
    pc = struct.pack("<iiiiii??2x", 100, 8, 10, 5, 64, 2, False, True)
    assert len(pc) == 28
    assert describe(RM_XLOG_ID, xlog.XLOG_PARAMETER_CHANGE, pc) == xlog.ParameterChange(
        100, 8, 10, 5, 64, xlog.WAL_LEVEL_LOGICAL, False, True
    )
    rp = struct.pack("<q64s", 123, b"rp1")
    assert len(rp) == 72
    assert describe(RM_XLOG_ID, xlog.XLOG_RESTORE_POINT, rp) == xlog.RestorePoint(123, "rp1")
    assert describe(RM_XLOG_ID, xlog.XLOG_FPW_CHANGE, b"\x00") == xlog.FpwChange(False)
    assert describe(RM_XLOG_ID, xlog.XLOG_FPW_CHANGE, b"\x01") == xlog.FpwChange(True)
    eor = struct.pack("<qII", 99, 2, 1)
    assert describe(RM_XLOG_ID, xlog.XLOG_END_OF_RECOVERY, eor) == xlog.EndOfRecovery(99, 2, 1)
    oc = struct.pack("<Qq", 0x3000000, 77)
    assert describe(RM_XLOG_ID, xlog.XLOG_OVERWRITE_CONTRECORD, oc) == xlog.OverwriteContrecord(0x3000000, 77)
    # Records without an interpreted payload.
    for info in (xlog.XLOG_NOOP, xlog.XLOG_FPI, xlog.XLOG_FPI_FOR_HINT, 0xC0):
        assert describe(RM_XLOG_ID, info, b"whatever") is None


def test_xlog_opcode_values() -> None:
    assert (xlog.XLOG_CHECKPOINT_SHUTDOWN, xlog.XLOG_CHECKPOINT_ONLINE, xlog.XLOG_NOOP) == (0x00, 0x10, 0x20)
    assert (xlog.XLOG_NEXTOID, xlog.XLOG_SWITCH, xlog.XLOG_BACKUP_END) == (0x30, 0x40, 0x50)
    assert (xlog.XLOG_PARAMETER_CHANGE, xlog.XLOG_RESTORE_POINT, xlog.XLOG_FPW_CHANGE) == (0x60, 0x70, 0x80)
    assert (xlog.XLOG_END_OF_RECOVERY, xlog.XLOG_FPI_FOR_HINT, xlog.XLOG_FPI) == (0x90, 0xA0, 0xB0)
    assert xlog.XLOG_OVERWRITE_CONTRECORD == 0xD0


# --- SMGR, DBASE, CLOG, MultiXact, RelMap, Standby, Tablespace, misc -------------------------


def test_relfilenode() -> None:
    rn = RelFileNode(1663, 5, 16384)
    assert rn.pack() == rnode_bytes(1663, 5, 16384)
    assert RelFileNode.unpack_from(b"xx" + rn.pack(), 2) == rn
    assert str(rn) == "1663/5/16384"
    assert RelFileNode(1664, 0, 1262).path() == "global/1262"
    with pytest.raises(PayloadError):
        RelFileNode.unpack_from(rn.pack(), 1)
    with pytest.raises(AttributeError):
        rn.db = 4  # type: ignore[misc]


def test_smgr_truncate() -> None:
    main = struct.pack("<I", 6) + rnode_bytes(1663, 5, 16384) + struct.pack("<i", smgr.SMGR_TRUNCATE_ALL)
    got = describe(RM_SMGR_ID, 0x21, main)
    assert got == smgr.SmgrTruncate(6, RelFileNode(1663, 5, 16384), 7)
    assert got.truncates_heap and got.truncates_vm and got.truncates_fsm
    assert (smgr.SMGR_TRUNCATE_HEAP, smgr.SMGR_TRUNCATE_VM, smgr.SMGR_TRUNCATE_FSM) == (1, 2, 4)


def test_dbase() -> None:
    assert describe(RM_DBASE_ID, 0x01, struct.pack("<IIII", 16397, 1663, 1, 1663)) == dbase.DbaseCreateFileCopy(
        16397, 1663, 1, 1663
    )
    assert describe(RM_DBASE_ID, 0x10, struct.pack("<II", 16398, 1663)) == dbase.DbaseCreateWalLog(16398, 1663)
    drop = struct.pack("<IiII", 16397, 2, 1663, 16500)
    assert describe(RM_DBASE_ID, 0x21, drop) == dbase.DbaseDrop(16397, (1663, 16500))
    with pytest.raises(PayloadError, match="DBASE DROP"):
        dbase.DbaseDrop.unpack(struct.pack("<IiI", 16397, 2, 1663))


def test_clog() -> None:
    assert describe(RM_CLOG_ID, 0x00, struct.pack("<i", 3)) == clog.ClogZeroPage(3)
    assert describe(RM_CLOG_ID, 0x10, struct.pack("<iII", 32, 1_000_000, 1)) == clog.ClogTruncate(32, 1_000_000, 1)


def test_multixact() -> None:
    assert describe(RM_MULTIXACT_ID, 0x00, struct.pack("<i", 1)) == multixact.MultiXactZeroPage(False, 1)
    assert describe(RM_MULTIXACT_ID, 0x10, struct.pack("<i", 0)) == multixact.MultiXactZeroPage(True, 0)
    create = struct.pack("<IIi", 1, 1, 2) + struct.pack("<IiIi", 833, 1, 834, 4)
    got = describe(RM_MULTIXACT_ID, 0x20, create)
    assert got == multixact.MultiXactCreate(
        1,
        1,
        (
            multixact.MultiXactMember(833, multixact.MULTIXACT_STATUS_FOR_SHARE),
            multixact.MultiXactMember(834, multixact.MULTIXACT_STATUS_NO_KEY_UPDATE),
        ),
    )
    assert got.nmembers == 2 and not got.members[0].is_update and got.members[1].is_update
    trunc = struct.pack("<IIIII", 5, 1, 100, 1, 300)
    assert describe(RM_MULTIXACT_ID, 0x30, trunc) == multixact.MultiXactTruncate(5, 1, 100, 1, 300)
    assert [multixact.MULTIXACT_STATUS_NAMES[i] for i in range(6)] == [
        "keysh",
        "sh",
        "fornokeyupd",
        "forupd",
        "nokeyupd",
        "upd",
    ]


def test_relmap() -> None:
    body = bytes(range(256)) * 2
    got = describe(RM_RELMAP_ID, 0x00, struct.pack("<IIi", 16398, 1663, 512) + body)
    assert got == relmap.RelmapUpdate(16398, 1663, body)
    assert got.nbytes == 512 and not got.is_shared
    assert describe(RM_RELMAP_ID, 0x00, struct.pack("<IIi", 0, 1664, 0)).is_shared
    with pytest.raises(PayloadError, match="RELMAP UPDATE"):
        relmap.RelmapUpdate.unpack(struct.pack("<IIi", 5, 1663, 512) + body[:-1])


def test_standby() -> None:
    locks = struct.pack("<i", 2) + struct.pack("<III", 716, 5, 16384) + struct.pack("<III", 717, 5, 16385)
    assert describe(RM_STANDBY_ID, 0x00, locks) == standby.StandbyLocks(
        (standby.StandbyLockEntry(716, 5, 16384), standby.StandbyLockEntry(717, 5, 16385))
    )
    # Garbage in the three padding bytes after subxid_overflow must not matter.
    running = struct.pack("<iiB3sIII", 2, 1, 0, b"\xde\xad\xbe", 800, 716, 799) + struct.pack("<III", 716, 790, 791)
    got = describe(RM_STANDBY_ID, 0x10, running)
    assert got == standby.RunningXacts(False, 800, 716, 799, (716, 790), (791,))
    assert got.xcnt == 2 and got.subxcnt == 1
    inval = struct.pack("<IIB3xi", 1, 1663, 1, 2) + b"\x37" * 32
    got = describe(RM_STANDBY_ID, 0x20, inval)
    assert got == standby.StandbyInvalidations(1, 1663, True, b"\x37" * 32)
    assert got.n_msgs == 2
    with pytest.raises(PayloadError, match="RUNNING_XACTS"):
        standby.RunningXacts.unpack(running[:-4])


def test_tblspc_logicalmsg_commit_ts_replorigin() -> None:
    assert describe(RM_TBLSPC_ID, 0x00, struct.pack("<I", 16500) + b"/srv/ts\0") == tblspc.TblspcCreate(
        16500, "/srv/ts"
    )
    assert describe(RM_TBLSPC_ID, 0x10, struct.pack("<I", 16500)) == tblspc.TblspcDrop(16500)
    with pytest.raises(PayloadError, match="TBLSPC CREATE"):
        tblspc.TblspcCreate.unpack(struct.pack("<I", 16500) + b"/srv/ts")

    msg = struct.pack("<I?3xQQ", 5, True, 10, 5) + b"neon-test\0" + b"hello"
    assert describe(RM_LOGICALMSG_ID, 0x00, msg) == logicalmsg.LogicalMessage(5, True, "neon-test", b"hello")
    assert len(struct.pack("<I?3xQQ", 0, 0, 0, 0)) == 24
    with pytest.raises(PayloadError, match="LOGICAL MESSAGE"):
        logicalmsg.LogicalMessage.unpack(struct.pack("<I?3xQQ", 5, True, 9, 5) + b"neon-test" + b"hello")

    assert describe(RM_COMMIT_TS_ID, 0x00, struct.pack("<i", 1)) == misc.CommitTsZeroPage(1)
    assert describe(RM_COMMIT_TS_ID, 0x10, struct.pack("<iI", 4, 900)) == misc.CommitTsTruncate(4, 900)
    assert describe(RM_REPLORIGIN_ID, 0x00, struct.pack("<QH?5x", 0xAABBCCDD, 1, True)) == misc.ReplOriginSet(
        0xAABBCCDD, 1, True
    )
    assert describe(RM_REPLORIGIN_ID, 0x10, struct.pack("<H", 1)) == misc.ReplOriginDrop(1)


def test_describe_none_for_plain_block_rmgrs() -> None:
    for rmid in (11, 12, 13, 14, 15, 16, 17, 20, 128, 255):
        assert describe(rmid, 0x00, b"\x01\x02\x03") is None
    assert describe(RM_HEAP2_ID, heap.XLOG_HEAP2_REWRITE, b"x" * 40) is None
    assert describe(RM_HEAP2_ID, heap.XLOG_HEAP2_NEW_CID, b"x" * 34) is None


# --- XACT: every chunk combination ---------------------------------------------------------

CHUNK_FLAGS = (
    xact.XACT_XINFO_HAS_DBINFO,
    xact.XACT_XINFO_HAS_SUBXACTS,
    xact.XACT_XINFO_HAS_RELFILENODES,
    xact.XACT_XINFO_HAS_DROPPED_STATS,
    xact.XACT_XINFO_HAS_INVALS,
    xact.XACT_XINFO_HAS_TWOPHASE,
    xact.XACT_XINFO_HAS_GID,
    xact.XACT_XINFO_HAS_ORIGIN,
)
XACT_OPCODES = (
    xact.XLOG_XACT_COMMIT,
    xact.XLOG_XACT_ABORT,
    xact.XLOG_XACT_COMMIT_PREPARED,
    xact.XLOG_XACT_ABORT_PREPARED,
)
SUBXACTS = (900, 901, 905)
RELS = (RelFileNode(1663, 5, 16384), RelFileNode(1664, 0, 1262))
STATS = (xact.XactStatsItem(2, 5, 16384),)
INVALS = bytes(range(32))


def build_commit_abort(opcode: int, xinfo: int, gid: str) -> bytes:
    """A commit/abort main data written chunk by chunk, as the server lays it out (spec §4.4)."""
    out = struct.pack("<q", 777_000_000_123) + struct.pack("<I", xinfo)
    if xinfo & xact.XACT_XINFO_HAS_DBINFO:
        out += struct.pack("<II", 5, 1663)
    if xinfo & xact.XACT_XINFO_HAS_SUBXACTS:
        out += struct.pack(f"<i{len(SUBXACTS)}I", len(SUBXACTS), *SUBXACTS)
    if xinfo & xact.XACT_XINFO_HAS_RELFILENODES:
        out += struct.pack("<i", len(RELS)) + b"".join(r.pack() for r in RELS)
    if xinfo & xact.XACT_XINFO_HAS_DROPPED_STATS:
        out += struct.pack("<i", len(STATS)) + b"".join(struct.pack("<iII", s.kind, s.dboid, s.objoid) for s in STATS)
    if xinfo & xact.XACT_XINFO_HAS_INVALS and opcode in (xact.XLOG_XACT_COMMIT, xact.XLOG_XACT_COMMIT_PREPARED):
        out += struct.pack("<i", len(INVALS) // 16) + INVALS
    if xinfo & xact.XACT_XINFO_HAS_TWOPHASE:
        out += struct.pack("<I", 1234)
        if xinfo & xact.XACT_XINFO_HAS_GID:
            out += gid.encode() + b"\0"
    if xinfo & xact.XACT_XINFO_HAS_ORIGIN:
        out += struct.pack("<Qq", 0x12345678, 761_000_000_000_000)
    return out


@pytest.mark.parametrize("mask", range(1 << len(CHUNK_FLAGS)))
def test_xact_commit_abort_every_chunk_combination(mask: int) -> None:
    xinfo = 0
    for i, flag in enumerate(CHUNK_FLAGS):
        if mask & (1 << i):
            xinfo |= flag
    # Flag-only bits ride along and must not consume data.
    xinfo |= xact.XACT_XINFO_HAS_AE_LOCKS | xact.XACT_COMPLETION_FORCE_SYNC_COMMIT
    for opcode, gid in itertools.product(XACT_OPCODES, ("g", "gid-7")):
        main = build_commit_abort(opcode, xinfo, gid)
        info = opcode | xact.XLOG_XACT_HAS_INFO | 0x01  # XLR_SPECIAL_REL_UPDATE in the low nibble
        got = describe(RM_XACT_ID, info, main)
        assert isinstance(got, xact.XactCommitAbort)
        is_commit = opcode in (xact.XLOG_XACT_COMMIT, xact.XLOG_XACT_COMMIT_PREPARED)
        twophase = bool(xinfo & xact.XACT_XINFO_HAS_TWOPHASE)
        assert got.opcode == opcode and got.is_commit == is_commit
        assert got.xact_time == 777_000_000_123 and got.xinfo == xinfo
        assert (got.db_id, got.ts_id) == ((5, 1663) if xinfo & xact.XACT_XINFO_HAS_DBINFO else (0, 0))
        assert got.subxacts == (SUBXACTS if xinfo & xact.XACT_XINFO_HAS_SUBXACTS else ())
        assert got.rels == (RELS if xinfo & xact.XACT_XINFO_HAS_RELFILENODES else ())
        assert got.stats_items == (STATS if xinfo & xact.XACT_XINFO_HAS_DROPPED_STATS else ())
        has_invals = is_commit and xinfo & xact.XACT_XINFO_HAS_INVALS
        assert got.invals == (INVALS if has_invals else b"")
        assert got.n_invals == (2 if has_invals else 0)
        assert got.twophase_xid == (1234 if twophase else 0)
        assert got.gid == (gid if twophase and xinfo & xact.XACT_XINFO_HAS_GID else None)
        if xinfo & xact.XACT_XINFO_HAS_ORIGIN:
            assert (got.origin_lsn, got.origin_timestamp) == (0x12345678, 761_000_000_000_000)
        else:
            assert (got.origin_lsn, got.origin_timestamp) == (0, 0)
        assert got.decided_xid(0 if twophase else 55) == (1234 if twophase else 55)
        # Every truncation is detected, and so is an extra byte.
        for cut in range(len(main)):
            with pytest.raises(PayloadError, match="XACT"):
                xact.XactCommitAbort.unpack(info, main[:cut])
        with pytest.raises(PayloadError, match="trailing"):
            xact.XactCommitAbort.unpack(info, main + b"\0")


def test_xact_commit_prepared_decides_the_twophase_xid() -> None:
    main = build_commit_abort(xact.XLOG_XACT_COMMIT_PREPARED, xact.XACT_XINFO_HAS_TWOPHASE | 0x2, "")
    got = xact.XactCommitAbort.unpack(xact.XLOG_XACT_COMMIT_PREPARED | 0x80, main)
    assert got.is_prepared
    assert got.decided_xids(0) == (1234, *SUBXACTS)


def test_xact_bad_counts() -> None:
    neg = struct.pack("<qIi", 1, xact.XACT_XINFO_HAS_SUBXACTS, -1)
    with pytest.raises(PayloadError, match="negative"):
        xact.XactCommitAbort.unpack(0x80, neg)
    huge = struct.pack("<qIi", 1, xact.XACT_XINFO_HAS_RELFILENODES, 0x7FFFFFFF)
    with pytest.raises(PayloadError, match="relfilenodes"):
        xact.XactCommitAbort.unpack(0x80, huge)
    no_nul = struct.pack("<qII", 1, xact.XACT_XINFO_HAS_TWOPHASE | xact.XACT_XINFO_HAS_GID, 5) + b"abc"
    with pytest.raises(PayloadError, match="NUL"):
        xact.XactCommitAbort.unpack(0x30 | 0x80, no_nul)
    with pytest.raises(PayloadError):
        xact.XactCommitAbort.unpack(0x10, struct.pack("<q", 1))  # PREPARE is not a commit/abort


def build_prepare(gid: str = "tx-1", *, magic: int = xact.TWOPHASE_MAGIC, len_delta: int = 0) -> bytes:
    """A two-phase state file without its CRC: header, MAXALIGN'd sections, then rmgr records."""
    subxacts = (801, 802)
    commit_rels = (RelFileNode(1663, 5, 16391),)
    abort_rels = (RelFileNode(1663, 5, 16392), RelFileNode(1663, 5, 16393))
    commit_stats = (xact.XactStatsItem(2, 5, 16391),)
    invals = b"\x11" * 16
    gidb = gid.encode() + b"\0"
    body = maxalign_pad(gidb)
    body += maxalign_pad(struct.pack(f"<{len(subxacts)}I", *subxacts))
    body += maxalign_pad(b"".join(r.pack() for r in commit_rels))
    body += maxalign_pad(b"".join(r.pack() for r in abort_rels))
    body += maxalign_pad(b"".join(struct.pack("<iII", s.kind, s.dboid, s.objoid) for s in commit_stats))
    body += maxalign_pad(invals)
    body += struct.pack("<IHH", 0, 0, 0)  # an end-of-rmgr-records marker; not parsed
    total_len = 72 + len(body) + 4 + len_delta
    header = struct.pack(
        "<IIIIqIIIIIIIBxHQq",
        magic,
        total_len,
        800,
        5,
        760_000_000_000_000,
        10,
        len(subxacts),
        len(commit_rels),
        len(abort_rels),
        len(commit_stats),
        0,
        1,
        1,
        len(gidb),
        0xABCDEF,
        123456,
    )
    assert len(header) == 72
    return header + body


def test_xact_prepare() -> None:
    main = build_prepare("tx-1")
    got = describe(RM_XACT_ID, xact.XLOG_XACT_PREPARE, main)
    assert isinstance(got, xact.XactPrepare)
    assert (got.xid, got.database, got.prepared_at, got.owner) == (800, 5, 760_000_000_000_000, 10)
    assert (got.nsubxacts, got.ncommitrels, got.nabortrels) == (2, 1, 2)
    assert (got.ncommitstats, got.nabortstats, got.ninvalmsgs) == (1, 0, 1)
    assert got.initfileinval is True and got.gidlen == 5
    assert (got.origin_lsn, got.origin_timestamp) == (0xABCDEF, 123456)
    assert got.gid == "tx-1"
    assert got.subxacts == (801, 802)
    assert got.commit_rels == (RelFileNode(1663, 5, 16391),)
    assert got.abort_rels == (RelFileNode(1663, 5, 16392), RelFileNode(1663, 5, 16393))
    assert got.commit_stats == (xact.XactStatsItem(2, 5, 16391),) and got.abort_stats == ()
    assert got.raw == main
    assert got.twophase_file_name == "pg_twophase/00000320"
    expected_file = main + struct.pack("<I", crc32c(main))
    assert xact.twophase_file_bytes(main) == expected_file == got.twophase_file_bytes()
    # A GID that fills its MAXALIGN unit exactly, and a longer one.
    assert xact.XactPrepare.unpack(build_prepare("1234567")).gid == "1234567"
    assert xact.XactPrepare.unpack(build_prepare("a-much-longer-gid")).subxacts == (801, 802)


def test_xact_prepare_rejects_bad_header() -> None:
    with pytest.raises(PayloadError, match="magic"):
        xact.XactPrepare.unpack(build_prepare(magic=0x12345678))
    with pytest.raises(PayloadError, match="total_len"):
        xact.XactPrepare.unpack(build_prepare(len_delta=8))
    main = build_prepare()
    for cut in (0, 10, 71, 72, 75, 90):
        with pytest.raises(PayloadError, match="XACT PREPARE"):
            xact.XactPrepare.unpack(main[:cut])


def test_xact_assignment_and_invalidations() -> None:
    assign = struct.pack("<Ii3I", 734, 3, 735, 736, 737)
    assert describe(RM_XACT_ID, 0x50, assign) == xact.XactAssignment(734, (735, 736, 737))
    inv = describe(RM_XACT_ID, 0x60, struct.pack("<i", 2) + b"\x05" * 32)
    assert inv == xact.XactInvalidations(b"\x05" * 32) and inv.n_msgs == 2
    with pytest.raises(PayloadError, match="ASSIGNMENT"):
        xact.XactAssignment.unpack(assign[:-1])


# --- Heap / Heap2 ---------------------------------------------------------------------------


def test_heap_structs() -> None:
    assert describe(RM_HEAP_ID, 0x80, struct.pack("<HB", 1, 0x08)) == heap.HeapInsert(1, 0x08)
    delete = struct.pack("<IHBB", 815, 36, 0x10, 0x09)
    assert describe(RM_HEAP_ID, 0x10, delete) == heap.HeapDelete(815, 36, 0x10, 0x09, b"")
    # With a replica-identity old tuple (wal_level=logical) the key follows in main data.
    old = struct.pack("<HHB", 2, 0x0802, 24) + b"tuple-bytes"
    got = describe(RM_HEAP_ID, 0x10, struct.pack("<IHBB", 815, 36, 0, heap.XLH_DELETE_CONTAINS_OLD_KEY) + old)
    assert got.old_tuple == old
    with pytest.raises(PayloadError, match="trailing"):
        heap.HeapDelete.unpack(delete + old)
    upd = struct.pack("<IHBBIH", 729, 6, 0, 0x13, 0, 204)
    assert len(upd) == 14
    assert describe(RM_HEAP_ID, 0x20, upd) == heap.HeapUpdate(729, 6, 0, 0x13, 0, 204, b"")
    assert describe(RM_HEAP_ID, 0xC0, upd) == heap.HeapUpdate(729, 6, 0, 0x13, 0, 204, b"")
    upd_old = struct.pack("<IHBBIH", 729, 6, 0, heap.XLH_UPDATE_CONTAINS_OLD_TUPLE, 0, 204) + old
    assert heap.HeapUpdate.unpack(upd_old).old_tuple == old
    with pytest.raises(PayloadError, match="old tuple"):
        heap.HeapUpdate.unpack(upd_old[:16])
    assert describe(RM_HEAP_ID, 0x60, struct.pack("<IHbB", 1, 100, -1, 1)) == heap.HeapLock(1, 100, -1, 1)
    assert describe(RM_HEAP_ID, 0x50, struct.pack("<H", 3)) == heap.HeapConfirm(3)
    assert describe(RM_HEAP_ID, 0x70, struct.pack("<H", 44)) == heap.HeapInplace(44)
    trunc = struct.pack("<IIB3x2I", 5, 2, 0x01, 16399, 16400)
    assert describe(RM_HEAP_ID, 0x30, trunc) == heap.HeapTruncate(5, 0x01, (16399, 16400))

    assert describe(RM_HEAP2_ID, 0x10, struct.pack("<IHH", 820, 1, 2)) == heap.HeapPrune(820, 1, 2)
    assert describe(RM_HEAP2_ID, 0x20, struct.pack("<H", 155)) == heap.HeapVacuum(155)
    assert describe(RM_HEAP2_ID, 0x30, struct.pack("<IH", 726, 57)) == heap.HeapFreezePage(726, 57)
    multi = struct.pack("<BxH3H", 0x02, 3, 1, 2, 3)
    assert describe(RM_HEAP2_ID, 0x50, multi) == heap.HeapMultiInsert(0x02, 3, (1, 2, 3))
    # INIT_PAGE: the offsets array is omitted.
    assert describe(RM_HEAP2_ID, 0xD0, multi[:4]) == heap.HeapMultiInsert(0x02, 3, ())
    with pytest.raises(PayloadError, match="trailing"):
        heap.HeapMultiInsert.unpack(0xD0, multi)
    with pytest.raises(PayloadError, match="offsets"):
        heap.HeapMultiInsert.unpack(0x50, multi[:-2])
    assert describe(RM_HEAP2_ID, 0x60, struct.pack("<IHBB", 9, 4, 0, 1)) == heap.HeapLockUpdated(9, 4, 0, 1)


# Main data for each record kind of the §4.9 table, with its clearing flag set or not.
def heap_insert(flags: int) -> bytes:
    return struct.pack("<HB", 5, flags)


def heap_multi_insert(flags: int, init: bool) -> bytes:
    return struct.pack("<BxH", flags, 2) + (b"" if init else struct.pack("<2H", 1, 2))


def heap_delete(flags: int, infobits: int = 0) -> bytes:
    return struct.pack("<IHBB", 900, 3, infobits, flags)


def heap_update(flags: int) -> bytes:
    return struct.pack("<IHBBIH", 900, 3, 0, flags, 0, 7)


def heap_lock(flags: int, infobits: int = 0) -> bytes:
    return struct.pack("<IHBB", 900, 3, infobits, flags)


ALL = heap.VISIBILITYMAP_VALID_BITS
FROZEN = heap.VISIBILITYMAP_ALL_FROZEN


@pytest.mark.parametrize(
    ("rmid", "info", "main", "blocks", "expected"),
    [
        # HEAP INSERT (0x00 / 0x80): byte 2, 0x01 -> block 0, both bits.
        (RM_HEAP_ID, 0x00, heap_insert(0x01), {0: 17}, [(17, ALL)]),
        (RM_HEAP_ID, 0x80, heap_insert(0x09), {0: 17}, [(17, ALL)]),
        (RM_HEAP_ID, 0x00, heap_insert(0x08), {0: 17}, []),
        # HEAP2 MULTI_INSERT (0x50 / 0xD0): byte 0.
        (RM_HEAP2_ID, 0x50, heap_multi_insert(0x01, False), {0: 4}, [(4, ALL)]),
        (RM_HEAP2_ID, 0xD0, heap_multi_insert(0x03, True), {0: 4}, [(4, ALL)]),
        (RM_HEAP2_ID, 0x50, heap_multi_insert(0x02, False), {0: 4}, []),
        # HEAP DELETE (0x10): byte 7 -- not byte 6 (infobits), where Neon's patched struct differs.
        (RM_HEAP_ID, 0x10, heap_delete(0x01), {0: 2}, [(2, ALL)]),
        (RM_HEAP_ID, 0x10, heap_delete(0x00, infobits=0x01), {0: 2}, []),
        (RM_HEAP_ID, 0x10, heap_delete(0x08), {0: 2}, []),
        # HEAP UPDATE / HOT_UPDATE: OLD -> block 1 if present else block 0; NEW -> block 0.
        (RM_HEAP_ID, 0x20, heap_update(0x01), {0: 10, 1: 0}, [(0, ALL)]),
        (RM_HEAP_ID, 0x20, heap_update(0x01), {0: 10}, [(10, ALL)]),
        (RM_HEAP_ID, 0x20, heap_update(0x02), {0: 10, 1: 0}, [(10, ALL)]),
        (RM_HEAP_ID, 0x20, heap_update(0x03), {0: 10, 1: 0}, [(0, ALL), (10, ALL)]),
        (RM_HEAP_ID, 0xA0, heap_update(0x13), {0: 5, 1: 0}, [(0, ALL), (5, ALL)]),
        (RM_HEAP_ID, 0x20, heap_update(0x03), {0: 10}, [(10, ALL)]),
        (RM_HEAP_ID, 0x20, heap_update(0x10), {0: 10, 1: 0}, []),
        (RM_HEAP_ID, 0x40, heap_update(0x01), {0: 3}, [(3, ALL)]),
        (RM_HEAP_ID, 0xC0, heap_update(0x02), {0: 3}, [(3, ALL)]),
        (RM_HEAP_ID, 0x40, heap_update(0x70), {0: 3}, []),
        # HEAP LOCK (0x60) and HEAP2 LOCK_UPDATED (0x60): byte 7, all-frozen only.
        (RM_HEAP_ID, 0x60, heap_lock(0x01), {0: 8}, [(8, FROZEN)]),
        (RM_HEAP_ID, 0x60, heap_lock(0x00, infobits=0x01), {0: 8}, []),
        (RM_HEAP2_ID, 0x60, heap_lock(0x01), {0: 8}, [(8, FROZEN)]),
        (RM_HEAP2_ID, 0x60, heap_lock(0x00, infobits=0x01), {0: 8}, []),
        # Records that clear nothing (even with flag-like bytes), and other rmgrs.
        (RM_HEAP2_ID, 0x40, struct.pack("<IB", 1, 0x01), {0: 0, 1: 1}, []),
        (RM_HEAP2_ID, 0x10, struct.pack("<IHH", 1, 1, 1), {0: 0}, []),
        (RM_HEAP_ID, 0x70, struct.pack("<H", 1), {0: 0}, []),
        (RM_XLOG_ID, 0x00, heap_insert(0x01), {0: 0}, []),
    ],
)
def test_vm_bits_cleared(
    rmid: int, info: int, main: bytes, blocks: dict[int, int], expected: list[tuple[int, int]]
) -> None:
    assert heap.vm_bits_cleared(rmid, info, main, blocks) == expected


def test_vm_bits_cleared_needs_block_0() -> None:
    with pytest.raises(PayloadError, match="block reference #0"):
        heap.vm_bits_cleared(RM_HEAP_ID, 0x00, heap_insert(0x01), {})
    with pytest.raises(PayloadError, match="HEAP DELETE"):
        heap.vm_bits_cleared(RM_HEAP_ID, 0x10, heap_delete(0x01)[:7], {0: 1})


# --- only PayloadError ever comes out ------------------------------------------------------

# (rmid, info) of every record kind with an interpreted payload, flags variants included.
KINDS = [
    *((RM_XLOG_ID, i) for i in (0x00, 0x10, 0x30, 0x40, 0x50, 0x60, 0x70, 0x80, 0x90, 0xD0)),
    *((RM_XACT_ID, op | hi) for op in (0x00, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60) for hi in (0x00, 0x80)),
    (RM_SMGR_ID, 0x11),
    (RM_SMGR_ID, 0x21),
    (RM_DBASE_ID, 0x01),
    (RM_DBASE_ID, 0x10),
    (RM_DBASE_ID, 0x21),
    (RM_CLOG_ID, 0x00),
    (RM_CLOG_ID, 0x10),
    *((RM_MULTIXACT_ID, i) for i in (0x00, 0x10, 0x20, 0x30)),
    (RM_RELMAP_ID, 0x00),
    *((RM_STANDBY_ID, i) for i in (0x00, 0x10, 0x20)),
    (RM_TBLSPC_ID, 0x00),
    (RM_TBLSPC_ID, 0x10),
    *((RM_HEAP_ID, op | hi) for op in range(0x00, 0x80, 0x10) for hi in (0x00, 0x80)),
    *((RM_HEAP2_ID, op | hi) for op in range(0x10, 0x70, 0x10) for hi in (0x00, 0x80)),
    (RM_COMMIT_TS_ID, 0x00),
    (RM_COMMIT_TS_ID, 0x10),
    (RM_REPLORIGIN_ID, 0x00),
    (RM_REPLORIGIN_ID, 0x10),
    (RM_LOGICALMSG_ID, 0x00),
]


@settings(max_examples=3000, deadline=None)
@given(st.sampled_from(KINDS), st.binary(max_size=120))
def test_random_bytes_only_raise_payload_error(kind: tuple[int, int], data: bytes) -> None:
    rmid, info = kind
    with contextlib.suppress(PayloadError):
        assert describe(rmid, info, data) is not None
    with contextlib.suppress(PayloadError):
        heap.vm_bits_cleared(rmid, info, data, {0: 1, 1: 2})


# Valid main data for every parser; each is a complete layout, so every shorter prefix is invalid.
VALID = [
    (RM_XLOG_ID, 0x00, BOOTSTRAP_CHECKPOINT.pack()),
    (RM_XLOG_ID, 0x30, struct.pack("<I", 1)),
    (RM_XLOG_ID, 0x50, struct.pack("<Q", 1)),
    (RM_XLOG_ID, 0x60, struct.pack("<iiiiii??2x", 1, 2, 3, 4, 5, 1, True, False)),
    (RM_XLOG_ID, 0x70, struct.pack("<q64s", 1, b"x")),
    (RM_XLOG_ID, 0x80, b"\x01"),
    (RM_XLOG_ID, 0x90, struct.pack("<qII", 1, 2, 1)),
    (RM_XLOG_ID, 0xD0, struct.pack("<Qq", 1, 2)),
    *(
        (RM_XACT_ID, op | 0x80, build_commit_abort(op, 0x1BF, "gid"))
        for op in (0x00, 0x20, 0x30, 0x40)  # 0x1BF: every chunk
    ),
    (RM_XACT_ID, 0x00, struct.pack("<q", 1)),
    (RM_XACT_ID, 0x10, build_prepare()),
    (RM_XACT_ID, 0x50, struct.pack("<Ii2I", 1, 2, 3, 4)),
    (RM_XACT_ID, 0x60, struct.pack("<i", 1) + bytes(16)),
    (RM_SMGR_ID, 0x11, rnode_bytes(1, 2, 3) + struct.pack("<i", 0)),
    (RM_SMGR_ID, 0x21, struct.pack("<I", 1) + rnode_bytes(1, 2, 3) + struct.pack("<i", 7)),
    (RM_DBASE_ID, 0x01, struct.pack("<IIII", 1, 2, 3, 4)),
    (RM_DBASE_ID, 0x10, struct.pack("<II", 1, 2)),
    (RM_DBASE_ID, 0x21, struct.pack("<Ii2I", 1, 2, 3, 4)),
    (RM_CLOG_ID, 0x00, struct.pack("<i", 1)),
    (RM_CLOG_ID, 0x10, struct.pack("<iII", 1, 2, 3)),
    (RM_MULTIXACT_ID, 0x00, struct.pack("<i", 1)),
    (RM_MULTIXACT_ID, 0x10, struct.pack("<i", 1)),
    (RM_MULTIXACT_ID, 0x20, struct.pack("<IIi2I", 1, 1, 1, 5, 1)),
    (RM_MULTIXACT_ID, 0x30, struct.pack("<IIIII", 1, 2, 3, 4, 5)),
    (RM_RELMAP_ID, 0x00, struct.pack("<IIi", 5, 1663, 3) + b"abc"),
    (RM_STANDBY_ID, 0x00, struct.pack("<iIII", 1, 1, 2, 3)),
    (RM_STANDBY_ID, 0x10, struct.pack("<ii?3xIII3I", 2, 1, False, 9, 7, 8, 7, 8, 9)),
    (RM_STANDBY_ID, 0x20, struct.pack("<II?3xi", 1, 2, True, 1) + bytes(16)),
    (RM_TBLSPC_ID, 0x00, struct.pack("<I", 1) + b"/x\0"),
    (RM_TBLSPC_ID, 0x10, struct.pack("<I", 1)),
    (RM_HEAP_ID, 0x00, heap_insert(1)),
    (RM_HEAP_ID, 0x10, heap_delete(1)),
    (RM_HEAP_ID, 0x20, heap_update(3)),
    (RM_HEAP_ID, 0x30, struct.pack("<IIB3xI", 5, 1, 0, 9)),
    (RM_HEAP_ID, 0x40, heap_update(1)),
    (RM_HEAP_ID, 0x50, struct.pack("<H", 1)),
    (RM_HEAP_ID, 0x60, heap_lock(1)),
    (RM_HEAP_ID, 0x70, struct.pack("<H", 1)),
    (RM_HEAP2_ID, 0x10, struct.pack("<IHH", 1, 2, 3)),
    (RM_HEAP2_ID, 0x20, struct.pack("<H", 1)),
    (RM_HEAP2_ID, 0x30, struct.pack("<IH", 1, 2)),
    (RM_HEAP2_ID, 0x40, struct.pack("<IB", 1, 1)),
    (RM_HEAP2_ID, 0x50, heap_multi_insert(1, False)),
    (RM_HEAP2_ID, 0xD0, heap_multi_insert(1, True)),
    (RM_HEAP2_ID, 0x60, heap_lock(1)),
    (RM_COMMIT_TS_ID, 0x00, struct.pack("<i", 1)),
    (RM_COMMIT_TS_ID, 0x10, struct.pack("<iI", 1, 2)),
    (RM_REPLORIGIN_ID, 0x00, struct.pack("<QH?5x", 1, 2, True)),
    (RM_REPLORIGIN_ID, 0x10, struct.pack("<H", 1)),
    (RM_LOGICALMSG_ID, 0x00, struct.pack("<I?3xQQ", 5, False, 2, 3) + b"p\0" + b"msg"),
]


@pytest.mark.parametrize(("rmid", "info", "main"), VALID, ids=lambda v: f"{v:#x}" if isinstance(v, int) else None)
def test_every_truncation_raises_payload_error(rmid: int, info: int, main: bytes) -> None:
    assert describe(rmid, info, main) is not None
    for cut in range(len(main)):
        with pytest.raises(PayloadError):
            describe(rmid, info, main[:cut])


@pytest.mark.parametrize(("rmid", "info", "main"), VALID, ids=lambda v: f"{v:#x}" if isinstance(v, int) else None)
def test_extra_bytes_raise_payload_error(rmid: int, info: int, main: bytes) -> None:
    if (rmid, info) == (RM_XACT_ID, 0x10):
        return  # PREPARE: per-rmgr records of any length follow the parsed sections
    with pytest.raises(PayloadError):
        describe(rmid, info, main + b"\0")


@settings(max_examples=500, deadline=None)
@given(st.sampled_from(VALID), st.data())
def test_mutated_valid_payloads_only_raise_payload_error(entry: tuple[int, int, bytes], data: st.DataObject) -> None:
    rmid, info, main = entry
    b = bytearray(main)
    for _ in range(data.draw(st.integers(0, 4))):
        if b:
            b[data.draw(st.integers(0, len(b) - 1))] = data.draw(st.integers(0, 255))
    b = b[: data.draw(st.integers(0, len(b)))] + data.draw(st.binary(max_size=8))
    try:
        describe(rmid, info, bytes(b))
    except PayloadError as e:
        assert str(e)  # a message, naming the record type
