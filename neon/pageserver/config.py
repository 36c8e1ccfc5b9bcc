"""Pageserver-wide configuration: `pageserver.toml`, `-c key=value` overrides and `--init`.

This module owns `PageServerConf` (every key of Neon's `pageserver/src/config.rs` at the reference
commit, with Neon's names and defaults; spec pageserver §5.12, control-plane §3.2), reading the
config file of a workdir and merging command-line overrides over it (`load_config`), and
initialising a workdir (`init_workdir`, the `--init` flag).

Durations are humantime strings in TOML (`"60 s"`, `"10 min"`) and `timedelta` in Python. Relative
paths in the file are relative to the workdir, because Neon's pageserver changes its current
directory to the workdir before it reads them. Unknown keys are errors naming the key; keys Neon
accepts but this implementation does not act on are validated and kept, and listed in
`IGNORED_KEYS` so that start-up can say they have no effect.
"""

from __future__ import annotations

import enum
import math
import os
import tomllib
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from neon.utils.crashsafe import durable_write
from neon.utils.toml_write import toml_key, toml_string

from .humantime import format_duration
from .tenant_config import Duration, TenantConf, TenantConfError, TenantConfOverrides

__all__ = [
    "CONFIG_FILE_NAME",
    "IGNORED_KEYS",
    "TENANTS_DIR",
    "AuthType",
    "LogFormat",
    "PageServerConf",
    "PageServerConfError",
    "init_workdir",
    "load_config",
    "parse_overrides",
    "render_config",
]

CONFIG_FILE_NAME = "pageserver.toml"
TENANTS_DIR = "tenants"
DEFAULT_PG_LISTEN_ADDR = "127.0.0.1:64000"
DEFAULT_HTTP_LISTEN_ADDR = "127.0.0.1:9898"
DEFAULT_BROKER_ENDPOINT = "http://127.0.0.1:50051"
DEFAULT_AUTH_PUBLIC_KEY_FILE = "auth_public_key.pem"

# Keys Neon accepts that this implementation validates but does not act on (yet).
IGNORED_KEYS: frozenset[str] = frozenset(
    {
        "max_file_descriptors",  # no layer-file descriptor cache: files are opened on first use and kept
        "broker_keepalive_interval",
        "concurrent_tenant_size_logical_size_queries",
        "metric_collection_interval",
        "cached_metric_collection_interval",
        "metric_collection_endpoint",
        "synthetic_size_calculation_interval",
        "disk_usage_based_eviction",
        "test_remote_failures",
        "ondemand_download_behavior_treat_error_as_warn",
        "control_plane_api",
        "control_plane_api_token",
        "control_plane_emergency_mode",
        "availability_zone",
        "remote_storage",  # parsed as a table; no remote storage backend exists yet
    }
)

_U64_MAX = (1 << 64) - 1
_I64_MAX = (1 << 63) - 1
U64 = Annotated[int, Field(strict=True, ge=0, le=_U64_MAX)]


class PageServerConfError(ValueError):
    """A pageserver configuration that cannot be used; the message names the key and the source."""


class AuthType(enum.StrEnum):
    Trust = "Trust"
    NeonJWT = "NeonJWT"


class LogFormat(enum.StrEnum):
    plain = "plain"
    json = "json"
    test = "test"


