"""Delta and image layer files: names, round trips, lookups, large values, deep indexes, corruption."""

from __future__ import annotations

import os
import random
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from neon.pageserver.layers import (
    BLOCK_SIZE,
    KEY_MAX,
    KEY_MIN,
    DeltaLayer,
    DeltaLayerName,
    DeltaLayerWriter,
    ImageLayer,
    ImageLayerName,
    ImageLayerWriter,
    LayerCorruptionError,
    LayerSummaryMismatchError,
    is_temp_file_name,
    key_from_hex,
    key_to_hex,
    parse_layer_file_name,
    try_parse_layer_file_name,
)
from neon.pageserver.layers import blob as blob_module
from neon.pageserver.layers import index as index_module
from neon.pageserver.layers.blockio import PAYLOAD_SIZE
from neon.utils.crashsafe import TEMP_SUFFIX
from neon.utils.id import TenantId, TimelineId
from neon.utils.lsn import Lsn

TENANT = TenantId("3aa8fcc61f6d357410b7de754b1d9001")
TIMELINE = TimelineId("de200bd42b49cc1814412c7e592dd6e9")
LSN_LO, LSN_HI = 0x1, 0x1_0000_0000

Entry = tuple[bytes, int, bool, bytes]  # key, lsn, will_init, value


def rel_key(i: int, rel: int = 16384) -> bytes:
    """A relation-block key: field1 0, spc 1663, db 5, rel, fork 0, block i."""
    return (
        bytes(1)
        + (1663).to_bytes(4, "big")
        + (5).to_bytes(4, "big")
        + rel.to_bytes(4, "big")
        + bytes(1)
        + i.to_bytes(4, "big")
    )


def page(seed: int) -> bytes:
    """An 8 KiB page-like value: header, a hole of zeros, repetitive tuples (compresses well)."""
    rng = random.Random(seed)
    head = rng.randbytes(24)
    tuples = b"".join(rng.randbytes(8) + b"tuple payload %06d " % j for j in range(120))
    return (head + bytes(8192 - 24 - len(tuples)) + tuples)[:8192]


def write_delta(
    directory: Path,
    entries: Iterable[Entry],
    key_start: bytes = KEY_MIN,
    key_end: bytes = KEY_MAX,
    lsn_range: tuple[int, int] = (LSN_LO, LSN_HI),
    **kw: int,
) -> Path:
    with DeltaLayerWriter(directory, TENANT, TIMELINE, key_start, lsn_range, **kw) as w:
        for key, lsn, will_init, value in entries:
            w.put(key, lsn, will_init, value)
        return w.finish(key_end)


def write_image(
    directory: Path,
    items: Iterable[tuple[bytes, bytes]],
    key_range: tuple[bytes, bytes] = (KEY_MIN, KEY_MAX),
    lsn: int = 0x5000,
) -> Path:
    with ImageLayerWriter(directory, TENANT, TIMELINE, key_range, lsn) as w:
        for key, value in items:
            w.put(key, value)
        return w.finish()


class Model:
    """The §5.4 semantics over plain lists: newest first, stop after the first will_init."""

    def __init__(self, entries: list[Entry]) -> None:
        self.by_key: dict[bytes, list[tuple[int, bool, bytes]]] = {}
        for key, lsn, will_init, value in sorted(entries, key=lambda e: (e[0], e[1])):
            self.by_key.setdefault(key, []).append((lsn, will_init, value))

    def get(self, key: bytes, floor: int, end: int) -> tuple[list[tuple[int, bool, bytes]], bool]:
        out = []
        for lsn, will_init, value in reversed(self.by_key.get(key, [])):
            if floor <= lsn < end:
                out.append((lsn, will_init, value))
                if will_init:
                    return out, True
        return out, False


def check_all_gets(layer: DeltaLayer, entries: list[Entry], queries: Iterable[tuple[bytes, int, int]]) -> None:
    model = Model(entries)
    for key, floor, end in queries:
        got = layer.get(key, floor, end)
        assert (got.entries, got.complete) == model.get(key, floor, end), (key.hex(), floor, end)


def only_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# ---------------------------------------------------------------------------------------------- names


