"""The `neon_local` configuration: `<repo>/config`, a TOML file (spec control-plane §1.6).

This module owns the model of that file (`LocalEnv`, with Neon's key names), where the repository
lives (`NEON_REPO_DIR`, else `./.neon`), the built-in default used by `init`, reading and writing
the file, and the per-tenant branch-name mappings.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from neon.utils.toml_write import toml_key, toml_string

CONFIG_FILE = "config"
DEFAULT_BRANCH_NAME = "main"
DEFAULT_PG_VERSION = 15
DEFAULT_BROKER_ADDR = "127.0.0.1:50051"
DEFAULT_PAGESERVER_PG_ADDR = "127.0.0.1:64000"
DEFAULT_PAGESERVER_HTTP_ADDR = "127.0.0.1:9898"
DEFAULT_SAFEKEEPER_PG_PORT = 5454
DEFAULT_SAFEKEEPER_HTTP_PORT = 7676

_HEADER = (
    "# This file describes a local deployment of the page server\n"
    "# and safekeeeper node. It is read by the 'neon_local' command-line\n"
    "# utility.\n"
)

AuthType = Literal["Trust", "NeonJWT"]


class ConfigError(Exception):
    """The configuration is missing, unreadable, or asked to do something inconsistent."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BrokerConf(_Section):
    listen_addr: str = DEFAULT_BROKER_ADDR

    @property
    def client_url(self) -> str:
        return f"http://{self.listen_addr}"


class PageServerConf(_Section):
    id: int = 1
    listen_pg_addr: str = DEFAULT_PAGESERVER_PG_ADDR
    listen_http_addr: str = DEFAULT_PAGESERVER_HTTP_ADDR
    pg_auth_type: AuthType = "Trust"
    http_auth_type: AuthType = "Trust"


class SafekeeperConf(_Section):
    id: int = 1
    pg_port: int = DEFAULT_SAFEKEEPER_PG_PORT
    pg_tenant_only_port: int | None = None
    http_port: int = DEFAULT_SAFEKEEPER_HTTP_PORT
    sync: bool = True
    remote_storage: str | None = None
    backup_threads: int | None = None
    auth_enabled: bool = False

    @property
    def compute_port(self) -> int:
        """The port computes connect to: the tenant-only one when there is one."""
        return self.pg_tenant_only_port or self.pg_port


