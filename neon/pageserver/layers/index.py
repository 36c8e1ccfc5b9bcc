"""The index of a layer file: a bulk-built, read-only B-tree of fixed-size keys → u64 values.

Node = one block payload: ``level u8`` (0 = leaf), ``reserved u8 = 0``, ``count u16``, then the
`count` keys back to back, then `count` big-endian u64 values.  Keys are strictly increasing.
Leaf values are blob references; an internal node's key i is the first key of its child i and its
value i is that child's block number relative to the index start.  All leaves come first, in key
order (leaf n is relative block n), then each upper level, the root last.
"""

from __future__ import annotations

import struct
import tempfile
from bisect import bisect_right
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

from .blockio import PAYLOAD_SIZE, BlockReader, LruCache

NODE_HEADER_SIZE = 4
VALUE_SIZE = 8
_SPOOL_IN_MEMORY = 16 << 20
_HEADER = struct.Struct(">BBH")

Node = tuple[int, list[bytes], tuple[int, ...]]  # (level, keys, values)


def node_capacity(key_size: int) -> int:
    return (PAYLOAD_SIZE - NODE_HEADER_SIZE) // (key_size + VALUE_SIZE)


def encode_node(level: int, keys: bytes | bytearray, values: list[int], key_size: int) -> bytes:
    count = len(values)
    body = _HEADER.pack(level, 0, count) + bytes(keys) + struct.pack(f">{count}Q", *values)
    return body + bytes(PAYLOAD_SIZE - len(body))


@dataclass(frozen=True)
class IndexLayout:
    blocks: int
    leaf_count: int
    root: int
    depth: int


class IndexBuilder:
    """Collects (key, value) in increasing key order; leaves go to an anonymous spool file."""

    def __init__(self, key_size: int, spool_dir: str | Path | None = None) -> None:
        self.key_size = key_size
        self.capacity = node_capacity(key_size)
        self.entry_count = 0
        self._keys = bytearray()
        self._values: list[int] = []
        self._first_keys: list[bytes] = []
        # Leaves wait here until the value stream's end (hence the index start) is known.
        self._spool = tempfile.SpooledTemporaryFile(max_size=_SPOOL_IN_MEMORY, dir=spool_dir)  # noqa: SIM115

    def add(self, key: bytes, value: int) -> None:
        """Append an entry; the caller guarantees keys are strictly increasing and sized."""
        if not self._values:
            self._first_keys.append(key)
        self._keys += key
        self._values.append(value)
        self.entry_count += 1
        if len(self._values) == self.capacity:
            self._flush_leaf()

    def add_many(self, keys: list[bytes], values: list[int]) -> None:
        """`add` for many entries (same guarantees), a leaf's worth at a time."""
        i = 0
        n = len(keys)
        while i < n:
            room = self.capacity - len(self._values)
            if not self._values:
                self._first_keys.append(keys[i])
            j = min(n, i + room)
            self._keys += b"".join(keys[i:j])
            self._values.extend(values[i:j])
            self.entry_count += j - i
            i = j
            if len(self._values) == self.capacity:
                self._flush_leaf()

    def _flush_leaf(self) -> None:
        self._spool.write(encode_node(0, self._keys, self._values, self.key_size))
        self._keys = bytearray()
        self._values = []

    def finish(self, sink: Callable[[bytes], None]) -> IndexLayout:
        """Pass every index block payload, in order, to `sink` and return the layout."""
        if self._values or not self._first_keys:
            if not self._first_keys:
                self._first_keys.append(b"")
            self._flush_leaf()
        leaf_count = len(self._first_keys)
        self._spool.seek(0)
        chunk = PAYLOAD_SIZE * 128
        while data := self._spool.read(chunk):
            sink(data)
        self._spool.close()
        # Upper levels, bottom-up: level n+1 holds (first key, relative block) of each level-n node.
        level, blocks = 0, leaf_count
        firsts, first_rel = self._first_keys, 0
        while len(firsts) > 1:
            level += 1
            next_firsts: list[bytes] = []
            next_rel = blocks
            for i in range(0, len(firsts), self.capacity):
                group = firsts[i : i + self.capacity]
                children = list(range(first_rel + i, first_rel + i + len(group)))
                sink(encode_node(level, b"".join(group), children, self.key_size))
                next_firsts.append(group[0])
                blocks += 1
            firsts, first_rel = next_firsts, next_rel
        self._first_keys = []
        return IndexLayout(blocks=blocks, leaf_count=leaf_count, root=blocks - 1, depth=level + 1)

    def close(self) -> None:
        self._spool.close()