def test_spec_example_names_round_trip() -> None:
    d = "000000000000000000000000000000000000-FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF__0000000001696070-00000000016960E9"
    i = "000000067F000032BE0000400000000020B6-000000067F000032BE0000400000000030B6__00000000578C6B29"
    dn, im = parse_layer_file_name(d), parse_layer_file_name(i)
    assert isinstance(dn, DeltaLayerName) and isinstance(im, ImageLayerName)
    assert str(dn) == d and str(im) == i
    assert dn.is_l0 and not im.is_l0
    assert dn.lsn_range == (Lsn("0/1696070"), Lsn("0/16960E9"))
    assert im.lsn == Lsn("0/578C6B29") and im.lsn_range == (Lsn("0/578C6B29"), Lsn("0/578C6B2A"))
    assert im.key_start == key_from_hex("000000067F000032BE0000400000000020B6")
    assert key_to_hex(im.key_end) == "000000067F000032BE0000400000000030B6"
    assert not DeltaLayerName(KEY_MIN, rel_key(5), 1, 2).is_l0


@given(
    st.binary(min_size=18, max_size=18),
    st.binary(min_size=18, max_size=18),
    st.integers(0, (1 << 64) - 1),
    st.integers(0, (1 << 64) - 1),
)
def test_name_round_trip(k1: bytes, k2: bytes, l1: int, l2: int) -> None:
    if k1 == k2 or l1 == l2:
        return
    ks, ke = sorted((k1, k2))
    ls, le = sorted((l1, l2))
    delta = DeltaLayerName(ks, ke, ls, le)
    assert parse_layer_file_name(str(delta)) == delta
    assert DeltaLayerName.parse(str(delta)) == delta
    if ls < (1 << 64) - 1:
        image = ImageLayerName(ks, ke, ls)
        assert parse_layer_file_name(str(image)) == image
        assert len(str(image)) == 36 + 1 + 36 + 2 + 16


def test_invalid_names_rejected() -> None:
    z, f = "0" * 36, "F" * 36
    good = f"{z}-{f}__{'0' * 15}1-{'0' * 15}2"
    assert try_parse_layer_file_name(good) is not None
    bad = [
        f"{f}-{z}__{'0' * 15}1-{'0' * 15}2",  # key start > end
        f"{z}-{z}__{'0' * 15}1-{'0' * 15}2",  # key start == end
        f"{z}-{f}__{'0' * 15}2-{'0' * 15}2",  # lsn start == end
        f"{z}-{f}__{'0' * 15}3-{'0' * 15}2",  # lsn start > end
        f"{z}-{z}__{'0' * 16}",  # empty image key range
        good.lower(),  # only the canonical upper-case spelling
        good[1:],
        good + "0",
        good + "-00000001",  # remote generation suffix is not a local file name
        "ephemeral-1",
        "metadata",
        "",
    ]
    for name in bad:
        assert try_parse_layer_file_name(name) is None, name
        with pytest.raises(ValueError):
            parse_layer_file_name(name)
    temp = f"{z}-XXX__{'0' * 15}1-{'0' * 15}2.aB3dE6gH{TEMP_SUFFIX}"
    assert is_temp_file_name(temp) and is_temp_file_name(good + ".x1y2z3w4" + TEMP_SUFFIX)
    assert not is_temp_file_name(good)
    with pytest.raises(ValueError, match="temporary"):
        parse_layer_file_name(good + ".x1y2z3w4" + TEMP_SUFFIX)
    assert try_parse_layer_file_name(temp) is None
    with pytest.raises(ValueError):
        DeltaLayerName(KEY_MIN, KEY_MAX, 5, 5)
    with pytest.raises(ValueError):
        ImageLayerName(KEY_MAX, KEY_MIN, 5)
    with pytest.raises(ValueError):
        DeltaLayerName(b"short", KEY_MAX, 1, 2)


# ---------------------------------------------------------------------------------------------- delta