def _check_addr(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected host:port, got {value!r}")
    return value


class PageServerConf(BaseModel):
    """The effective pageserver configuration. Field names are Neon's `pageserver.toml` keys."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    id: U64
    listen_pg_addr: str = DEFAULT_PG_LISTEN_ADDR
    listen_http_addr: str = DEFAULT_HTTP_LISTEN_ADDR
    availability_zone: str | None = None
    wait_lsn_timeout: Duration = timedelta(seconds=60)
    wal_redo_timeout: Duration = timedelta(seconds=60)
    initial_superuser_name: str = "cloud_admin"
    page_cache_size: U64 = 8192
    max_file_descriptors: U64 = 100
    # None: neon.postgres.pg_distrib.PgDistrib.default() (Neon: <cwd>/pg_install).
    pg_distrib_dir: Path | None = None
    http_auth_type: AuthType = AuthType.Trust
    pg_auth_type: AuthType = AuthType.Trust
    auth_validation_public_key_path: Path | None = None
    broker_endpoint: str = DEFAULT_BROKER_ENDPOINT
    broker_keepalive_interval: Duration = timedelta(milliseconds=5000)
    log_format: LogFormat = LogFormat.plain
    remote_storage: dict[str, Any] | None = None
    tenant_config: TenantConfOverrides = TenantConfOverrides()
    concurrent_tenant_size_logical_size_queries: Annotated[int, Field(strict=True, ge=1)] = 1
    metric_collection_interval: Duration = timedelta(minutes=10)
    cached_metric_collection_interval: Duration = timedelta(0)
    metric_collection_endpoint: str | None = None
    synthetic_size_calculation_interval: Duration = timedelta(minutes=10)
    disk_usage_based_eviction: dict[str, Any] | None = None
    test_remote_failures: U64 = 0
    ondemand_download_behavior_treat_error_as_warn: bool = False
    background_task_maximum_delay: Duration = timedelta(seconds=10)
    control_plane_api: str | None = None
    control_plane_api_token: str | None = None
    control_plane_emergency_mode: bool = False

    @field_validator("listen_pg_addr", "listen_http_addr")
    @classmethod
    def _addr(cls, v: str) -> str:
        return _check_addr(v)

    @field_validator("broker_endpoint")
    @classmethod
    def _broker(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError(f"expected an http:// or https:// URL, got {v!r}")
        return v

    @field_validator("page_cache_size")
    @classmethod
    def _page_cache(cls, v: int) -> int:
        if v == 0:
            # Neon's page cache panics with zero slots; say so at config time.
            raise ValueError("page_cache_size must be at least 1")
        return v

    @field_validator("remote_storage")
    @classmethod
    def _remote_storage(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is None:
            return v
        kinds = [k for k in ("local_path", "bucket_name", "container_name") if k in v]
        if len(kinds) != 1:
            raise ValueError("remote_storage needs exactly one of local_path, bucket_name, container_name")
        return v

    # --- derived values ---------------------------------------------------------------------
    def default_tenant_conf(self) -> TenantConf:
        """The configuration a tenant without overrides gets: `[tenant_config]` over the built-ins."""
        return TenantConf.merged(TenantConf(), self.tenant_config)

    def auth_key_path(self, workdir: Path) -> Path | None:
        """The JWT validation key (Neon's default `<workdir>/auth_public_key.pem` when auth is on)."""
        if self.auth_validation_public_key_path is not None:
            return self.auth_validation_public_key_path
        if AuthType.NeonJWT in (self.http_auth_type, self.pg_auth_type):
            return workdir / DEFAULT_AUTH_PUBLIC_KEY_FILE
        return None

    def ignored_keys_set(self) -> list[str]:
        """Keys set to non-default values that this implementation does not act on (for a warning)."""
        defaults = {name: f.default for name, f in type(self).model_fields.items()}
        return sorted(k for k in IGNORED_KEYS if getattr(self, k) != defaults.get(k))

    def refuse_unsupported(self) -> None:
        """Raise for settings that are valid in Neon but that this implementation cannot honour.

        JWT authentication is accepted in the file (so a Neon config loads) but refused at start
        rather than silently serving without authentication."""
        for key in ("http_auth_type", "pg_auth_type"):
            if getattr(self, key) is AuthType.NeonJWT:
                raise PageServerConfError(f"{key} = 'NeonJWT' is not supported by this pageserver (only 'Trust')")

    def to_toml_dict(self) -> dict[str, Any]:
        """The keys whose values are set, in TOML form (durations as humantime, paths as strings)."""
        out: dict[str, Any] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if value is None:
                continue
            if name == "tenant_config":
                value = value.to_json_dict()
            elif isinstance(value, timedelta):
                value = format_duration(value)
            elif isinstance(value, enum.Enum):
                value = value.value
            elif isinstance(value, Path):
                value = str(value)
            out[name] = value
        return out


# --- reading -------------------------------------------------------------------------------
def parse_overrides(overrides: list[str]) -> list[dict[str, Any]]:
    """Each `-c` argument as a TOML document (`key = value`, dotted keys and inline tables allowed)."""
    docs = []
    for text in overrides:
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            hint = ""
            key, sep, value = text.partition("=")
            quoted = f"{key.strip()} = '{value.strip()}'"
            if sep and "'" not in value:
                try:
                    tomllib.loads(quoted)
                    hint = f' (strings must be quoted: -c "{quoted}")'
                except tomllib.TOMLDecodeError:
                    pass
            raise PageServerConfError(f"invalid -c override {text!r}: {e}{hint}") from None
        if not doc:
            raise PageServerConfError(f"invalid -c override {text!r}: no key = value in it")
        docs.append(doc)
    return docs


def _merge(base: dict[str, Any], doc: Mapping[str, Any]) -> None:
    for key, value in doc.items():
        # `[tenant_config]` is a bag of independent settings, so `-c tenant_config.gc_period='1h'`
        # adds to the file's table. Every other key (including the `remote_storage` table, whose
        # kinds exclude one another) is replaced whole, as Neon does.
        if key == "tenant_config" and isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value


def _resolve_paths(values: dict[str, Any], workdir: Path) -> None:
    for key in ("pg_distrib_dir", "auth_validation_public_key_path"):
        v = values.get(key)
        if isinstance(v, str) and not os.path.isabs(v):
            values[key] = str(workdir / v)


def _build(values: dict[str, Any], source: str) -> PageServerConf:
    if "workdir" in values:
        raise PageServerConfError(f"'workdir' cannot be set in {source}: use -D / --workdir")
    unknown = sorted(k for k in values if k not in PageServerConf.model_fields)
    if unknown:
        raise PageServerConfError(
            f"unrecognized pageserver option{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(repr(k) for k in unknown)} in {source}"
        )
    if "id" not in values:
        raise PageServerConfError(f"missing required option 'id' (the node id) in {source}")
    tc = values.get("tenant_config")
    if tc is not None:
        if not isinstance(tc, dict):
            raise PageServerConfError(f"'tenant_config' must be a table in {source}")
        try:
            values = {
                **values,
                "tenant_config": TenantConfOverrides.from_mapping(tc, source=f"[tenant_config] of {source}"),
            }
        except TenantConfError as e:
            raise PageServerConfError(str(e)) from None
    try:
        return PageServerConf.model_validate(values)
    except ValidationError as e:
        problems = []
        for err in e.errors(include_url=False):
            key = ".".join(str(p) for p in err["loc"]) or "<root>"
            msg = err["msg"].removeprefix("Value error, ")
            problems.append(f"{key}: {msg} (got {err.get('input')!r})")
        raise PageServerConfError(f"invalid pageserver config in {source}: " + "; ".join(problems)) from None


def _read_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PageServerConfError(f"config file {path} not found: initialise the workdir with --init first") from None
    except UnicodeDecodeError as e:
        raise PageServerConfError(f"config file {path} is not UTF-8: {e}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise PageServerConfError(f"config file {path} is not valid TOML: {e}") from None


def load_config(workdir: str | os.PathLike[str], overrides: list[str] | None = None) -> PageServerConf:
    """`<workdir>/pageserver.toml` with each `-c` override merged over it, validated."""
    workdir = Path(workdir).absolute()
    path = workdir / CONFIG_FILE_NAME
    values = _read_file(path)
    for doc in parse_overrides(overrides or []):
        _merge(values, doc)
    _resolve_paths(values, workdir)
    source = str(path) + (" and -c overrides" if overrides else "")
    return _build(values, source)


# --- writing and --init ----------------------------------------------------------------------
def _toml_value(value: Any, key: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        if not -_I64_MAX - 1 <= value <= _I64_MAX:
            raise PageServerConfError(f"{key}: {value} does not fit a TOML integer (i64)")
        return str(value)
    if isinstance(value, float) and math.isfinite(value):
        return repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v, key) for v in value) + "]"
    if isinstance(value, Mapping):
        items = ", ".join(f"{toml_key(k)} = {_toml_value(v, f'{key}.{k}')}" for k, v in value.items())
        return "{ " + items + " }" if items else "{}"
    raise PageServerConfError(f"{key}: cannot write a {type(value).__name__} as TOML")


def render_config(conf: PageServerConf) -> str:
    """`pageserver.toml` text holding every set value of `conf` (tables as sections, at the end)."""
    values = conf.to_toml_dict()
    lines = ["# pageserver configuration, written by --init\n"]
    tables = []
    for key, value in values.items():
        if isinstance(value, Mapping):
            tables.append((key, value))
        else:
            lines.append(f"{key} = {_toml_value(value, key)}\n")
    for key, table in tables:
        lines.append(f"\n[{key}]\n")
        lines.extend(f"{toml_key(k)} = {_toml_value(v, f'{key}.{k}')}\n" for k, v in table.items())
    return "".join(lines)


def init_workdir(workdir: str | os.PathLike[str], overrides: list[str] | None = None) -> PageServerConf:
    """`--init`: create the workdir, write `pageserver.toml` from the defaults and `overrides`
    (which must include `id`), and create `tenants/`. Refuses a workdir that already has a config."""
    workdir = Path(workdir).absolute()
    path = workdir / CONFIG_FILE_NAME
    if path.exists():
        raise PageServerConfError(f"config file {path} already exists: the workdir is already initialised")
    values: dict[str, Any] = {}
    for doc in parse_overrides(overrides or []):
        _merge(values, doc)
    _resolve_paths(values, workdir)
    conf = _build(values, "-c overrides of --init")
    text = render_config(conf)
    # What we write must read back as the same configuration.
    assert _build(tomllib.loads(text), "the rendered config") == conf
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / TENANTS_DIR).mkdir(mode=0o700, exist_ok=True)
    durable_write(path, text.encode())
    return conf
