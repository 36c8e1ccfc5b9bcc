"""`neon-pageserver` as a real process: --init, start, the HTTP API and the page service on their
ports, one daemon per workdir, SIGTERM flushes and exits 0, a restart serves the same timelines."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from neon.pageserver.layers import try_parse_layer_file_name
from neon.pageserver.metadata import load_metadata
from neon.pq.client import connect
from neon.utils.http_json import request_json

TIMEOUT = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(port: int, method: str, path: str, body: object | None = None) -> tuple[int, Any]:
    """(status, decoded JSON body) of a request to a daemon's HTTP API on 127.0.0.1:`port`; a
    body that is not JSON comes back as text."""
    return request_json("127.0.0.1", port, method, path, body, timeout=TIMEOUT)


class Daemon:
    def __init__(self, workdir: Path, config: dict[str, str] | None = None) -> None:
        self.workdir = workdir
        self.config = dict(config or {})  # more `-c key=value` for --init (values in TOML syntax)
        self.pg_port = free_port()
        self.http_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir.parent / "pageserver.log"

    def cmd(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "neon.pageserver.main", "-D", str(self.workdir), *args]

    def init(self) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.cmd(
                "--init",
                "-c",
                "id=7",
                "-c",
                f"listen_pg_addr='127.0.0.1:{self.pg_port}'",
                "-c",
                f"listen_http_addr='127.0.0.1:{self.http_port}'",
                "-c",
                "log_format='json'",
                *(arg for k, v in self.config.items() for arg in ("-c", f"{k}={v}")),
            ),
            capture_output=True,
            text=True,
        )

    def start(self) -> None:
        self.proc = subprocess.Popen(self.cmd(), stdout=open(self.log, "ab"), stderr=subprocess.STDOUT)  # noqa: SIM115

    def http(self, method: str, path: str, body: object | None = None) -> tuple[int, object]:
        return http_json(self.http_port, method, path, body)

    async def wait_ready(self) -> None:
        """Until /v1/status answers (the daemon is up), failing if the process exits."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + TIMEOUT
        while loop.time() < deadline:
            assert self.proc is not None and self.proc.poll() is None, self.log.read_text()[-3000:]
            try:
                status, _ = await asyncio.to_thread(self.http, "GET", "/v1/status")
                if status == 200:
                    return
            except (ConnectionError, urllib.error.URLError):
                pass
            await asyncio.sleep(0.05)  # polling a process that is starting: there is nothing to wait on
        raise TimeoutError("pageserver did not start")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=TIMEOUT)


@pytest.fixture
def daemon(test_root: Path) -> Iterator[Daemon]:
    d = Daemon(test_root / "ps")
    yield d
    if d.proc is not None and d.proc.poll() is None:
        d.proc.kill()
        d.proc.wait()


