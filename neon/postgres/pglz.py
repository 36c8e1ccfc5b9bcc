"""Decompression of PostgreSQL's pglz format, as used for WAL full-page images (spec §3.8)."""

from __future__ import annotations


class PglzError(ValueError):
    pass


def pglz_decompress(src: bytes, rawsize: int) -> bytes:
    """Decompress `src` into exactly `rawsize` bytes; raises PglzError on corrupt input."""
    out = bytearray()
    i = 0
    n = len(src)
    while i < n and len(out) < rawsize:
        ctrl = src[i]
        i += 1
        for bit in range(8):
            if i >= n or len(out) >= rawsize:
                break
            if ctrl & (1 << bit):
                if i + 1 >= n:
                    raise PglzError("truncated match tag")
                b0 = src[i]
                b1 = src[i + 1]
                i += 2
                length = (b0 & 0x0F) + 3
                offset = ((b0 & 0xF0) << 4) | b1
                if length == 18:
                    if i >= n:
                        raise PglzError("truncated match length")
                    length += src[i]
                    i += 1
                if offset == 0 or offset > len(out):
                    raise PglzError(f"match offset {offset} outside the output")
                length = min(length, rawsize - len(out))
                start = len(out) - offset
                if offset >= length:
                    out += out[start : start + length]
                else:
                    # Overlapping copy: the match repeats its own output.
                    for k in range(length):
                        out.append(out[start + k])
            else:
                out.append(src[i])
                i += 1
    if len(out) != rawsize:
        raise PglzError(f"decompressed {len(out)} bytes, expected {rawsize}")
    return bytes(out)
