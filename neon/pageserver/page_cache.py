"""The materialized page cache (spec pageserver §5.8): reconstructed pages by (timeline, key, LSN).

One instance is shared by every tenant of a pageserver. A lookup returns the newest cached
version at or below the requested LSN, which a read then uses as its base image (so a page
read again at a later LSN only replays the records after the cached version). Replacement is
LRU over (timeline, key) entries, each holding a few versions.
"""

from __future__ import annotations

from collections import OrderedDict

from neon.postgres.constants import BLCKSZ

DEFAULT_PAGE_CACHE_SIZE = 8192  # pages (64 MiB), Neon's page_cache_size
VERSIONS_PER_KEY = 4


class MaterializedPageCache:
    def __init__(self, capacity: int = DEFAULT_PAGE_CACHE_SIZE) -> None:
        if capacity < 0:
            raise ValueError("page cache capacity must be ≥ 0")
        self.capacity = capacity
        self._entries: OrderedDict[tuple[bytes, bytes], list[tuple[int, bytes]]] = OrderedDict()
        self._pages = 0
        self.hits = 0
        self.misses = 0

    def lookup(self, timeline_id: bytes, key: bytes, lsn: int) -> tuple[int, bytes] | None:
        """(cached LSN, page) of the newest version with LSN ≤ `lsn`."""
        versions = self._entries.get((timeline_id, key))
        if versions is not None:
            for i in range(len(versions) - 1, -1, -1):
                if versions[i][0] <= lsn:
                    self._entries.move_to_end((timeline_id, key))
                    self.hits += 1
                    return versions[i]
        self.misses += 1
        return None

    def memorize(self, timeline_id: bytes, key: bytes, lsn: int, page: bytes) -> None:
        if len(page) != BLCKSZ or self.capacity == 0:
            return  # only whole pages (a CLOG value with its trailer is not one)
        entry = (timeline_id, key)
        versions = self._entries.get(entry)
        if versions is None:
            self._entries[entry] = [(lsn, page)]
        else:
            self._entries.move_to_end(entry)
            for i, (v_lsn, _) in enumerate(versions):
                if v_lsn == lsn:
                    versions[i] = (lsn, page)
                    return
            versions.append((lsn, page))
            versions.sort(key=lambda v: v[0])
            if len(versions) > VERSIONS_PER_KEY:
                del versions[0]
                self._pages -= 1
        self._pages += 1
        while self._pages > self.capacity and self._entries:
            _, evicted = self._entries.popitem(last=False)
            self._pages -= len(evicted)

    def forget_timeline(self, timeline_id: bytes) -> None:
        for entry in [e for e in self._entries if e[0] == timeline_id]:
            self._pages -= len(self._entries.pop(entry))

    def __len__(self) -> int:
        return self._pages