class LocalEnv(BaseModel):
    """The whole `<repo>/config`; `base_dir` is where it lives (not stored in the file)."""

    model_config = ConfigDict(extra="forbid")

    base_dir: Path = Field(default=Path(".neon"), exclude=True)
    pg_distrib_dir: Path | None = None
    neon_distrib_dir: Path | None = None
    default_tenant_id: str | None = None
    private_key_path: Path | None = None
    control_plane_api: str | None = None
    broker: BrokerConf = Field(default_factory=BrokerConf)
    pageservers: list[PageServerConf] = Field(default_factory=list)
    safekeepers: list[SafekeeperConf] = Field(default_factory=list)
    branch_name_mappings: dict[str, list[tuple[str, str]]] = Field(default_factory=dict)

    # --- locations ---------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.base_dir / CONFIG_FILE

    def pageserver_dir(self, ps_id: int) -> Path:
        return self.base_dir / f"pageserver_{ps_id}"

    def safekeeper_dir(self, sk_id: int) -> Path:
        return self.base_dir / "safekeepers" / f"sk{sk_id}"

    @property
    def endpoints_dir(self) -> Path:
        return self.base_dir / "endpoints"

    # --- lookups -----------------------------------------------------------------------------
    def pageserver(self, ps_id: int | None = None) -> PageServerConf:
        """The pageserver with `ps_id`, or the first one (Neon's "default pageserver")."""
        if not self.pageservers:
            raise ConfigError("no pageserver is configured")
        if ps_id is None:
            return self.pageservers[0]
        for ps in self.pageservers:
            if ps.id == ps_id:
                return ps
        raise ConfigError(f"could not find pageserver {ps_id}")

    def safekeeper(self, sk_id: int) -> SafekeeperConf:
        for sk in self.safekeepers:
            if sk.id == sk_id:
                return sk
        raise ConfigError(f"could not find safekeeper {sk_id}")

    def tenant_id_or_default(self, tenant_id: str | None) -> str:
        if tenant_id is not None:
            return tenant_id
        if self.default_tenant_id is None:
            raise ConfigError("No tenant id. Use --tenant-id, or set a default tenant")
        return self.default_tenant_id

    # --- branch-name mappings ----------------------------------------------------------------
    def register_branch_mapping(self, branch_name: str, tenant_id: str, timeline_id: str) -> None:
        pairs = self.branch_name_mappings.setdefault(branch_name, [])
        for tenant, timeline in pairs:
            if tenant == tenant_id:
                if timeline == timeline_id:
                    return
                raise ConfigError(
                    f"branch '{branch_name}' is already mapped to timeline {timeline} of tenant {tenant_id}, "
                    f"cannot map it to timeline {timeline_id}"
                )
        pairs.append((tenant_id, timeline_id))

    def branch_timeline_id(self, branch_name: str, tenant_id: str) -> str | None:
        for tenant, timeline in self.branch_name_mappings.get(branch_name, []):
            if tenant == tenant_id:
                return timeline
        return None

    def branch_names_by_timeline(self, tenant_id: str) -> dict[str, str]:
        """timeline id → branch name, for one tenant."""
        return {
            timeline: name
            for name, pairs in self.branch_name_mappings.items()
            for tenant, timeline in pairs
            if tenant == tenant_id
        }

    # --- files -------------------------------------------------------------------------------
    @classmethod
    def load(cls, base_dir: Path) -> LocalEnv:
        path = base_dir / CONFIG_FILE
        if not path.is_file():
            raise ConfigError(f"Neon config is not found in {base_dir}. You need to run 'neon_local init' first")
        return cls.parse_toml(path.read_text(), base_dir, source=str(path))

    @classmethod
    def parse_toml(cls, text: str, base_dir: Path, *, source: str) -> LocalEnv:
        try:
            doc = tomllib.loads(text)
            return cls.model_validate({**doc, "base_dir": base_dir})
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{source} is not valid TOML: {e}") from None
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise ConfigError(f"{source}: {where}: {first['msg']} ({e.error_count()} error(s))") from None

    def save(self) -> None:
        """Rewrite the whole file atomically (a crash leaves the old or the new one)."""
        tmp = self.config_path.with_name(CONFIG_FILE + ".tmp")
        tmp.write_text(self.to_toml())
        os.replace(tmp, self.config_path)

    def to_toml(self) -> str:
        doc = self.model_dump(mode="json", exclude_none=True)
        out = [_HEADER]
        for key in ("pg_distrib_dir", "neon_distrib_dir", "default_tenant_id", "private_key_path", "control_plane_api"):
            if key in doc:
                out.append(f"{key} = {_toml_value(doc[key])}\n")
        out.append("\n[broker]\n")
        out.extend(f"{k} = {_toml_value(v)}\n" for k, v in doc["broker"].items())
        for table in ("pageservers", "safekeepers"):
            for entry in doc[table]:
                out.append(f"\n[[{table}]]\n")
                out.extend(f"{toml_key(k)} = {_toml_value(v)}\n" for k, v in entry.items())
        out.append("\n[branch_name_mappings]\n")
        for name, pairs in doc["branch_name_mappings"].items():
            out.append(f"{toml_key(name)} = {_toml_value(pairs)}\n")
        return "".join(out)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


def repo_dir() -> Path:
    """`NEON_REPO_DIR`, else `.neon` in the current directory (made absolute: daemons change dirs)."""
    return Path(os.environ.get("NEON_REPO_DIR") or ".neon").absolute()


def default_init_config() -> str:
    """The built-in `init` input: one pageserver, one safekeeper, the broker, Neon's default ports.

    Unlike Neon's, no `control_plane_api`: there is no attachment service here.
    """
    return (
        f"[broker]\nlisten_addr = '{DEFAULT_BROKER_ADDR}'\n\n"
        f"[[pageservers]]\nid = 1\nlisten_pg_addr = '{DEFAULT_PAGESERVER_PG_ADDR}'\n"
        f"listen_http_addr = '{DEFAULT_PAGESERVER_HTTP_ADDR}'\npg_auth_type = 'Trust'\nhttp_auth_type = 'Trust'\n\n"
        f"[[safekeepers]]\nid = 1\npg_port = {DEFAULT_SAFEKEEPER_PG_PORT}\nhttp_port = {DEFAULT_SAFEKEEPER_HTTP_PORT}\n"
    )
