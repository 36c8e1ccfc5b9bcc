"""Per-tenant configuration (spec pageserver §5.12) and the legacy tenant `config` file (§1.6).

This module owns:

* `TenantConf`: every tenant setting with Neon's built-in defaults (`TenantConf()` is the default
  configuration); `TenantConfOverrides`: the same keys, each `None` when not set (Neon's
  `TenantConfOpt`); `TenantConf.merged(defaults, overrides)` gives the effective configuration.
* `EvictionPolicy`: `NoEviction` or `LayerAccessThreshold(period, threshold)`, tagged by `"kind"`.
* The text forms: durations are `datetime.timedelta` in Python and humantime strings in JSON and
  TOML (`"20s"`, `"7days"`; input may be any humantime spelling, output is always humantime's
  canonical form). `to_json_dict()` gives the API/JSON form.
* `write_tenant_config` / `read_tenant_config`: `tenants/<tenant>/config`, two comment lines, a
  blank line and a `[tenant_config]` table holding only the overridden keys.

Validation follows Neon's Rust types: byte counts and thresholds are non-negative integers that
fit a u64 (`max_lsn_wal_lag` is a NonZeroU64), booleans must be booleans, durations must be
non-negative humantime strings (or timedeltas from Python), and unknown keys are errors.
"""

from __future__ import annotations

import math
import os
import tomllib
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    ValidationError,
)

from neon.pageserver.humantime import DurationParseError, format_duration, parse_duration
from neon.utils.crashsafe import durable_write
from neon.utils.toml_write import toml_string

__all__ = [
    "TENANT_CONFIG_FILE_NAME",
    "TENANT_CONFIG_HEADER",
    "EvictionPolicy",
    "LayerAccessThreshold",
    "NoEviction",
    "TenantConf",
    "TenantConfError",
    "TenantConfOverrides",
    "read_tenant_config",
    "render_tenant_config",
    "tenant_config_path",
    "write_tenant_config",
]

TENANT_CONFIG_FILE_NAME = "config"
# Neon's exact preamble (including the two spaces in the second line).
TENANT_CONFIG_HEADER = (
    "# This file contains a specific per-tenant's config.\n"
    "#  It is read in case of pageserver restart.\n"
    "\n"
    "[tenant_config]\n"
)
_U64_MAX = (1 << 64) - 1
_I64_MAX = (1 << 63) - 1


class TenantConfError(ValueError):
    """A tenant configuration (API body, config file) with unknown keys or invalid values."""


# --- field types -----------------------------------------------------------------------------
def _validate_duration(value: Any) -> timedelta:
    # Neon deserialises durations with humantime_serde: strings only. Python callers may also pass
    # a timedelta. Numbers are refused on purpose: "600" would be ambiguous about its unit.
    if isinstance(value, timedelta):
        td = value
    elif isinstance(value, str):
        if value.lstrip().startswith("-"):
            # humantime would only say "expected number at 0"; say what is actually wrong.
            raise ValueError(f"duration must not be negative, got {value!r}")
        try:
            td = parse_duration(value)
        except DurationParseError as e:
            raise ValueError(str(e)) from None
    else:
        raise ValueError(f"expected a duration string such as '10m' or '1h 30m', got {type(value).__name__}")
    if td < timedelta(0):
        raise ValueError(f"duration must not be negative, got {td}")
    return td


Duration = Annotated[
    timedelta,
    PlainValidator(_validate_duration, json_schema_input_type=str),
    PlainSerializer(format_duration, return_type=str, when_used="json"),
]
U64 = Annotated[int, Field(strict=True, ge=0, le=_U64_MAX)]
NonZeroU64 = Annotated[int, Field(strict=True, ge=1, le=_U64_MAX)]
Bool = Annotated[bool, Field(strict=True)]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class NoEviction(_Frozen):
    """Never evict layers (the default)."""

    kind: Literal["NoEviction"] = "NoEviction"


class LayerAccessThreshold(_Frozen):
    """Every `period`, evict resident layers whose last access is older than `threshold`."""

    kind: Literal["LayerAccessThreshold"] = "LayerAccessThreshold"
    period: Duration
    threshold: Duration


EvictionPolicy = Annotated[NoEviction | LayerAccessThreshold, Field(discriminator="kind")]


# --- the configuration -----------------------------------------------------------------------
class TenantConf(_Frozen):
    """The effective configuration of a tenant; `TenantConf()` holds Neon's built-in defaults.

    Field order is Neon's declaration order, which is also the order keys are written in."""

    checkpoint_distance: U64 = 256 * 1024 * 1024
    checkpoint_timeout: Duration = timedelta(minutes=10)
    compaction_target_size: U64 = 128 * 1024 * 1024
    compaction_period: Duration = timedelta(seconds=20)  # zero disables the compaction loop
    compaction_threshold: U64 = 10
    gc_horizon: U64 = 64 * 1024 * 1024
    gc_period: Duration = timedelta(hours=1)  # zero disables the GC loop
    image_creation_threshold: U64 = 3
    pitr_interval: Duration = timedelta(days=7)
    walreceiver_connect_timeout: Duration = timedelta(seconds=10)
    lagging_wal_timeout: Duration = timedelta(seconds=10)
    max_lsn_wal_lag: NonZeroU64 = 10 * 1024 * 1024
    trace_read_requests: Bool = False
    eviction_policy: EvictionPolicy = NoEviction()
    min_resident_size_override: U64 | None = None
    evictions_low_residence_duration_metric_threshold: Duration = timedelta(hours=24)
    gc_feedback: Bool = False

    @classmethod
    def merged(cls, defaults: TenantConf, overrides: TenantConfOverrides) -> TenantConf:
        """Each key from `overrides` where set, else from `defaults` (Neon's `TenantConfOpt::merge`)."""
        return overrides.merge(defaults)

    def to_json_dict(self) -> dict[str, Any]:
        """The JSON/API form: durations as canonical humantime strings, every key present."""
        return self.model_dump(mode="json")