async def test_daemon_lifecycle(daemon: Daemon) -> None:
    init = daemon.init()
    assert init.returncode == 0, init.stderr
    assert (daemon.workdir / "pageserver.toml").exists() and (daemon.workdir / "tenants").is_dir()
    again = daemon.init()
    assert again.returncode != 0 and "already" in again.stderr
    daemon.start()
    await daemon.wait_ready()
    # A second daemon on the same workdir is refused with a clear error.
    second = subprocess.run(daemon.cmd(), capture_output=True, text=True, timeout=TIMEOUT)
    assert second.returncode != 0 and "locked" in second.stderr
    status, tenant_id = await asyncio.to_thread(daemon.http, "POST", "/v1/tenant", {})
    assert status == 201, tenant_id
    status, info = await asyncio.to_thread(
        daemon.http, "POST", f"/v1/tenant/{tenant_id}/timeline", {"new_timeline_id": "11" * 16}
    )
    assert status == 201, info
    assert isinstance(info, dict) and info["timeline_id"] == "11" * 16
    # The OpenAPI document lists the daemon's own routes with their models.
    status, doc = await asyncio.to_thread(daemon.http, "GET", "/v1/doc")
    assert status == 200 and isinstance(doc, dict) and doc["openapi"].startswith("3.")
    create = doc["paths"]["/v1/tenant/{tenant_id}/timeline"]["post"]
    assert create["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("TimelineCreateRequest")
    assert "last_record_lsn" in doc["components"]["schemas"]["TimelineInfo"]["properties"]
    assert "/v1/tenant/{tenant_id}/timeline/{timeline_id}/wal_source" in doc["paths"]
    status, gc = await asyncio.to_thread(daemon.http, "PUT", f"/v1/tenant/{tenant_id}/timeline/{'11' * 16}/do_gc", {})
    assert status == 200 and isinstance(gc, dict) and set(gc) >= {"layers_total", "layers_removed", "elapsed"}
    # No commit after the import yet: no timestamp to find; a bad timestamp is a 400.
    by_ts = f"/v1/tenant/{tenant_id}/timeline/{'11' * 16}/get_lsn_by_timestamp?timestamp="
    assert await asyncio.to_thread(daemon.http, "GET", by_ts + "2030-01-01T00:00:00Z") == (200, "nodata")
    status, err = await asyncio.to_thread(daemon.http, "GET", by_ts + "yesterday")
    assert status == 400 and "Invalid timestamp" in err["msg"]  # type: ignore[index]
    # The page service answers on its port.
    conn = await connect("127.0.0.1", daemon.pg_port, "cloud_admin")
    rows = await conn.query(f"get_last_record_rlsn {tenant_id} {'11' * 16}")
    assert rows == [(info["prev_record_lsn"], info["last_record_lsn"])]  # (prev, last), as Neon answers
    await conn.close()
    with urllib.request.urlopen(f"http://127.0.0.1:{daemon.http_port}/metrics", timeout=TIMEOUT) as resp:
        text = resp.read().decode()
    assert f'pageserver_last_record_lsn{{tenant_id="{tenant_id}",timeline_id="{"11" * 16}"}}' in text
    for name in ("pageserver_wal_redo_seconds", "pageserver_smgr_query_seconds", "pageserver_event_loop_lag_seconds"):
        assert name in text
    assert daemon.stop() == 0
    log = daemon.log.read_text()
    assert "pageserver stopped" in log and "Traceback" not in log
    # Restart: the same tenant and timeline with the same LSNs.
    daemon.start()
    await daemon.wait_ready()
    status, again_info = await asyncio.to_thread(daemon.http, "GET", f"/v1/tenant/{tenant_id}/timeline/{'11' * 16}")
    assert status == 200 and isinstance(again_info, dict)
    assert again_info["last_record_lsn"] == info["last_record_lsn"]
    assert again_info["disk_consistent_lsn"] == info["disk_consistent_lsn"]
    assert daemon.stop(signal.SIGINT) == 0


def test_bad_config_is_a_clear_error(daemon: Daemon) -> None:
    assert daemon.init().returncode == 0
    bad = subprocess.run(daemon.cmd("-c", "no_such_option=1"), capture_output=True, text=True, timeout=TIMEOUT)
    assert bad.returncode == 2 and "no_such_option" in bad.stderr


async def test_daemon_survives_garbage(daemon: Daemon) -> None:
    """Random HTTP requests and raw libpq garbage: a clear error each, the daemon keeps serving."""
    import random

    assert daemon.init().returncode == 0
    daemon.start()
    await daemon.wait_ready()
    rng = random.Random(1234)
    status, tenant_id = await asyncio.to_thread(daemon.http, "POST", "/v1/tenant", {})
    assert status == 201
    paths = ["/v1/tenant", f"/v1/tenant/{tenant_id}", f"/v1/tenant/{tenant_id}/timeline", "/v1/tenant/zz", "/v1/x"]

    def http_garbage() -> list[int]:
        codes = []
        for _ in range(300):
            path = rng.choice(paths) + rng.choice(["", "/timeline/" + "ab" * 16, "/" + "%" * rng.randint(1, 3)])
            body = rng.choice([rng.randbytes(rng.randint(0, 64)), b"{", b'{"new_timeline_id": 5}', b"[]", b"null"])
            req = urllib.request.Request(
                f"http://127.0.0.1:{daemon.http_port}{path}", data=body, method=rng.choice(["GET", "POST", "PUT"])
            )
            try:
                with urllib.request.urlopen(req, timeout=TIMEOUT) as resp:
                    codes.append(resp.status)
            except urllib.error.HTTPError as e:
                payload = json.loads(e.read() or b"null")
                assert e.code in (400, 404, 405, 406, 409, 412, 503) or (e.code == 500 and "msg" in payload), (
                    path,
                    e.code,
                    payload,
                )
                codes.append(e.code)
        return codes

    async def pq_garbage() -> None:
        for _ in range(200):
            reader, writer = await asyncio.open_connection("127.0.0.1", daemon.pg_port)
            writer.write(rng.randbytes(rng.randint(1, 200)))
            with contextlib.suppress(ConnectionError):
                await writer.drain()
                writer.write_eof()  # a client that sent a fragment and went away
                await asyncio.wait_for(reader.read(1024), TIMEOUT)  # an error or a close, never a hang
            writer.close()

    codes, _ = await asyncio.gather(asyncio.to_thread(http_garbage), pq_garbage())
    assert any(c >= 400 for c in codes)
    # Still serving: the API and the page service both answer.
    assert (await asyncio.to_thread(daemon.http, "GET", f"/v1/tenant/{tenant_id}"))[0] == 200
    conn = await connect("127.0.0.1", daemon.pg_port, "cloud_admin")
    with pytest.raises(Exception, match=r"not found|unknown"):
        await conn.query(f"pagestream {tenant_id} {'ab' * 16}")
    await conn.close()
    assert daemon.stop() == 0
    assert "Traceback" not in daemon.log.read_text()


# --- FAILPOINTS at daemon start -----------------------------------------------------------------
def _start_with_env(d: Daemon, failpoints: str) -> None:
    env = {**os.environ, "FAILPOINTS": failpoints}
    d.proc = subprocess.Popen(d.cmd(), stdout=open(d.log, "ab"), stderr=subprocess.STDOUT, env=env)  # noqa: SIM115


def test_daemon_refuses_bad_failpoints_env(daemon: Daemon) -> None:
    assert daemon.init().returncode == 0
    _start_with_env(daemon, "flush-frozen-exit=nonsense")
    assert daemon.proc is not None and daemon.proc.wait(timeout=60) == 2
    assert "failed to apply failpoint flush-frozen-exit=nonsense" in daemon.log.read_text()


async def test_daemon_exits_at_flush_from_env_failpoint(daemon: Daemon) -> None:
    """`FAILPOINTS=flush-frozen-exit=exit`: the first layer flush (the new timeline's initdb
    import) ends the daemon with status 1, after writing the layer and before the metadata."""
    assert daemon.init().returncode == 0
    _start_with_env(daemon, "flush-frozen-exit=exit")
    await daemon.wait_ready()
    status, tenant_id = await asyncio.to_thread(daemon.http, "POST", "/v1/tenant", {})
    assert status == 201, tenant_id
    # The connection drops when the process exits.
    with pytest.raises((ConnectionError, urllib.error.URLError)):
        await asyncio.to_thread(
            http_json, daemon.http_port, "POST", f"/v1/tenant/{tenant_id}/timeline", {"new_timeline_id": "33" * 16}
        )
    assert daemon.proc is not None and daemon.proc.wait(timeout=60) == 1
    assert "Exit requested by failpoint" in daemon.log.read_text()
    tl_dir = daemon.workdir / "tenants" / tenant_id / "timelines" / ("33" * 16)
    assert [p for p in tl_dir.iterdir() if try_parse_layer_file_name(p.name) is not None]
    assert load_metadata(tl_dir).disk_consistent_lsn == 0
