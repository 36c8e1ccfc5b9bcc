"""Real WAL record chains for the walredo benchmark, taken from a stock PG15 cluster's WAL.

A table with a btree index gets single-row INSERTs, one statement (and transaction) each, so
heap block 0 is created by an INSERT+INIT record and then receives one INSERT record per row
that fits, and the index's first leaf is created by NEWROOT and then gets one INSERT_LEAF per
row. The WAL is decoded and, per block, the records from the last one that initialises it
(WILL_INIT or a full-page image to apply) to the end make its chain.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from neon.postgres.errors import WalDecodeError
from neon.postgres.walfiles import read_wal_files
from neon.postgres.walrecord import decode_record
from neon.walredo.records import BufferTag, PostgresRecord
from tests.fixtures.vanilla import VanillaPostgres

RM_HEAP_ID = 10
RM_BTREE_ID = 11


@dataclass
class Chain:
    """The records that rebuild one block, the first of them initialising it."""

    name: str  # the relation's name in the workload
    tag: BufferTag
    records: list[tuple[int, PostgresRecord]] = field(default_factory=list)  # (end LSN, record)
    rmids: set[int] = field(default_factory=set)

    @property
    def nbytes(self) -> int:
        return sum(len(r.rec) for _, r in self.records)


def run_insert_workload(pg: VanillaPostgres, rows: int) -> dict[str, tuple[int, int, int]]:
    """Create `t` and its index, insert `rows` rows one statement at a time; (spc, db, rel) per name."""
    pg.safe_psql("CREATE TABLE t (id int, v text) WITH (autovacuum_enabled = off); CREATE INDEX t_id ON t (id)")
    with pg.connect() as conn, conn.cursor() as cur:
        for i in range(rows):
            cur.execute("INSERT INTO t VALUES (%s, %s)", (i, f"r{i}"))
    db_oid = pg.safe_psql("SELECT oid FROM pg_database WHERE datname = current_database()")[0][0]
    rels = {}
    for name in ("t", "t_id"):
        filenode = pg.safe_psql(f"SELECT pg_relation_filenode('{name}')")[0][0]
        rels[name] = (1663, db_oid, filenode)
    return rels


def collect_chains(pg: VanillaPostgres, rels: dict[str, tuple[int, int, int]]) -> list[Chain]:
    """The chain of every main-fork block of `rels` in the cluster's WAL, longest first."""
    names = {rel: name for name, rel in rels.items()}
    chains: dict[BufferTag, Chain] = {}
    try:
        for _start, end, raw in read_wal_files(pg.wal_segments()):
            rec = decode_record(raw, end)
            for blk in rec.blocks:
                if blk.forknum != 0 or blk.rel not in names:
                    continue
                tag = BufferTag(*blk.rel, 0, blk.blkno)
                inits = blk.will_init or blk.apply_image
                if inits:
                    chains[tag] = Chain(names[blk.rel], tag)
                elif tag not in chains:
                    continue  # no initialising record seen yet (cannot happen for new relations)
                chain = chains[tag]
                chain.records.append((end, PostgresRecord(inits, raw)))
                chain.rmids.add(rec.rmid)
    except WalDecodeError:
        pass  # the end of the valid WAL
    return sorted(chains.values(), key=lambda c: len(c.records), reverse=True)