def test_delta_lookup_boundaries(tmp_path: Path) -> None:
    a, b, c = rel_key(10), rel_key(20), rel_key(30)
    entries: list[Entry] = [
        (a, 0x100, True, page(1)),
        (a, 0x200, False, b"rec a 200"),
        (a, 0x300, False, b"rec a 300"),
        (b, 0x150, False, b"rec b 150 (no base: continues to older layers)"),
        (b, 0x250, False, b"rec b 250"),
        (c, 0x100, True, b"image-ish c 100"),
        (c, 0x180, True, b"init c 180"),
        (c, 0x400, False, b"rec c 400" * 40),
    ]
    path = write_delta(tmp_path, entries, key_start=a, key_end=rel_key(31), lsn_range=(0x100, 0x401))
    assert path.name == str(DeltaLayerName(a, rel_key(31), 0x100, 0x401))
    with DeltaLayer(path, tenant_id=TENANT, timeline_id=TIMELINE) as layer:
        assert layer.key_range == (a, rel_key(31)) and layer.lsn_range == (0x100, 0x401)
        assert not layer.is_l0 and layer.entry_count == len(entries)
        # will_init stops the search and completes it
        assert layer.get(a, 0, 0x401) == ([(0x300, False, b"rec a 300"), (0x200, False, b"rec a 200"),
                                           (0x100, True, page(1))], True)  # fmt: skip
        # lsn_end is exclusive
        assert layer.get(a, 0, 0x300) == ([(0x200, False, b"rec a 200"), (0x100, True, page(1))], True)
        assert layer.get(a, 0, 0x301).entries[0][0] == 0x300
        # the floor is inclusive; stopping at the floor means "continue in older layers"
        assert layer.get(a, 0x200, 0x401) == ([(0x300, False, b"rec a 300"), (0x200, False, b"rec a 200")], False)
        assert layer.get(a, 0x201, 0x401) == ([(0x300, False, b"rec a 300")], False)
        assert layer.get(a, 0x301, 0x401) == ([], False)
        assert layer.get(a, 0, 0x100) == ([], False)
        assert layer.get(a, 0x300, 0x300) == ([], False)
        # no will_init at all: continue
        b_entries = [(0x250, False, b"rec b 250"), (0x150, False, b"rec b 150 (no base: continues to older layers)")]
        assert layer.get(b, 0, 0x401) == (b_entries, False)
        # the newest will_init wins; older ones are not returned
        assert layer.get(c, 0, 0x401) == ([(0x400, False, b"rec c 400" * 40), (0x180, True, b"init c 180")], True)
        assert layer.get(c, 0, 0x180) == ([(0x100, True, b"image-ish c 100")], True)
        # absent keys: before the first, between, after the last, a neighbour of a present key
        for absent in (rel_key(0), rel_key(15), rel_key(25), rel_key(99), rel_key(10, rel=16385), KEY_MIN, KEY_MAX):
            assert layer.get(absent, 0, LSN_HI) == ([], False)
        assert list(layer.iter_entries()) == entries
        assert list(layer.iter_index()) == [(k, lsn, wi) for k, lsn, wi, _ in entries]
        layer.verify()
    with pytest.raises(ValueError):
        DeltaLayer(path).get(b"short", 0, 1)


def test_delta_history_spans_many_leaves(tmp_path: Path) -> None:
    """One key with 2000 versions: the backward scan crosses leaf boundaries."""
    k = rel_key(7)
    entries: list[Entry] = [(rel_key(6), 0x10, True, b"neighbour")]
    entries += [(k, 0x10 + i, i % 500 == 0, b"v%d" % i) for i in range(2000)]
    entries += [(rel_key(8), 0x10, True, b"neighbour")]
    path = write_delta(tmp_path, entries, lsn_range=(0x10, LSN_HI))
    with DeltaLayer(path) as layer:
        assert layer.index_depth == 2
        got = layer.get(k, 0, LSN_HI)
        assert got.complete and [e[0] for e in got.entries] == list(range(0x10 + 1999, 0x10 + 1499, -1))
        got = layer.get(k, 0x10 + 1700, LSN_HI)
        assert not got.complete and len(got.entries) == 300
        check_all_gets(
            layer, entries, [(k, f, e) for f in (0, 0x10, 0x300, 0x700) for e in (0x11, 0x400, 0x900, LSN_HI)]
        )


# Large incompressible values, generated cheaply (hypothesis-drawn 8 KiB binaries trip its health checks).
big_random_value = st.tuples(st.integers(0, 1 << 32), st.integers(8000, 9000)).map(
    lambda t: random.Random(t[0]).randbytes(t[1])
)
hypothesis_settings = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)

entry_strategy = st.tuples(
    st.integers(0, 12),  # key index
    st.integers(1, 60),  # lsn
    st.booleans(),
    st.one_of(
        st.binary(max_size=200),
        st.integers(0, 20_000).map(lambda n: b"z" * n),
        big_random_value,
    ),
)


