"""Durations in the text form of Rust's `humantime` crate, as Neon's configs and HTTP API use them.

This module owns parsing (`parse_duration`) and canonical rendering (`format_duration`) of strings
like `"20s"`, `"10 m"`, `"1h 30min"`, `"7days"`. The grammar and the units follow humantime 2.x:

* a duration is one or more `<number><unit>` spans; whitespace may stand between spans, between a
  number and its unit, and (humantime's quirk, kept) even between digits of one number;
* units: `nsec ns nanos`, `usec us µs`, `msec ms millis`, `seconds second secs sec s`,
  `minutes minute mins min m`, `hours hour hrs hr h`, `days day d`, `weeks week w`,
  `months month M` (30.44 days = 2 630 016 s), `years year y` (365.25 days = 31 557 600 s);
* the canonical form lists non-zero parts largest first, separated by one space: `Nyear(s)`,
  `Nmonth(s)`, `Nday(s)`, `Nh`, `Nm`, `Ns`, `Nms`, `Nus`, `Nns`; zero is `"0s"`.

Rust durations have nanosecond resolution and Python's `timedelta` only microseconds, so the exact
functions work on integer nanoseconds (`parse_duration_ns`, `format_duration_ns`) and the
`timedelta` ones refuse a value with a sub-microsecond part rather than silently rounding it.
Error messages give character offsets where humantime gives byte offsets (they differ only after
a non-ASCII character such as `µ`).
"""

from __future__ import annotations

from datetime import timedelta

__all__ = [
    "DurationParseError",
    "format_duration",
    "format_duration_ns",
    "parse_duration",
    "parse_duration_ns",
    "timedelta_to_ns",
]

NS_PER_US = 1_000
NS_PER_MS = 1_000_000
NS_PER_SEC = 1_000_000_000
SECS_PER_MONTH = 2_630_016  # 30.44 days
SECS_PER_YEAR = 31_557_600  # 365.25 days
_U64_MAX = (1 << 64) - 1

# unit -> (multiplier, True if the multiplier is in nanoseconds else seconds). humantime keeps
# sub-second and whole-second parts apart, which decides where a number overflows u64.
_UNITS: dict[str, tuple[int, bool]] = {}
for _names, _mult, _is_ns in (
    (("nanos", "nsec", "ns"), 1, True),
    (("usec", "us", "µs"), NS_PER_US, True),
    (("millis", "msec", "ms"), NS_PER_MS, True),
    (("seconds", "second", "secs", "sec", "s"), 1, False),
    (("minutes", "minute", "min", "mins", "m"), 60, False),
    (("hours", "hour", "hr", "hrs", "h"), 3600, False),
    (("days", "day", "d"), 86400, False),
    (("weeks", "week", "w"), 7 * 86400, False),
    (("months", "month", "M"), SECS_PER_MONTH, False),
    (("years", "year", "y"), SECS_PER_YEAR, False),
):
    for _name in _names:
        _UNITS[_name] = (_mult, _is_ns)

