"""LogicalMessage (rmid 21) payload: `xl_logical_message` from pg_logical_emit_message (spec §4.11).

No pages change. Neon gives some prefixes a meaning of its own (`neon-test`, `neon-file:`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ._reader import Buffer, PayloadReader, cstr

XLOG_LOGICAL_MESSAGE = 0x00

_HEAD = struct.Struct("<I?3xQQ")


@dataclass(frozen=True, slots=True)
class LogicalMessage:
    db_id: int
    transactional: bool
    prefix: str  # without its terminating NUL
    message: bytes

    @classmethod
    def unpack(cls, data: Buffer) -> LogicalMessage:
        r = PayloadReader(data, "LOGICAL MESSAGE")
        db_id, transactional, prefix_size, message_size = r.unpack(_HEAD, "xl_logical_message")
        # prefix_size counts the NUL, which must be the prefix's last byte.
        prefix = r.take(prefix_size, "prefix")
        if not prefix or prefix[-1] != 0 or b"\0" in prefix[:-1]:
            raise r.error(f"prefix of {prefix_size} bytes is not one NUL-terminated string")
        message = r.take(message_size, "message")
        r.end()
        return cls(db_id, transactional, cstr(prefix[:-1]), message)


def describe(info: int, data: Buffer) -> LogicalMessage | None:
    return LogicalMessage.unpack(data) if info & 0xF0 == XLOG_LOGICAL_MESSAGE else None
