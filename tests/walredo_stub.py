"""A stand-in WAL-redo helper speaking the pipe protocol, chatty on stderr at every step.

It "applies" a record by mixing it into the page deterministically (`stub_apply`), so tests can
compute the expected page. Records starting with b"CRASH" make it exit with an error and
b"HANG" makes it stop responding. It writes to stderr before, during and after each response.
"""

from __future__ import annotations

import hashlib
import os
import struct
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from neon.walredo.protocol import MessageReader

PAGE = 8192


def stub_apply(page: bytes, lsn: int, record: bytes) -> bytes:
    out = bytearray(page)
    out[0:8] = struct.pack(">Q", lsn)
    out[8:40] = hashlib.sha256(record + bytes(out[40:72])).digest()
    return bytes(out)


def main() -> None:
    err = sys.stderr
    out = os.fdopen(os.dup(1), "wb", buffering=0)
    err.write("stub walredo: starting up\n")
    err.flush()
    reader = MessageReader()
    page = bytes(PAGE)
    nreq = 0
    while True:
        chunk = os.read(0, 65536)
        if not chunk:
            err.write("stub walredo: stdin closed, exiting\n")
            return
        reader.feed(chunk)
        while (msg := reader.next_message()) is not None:
            kind, payload = msg
            if kind == b"B":
                page = bytes(PAGE)
            elif kind == b"P":
                page = payload[17:]
            elif kind == b"A":
                lsn = struct.unpack(">Q", payload[:8])[0]
                rec = payload[8:]
                if rec.startswith(b"CRASH"):
                    err.write("stub walredo: ERROR: cannot apply record\n")
                    err.flush()
                    sys.exit(1)
                if rec.startswith(b"HANG"):
                    time.sleep(3600)
                page = stub_apply(page, lsn, rec)
            elif kind in (b"G", b"M"):
                nreq += 1
                result = page if kind == b"G" else payload[5:][::-1]
                err.write(f"stub walredo: request {nreq} before\n")
                err.flush()
                out.write(result[:1000])
                err.write(f"stub walredo: request {nreq} during\n")
                err.flush()
                out.write(result[1000:])
                err.write(f"stub walredo: request {nreq} after\n")
                err.flush()
            else:
                err.write(f"stub walredo: ERROR: unknown message {kind!r}\n")
                sys.exit(1)


if __name__ == "__main__":
    main()
