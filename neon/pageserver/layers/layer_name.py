"""Layer file names, exactly as Neon spells them (spec/pageserver.md §5.5).

* delta: ``<KEYSTART>-<KEYEND>__<LSNSTART>-<LSNEND>``
* image: ``<KEYSTART>-<KEYEND>__<LSN>``

Keys are the 18-byte binary key form written as 36 upper-case hex digits, LSNs 16 upper-case hex
digits; key end and LSN end are exclusive.  Only the canonical (upper-case) spelling parses, so a
layer has exactly one name.  Writers create files under temporary names ending in ``.___temp``;
those are never layers and are removed at start-up.
"""

from __future__ import annotations

import re
import secrets
import string
from dataclasses import dataclass

from neon.utils.crashsafe import TEMP_SUFFIX
from neon.utils.lsn import Lsn

KEY_SIZE = 18
KEY_MIN = bytes(KEY_SIZE)
KEY_MAX = b"\xff" * KEY_SIZE
LSN_MAX = (1 << 64) - 1

_KEY_HEX = r"[0-9A-F]{36}"
_LSN_HEX = r"[0-9A-F]{16}"
_DELTA_RE = re.compile(rf"({_KEY_HEX})-({_KEY_HEX})__({_LSN_HEX})-({_LSN_HEX})")
_IMAGE_RE = re.compile(rf"({_KEY_HEX})-({_KEY_HEX})__({_LSN_HEX})")
_TEMP_ALPHABET = string.ascii_letters + string.digits


def key_to_hex(key: bytes) -> str:
    """The 36-digit upper-case hex form of an 18-byte key."""
    check_key(key)
    return key.hex().upper()


def key_from_hex(text: str) -> bytes:
    if len(text) != 2 * KEY_SIZE:
        raise ValueError(f"invalid key {text!r}: expected {2 * KEY_SIZE} hex digits")
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise ValueError(f"invalid key {text!r}: expected {2 * KEY_SIZE} hex digits") from None


def check_key(key: bytes) -> None:
    if not isinstance(key, bytes) or len(key) != KEY_SIZE:
        raise ValueError(f"a key is {KEY_SIZE} bytes, got {key!r}")


def _check_lsn(lsn: int, what: str) -> None:
    if not 0 <= lsn <= LSN_MAX:
        raise ValueError(f"{what} {lsn} is not a 64-bit LSN")


@dataclass(frozen=True)
class DeltaLayerName:
    """Key range ``[key_start, key_end)`` by LSN range ``[lsn_start, lsn_end)``."""

    key_start: bytes
    key_end: bytes
    lsn_start: Lsn
    lsn_end: Lsn

    def __post_init__(self) -> None:
        check_key(self.key_start)
        check_key(self.key_end)
        _check_lsn(self.lsn_start, "lsn_start")
        _check_lsn(self.lsn_end, "lsn_end")
        object.__setattr__(self, "lsn_start", Lsn(self.lsn_start))
        object.__setattr__(self, "lsn_end", Lsn(self.lsn_end))
        if self.key_start >= self.key_end:
            raise ValueError(f"delta layer key range {self.key_start.hex()}..{self.key_end.hex()} is empty")
        if self.lsn_start >= self.lsn_end:
            raise ValueError(f"delta layer LSN range {self.lsn_start}..{self.lsn_end} is empty")

    @classmethod
    def parse(cls, name: str) -> DeltaLayerName:
        m = _DELTA_RE.fullmatch(name)
        if m is None:
            raise ValueError(f"not a delta layer file name: {name!r}")
        ks, ke, ls, le = m.groups()
        return cls(bytes.fromhex(ks), bytes.fromhex(ke), Lsn(int(ls, 16)), Lsn(int(le, 16)))

    @property
    def key_range(self) -> tuple[bytes, bytes]:
        return (self.key_start, self.key_end)

    @property
    def lsn_range(self) -> tuple[Lsn, Lsn]:
        return (self.lsn_start, self.lsn_end)

    @property
    def is_l0(self) -> bool:
        """L0 delta layers cover the whole key space."""
        return self.key_start == KEY_MIN and self.key_end == KEY_MAX

    @property
    def is_delta(self) -> bool:
        return True

    def __str__(self) -> str:
        return (
            f"{self.key_start.hex().upper()}-{self.key_end.hex().upper()}"
            f"__{int(self.lsn_start):016X}-{int(self.lsn_end):016X}"
        )