@hypothesis_settings
@given(st.lists(entry_strategy, max_size=80), st.integers(0, 3))
def test_delta_matches_model(raw: list[tuple[int, int, bool, bytes]], zstd_level: int) -> None:
    by_pos = {(ki, lsn): (wi, v) for ki, lsn, wi, v in raw}
    entries = [(rel_key(ki * 3), lsn, wi, v) for (ki, lsn), (wi, v) in sorted(by_pos.items())]
    with tempfile.TemporaryDirectory() as tmp:
        path = write_delta(Path(tmp), entries, lsn_range=(1, 61), zstd_level=zstd_level)
        assert only_files(Path(tmp)) == [path.name]
        with DeltaLayer(path) as layer:
            assert list(layer.iter_entries()) == entries
            bounds = (0, 1, 2, 15, 30, 31, 45, 60, 61, 100)
            queries = [(rel_key(q), f, e) for q in range(40) for f in bounds for e in bounds if f < e][::3]
            check_all_gets(layer, entries, queries)
            layer.verify()


def test_empty_delta_layer(tmp_path: Path) -> None:
    path = write_delta(tmp_path, [], key_end=rel_key(1))
    with DeltaLayer(path) as layer:
        assert layer.entry_count == 0 and layer.index_depth == 1
        assert layer.get(rel_key(0), 0, LSN_HI) == ([], False)
        assert list(layer.iter_entries()) == []
        layer.verify()
        assert path.stat().st_size == 2 * BLOCK_SIZE  # summary + one empty leaf


def test_large_values_span_blocks(tmp_path: Path) -> None:
    rng = random.Random(5)
    values = [
        rng.randbytes(100_000),  # incompressible: stored raw across 13 blocks
        b"compressible " * 80_000,  # ~1 MB, zstd
        rng.randbytes(PAYLOAD_SIZE - 4),  # exactly fills a block's payload with its header
        rng.randbytes(PAYLOAD_SIZE - 3),
        rng.randbytes(PAYLOAD_SIZE + 1),
        b"",
        b"x",
        rng.randbytes(127),
        rng.randbytes(128),
        rng.randbytes(3 * PAYLOAD_SIZE),
    ]
    # interleave small values so that blobs start at many offsets, including a block's last bytes
    entries: list[Entry] = []
    lsn = 0x2000
    for i, v in enumerate(values * 3):
        for j in range(i % 7):
            entries.append((rel_key(i), lsn, j == 0, rng.randbytes(rng.randrange(1, 140))))
            lsn += 1
        entries.append((rel_key(i), lsn, False, v))
        lsn += 1
    path = write_delta(tmp_path, entries)
    with DeltaLayer(path, cache_blocks=2) as layer:
        assert list(layer.iter_entries()) == entries
        for key, lsn, will_init, value in entries:
            assert layer.get(key, lsn, lsn + 1).entries == [(lsn, will_init, value)]
        layer.verify()
        summary = layer.summary
        assert summary.stored_value_bytes < summary.raw_value_bytes  # the big compressible one shrank
    assert only_files(tmp_path) == [path.name]


def test_value_size_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(blob_module, "MAX_VALUE_SIZE", 1000)  # the real limit is 2**30 - 1
    with DeltaLayerWriter(tmp_path, TENANT, TIMELINE, KEY_MIN, (1, 2)) as w:
        w.put(KEY_MIN, 1, True, bytes(1000))
        with pytest.raises(ValueError, match="exceeds the layer limit"):
            w.put(rel_key(1), 1, True, bytes(1001))
    assert only_files(tmp_path) == []
    assert blob_module.LENGTH_MASK == (1 << 30) - 1


def test_compression_pays_on_pages(tmp_path: Path) -> None:
    entries = [(rel_key(i), 0x3000, True, page(i)) for i in range(200)]
    (tmp_path / "raw").mkdir()
    raw = write_delta(tmp_path / "raw", entries, zstd_level=0)
    packed = write_delta(tmp_path, entries, zstd_level=3)
    assert packed.stat().st_size * 3 < raw.stat().st_size
    with DeltaLayer(raw) as a, DeltaLayer(packed) as b:
        assert list(a.iter_entries()) == list(b.iter_entries()) == entries
        assert a.summary.stored_value_bytes == a.summary.raw_value_bytes


