"""The few pieces of TOML writing the config files need (tomllib only reads): basic strings, keys."""

from __future__ import annotations


def toml_string(s: str) -> str:
    """`s` as a TOML basic string, escaping quotes, backslashes and control characters."""
    out = ['"']
    for ch in s:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def toml_key(k: str) -> str:
    """A bare key when it may be one, else a quoted key."""
    return k if k and all(c.isalnum() or c in "_-" for c in k) else toml_string(k)