@dataclass(frozen=True)
class ImageLayerName:
    """Every key of ``[key_start, key_end)`` as of ``lsn`` (LSN range ``[lsn, lsn + 1)``)."""

    key_start: bytes
    key_end: bytes
    lsn: Lsn

    def __post_init__(self) -> None:
        check_key(self.key_start)
        check_key(self.key_end)
        if not 0 <= self.lsn < LSN_MAX:
            raise ValueError(f"image layer LSN {self.lsn} out of range")
        object.__setattr__(self, "lsn", Lsn(self.lsn))
        if self.key_start >= self.key_end:
            raise ValueError(f"image layer key range {self.key_start.hex()}..{self.key_end.hex()} is empty")

    @classmethod
    def parse(cls, name: str) -> ImageLayerName:
        m = _IMAGE_RE.fullmatch(name)
        if m is None:
            raise ValueError(f"not an image layer file name: {name!r}")
        ks, ke, lsn = m.groups()
        return cls(bytes.fromhex(ks), bytes.fromhex(ke), Lsn(int(lsn, 16)))

    @property
    def key_range(self) -> tuple[bytes, bytes]:
        return (self.key_start, self.key_end)

    @property
    def lsn_range(self) -> tuple[Lsn, Lsn]:
        return (self.lsn, Lsn(self.lsn + 1))

    @property
    def is_l0(self) -> bool:
        return False

    @property
    def is_delta(self) -> bool:
        return False

    def __str__(self) -> str:
        return f"{self.key_start.hex().upper()}-{self.key_end.hex().upper()}__{int(self.lsn):016X}"


LayerName = DeltaLayerName | ImageLayerName


def is_temp_file_name(name: str) -> bool:
    """A leftover of an interrupted write (any file ending in ``.___temp``): delete, never load."""
    return name.endswith(TEMP_SUFFIX)


def parse_layer_file_name(name: str) -> LayerName:
    """Parse a delta or image layer file name; `ValueError` for anything else (temp files included)."""
    if is_temp_file_name(name):
        raise ValueError(f"{name!r} is a temporary file of an unfinished layer write, not a layer")
    if _DELTA_RE.fullmatch(name):
        return DeltaLayerName.parse(name)
    if _IMAGE_RE.fullmatch(name):
        return ImageLayerName.parse(name)
    raise ValueError(f"not a layer file name: {name!r}")


def try_parse_layer_file_name(name: str) -> LayerName | None:
    """Like `parse_layer_file_name`, but None for temp files and names that are not layers."""
    try:
        return parse_layer_file_name(name)
    except ValueError:
        return None


def _temp_tag() -> str:
    return "".join(secrets.choice(_TEMP_ALPHABET) for _ in range(8))


def delta_temp_file_name(key_start: bytes, lsn_start: int, lsn_end: int) -> str:
    """``<KEYSTART>-XXX__<LSNSTART>-<LSNEND>.<8 random alphanumerics>.___temp`` (key end not known yet)."""
    return f"{key_to_hex(key_start)}-XXX__{lsn_start:016X}-{lsn_end:016X}.{_temp_tag()}{TEMP_SUFFIX}"


def image_temp_file_name(final: ImageLayerName) -> str:
    """``<final name>.<8 random alphanumerics>.___temp``."""
    return f"{final}.{_temp_tag()}{TEMP_SUFFIX}"
