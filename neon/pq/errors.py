"""Errors of the Postgres wire protocol layer and the SQLSTATE codes our services report.

Three kinds of failure are kept apart on purpose:

* `ProtocolViolation` — the *peer* sent bytes that do not follow protocol v3.0 (or sent a valid
  message in a phase where it is not allowed). The connection cannot continue.
* `LocalProtocolError` — *our* code asked the codec to send something the current phase forbids.
  That is a bug on our side, never caused by input.
* `PgError` — an ordinary SQL-level error carried by an ErrorResponse. A client raises it when the
  server reports an error; a server-side handler raises it to have one sent. The connection stays
  usable unless the severity is FATAL or PANIC.
"""

from __future__ import annotations

from typing import Final


class ProtocolViolation(Exception):
    """The peer broke the protocol; the message says what was wrong."""


class LocalProtocolError(RuntimeError):
    """We tried to send a message that the connection's current phase does not allow."""


class SqlState:
    """SQLSTATE codes used by our servers and checked by our clients (PostgreSQL Appendix A)."""

    SUCCESSFUL_COMPLETION: Final = "00000"
    WARNING: Final = "01000"
    FEATURE_NOT_SUPPORTED: Final = "0A000"
    CONNECTION_FAILURE: Final = "08006"
    PROTOCOL_VIOLATION: Final = "08P01"
    INVALID_PARAMETER_VALUE: Final = "22023"
    CHARACTER_NOT_IN_REPERTOIRE: Final = "22021"
    INVALID_AUTHORIZATION_SPECIFICATION: Final = "28000"
    INVALID_PASSWORD: Final = "28P01"
    SYNTAX_ERROR: Final = "42601"
    UNDEFINED_TABLE: Final = "42P01"
    UNDEFINED_OBJECT: Final = "42704"
    TOO_MANY_CONNECTIONS: Final = "53300"
    QUERY_CANCELED: Final = "57014"
    ADMIN_SHUTDOWN: Final = "57P01"
    INTERNAL_ERROR: Final = "XX000"


# ErrorResponse/NoticeResponse field codes (protocol "Error and Notice Message Fields").
FIELD_CODES: Final[dict[str, str]] = {
    "severity": "S",
    "severity_nonlocalized": "V",
    "sqlstate": "C",
    "message": "M",
    "detail": "D",
    "hint": "H",
    "position": "P",
    "internal_position": "p",
    "internal_query": "q",
    "where": "W",
    "schema": "s",
    "table": "t",
    "column": "c",
    "data_type": "d",
    "constraint": "n",
    "file": "F",
    "line": "L",
    "routine": "R",
}
FIELD_NAMES: Final[dict[str, str]] = {code: name for name, code in FIELD_CODES.items()}

FATAL_SEVERITIES: Final = frozenset({"FATAL", "PANIC"})


class PgError(Exception):
    """An error as carried by ErrorResponse: `fields` maps one-letter field codes to values."""

    def __init__(
        self,
        message: str,
        sqlstate: str = SqlState.INTERNAL_ERROR,
        *,
        severity: str = "ERROR",
        detail: str | None = None,
        hint: str | None = None,
        fields: dict[str, str] | None = None,
    ) -> None:
        merged = {"S": severity, "V": severity, "C": sqlstate, "M": message}
        if detail is not None:
            merged["D"] = detail
        if hint is not None:
            merged["H"] = hint
        if fields:
            merged.update(fields)
        self.fields: dict[str, str] = merged
        super().__init__(str(self))

    @classmethod
    def from_fields(cls, fields: dict[str, str]) -> PgError:
        err = cls.__new__(cls)
        err.fields = dict(fields)
        Exception.__init__(err, str(err))
        return err

    @property
    def severity(self) -> str:
        # 'V' is the untranslated severity; old servers only send the localized 'S'.
        return self.fields.get("V") or self.fields.get("S") or "ERROR"

    @property
    def sqlstate(self) -> str:
        return self.fields.get("C", SqlState.INTERNAL_ERROR)

    @property
    def message(self) -> str:
        return self.fields.get("M", "")

    @property
    def detail(self) -> str | None:
        return self.fields.get("D")

    @property
    def hint(self) -> str | None:
        return self.fields.get("H")

    @property
    def is_fatal(self) -> bool:
        return self.severity in FATAL_SEVERITIES

    def __str__(self) -> str:
        text = f"{self.severity}: {self.message} (SQLSTATE {self.sqlstate})"
        if self.detail:
            text += f"\nDETAIL: {self.detail}"
        if self.hint:
            text += f"\nHINT: {self.hint}"
        return text

    def __repr__(self) -> str:
        return f"PgError({self.message!r}, {self.sqlstate!r}, severity={self.severity!r})"
