"""Compute endpoints under `.neon/endpoints/<endpoint_id>/` (spec control-plane §1.7, §1.3 endpoint).

This module owns an endpoint's persisted state (`endpoint.json`, Neon's fields), port allocation,
its status as `endpoint list` shows it, and starting and stopping one from separate one-shot
invocations: `LocalEndpoint` is `neon.compute.Endpoint` with a TCP listener on 127.0.0.1 and a
WAL proposer that outlives the command that started it (its pid in `walproposer.pid`).
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from neon.compute import Endpoint, EndpointError
from neon.utils.lsn import Lsn

from .config import DEFAULT_PG_VERSION, LocalEnv

ENDPOINT_FILE = "endpoint.json"
PORT_BASE = 55431  # the first endpoint gets pg 55432, http 55433, as Neon's
STATUS_CONNECT_TIMEOUT = 0.3


class EndpointConf(BaseModel):
    """`endpoint.json`: what an endpoint is, written at create and read by every later command."""

    endpoint_id: str
    tenant_id: str
    timeline_id: str
    mode: Literal["Primary"] | dict[Literal["Static"], str] = "Primary"
    pg_port: int
    http_port: int
    pg_version: int = DEFAULT_PG_VERSION
    skip_pg_catalog_updates: bool = True
    pageserver_id: int = 1

    @property
    def static_lsn(self) -> str | None:
        return self.mode["Static"] if isinstance(self.mode, dict) else None


class LocalEndpoint(Endpoint):
    """A compute driven by one-shot commands (TCP, the proposer found again by its pid file), or a
    read-only one at a fixed LSN."""

    def __init__(self, *args: Any, static_lsn: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.static_lsn = static_lsn

    async def create(self, lsn: Lsn | str | None = None) -> LocalEndpoint:
        await super().create(lsn)
        extra = []
        if self.static_lsn is not None:
            # A read-only compute at a fixed LSN: a standby with nothing to follow.
            extra.append("hot_standby = on")
            signal_file = self.pgdata / "standby.signal"
            signal_file.touch()
            self.user.own(signal_file, 0o600)
        if extra:
            with open(self.pgdata / "postgresql.conf", "a") as conf:
                conf.write("# neon_local\n" + "\n".join(extra) + "\n")
        return self


class ComputeControlPlane:
    """Every endpoint directory of one `.neon`."""

    def __init__(self, env: LocalEnv) -> None:
        self.env = env

    def endpoint_dir(self, endpoint_id: str) -> Path:
        return self.env.endpoints_dir / endpoint_id

    def endpoints(self) -> dict[str, EndpointConf]:
        found: dict[str, EndpointConf] = {}
        if not self.env.endpoints_dir.is_dir():
            return found
        for path in sorted(self.env.endpoints_dir.iterdir()):
            conf_file = path / ENDPOINT_FILE
            if conf_file.is_file():
                found[path.name] = EndpointConf.model_validate_json(conf_file.read_text())
        return found

    def get(self, endpoint_id: str) -> EndpointConf | None:
        return self.endpoints().get(endpoint_id)

    def _next_port(self) -> int:
        used = [p for conf in self.endpoints().values() for p in (conf.pg_port, conf.http_port)]
        return max([PORT_BASE, *used]) + 1

    def new_endpoint(
        self,
        endpoint_id: str,
        *,
        tenant_id: str,
        timeline_id: str,
        lsn: str | None,
        pg_port: int | None,
        http_port: int | None,
        pageserver_id: int,
        pg_version: int,
    ) -> EndpointConf:
        if self.endpoint_dir(endpoint_id).exists():
            raise EndpointError(f"endpoint {endpoint_id} already exists")
        if pg_port is None:
            pg_port = self._next_port()
        if http_port is None:
            http_port = max(self._next_port(), pg_port + 1)
        conf = EndpointConf(
            endpoint_id=endpoint_id,
            tenant_id=tenant_id,
            timeline_id=timeline_id,
            mode="Primary" if lsn is None else {"Static": lsn},
            pg_port=pg_port,
            http_port=http_port,
            pg_version=pg_version,
            pageserver_id=pageserver_id,
        )
        directory = self.endpoint_dir(endpoint_id)
        directory.mkdir(parents=True)
        directory.chmod(0o755)  # the unprivileged Postgres user works below it
        (directory / ENDPOINT_FILE).write_text(json.dumps(conf.model_dump(mode="json"), indent=2) + "\n")
        return conf

    def compute(self, conf: EndpointConf) -> LocalEndpoint:
        ps = self.env.pageserver(conf.pageserver_id)
        static = conf.static_lsn is not None
        return LocalEndpoint(
            self.endpoint_dir(conf.endpoint_id),
            tenant_id=conf.tenant_id,
            timeline_id=conf.timeline_id,
            pageserver_pg=_host_port(ps.listen_pg_addr),
            pageserver_http=_host_port(ps.listen_http_addr),
            pg_port=conf.pg_port,
            # A static endpoint writes no WAL: it gets no safekeepers and no WAL source.
            safekeepers=[] if static else [f"127.0.0.1:{sk.compute_port}" for sk in self.env.safekeepers],
            static_lsn=conf.static_lsn,
            listen_addresses="127.0.0.1",  # `psql -h 127.0.0.1 -p <port>`, as Neon's endpoints
        )

    def status(self, conf: EndpointConf) -> str:
        """`running`, `stopped`, `crashed` or `running, no pidfile`, as Neon's `endpoint list`."""
        has_pidfile = (self.endpoint_dir(conf.endpoint_id) / "pgdata" / "postmaster.pid").exists()
        try:
            socket.create_connection(("127.0.0.1", conf.pg_port), timeout=STATUS_CONNECT_TIMEOUT).close()
            accepting = True
        except OSError:
            accepting = False
        if has_pidfile:
            return "running" if accepting else "crashed"
        return "running, no pidfile" if accepting else "stopped"

    async def start(self, conf: EndpointConf) -> LocalEndpoint:
        """A fresh basebackup (after syncing the safekeepers, for a primary), then Postgres and,
        for a primary, the WAL proposer."""
        if self.status(conf) != "stopped":
            raise EndpointError("The endpoint is already running")
        ep = self.compute(conf)
        ep.stop_proposer(signal.SIGKILL)  # a proposer left behind by a crashed compute
        # A compute always starts from a fresh basebackup.
        shutil.rmtree(ep.pgdata, ignore_errors=True)
        ps = self.env.pageserver(conf.pageserver_id)
        where = f"at {conf.static_lsn}" if conf.static_lsn else "at the end of the timeline"
        if ep.safekeepers:
            print(f"Syncing safekeepers {','.join(ep.safekeepers)} ...", flush=True)
        print(f"Fetching basebackup {where} from pageserver at '{ps.listen_pg_addr}' ...", flush=True)
        try:
            await ep.create(conf.static_lsn)
            await ep.start(attach_wal_source=False)
        except BaseException:
            ep.destroy(remove=False)  # leave the directory, with its logs, as a stopped endpoint
            shutil.rmtree(ep.pgdata, ignore_errors=True)
            raise
        return ep

    async def stop(self, conf: EndpointConf, *, destroy: bool = False, immediate: bool = False) -> None:
        """Stop Postgres (fast; immediate with `immediate` or before `destroy`) and its proposer;
        a fast stop returns once the pageserver has the shutdown checkpoint."""
        ep = self.compute(conf)
        ep.running = (ep.pgdata / "postmaster.pid").exists()
        try:
            await ep.stop("immediate" if destroy or immediate else "fast")
        finally:
            ep.stop_proposer()
        if destroy:
            print(f"Destroying postgres data directory '{ep.pgdata}'")
            shutil.rmtree(ep.workdir)


def _host_port(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)