class TenantConfOverrides(_Frozen):
    """Per-tenant overrides (Neon's `TenantConfOpt`): `None` means "not set, inherit"."""

    checkpoint_distance: U64 | None = None
    checkpoint_timeout: Duration | None = None
    compaction_target_size: U64 | None = None
    compaction_period: Duration | None = None
    compaction_threshold: U64 | None = None
    gc_horizon: U64 | None = None
    gc_period: Duration | None = None
    image_creation_threshold: U64 | None = None
    pitr_interval: Duration | None = None
    walreceiver_connect_timeout: Duration | None = None
    lagging_wal_timeout: Duration | None = None
    max_lsn_wal_lag: NonZeroU64 | None = None
    trace_read_requests: Bool | None = None
    eviction_policy: EvictionPolicy | None = None
    min_resident_size_override: U64 | None = None
    evictions_low_residence_duration_metric_threshold: Duration | None = None
    gc_feedback: Bool | None = None

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, source: str | None = None) -> TenantConfOverrides:
        """Validate a JSON/TOML mapping; errors become one `TenantConfError` naming keys and `source`."""
        try:
            return cls.model_validate(dict(data))
        except ValidationError as e:
            raise TenantConfError(_describe(e, source)) from None

    def merge(self, defaults: TenantConf) -> TenantConf:
        """The effective configuration: each key set here wins over `defaults`."""
        return defaults.model_copy(update=self.set_values())

    def set_values(self) -> dict[str, Any]:
        """Only the keys that are set, as Python values (timedelta, models)."""
        return {name: getattr(self, name) for name in type(self).model_fields if getattr(self, name) is not None}

    def to_json_dict(self) -> dict[str, Any]:
        """The JSON/API form of the keys that are set (unset keys are omitted, as Neon does)."""
        return self.model_dump(mode="json", exclude_none=True)

    def is_empty(self) -> bool:
        return not self.set_values()


def _describe(e: ValidationError, source: str | None) -> str:
    problems = []
    for err in e.errors(include_url=False):
        key = ".".join(str(p) for p in err["loc"]) or "<root>"
        if err["type"] == "extra_forbidden":
            problems.append(f"unknown key {key!r}")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            problems.append(f"{key}: {msg} (got {err.get('input')!r})")
    where = f" in {source}" if source else ""
    return f"invalid tenant config{where}: " + "; ".join(problems)


# --- the legacy `config` file ----------------------------------------------------------------
def tenant_config_path(tenant_dir: str | os.PathLike[str]) -> Path:
    return Path(tenant_dir) / TENANT_CONFIG_FILE_NAME


def _toml_value(value: Any, key: str) -> str:
    # Only the value kinds that occur in tenant configs: bool, int, str, and flat inline tables.
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        if value > _I64_MAX or value < -_I64_MAX - 1:
            # TOML integers are i64; Neon's TOML serialiser fails on such a u64 the same way.
            raise TenantConfError(f"tenant config key {key!r}: {value} does not fit a TOML integer (i64)")
        return str(value)
    if isinstance(value, float) and math.isfinite(value):
        return repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, Mapping):
        items = ", ".join(f"{k} = {_toml_value(v, f'{key}.{k}')}" for k, v in value.items())
        return "{ " + items + " }" if items else "{}"
    raise TenantConfError(f"tenant config key {key!r}: cannot write a {type(value).__name__} as TOML")


def render_tenant_config(overrides: TenantConfOverrides) -> str:
    """The text of the legacy `config` file for `overrides` (only the keys that are set)."""
    lines = [f"{key} = {_toml_value(value, key)}\n" for key, value in overrides.to_json_dict().items()]
    return TENANT_CONFIG_HEADER + "".join(lines)


def write_tenant_config(
    tenant_dir: str | os.PathLike[str], overrides: TenantConfOverrides, *, owner: tuple[int, int] | None = None
) -> None:
    """Write `<tenant_dir>/config` crash-safely (temp file, fsync, rename, fsync of the directory)."""
    durable_write(tenant_config_path(tenant_dir), render_tenant_config(overrides).encode(), owner=owner)


def read_tenant_config(tenant_dir: str | os.PathLike[str]) -> TenantConfOverrides:
    """Read `<tenant_dir>/config`. A missing file means no overrides; a file that is not valid TOML,
    has top-level keys other than `[tenant_config]`, or holds bad values is a `TenantConfError`
    naming the file (Neon disables such a tenant rather than guessing at its settings)."""
    path = tenant_config_path(tenant_dir)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return TenantConfOverrides()
    except UnicodeDecodeError as e:
        raise TenantConfError(f"tenant config file {path} is not UTF-8: {e}") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise TenantConfError(f"tenant config file {path} is not valid TOML: {e}") from None
    unknown = [k for k in doc if k != "tenant_config"]
    if unknown:
        raise TenantConfError(f"tenant config file {path} has unrecognized top-level key(s): {', '.join(unknown)}")
    table = doc.get("tenant_config", {})
    if not isinstance(table, dict):
        raise TenantConfError(f"tenant config file {path}: 'tenant_config' must be a table")
    return TenantConfOverrides.from_mapping(table, source=f"tenant config file {path}")
