"""Tenant and timeline ids: 16 random bytes, written as 32 lowercase hex characters."""

from __future__ import annotations

import os


class HexId(bytes):
    """Base of the 128-bit ids; subclasses differ only in name."""

    LENGTH = 16

    def __new__(cls, value: bytes | str) -> HexId:
        if isinstance(value, str):
            if len(value) != 2 * cls.LENGTH:
                raise ValueError(f"invalid {cls.__name__} {value!r}: expected 32 hex characters")
            try:
                value = bytes.fromhex(value)
            except ValueError:
                raise ValueError(f"invalid {cls.__name__} {value!r}: expected 32 hex characters") from None
        if len(value) != cls.LENGTH:
            raise ValueError(f"invalid {cls.__name__}: expected {cls.LENGTH} bytes, got {len(value)}")
        return super().__new__(cls, value)

    @classmethod
    def generate(cls) -> HexId:
        return cls(os.urandom(cls.LENGTH))

    def __str__(self) -> str:
        return self.hex()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.hex()})"


class TenantId(HexId):
    pass


class TimelineId(HexId):
    pass