_MAX_TIMEDELTA_NS = (timedelta.max // timedelta(microseconds=1)) * NS_PER_US


class DurationParseError(ValueError):
    """Text that is not a humantime duration; the message quotes it and says where it goes wrong."""

    def __init__(self, text: str, reason: str) -> None:
        self.text = text
        self.reason = reason
        super().__init__(f"invalid duration {text!r}: {reason}")


def _is_ascii_letter(c: str) -> bool:
    return ("a" <= c <= "z") or ("A" <= c <= "Z")


def parse_duration_ns(text: str) -> int:
    """Parse a humantime duration into integer nanoseconds (exact; the same inputs humantime takes)."""
    if not isinstance(text, str):
        raise TypeError(f"duration must be a string, not {type(text).__name__}")
    n_chars = len(text)
    pos = 0
    secs = 0
    nanos = 0

    def first_digit() -> int | None:
        # Skip whitespace before a number; anything else that is not a digit is an error.
        nonlocal pos
        start = pos
        while pos < n_chars:
            c = text[pos]
            pos += 1
            if c.isdigit() and c.isascii():
                return ord(c) - 48
            if c.isspace():
                continue
            raise DurationParseError(text, f"expected number at {start}")
        return None

    def add_span(n: int, unit: str) -> None:
        nonlocal secs, nanos
        if unit not in _UNITS:
            if not unit:
                raise DurationParseError(text, f"time unit needed, for example {n}sec or {n}ms")
            raise DurationParseError(
                text,
                f"unknown time unit {unit!r}, supported units: ns, us/µs, ms, sec, min, hours, days, "
                "weeks, months, years (and few variations)",
            )
        mult, is_ns = _UNITS[unit]
        part = n * mult
        if part > _U64_MAX:
            raise DurationParseError(text, "number is too large")
        if is_ns:
            nanos += part
            if nanos > _U64_MAX:
                raise DurationParseError(text, "number is too large")
        else:
            secs += part
        secs += nanos // NS_PER_SEC
        nanos %= NS_PER_SEC
        if secs > _U64_MAX:
            raise DurationParseError(text, "number is too large")

    n = first_digit()
    if n is None:
        raise DurationParseError(text, "value was empty")
    while True:
        # The rest of the number: digits, with whitespace allowed (and ignored) in between.
        unit_start = n_chars
        while pos < n_chars:
            c = text[pos]
            if c.isdigit() and c.isascii():
                n = n * 10 + ord(c) - 48
                if n > _U64_MAX:
                    raise DurationParseError(text, "number is too large")
            elif c.isspace():
                pass
            elif _is_ascii_letter(c) or c == "µ":
                unit_start = pos
                pos += 1
                break
            else:
                raise DurationParseError(text, f"invalid character at {pos}")
            pos += 1
        # The unit: ASCII letters up to whitespace, the end, or a digit that starts the next span.
        unit_end = n_chars
        next_digit: int | None = None
        while unit_start < n_chars and pos < n_chars:
            c = text[pos]
            if c.isdigit() and c.isascii():
                unit_end = pos
                next_digit = ord(c) - 48
                pos += 1
                break
            if c.isspace():
                unit_end = pos
                pos += 1
                break
            if not _is_ascii_letter(c):
                raise DurationParseError(text, f"invalid character at {pos}")
            pos += 1
        add_span(n, text[unit_start:unit_end])
        if next_digit is not None:
            n = next_digit
            continue
        following = first_digit()
        if following is None:
            return secs * NS_PER_SEC + nanos
        n = following


def format_duration_ns(ns: int) -> str:
    """Render nanoseconds the way humantime's `format_duration` displays them (`"1m 20s"`, `"7days"`)."""
    if ns < 0:
        raise ValueError(f"cannot format a negative duration ({ns} ns)")
    if ns == 0:
        return "0s"
    secs, sub = divmod(ns, NS_PER_SEC)
    years, rest = divmod(secs, SECS_PER_YEAR)
    months, rest = divmod(rest, SECS_PER_MONTH)
    days, day_secs = divmod(rest, 86400)
    parts: list[str] = []
    # Only the calendar-ish units take a plural "s"; h/m/s and below never do.
    for value, name in ((years, "year"), (months, "month"), (days, "day")):
        if value:
            parts.append(f"{value}{name}{'s' if value > 1 else ''}")
    for value, name in (
        (day_secs // 3600, "h"),
        (day_secs % 3600 // 60, "m"),
        (day_secs % 60, "s"),
        (sub // NS_PER_MS, "ms"),
        (sub // NS_PER_US % 1000, "us"),
        (sub % 1000, "ns"),
    ):
        if value:
            parts.append(f"{value}{name}")
    return " ".join(parts)


def timedelta_to_ns(td: timedelta) -> int:
    """Exact nanoseconds of a timedelta (timedelta's own resolution is one microsecond)."""
    return (td // timedelta(microseconds=1)) * NS_PER_US


def parse_duration(text: str) -> timedelta:
    """Parse a humantime duration into a timedelta; sub-microsecond parts are an error, not rounded."""
    ns = parse_duration_ns(text)
    if ns % NS_PER_US:
        raise DurationParseError(text, "sub-microsecond precision is not supported")
    if ns > _MAX_TIMEDELTA_NS:
        raise DurationParseError(text, "number is too large")
    return timedelta(microseconds=ns // NS_PER_US)


def format_duration(td: timedelta) -> str:
    """humantime's canonical text of a non-negative timedelta (`timedelta(days=7)` -> `"7days"`)."""
    if td < timedelta(0):
        raise ValueError(f"cannot format a negative duration ({td})")
    return format_duration_ns(timedelta_to_ns(td))
