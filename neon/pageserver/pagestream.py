"""The pagestream sub-protocol (spec pageserver §7.3) as a sans-IO codec, plus its LSN rules.

This module owns the byte layouts of the four requests a compute sends inside a `pagestream`
CopyBoth stream (Exists, Nblocks, GetPage, DbSize) and of the five responses (the four answers
and the error response), exactly as Neon encodes them at commit 11e523f503: one message per
CopyData payload, a tag byte, then big-endian fixed-width fields. Server side: `decode_request`
and `encode_response`; client side: `encode_request` and `decode_response`. Malformed input
raises `PagestreamError` with a message saying what was wrong; nothing else escapes the decoders.

It also owns the mapping from a request's `(latest, lsn)` to the LSN to read at
(`resolve_request_lsn`, `check_gc_cutoff`: Neon's `wait_or_get_last_lsn` without the waiting,
which the page service does with the timeline).

Two deliberate choices where Neon is looser:

* Trailing bytes after a request or response are an error. Neon's parser ignores them, but the
  length is the only framing we have, and extra bytes mean the peer speaks another protocol
  version (later Neon releases added fields); reading such a request as if it were ours would
  serve the wrong LSN silently.
* `latest` accepts any non-zero byte as true, as Neon's `get_u8() != 0` does; we always encode 1.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from neon.pageserver.key import RelTag
from neon.utils.lsn import Lsn

BLCKSZ: Final = 8192

# Request tags (Neon's NeonMessageTag in pagestore_client.h).
TAG_EXISTS: Final = 0
TAG_NBLOCKS: Final = 1
TAG_GETPAGE: Final = 2
TAG_DBSIZE: Final = 3

# Response tags.
TAG_EXISTS_RESPONSE: Final = 100
TAG_NBLOCKS_RESPONSE: Final = 101
TAG_GETPAGE_RESPONSE: Final = 102
TAG_ERROR_RESPONSE: Final = 103
TAG_DBSIZE_RESPONSE: Final = 104

_REL_REQ: Final = struct.Struct(">BBQIIIB")  # tag, latest, lsn, spcnode, dbnode, relnode, forknum
_PAGE_REQ: Final = struct.Struct(">BBQIIIBI")  # … + blkno
_DB_REQ: Final = struct.Struct(">BBQI")  # tag, latest, lsn, dbnode
_U8: Final = struct.Struct(">B")
_U32: Final = struct.Struct(">I")
_I64: Final = struct.Struct(">q")

_REQUEST_NAMES: Final = {TAG_EXISTS: "Exists", TAG_NBLOCKS: "Nblocks", TAG_GETPAGE: "GetPage", TAG_DBSIZE: "DbSize"}
_REQUEST_SIZES: Final = {TAG_EXISTS: _REL_REQ.size, TAG_NBLOCKS: _REL_REQ.size, TAG_GETPAGE: _PAGE_REQ.size}
_REQUEST_SIZES[TAG_DBSIZE] = _DB_REQ.size


class PagestreamError(ValueError):
    """A pagestream message that does not follow the protocol (or a value that cannot be encoded)."""


class PagestreamRequestError(Exception):
    """A well-formed request that cannot be served at its LSN (LSN 0 without `latest`, GC'd LSN)."""


# --- requests -------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ExistsRequest:
    latest: bool
    lsn: Lsn
    rel: RelTag


@dataclass(frozen=True, slots=True)
class NblocksRequest:
    latest: bool
    lsn: Lsn
    rel: RelTag


@dataclass(frozen=True, slots=True)
class GetPageRequest:
    latest: bool
    lsn: Lsn
    rel: RelTag
    blkno: int


@dataclass(frozen=True, slots=True)
class DbSizeRequest:
    latest: bool
    lsn: Lsn
    dbnode: int


PagestreamRequest = ExistsRequest | NblocksRequest | GetPageRequest | DbSizeRequest


# --- responses ------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ExistsResponse:
    exists: bool


@dataclass(frozen=True, slots=True)
class NblocksResponse:
    n_blocks: int


@dataclass(frozen=True, slots=True)
class GetPageResponse:
    page: bytes


@dataclass(frozen=True, slots=True)
class ErrorResponse:
    message: str


@dataclass(frozen=True, slots=True)
class DbSizeResponse:
    db_size: int


PagestreamResponse = ExistsResponse | NblocksResponse | GetPageResponse | ErrorResponse | DbSizeResponse


def request_name(req: PagestreamRequest) -> str:
    """The request's name as in the spec (for logs and metrics labels)."""
    return type(req).__name__.removesuffix("Request")


# --- server side ----------------------------------------------------------------------------------
def decode_request(data: bytes | bytearray | memoryview) -> PagestreamRequest:
    """Parse one CopyData payload from a compute; `PagestreamError` if it is not a valid request."""
    buf = bytes(data)
    if not buf:
        raise PagestreamError("empty pagestream message: expected a request tag byte")
    tag = buf[0]
    size = _REQUEST_SIZES.get(tag)
    if size is None:
        raise PagestreamError(f"unknown smgr message tag: {tag}")
    if len(buf) != size:
        what = "truncated" if len(buf) < size else "trailing bytes in"
        raise PagestreamError(
            f"{what} pagestream {_REQUEST_NAMES[tag]} request: {len(buf)} bytes, expected {size} (tag included)"
        )
    if tag == TAG_GETPAGE:
        _, latest, lsn, spc, db, rel, fork, blkno = _PAGE_REQ.unpack(buf)
        return GetPageRequest(latest != 0, Lsn(lsn), RelTag(spc, db, rel, fork), blkno)
    if tag == TAG_DBSIZE:
        _, latest, lsn, db = _DB_REQ.unpack(buf)
        return DbSizeRequest(latest != 0, Lsn(lsn), db)
    _, latest, lsn, spc, db, rel, fork = _REL_REQ.unpack(buf)
    cls = ExistsRequest if tag == TAG_EXISTS else NblocksRequest
    return cls(latest != 0, Lsn(lsn), RelTag(spc, db, rel, fork))


def encode_response(resp: PagestreamResponse) -> bytes:
    """One response as the CopyData payload Neon's compute expects."""
    try:
        if isinstance(resp, ExistsResponse):
            return bytes((TAG_EXISTS_RESPONSE, 1 if resp.exists else 0))
        if isinstance(resp, NblocksResponse):
            return _U8.pack(TAG_NBLOCKS_RESPONSE) + _U32.pack(resp.n_blocks)
        if isinstance(resp, GetPageResponse):
            if len(resp.page) != BLCKSZ:
                raise PagestreamError(f"a GetPage response carries {BLCKSZ} bytes, not {len(resp.page)}")
            return _U8.pack(TAG_GETPAGE_RESPONSE) + bytes(resp.page)
        if isinstance(resp, ErrorResponse):
            # The compute reads the message as a C string: an embedded NUL would cut it short.
            text = resp.message.replace("\0", "\\0").encode("utf-8", "replace")
            return _U8.pack(TAG_ERROR_RESPONSE) + text + b"\0"
        if isinstance(resp, DbSizeResponse):
            return _U8.pack(TAG_DBSIZE_RESPONSE) + _I64.pack(resp.db_size)
    except struct.error as e:
        raise PagestreamError(f"cannot encode {resp!r}: {e}") from None
    raise PagestreamError(f"not a pagestream response: {resp!r}")


# --- client side ----------------------------------------------------------------------------------
def encode_request(req: PagestreamRequest) -> bytes:
    """One request as the CopyData payload a compute sends."""
    if not isinstance(req, ExistsRequest | NblocksRequest | GetPageRequest | DbSizeRequest):
        raise PagestreamError(f"not a pagestream request: {req!r}")
    latest = 1 if req.latest else 0
    try:
        if isinstance(req, GetPageRequest):
            r = req.rel
            return _PAGE_REQ.pack(TAG_GETPAGE, latest, req.lsn, r.spc, r.db, r.rel, r.fork, req.blkno)
        if isinstance(req, DbSizeRequest):
            return _DB_REQ.pack(TAG_DBSIZE, latest, req.lsn, req.dbnode)
        r = req.rel
        tag = TAG_EXISTS if isinstance(req, ExistsRequest) else TAG_NBLOCKS
        return _REL_REQ.pack(tag, latest, req.lsn, r.spc, r.db, r.rel, r.fork)
    except struct.error as e:
        raise PagestreamError(f"cannot encode {req!r}: {e}") from None


def decode_response(data: bytes | bytearray | memoryview) -> PagestreamResponse:
    """Parse one CopyData payload from the pageserver; `PagestreamError` if it is not a valid response."""
    buf = bytes(data)
    if not buf:
        raise PagestreamError("empty pagestream message: expected a response tag byte")
    tag, body = buf[0], buf[1:]

    def need(n: int, name: str) -> None:
        if len(body) != n:
            raise PagestreamError(f"pagestream {name} response has {len(body)} bytes after the tag, expected {n}")

    if tag == TAG_EXISTS_RESPONSE:
        need(1, "Exists")
        if body[0] > 1:
            raise PagestreamError(f"pagestream Exists response: exists byte is {body[0]}, expected 0 or 1")
        return ExistsResponse(body[0] == 1)
    if tag == TAG_NBLOCKS_RESPONSE:
        need(4, "Nblocks")
        return NblocksResponse(_U32.unpack(body)[0])
    if tag == TAG_GETPAGE_RESPONSE:
        need(BLCKSZ, "GetPage")
        return GetPageResponse(body)
    if tag == TAG_DBSIZE_RESPONSE:
        need(8, "DbSize")
        return DbSizeResponse(_I64.unpack(body)[0])
    if tag == TAG_ERROR_RESPONSE:
        end = body.find(b"\0")
        if end < 0:
            raise PagestreamError("pagestream Error response: message is not NUL-terminated")
        if end != len(body) - 1:
            raise PagestreamError(f"pagestream Error response: {len(body) - end - 1} bytes after the terminating NUL")
        try:
            return ErrorResponse(body[:end].decode("utf-8"))
        except UnicodeDecodeError as e:
            raise PagestreamError(f"pagestream Error response: message is not UTF-8 ({e})") from None
    raise PagestreamError(f"unknown pagestream response tag: {tag}")


# --- LSN semantics (Neon's wait_or_get_last_lsn) --------------------------------------------------
def resolve_request_lsn(latest: bool, lsn: int, last_record_lsn: int) -> tuple[Lsn, bool]:
    """(LSN to read at, whether to wait for it first) for a request's `latest` flag and LSN.

    With `latest`, the LSN only says "nothing changed after it" (the primary sends its last-written
    LSN), so anything already ingested is served at last_record_lsn: the newest state is as good
    and that includes LSN 0, which a compute sends during bootstrap and which must not wait.
    A larger LSN must be waited for. Without `latest` (replicas, historical reads) the request
    is for exactly that LSN, which is waited for; LSN 0 then has no meaning and is an error.
    After waiting, `check_gc_cutoff` must pass."""
    if latest:
        if lsn <= last_record_lsn:
            return Lsn(last_record_lsn), False
        return Lsn(lsn), True
    if lsn == 0:
        raise PagestreamRequestError("invalid LSN(0) in request")
    return Lsn(lsn), lsn > last_record_lsn


def check_gc_cutoff(lsn: int, latest_gc_cutoff_lsn: int) -> None:
    """Page versions below the GC cutoff may be gone: refuse to read there."""
    if lsn < latest_gc_cutoff_lsn:
        raise PagestreamRequestError(
            "tried to request a page version that was garbage collected. "
            f"requested at {Lsn(lsn)} gc cutoff {Lsn(latest_gc_cutoff_lsn)}"
        )


__all__ = [
    "BLCKSZ",
    "DbSizeRequest",
    "DbSizeResponse",
    "ErrorResponse",
    "ExistsRequest",
    "ExistsResponse",
    "GetPageRequest",
    "GetPageResponse",
    "NblocksRequest",
    "NblocksResponse",
    "PagestreamError",
    "PagestreamRequest",
    "PagestreamRequestError",
    "PagestreamResponse",
    "check_gc_cutoff",
    "decode_request",
    "decode_response",
    "encode_request",
    "encode_response",
    "request_name",
    "resolve_request_lsn",
]
