"""Unit tests of the storage core's pieces: layer map search, the in-memory layer, the page cache,
modifications and relation sizes, ingest arithmetic, key-space partitioning, and load-time cleanup."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest

from neon.pageserver.compaction import partition_keyspace
from neon.pageserver.datadir_mapping import ZERO_PAGE, AlreadyExistsError, DatadirModification, iter_range_keys
from neon.pageserver.inmemory_layer import InMemoryLayer
from neon.pageserver.key import Key, RelTag, rel_block_key_bytes
from neon.pageserver.layer_map import HistoricLayer, LayerMap
from neon.pageserver.layers import KEY_MAX, KEY_MIN, DeltaLayerName, DeltaLayerWriter, ImageLayerName
from neon.pageserver.metadata import TimelineMetadata
from neon.pageserver.page_cache import MaterializedPageCache
from neon.pageserver.tenant_config import TenantConf
from neon.pageserver.timeline import Timeline, TimelineStateError, _without_unrecorded_compactions
from neon.pageserver.value import Image, decode_value, encode_value
from neon.pageserver.walingest import WalIngest, fsm_logical_to_physical
from neon.postgres.checkpoint import CheckPoint
from neon.postgres.page import fsm_logical_to_physical as pg_fsm_logical_to_physical
from neon.utils.failpoints import Failpoints
from neon.utils.id import TenantId, TimelineId
from neon.utils.lsn import Lsn
from neon.walredo.records import SlruKind

TENANT = TenantId("11111111111111111111111111111111")
TIMELINE = TimelineId("22222222222222222222222222222222")


def k(n: int) -> bytes:
    return n.to_bytes(18, "big")


def historic(name: DeltaLayerName | ImageLayerName) -> HistoricLayer:
    return HistoricLayer(name, Path("/nonexistent") / str(name), TENANT, TIMELINE, 0)


def delta(ks: int, ke: int, ls: int, le: int) -> HistoricLayer:
    return historic(DeltaLayerName(k(ks), k(ke), Lsn(ls), Lsn(le)))


def image(ks: int, ke: int, lsn: int) -> HistoricLayer:
    return historic(ImageLayerName(k(ks), k(ke), Lsn(lsn)))


# --- layer map search (spec §5.6) -----------------------------------------------------------------
class TestLayerMapSearch:
    def make(self, *layers: HistoricLayer) -> LayerMap:
        lm = LayerMap(None)
        lm.replace([], list(layers))
        return lm

    def test_nothing(self) -> None:
        assert self.make(delta(10, 20, 100, 200)).search(k(5), 300) is None
        assert self.make(delta(10, 20, 100, 200)).search(k(15), 100) is None  # starts at the end LSN

    def test_only_image_or_only_delta(self) -> None:
        i = image(0, 100, 150)
        assert self.make(i).search(k(5), 300) == (i, 150)
        d = delta(0, 100, 100, 200)
        assert self.make(d).search(k(5), 300) == (d, 100)

    def test_image_at_least_as_new_as_delta_wins(self) -> None:
        d, i = delta(0, 100, 100, 200), image(0, 100, 199)
        assert self.make(d, i).search(k(5), 300) == (i, 199)

    def test_image_exactly_below_the_end_lsn_wins(self) -> None:
        d, i = delta(0, 100, 100, 400), image(0, 100, 249)
        assert self.make(d, i).search(k(5), 250) == (i, 249)

    def test_newer_delta_reads_down_to_just_above_the_image(self) -> None:
        d, i = delta(0, 100, 100, 400), image(0, 100, 150)
        assert self.make(d, i).search(k(5), 300) == (d, 151)
        older_image = image(0, 100, 50)
        assert self.make(d, older_image).search(k(5), 300) == (d, 100)

    def test_key_ranges_are_respected(self) -> None:
        left, right = delta(0, 50, 100, 200), delta(50, 100, 100, 300)
        lm = self.make(left, right)
        assert lm.search(k(10), 1000) == (left, 100)
        assert lm.search(k(50), 1000) == (right, 100)
        assert lm.search(k(100), 1000) is None

    def test_newest_delta_below_end_lsn(self) -> None:
        old, new = delta(0, 100, 100, 200), delta(0, 100, 200, 300)
        lm = self.make(old, new)
        assert lm.search(k(1), 250) == (new, 200)
        assert lm.search(k(1), 200) == (old, 100)

    def test_replace_is_one_step(self) -> None:
        a, b, c = delta(0, 100, 100, 200), delta(0, 100, 200, 300), delta(0, 100, 100, 300)
        lm = self.make(a, b)
        before = lm.deltas
        lm.replace([a, b], [c])
        assert lm.deltas == (c,) and before == (b, a)


# --- in-memory layer ------------------------------------------------------------------------------
def test_inmemory_layer_reads_newest_first_down_to_will_init() -> None:
    layer = InMemoryLayer(100)
    key = k(7)
    layer.put(key, 104, True, b"img")
    layer.put(key, 108, False, b"r1")
    layer.put(key, 112, False, b"r2")
    assert layer.get(key, 0, 113) == ([(112, False, b"r2"), (108, False, b"r1"), (104, True, b"img")], True)
    assert layer.get(key, 0, 112) == ([(108, False, b"r1"), (104, True, b"img")], True)
    assert layer.get(key, 108, 200) == ([(112, False, b"r2"), (108, False, b"r1")], False)
    assert layer.get(k(8), 0, 200) == ([], False)
    layer.put(key, 112, False, b"r2bis")  # the same record put twice: the last wins
    assert layer.get(key, 110, 200).entries == [(112, False, b"r2bis")]
    with pytest.raises(ValueError, match="below"):
        layer.put(key, 108, False, b"late")
    assert layer.size == len(b"img") + len(b"r1") + len(b"r2bis")
    layer.freeze(113)
    with pytest.raises(RuntimeError, match="frozen"):
        layer.put(k(9), 116, True, b"x")


def test_inmemory_layer_flushes_to_an_l0_delta(tmp_path: Path) -> None:
    layer = InMemoryLayer(0x100)
    for i in range(50):
        layer.put(k(50 - i), 0x108, True, encode_value(Image(bytes([i]) * 10)))
    layer.freeze(0x111)
    path = layer.write_delta_layer(tmp_path, TENANT, TIMELINE)
    assert path.name == f"{KEY_MIN.hex().upper()}-{KEY_MAX.hex().upper()}__{0x100:016X}-{0x111:016X}"
    from neon.pageserver.layers import DeltaLayer

    with DeltaLayer(path, tenant_id=TENANT, timeline_id=TIMELINE) as d:
        entries = list(d)
    assert [e[0] for e in entries] == sorted(k(50 - i) for i in range(50))
    assert decode_value(entries[0][3]) == Image(bytes([49]) * 10)


# --- page cache -----------------------------------------------------------------------------------
def test_page_cache_returns_newest_version_at_or_below_the_lsn() -> None:
    cache = MaterializedPageCache(3)
    page = bytes(8192)
    cache.memorize(b"tl", k(1), 100, b"\x01" + page[1:])
    cache.memorize(b"tl", k(1), 200, b"\x02" + page[1:])
    assert cache.lookup(b"tl", k(1), 99) is None
    assert cache.lookup(b"tl", k(1), 150)[0] == 100  # type: ignore[index]
    assert cache.lookup(b"tl", k(1), 500)[0] == 200  # type: ignore[index]
    assert cache.lookup(b"other", k(1), 500) is None
    cache.memorize(b"tl", k(1), 150, b"\x03" + b"\x00" * 8191 + b"x")  # not a page: ignored
    cache.memorize(b"tl", k(2), 100, page)
    cache.memorize(b"tl", k(3), 100, page)  # over capacity: the least recently used key goes
    assert len(cache) <= 3
    assert cache.lookup(b"tl", k(3), 100) is not None


# --- modifications and relation sizes (spec §4.3-4.6) --------------------------------------------
class _NoRedo:
    async def request_redo(self, *args: object) -> bytes:
        raise AssertionError("no redo expected")


def make_timeline(tmp_path: Path, *, failpoints: Failpoints | None = None) -> Timeline:
    md = TimelineMetadata(
        disk_consistent_lsn=Lsn(0),
        prev_record_lsn=None,
        ancestor_timeline=None,
        ancestor_lsn=Lsn(0),
        latest_gc_cutoff_lsn=Lsn(0x100),
        initdb_lsn=Lsn(0x100),
        pg_version=15,
    )
    return Timeline(
        tenant_id=TENANT,
        timeline_id=TIMELINE,
        path=tmp_path,
        metadata=md,
        ancestor=None,
        conf=TenantConf,
        walredo=_NoRedo(),  # type: ignore[arg-type]
        page_cache=MaterializedPageCache(0),
        failpoints=failpoints,
    )


def test_modification_is_atomic_and_sizes_stay_exact(tmp_path: Path) -> None:
    tl = make_timeline(tmp_path)
    tl.logical_size = 0
    mod = DatadirModification(tl)
    mod.lsn = 0x100
    mod.init_empty()
    mod.put_relmap_file(1663, 5, b"m" * 512)
    mod.commit()
    tag = RelTag(1663, 5, 16384, 0)
    mod.lsn = 0x108
    mod.ensure_rel_block(tag, 3)  # implicit creation, extension to 4 blocks, blocks 0..2 zeroed
    mod.put_rel_page_image(tag, 3, b"\x07" * 8192)
    # Within the record, later puts see the new size (the eagerly updated rel-size cache) ...
    assert mod.rel_size(tag) == 4
    # ... but nothing is visible at the record's LSN before commit.
    assert tl.last_record_lsn == 0x100
    assert tl.list_rels(1663, 5, 0x100) == set()
    mod.commit()
    assert tl.last_record_lsn == 0x108 and tl.prev_record_lsn == 0x100
    assert tl.list_rels(1663, 5, 0x108) == {tag}
    assert tl.get_rel_size(tag, 0x108) == 4
    assert tl.logical_size == 4 * 8192
    assert tl.get_image(rel_block_key_bytes(*tag, 1), 0x108) == ZERO_PAGE
    assert tl.get_image(rel_block_key_bytes(*tag, 3), 0x108) == b"\x07" * 8192
    with pytest.raises(AlreadyExistsError):
        mod.lsn = 0x110
        mod.put_rel_creation(tag, 0)
    mod.pending.clear()
    # Sizes at older LSNs stay as they were; VM/FSM forks never created read as 0 blocks.
    tl.rel_size_cache.clear()
    assert tl.get_rel_size(RelTag(1663, 5, 16384, 2), 0x108) == 0
    # A write at or below last_record_lsn is refused.
    mod.lsn = 0x108
    mod.put_rel_page_image(tag, 0, ZERO_PAGE)
    with pytest.raises(TimelineStateError, match="after advancing last_record_lsn"):
        mod.commit()


def test_slru_segments_and_twophase_files(tmp_path: Path) -> None:
    tl = make_timeline(tmp_path)
    mod = DatadirModification(tl)
    mod.lsn = 0x100
    mod.init_empty()
    mod.put_slru_segment_creation(SlruKind.CLOG, 0, 2)
    mod.put_slru_page_image(SlruKind.CLOG, 0, 0, ZERO_PAGE)
    mod.put_slru_page_image(SlruKind.CLOG, 0, 1, ZERO_PAGE)
    mod.put_twophase_file(742, b"state")
    mod.commit()
    assert tl.list_slru_segments(SlruKind.CLOG, 0x100) == {0}
    assert tl.get_slru_segment_size(SlruKind.CLOG, 0, 0x100) == 2
    assert tl.list_twophase_files(0x100) == {742}
    assert tl.get_twophase_file(742, 0x100) == b"state"
    mod.lsn = 0x108
    mod.drop_twophase_file(742)
    mod.drop_slru_segment(SlruKind.CLOG, 0)
    mod.commit()
    assert tl.list_twophase_files(0x108) == set() and tl.list_twophase_files(0x100) == {742}
    assert tl.list_slru_segments(SlruKind.CLOG, 0x108) == set()
    keyspace = tl.collect_keyspace(0x100)
    keys = [key for start, end in keyspace for key in iter_range_keys(start, end)]
    assert keys == sorted(keys) and len(keys) == len(set(keys))
    assert Key.from_bytes(keys[0]) == Key(0, 0, 0, 0, 0, 0)  # the DbDir key comes first


# --- ingest arithmetic ----------------------------------------------------------------------------
@pytest.mark.parametrize("addr", [0, 1, 4068, 4069, 4070, 4069 * 4069, 4069 * 4069 + 5])
def test_fsm_logical_to_physical_matches_postgres(addr: int) -> None:
    assert fsm_logical_to_physical(addr) == pg_fsm_logical_to_physical(0, addr)


def _checkpoint(next_xid: int) -> CheckPoint:
    return replace(CheckPoint.initial(0), next_xid=next_xid)


@pytest.mark.parametrize(
    ("next_xid", "xid", "expected"),
    [
        (1024, 1000, 1024),  # not ahead: unchanged
        (1024, 1023, 1024),
        (1024, 1024, 2048),  # rounded up to a multiple of 1024
        (5 << 32 | 700, 0xFFFF_FFF0, 5 << 32 | 700),  # an older xid (wraparound-aware): unchanged
        (5 << 32 | 0xFFFF_FC00, 0xFFFF_FFFF, 6 << 32 | 1024),  # wraps: max(0, 3) rounds up to 1024
    ],
)
def test_update_next_xid(next_xid: int, xid: int, expected: int) -> None:
    ingest = WalIngest(None, _checkpoint(next_xid))  # type: ignore[arg-type]
    ingest._update_next_xid(xid)
    assert ingest.checkpoint.next_xid == expected
    assert ingest.checkpoint_modified == (expected != next_xid)


# --- compaction helpers ---------------------------------------------------------------------------
def test_partition_keyspace_packs_ranges_and_cuts_big_ones() -> None:
    ranges = [(k(0), k(3)), (k(10), k(12)), (k(20), k(45))]
    parts = partition_keyspace(ranges, 10)
    assert parts == [[(k(0), k(3)), (k(10), k(12))], [(k(20), k(30))], [(k(30), k(40))], [(k(40), k(45))]]
    assert partition_keyspace([], 10) == []


def test_leftover_l1_layers_of_an_interrupted_compaction_are_removed(tmp_path: Path) -> None:
    def write(ks: bytes, ke: bytes, lsns: tuple[int, int]) -> HistoricLayer:
        w = DeltaLayerWriter(tmp_path, TENANT, TIMELINE, ks, lsns)
        w.put(ks, lsns[0], True, b"v")
        p = w.finish(ke)
        name = DeltaLayerName.parse(p.name)
        return HistoricLayer.at(p, name, TENANT, TIMELINE)

    l0a = write(KEY_MIN, KEY_MAX, (0x100, 0x200))
    l0b = write(KEY_MIN, KEY_MAX, (0x200, 0x300))
    unfinished = write(k(5), k(9), (0x100, 0x300))  # both inputs still there
    finished = write(k(5), k(9), (0x300, 0x500))  # its inputs are gone: a real L1
    import structlog

    kept = _without_unrecorded_compactions([l0a, l0b, unfinished, finished], structlog.get_logger())
    assert kept == [l0a, l0b, finished]
    assert not unfinished.path.exists() and finished.path.exists()


async def test_a_record_failing_half_way_leaves_no_trace(tmp_path: Path) -> None:
    import struct

    from neon.pageserver.walingest import WalIngest
    from neon.postgres.errors import PayloadError
    from neon.postgres.walformat import encode_record

    tl = make_timeline(tmp_path)
    mod = DatadirModification(tl)
    mod.lsn = 0x100
    mod.init_empty()
    mod.put_checkpoint(CheckPoint.initial(0x100).pack())
    mod.commit()
    ingest = WalIngest.for_timeline(tl)
    # A NEXTOID record with a truncated payload, from a new transaction: its xid moves nextXid
    # forward before the payload fails to parse.
    bad = encode_record(xid=5000, prev=0, info=0x30, rmid=0, main_data=b"\x01\x02")
    with pytest.raises(PayloadError):
        await ingest.ingest_batch([(0x100, 0x108, bad)], mod)
    assert tl.last_record_lsn == 0x100 and not mod.pending
    assert ingest.checkpoint == CheckPoint.initial(0x100)  # the committed value again
    good = encode_record(xid=0, prev=0, info=0x30, rmid=0, main_data=struct.pack("<I", 24000))
    await ingest.ingest_batch([(0x100, 0x108, good)], mod)
    stored = CheckPoint.unpack(tl.get_checkpoint(0x108))
    assert stored.next_oid == 24000 and stored.next_xid == 1024  # xid 0 rounds up; nothing of xid 5000


def test_scratch_roots_of_dead_pageservers_are_removed(tmp_path: Path) -> None:
    """A SIGKILLed pageserver leaves its walredo/initdb scratch roots behind; the next one removes
    them (and only them) when it makes its own."""
    import subprocess
    import sys

    from neon.pageserver.tenant_manager import _traversable_dir

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    prefix = "neon-pageserver-walredo-"
    stale = tmp_path / f"{prefix}{dead.pid}-abc"
    live = tmp_path / f"{prefix}{os.getpid()}-def"
    foreign = tmp_path / f"{prefix}oldstyle"
    for d in (stale, live, foreign):
        d.mkdir()
    new = _traversable_dir(tmp_path, prefix)
    assert not stale.exists() and live.exists() and foreign.exists()
    assert new.name.startswith(f"{prefix}{os.getpid()}-") and new.stat().st_mode & 0o777 == 0o755
