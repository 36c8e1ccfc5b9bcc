"""Builds the cffi extension `neon._walnative` from native/*.c (run by `make setup`).

Rebuilt only when the C source or this file changes; the import falls back to pure Python
when the module is absent.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
import tempfile
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
PKG = HERE.parent / "neon"
SOURCES = [HERE / "walscan.c"]

CDEF = """
typedef struct {
    uint64_t pos;
    uint64_t prev;
    uint32_t off;
    uint32_t page_room;
    uint32_t tli;
    uint32_t prev_known;
} wal_scan_state;
int wal_scan(const uint8_t *buf, uint32_t len, uint32_t seg_size, wal_scan_state *st, uint64_t *out, int max_out);
uint32_t wal_crc32c(const uint8_t *p, size_t n);
"""


def main() -> None:
    digest = hashlib.sha256(CDEF.encode() + b"".join(p.read_bytes() for p in SOURCES) + Path(__file__).read_bytes())
    stamp = PKG / ".walnative.stamp"
    built = list(PKG.glob("_walnative*.so"))
    if built and stamp.exists() and stamp.read_text() == digest.hexdigest():
        return
    ffi = FFI()
    ffi.cdef(CDEF)
    ffi.set_source(
        "_walnative",
        "\n".join(p.read_text() for p in SOURCES),
        extra_compile_args=["-O2", "-std=c11", "-Wall"],
    )
    with tempfile.TemporaryDirectory() as tmp:
        so = Path(ffi.compile(tmpdir=tmp, verbose=False))
        for old in built:
            old.unlink()
        shutil.copy(so, PKG / so.name)
    stamp.write_text(digest.hexdigest())
    print(f"native: built {PKG / so.name}", file=sys.stderr)


if __name__ == "__main__":
    main()
