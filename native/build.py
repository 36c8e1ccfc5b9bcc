"""Builds the native modules (run by `make setup`): the cffi extension `neon._walnative` from
native/walscan.c, and the CPython extension `neon._ingestfast` from native/ingestfast.c.

Each is rebuilt only when its C source or this file changes; the imports fall back to pure
Python when a module is absent.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import sysconfig
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


def build_ingestfast() -> None:
    """The ingest fast lane: plain C against the Python C API, compiled with the system compiler."""
    source = HERE / "ingestfast.c"
    digest = hashlib.sha256(source.read_bytes() + Path(__file__).read_bytes()).hexdigest()
    stamp = PKG / ".ingestfast.stamp"
    target = PKG / f"_ingestfast{sysconfig.get_config_var('EXT_SUFFIX')}"
    if target.exists() and stamp.exists() and stamp.read_text() == digest:
        return
    cc = (sysconfig.get_config_var("CC") or "cc").split()
    include = sysconfig.get_paths()["include"]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / target.name
        cmd = [*cc, "-O2", "-std=c11", "-Wall", "-fPIC", "-shared", f"-I{include}", str(source), "-o", str(out)]
        subprocess.run(cmd, check=True)
        shutil.copy(out, target)
    stamp.write_text(digest)
    print(f"native: built {target}", file=sys.stderr)


def main() -> None:
    build_ingestfast()
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