class Leaf:
    """A verified leaf block, searched in place; a leaf found hot in the cache gets its keys decoded
    once, so that later searches are a C bisect (decoding every leaf read would cost more than the read)."""

    __slots__ = ("count", "hits", "key_size", "keys", "payload", "values_at")

    def __init__(self, payload: bytes, count: int, key_size: int) -> None:
        self.payload = payload
        self.count = count
        self.key_size = key_size
        self.values_at = NODE_HEADER_SIZE + count * key_size
        self.keys: list[bytes] | None = None
        self.hits = 0

    def key(self, i: int) -> bytes:
        o = NODE_HEADER_SIZE + i * self.key_size
        return self.payload[o : o + self.key_size]

    def value(self, i: int) -> int:
        o = self.values_at + i * VALUE_SIZE
        return int.from_bytes(self.payload[o : o + VALUE_SIZE], "big")

    def decode_keys(self) -> None:
        ks, end = self.key_size, self.values_at
        self.keys = [self.payload[i : i + ks] for i in range(NODE_HEADER_SIZE, end, ks)]

    def find_le(self, key: bytes) -> int:
        """Position of the last entry ≤ `key`, or -1."""
        if self.keys is not None:
            return bisect_right(self.keys, key) - 1
        p, ks = self.payload, self.key_size
        lo, hi = 0, self.count
        while lo < hi:
            mid = (lo + hi) >> 1
            o = NODE_HEADER_SIZE + mid * ks
            if key < p[o : o + ks]:
                hi = mid
            else:
                lo = mid + 1
        return lo - 1


_PROMOTE_AFTER_HITS = 4