def test_deep_index_and_block_reads_per_get(tmp_path: Path) -> None:
    """100k entries: a 3-level index, and a single get reads O(depth) blocks, not O(n)."""
    n = 100_000
    rng = random.Random(1)
    entries = [(rel_key(i // 4, rel=16384 + i // 40_000), LSN_LO + i, i % 4 == 0, rng.randbytes(rng.randrange(10, 60)))
               for i in range(n)]  # fmt: skip
    path = write_delta(tmp_path, entries)
    with DeltaLayer(path, cache_blocks=0, cache_nodes=0) as layer:
        assert layer.entry_count == n
        assert layer.index_depth == 3 > 1
        for i in rng.sample(range(n), 300):
            key, lsn, _, value = entries[i]
            before = layer.block_stats.reads
            got = layer.get(key, 0, lsn + 1)
            reads = layer.block_stats.reads - before
            # root pinned: one read per lower index level (+1 if the history crosses into the previous
            # leaf), then one or two blocks per value returned (i % 4 + 1 values, up to the will_init)
            assert reads <= (layer.index_depth - 1) + 1 + 2 * (i % 4 + 1), reads
            if i % 4 == 0:
                assert reads <= (layer.index_depth - 1) + 2, reads
            assert got.complete and got.entries[0] == (lsn, i % 4 == 0, value)
        assert layer.get(rel_key(n), 0, LSN_HI) == ([], False)
    with DeltaLayer(path) as layer:
        sample = rng.sample(range(n), 2000)
        check_all_gets(layer, entries, [(entries[i][0], 0, LSN_HI) for i in sample])
        layer.block_stats.reads = 0
        key = entries[4000][0]
        for _ in range(100):
            layer.get(key, 0, LSN_HI)
        assert layer.block_stats.reads <= 4  # repeated lookups are served from the caches


def test_concurrent_readers(tmp_path: Path) -> None:
    entries = [(rel_key(i), 0x100 + i, True, page(i) if i % 10 == 0 else b"v%d" % i) for i in range(3000)]
    path = write_delta(tmp_path, entries)
    errors: list[BaseException] = []
    with DeltaLayer(path, cache_blocks=4, cache_nodes=2) as layer:

        def run(seed: int) -> None:
            rng = random.Random(seed)
            try:
                for _ in range(1500):
                    k, lsn, wi, v = entries[rng.randrange(len(entries))]
                    assert layer.get(k, 0, LSN_HI) == ([(lsn, wi, v)], True)
            except BaseException as e:  # pragma: no cover - reported below
                errors.append(e)

        threads = [threading.Thread(target=run, args=(s,)) for s in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors


# ---------------------------------------------------------------------------------------------- image


def test_image_layer_round_trip(tmp_path: Path) -> None:
    items = [(rel_key(i), page(i) if i % 3 else b"small %d" % i) for i in range(0, 3000, 2)]
    key_range = (rel_key(0), rel_key(6000))
    path = write_image(tmp_path, items, key_range, lsn=0x578C6B29)
    assert path.name == str(ImageLayerName(*key_range, 0x578C6B29))
    with ImageLayer(path, tenant_id=TENANT, timeline_id=TIMELINE) as layer:
        assert layer.key_range == key_range and layer.lsn == 0x578C6B29
        assert layer.lsn_range == (0x578C6B29, 0x578C6B2A)
        assert layer.entry_count == len(items) and layer.index_depth == 2
        for key, value in items:
            assert layer.get(key) == value
        for absent in (rel_key(1), rel_key(2999), rel_key(5000), KEY_MIN, KEY_MAX, rel_key(2, rel=1)):
            assert layer.get(absent) is None
        assert list(layer.iter_entries()) == items
        assert list(layer.iter_keys()) == [k for k, _ in items]
        layer.verify()


@hypothesis_settings
@given(
    st.dictionaries(
        st.binary(min_size=18, max_size=18), st.one_of(st.binary(max_size=300), big_random_value), max_size=60
    )
)
def test_image_matches_model(items: dict[bytes, bytes]) -> None:
    items.pop(KEY_MAX, None)
    ordered = sorted(items.items())
    with tempfile.TemporaryDirectory() as tmp:
        path = write_image(Path(tmp), ordered)
        with ImageLayer(path) as layer:
            assert list(layer.iter_entries()) == ordered
            for key, value in ordered:
                assert layer.get(key) == value
                probe = (int.from_bytes(key, "big") ^ 1).to_bytes(18, "big")
                assert layer.get(probe) == items.get(probe)


def test_image_writer_validation(tmp_path: Path) -> None:
    w = ImageLayerWriter(tmp_path, TENANT, TIMELINE, (rel_key(10), rel_key(20)), 0x100)
    w.put(rel_key(10), b"a")
    with pytest.raises(ValueError, match="increasing"):
        w.put(rel_key(10), b"again")
    with pytest.raises(ValueError, match="range"):
        w.put(rel_key(20), b"past the end")
    with pytest.raises(ValueError):
        w.put(b"short", b"")
    w.abort()
    assert only_files(tmp_path) == []
    with pytest.raises(ValueError):
        ImageLayerWriter(tmp_path, TENANT, TIMELINE, (rel_key(20), rel_key(10)), 0x100)
    with pytest.raises(ValueError):
        ImageLayer(tmp_path / str(DeltaLayerName(KEY_MIN, KEY_MAX, 1, 2)))


# ---------------------------------------------------------------------------------------------- writing


def test_delta_writer_validation_and_no_temp_files(tmp_path: Path) -> None:
    w = DeltaLayerWriter(tmp_path, TENANT, TIMELINE, rel_key(5), (0x100, 0x200))
    [temp] = only_files(tmp_path)
    assert is_temp_file_name(temp) and temp.startswith(key_to_hex(rel_key(5)) + "-XXX__")
    w.put(rel_key(5), 0x100, True, b"a")
    w.put(rel_key(5), 0x180, False, b"b")
    for bad in [
        (rel_key(5), 0x180, False, b"duplicate"),
        (rel_key(5), 0x17F, False, b"older lsn"),
        (rel_key(4), 0x1FF, True, b"smaller key"),
        (rel_key(6), 0x200, True, b"lsn end is exclusive"),
        (rel_key(6), 0x0FF, True, b"below lsn start"),
        (b"short", 0x150, True, b""),
    ]:
        with pytest.raises(ValueError):
            w.put(*bad)
    w.put(rel_key(6), 0x100, True, b"c")
    with pytest.raises(ValueError, match="key end"):
        w.finish(rel_key(6))  # must be above the last key; the unfinished file is discarded
    assert only_files(tmp_path) == []
    with pytest.raises(ValueError, match="finished or aborted"):
        w.put(rel_key(7), 0x100, True, b"")

    path = write_delta(tmp_path, [(rel_key(5), 0x100, True, b"a")], key_start=rel_key(5), key_end=rel_key(6),
                       lsn_range=(0x100, 0x200))  # fmt: skip
    assert only_files(tmp_path) == [path.name]
    with pytest.raises(FileExistsError):  # layer files are immutable
        write_delta(tmp_path, [], key_start=rel_key(5), key_end=rel_key(6), lsn_range=(0x100, 0x200))
    assert only_files(tmp_path) == [path.name]

    with pytest.raises(RuntimeError), DeltaLayerWriter(tmp_path, TENANT, TIMELINE, KEY_MIN, (1, 2)) as w2:
        w2.put(KEY_MIN, 1, True, b"x" * 5000)
        raise RuntimeError("writer interrupted")
    assert only_files(tmp_path) == [path.name]
    with pytest.raises(ValueError):
        DeltaLayerWriter(tmp_path, TENANT, TIMELINE, KEY_MIN, (5, 5))


def test_index_spilled_to_disk_leaves_no_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(index_module, "_SPOOL_IN_MEMORY", 1)  # the leaf spool goes to an anonymous file
    entries = [(rel_key(i), 0x100, True, b"v") for i in range(2000)]
    with DeltaLayerWriter(tmp_path, TENANT, TIMELINE, KEY_MIN, (0x100, 0x101)) as w:
        for e in entries:
            w.put(*e)
        assert len(only_files(tmp_path)) == 1
        path = w.finish(KEY_MAX)
    assert only_files(tmp_path) == [path.name]
    with DeltaLayer(path) as layer:
        assert list(layer.iter_entries()) == entries


def test_write_is_durable_and_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The final name appears only after the file was fsynced, and the directory is fsynced after it."""
    events: list[str] = []
    real_fsync, real_rename = os.fsync, os.rename
    import neon.pageserver.layers.layer_file as layer_file

    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "rename", lambda a, b: (events.append("rename"), real_rename(a, b))[1])
    monkeypatch.setattr(layer_file, "fsync_path", lambda p: events.append(f"fsync_dir:{Path(p).name}"))
    write_image(tmp_path, [(rel_key(1), b"x")])
    assert events == ["fsync", "rename", f"fsync_dir:{tmp_path.name}"]


# ---------------------------------------------------------------------------------------------- damage


def _corruption_fixture(directory: Path) -> tuple[Path, list[Entry]]:
    rng = random.Random(9)
    entries: list[Entry] = []
    for i in range(400):
        k = rel_key(i)
        entries.append((k, 0x100, True, page(i) if i % 8 == 0 else rng.randbytes(rng.randrange(1, 300))))
        entries.append((k, 0x200 + i, False, rng.randbytes(rng.randrange(1, 60))))
    entries[101] = (entries[101][0], entries[101][1], False, rng.randbytes(30_000))  # spans blocks
    return write_delta(directory, entries), entries


def test_flipped_byte_anywhere_is_detected(tmp_path: Path) -> None:
    path, entries = _corruption_fixture(tmp_path)
    size = path.stat().st_size
    with DeltaLayer(path) as layer:
        s = layer.summary
        assert layer.index_depth == 2 and s.index_start_blk > 5
    nblocks = size // BLOCK_SIZE
    positions = {0, 1, 4, 100, 153, 4000, PAYLOAD_SIZE - 1, PAYLOAD_SIZE, BLOCK_SIZE - 1, size - 1}
    rng = random.Random(3)
    for blk in range(nblocks):
        base = blk * BLOCK_SIZE
        positions |= {base, base + 3, base + rng.randrange(PAYLOAD_SIZE), base + PAYLOAD_SIZE + rng.randrange(4)}
    keys = sorted({e[0] for e in entries})
    model = Model(entries)
    original = path.read_bytes()
    assert len(positions) > 4 * nblocks
    for pos in sorted(positions):
        damaged = bytearray(original)
        damaged[pos] ^= 1 << (pos % 8)
        path.write_bytes(damaged)
        try:
            layer = DeltaLayer(path, cache_blocks=4, cache_nodes=2)
        except LayerCorruptionError as e:
            assert str(path) in str(e) and e.path == path
            continue
        with layer:
            # never a wrong value: each get returns the truth or raises
            for key in keys:
                try:
                    got = layer.get(key, 0, LSN_HI)
                except LayerCorruptionError as e:
                    assert str(path) in str(e) and e.block is not None
                    continue
                assert (got.entries, got.complete) == model.get(key, 0, LSN_HI), pos
            with pytest.raises(LayerCorruptionError, match=str(path)):
                layer.verify()
            # the sequential scan (compaction's path) detects it too
            scan = layer.iter_entries if pos < s.index_start_blk * BLOCK_SIZE else layer.iter_index
            with pytest.raises(LayerCorruptionError):
                list(scan())
    path.write_bytes(original)
    with DeltaLayer(path) as layer:
        layer.verify()


def test_flipped_byte_in_image_layer(tmp_path: Path) -> None:
    items = [(rel_key(i), page(i)) for i in range(300)]
    path = write_image(tmp_path, items)
    original = path.read_bytes()
    for pos in range(5, len(original), 997):
        damaged = bytearray(original)
        damaged[pos] ^= 0x80
        path.write_bytes(damaged)
        try:
            with ImageLayer(path) as layer:
                for key, value in items:
                    try:
                        assert layer.get(key) == value
                    except LayerCorruptionError as e:
                        assert e.path == path
                with pytest.raises(LayerCorruptionError):
                    layer.verify()
        except LayerCorruptionError as e:
            assert str(path) in str(e)


def test_truncated_or_extended_file(tmp_path: Path) -> None:
    path, _ = _corruption_fixture(tmp_path)
    original = path.read_bytes()
    for size, pattern in [
        (0, "shorter than its 8192-byte summary"),
        (100, "shorter than its 8192-byte summary"),
        (BLOCK_SIZE, "truncated"),
        (len(original) - BLOCK_SIZE, "truncated"),
        (len(original) - 1, "truncated"),
        (len(original) + 1, "trailing bytes"),
    ]:
        path.write_bytes(original[:size] if size <= len(original) else original + b"\0")
        with pytest.raises(LayerCorruptionError, match=pattern) as info:
            DeltaLayer(path)
        assert info.value.path == path and str(path) in str(info.value)


def test_truncated_while_open(tmp_path: Path) -> None:
    path, entries = _corruption_fixture(tmp_path)
    with DeltaLayer(path, cache_blocks=0, cache_nodes=0) as layer:
        os.truncate(path, 4 * BLOCK_SIZE)
        with pytest.raises(LayerCorruptionError, match="short read"):
            for key, _, _, _ in entries:
                layer.get(key, 0, LSN_HI)


def test_summary_must_match_name(tmp_path: Path) -> None:
    path = write_delta(tmp_path, [(rel_key(1), 0x100, True, b"a")], key_end=rel_key(2), lsn_range=(0x100, 0x200))
    for other in [
        DeltaLayerName(KEY_MIN, rel_key(3), 0x100, 0x200),
        DeltaLayerName(KEY_MIN, rel_key(2), 0x100, 0x201),
        DeltaLayerName(rel_key(1), rel_key(2), 0x100, 0x200),
    ]:
        moved = path.rename(tmp_path / str(other))
        with pytest.raises(LayerSummaryMismatchError, match="summary does not match") as info:
            DeltaLayer(moved)
        assert info.value.path == moved
        path = moved.rename(path)
    image = path.rename(tmp_path / str(ImageLayerName(KEY_MIN, rel_key(2), 0x100)))
    with pytest.raises(LayerSummaryMismatchError, match="delta layer"):
        ImageLayer(image)
    path = image.rename(path)
    with pytest.raises(LayerSummaryMismatchError, match="tenant"):
        DeltaLayer(path, tenant_id=TenantId.generate())
    with pytest.raises(LayerSummaryMismatchError, match="timeline"):
        DeltaLayer(path, timeline_id=TimelineId.generate())
    with pytest.raises(ValueError, match="not a layer file name"):
        DeltaLayer(path.rename(tmp_path / "not-a-layer"))


def test_block_from_another_layer_is_detected(tmp_path: Path) -> None:
    """Same block number, valid checksum for its own file: the per-file salt rejects it elsewhere."""
    a = write_delta(tmp_path, [(rel_key(i), 0x100, True, b"A" * 200) for i in range(100)], lsn_range=(0x100, 0x200))
    b = write_delta(tmp_path, [(rel_key(i), 0x300, True, b"B" * 200) for i in range(100)], lsn_range=(0x300, 0x400))
    data_a, data_b = bytearray(a.read_bytes()), b.read_bytes()
    data_a[BLOCK_SIZE : 2 * BLOCK_SIZE] = data_b[BLOCK_SIZE : 2 * BLOCK_SIZE]
    a.write_bytes(data_a)
    with DeltaLayer(a) as layer, pytest.raises(LayerCorruptionError, match="block 1: checksum mismatch"):
        layer.get(rel_key(0), 0, LSN_HI)


@pytest.mark.parametrize("native", [True, False], ids=["C loop", "Python loop"])
def test_put_versions_writes_the_same_bytes_as_put(
    tmp_path: Path, native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    import random

    from neon.pageserver.layers import DeltaLayerWriter, layer_file

    if native and layer_file._encode_versions is None:
        pytest.skip("neon._ingestfast is not built")
    if not native:
        monkeypatch.setattr(layer_file, "_encode_versions", None)

    rng = random.Random(7)
    entries = {}
    for k in range(300):
        key = k.to_bytes(18, "big")
        lsns = sorted(rng.sample(range(0x1000, 0x100000, 8), rng.randint(1, 12)))
        sizes = (0, 5, 127, 128, 300, 511, 512, 2000, 8192)
        entries[key] = [(lsn, rng.random() < 0.3, rng.randbytes(rng.choice(sizes))) for lsn in lsns]
    # Then values that move the write position a byte at a time, so that every way a blob can meet
    # a block's end (1, 2, 3 or 4 bytes of room left for its header) happens many times.
    for k in range(300, 303):
        key = k.to_bytes(18, "big")
        small = (b"", b"x", b"xy", b"xyz")
        entries[key] = [
            (0x1000 + 8 * i, False, rng.choice(small) if i % 9 else rng.randbytes(130)) for i in range(20000)
        ]
    paths = []
    for how in ("put", "put_versions"):
        d = tmp_path / how
        d.mkdir()
        w = DeltaLayerWriter(d, TENANT, TIMELINE, bytes(18), (0x1000, 0x100000))
        for key, versions in entries.items():
            if how == "put":
                for lsn, init, value in versions:
                    w.put(key, lsn, init, value)
            else:
                w.put_versions(key, versions)
        paths.append(w.finish(b"\xff" * 18))
    assert paths[0].name == paths[1].name
    assert paths[0].read_bytes() == paths[1].read_bytes()