class IndexReader:
    """Searches the index of an open layer file: pins the root, caches internal nodes and leaves."""

    def __init__(self, blocks: BlockReader, start_blk: int, layout: IndexLayout, key_size: int, cache_nodes: int = 64):
        self._blocks = blocks
        self._start = start_blk
        self.layout = layout
        self.key_size = key_size
        self._capacity = node_capacity(key_size)
        self._internal_cache: LruCache[int, Node] = LruCache(cache_nodes)
        self._leaf_cache: LruCache[int, Leaf] = LruCache(cache_nodes)
        if layout.depth == 1:
            self._root_leaf: Leaf | None = self._read_leaf(layout.root)
            self._root_leaf.decode_keys()
            self.root: Node | None = None
        else:
            self._root_leaf = None
            self.root = self._decode(layout.root, layout.depth - 1)

    def _read(self, rel: int, expected_level: int) -> tuple[bytes, int]:
        blkno = self._start + rel
        payload = self._blocks.read_block(blkno, cache=False)
        level, reserved, count = _HEADER.unpack_from(payload)
        if level != expected_level or reserved != 0 or count > self._capacity:
            raise self._blocks.corruption(
                blkno, f"bad index node header (level {level}, expected {expected_level}; {count} entries)"
            )
        if count == 0 and not (level == 0 and self.layout.leaf_count == 1):
            raise self._blocks.corruption(blkno, "empty index node")
        return payload, count

    def _read_leaf(self, rel: int) -> Leaf:
        payload, count = self._read(rel, 0)
        return Leaf(payload, count, self.key_size)

    def _decode(self, rel: int, expected_level: int) -> Node:
        """A node decoded into lists (internal nodes, scans and checks)."""
        payload, count = self._read(rel, expected_level)
        ks = self.key_size
        end = NODE_HEADER_SIZE + count * ks
        keys = [payload[i : i + ks] for i in range(NODE_HEADER_SIZE, end, ks)]
        values = struct.unpack_from(f">{count}Q", payload, end)
        if expected_level > 0:
            lo, hi = (0, self.layout.leaf_count) if expected_level == 1 else (self.layout.leaf_count, rel)
            if min(values) < lo or max(values) >= hi:
                raise self._blocks.corruption(self._start + rel, "index node points outside its child level")
        return (expected_level, keys, values)

    def _internal(self, rel: int, level: int) -> Node:
        node = self._internal_cache.get(rel)
        if node is None:
            node = self._decode(rel, level)
            self._internal_cache.put(rel, node)
        elif node[0] != level:
            raise self._blocks.corruption(self._start + rel, f"index node level {node[0]}, expected {level}")
        return node

    def leaf(self, rel: int) -> Leaf:
        if self._root_leaf is not None and rel == self.layout.root:
            return self._root_leaf
        if not 0 <= rel < self.layout.leaf_count:
            raise self._blocks.corruption(self._start + rel, f"no index leaf {rel}")
        leaf = self._leaf_cache.get(rel)
        if leaf is None:
            leaf = self._read_leaf(rel)
            self._leaf_cache.put(rel, leaf)
        elif leaf.keys is None:
            leaf.hits += 1
            if leaf.hits >= _PROMOTE_AFTER_HITS:
                leaf.decode_keys()
        return leaf

    def find_le(self, key: bytes) -> tuple[int, int, Leaf] | None:
        """(leaf number, position, leaf) of the last entry whose key ≤ `key`, or None if there is none."""
        leaf = self._root_leaf
        rel = self.layout.root
        if leaf is None:
            assert self.root is not None
            level, keys, values = self.root
            while True:
                i = bisect_right(keys, key) - 1
                if i < 0:
                    return None
                rel = values[i]
                if level == 1:
                    break
                level, keys, values = self._internal(rel, level - 1)
            leaf = self.leaf(rel)
        pos = leaf.find_le(key)
        if pos < 0:
            return None
        return rel, pos, leaf

    def iter_entries(self) -> Iterator[tuple[bytes, int]]:
        """Every (key, value) in key order, leaf by leaf (leaves bypass the caches)."""
        for rel in range(self.layout.leaf_count):
            _, keys, values = self._decode(rel, 0)
            yield from zip(keys, values, strict=True)

    def check_tree(self, entry_count: int) -> None:
        """Walk every node from the root: levels, key order, downlinks = children's first keys, counts."""
        leaves: list[int] = []
        total = 0
        last_key = b""

        def walk(rel: int, level: int, lower: bytes | None) -> None:
            nonlocal total
            node_level, keys, values = self._decode(rel, level)
            blkno = self._start + rel
            if any(a >= b for a, b in pairwise(keys)):
                raise self._blocks.corruption(blkno, "index node keys are not strictly increasing")
            if lower is not None and (not keys or keys[0] != lower):
                raise self._blocks.corruption(blkno, "index node's first key differs from its parent's downlink")
            if node_level == 0:
                nonlocal last_key
                if keys and keys[0] <= last_key:
                    raise self._blocks.corruption(blkno, "index leaf keys overlap the previous leaf")
                leaves.append(rel)
                total += len(keys)
                last_key = keys[-1] if keys else last_key
                return
            for key, child in zip(keys, values, strict=True):
                walk(child, level - 1, key)

        walk(self.layout.root, self.layout.depth - 1, None)
        if leaves != list(range(self.layout.leaf_count)):
            raise self._blocks.corruption(self._start, "index leaves are not reached in order")
        if total != entry_count:
            raise self._blocks.corruption(self._start, f"index holds {total} entries, summary says {entry_count}")
