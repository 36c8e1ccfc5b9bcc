"""`neon_local` (python -m neon.control_plane) as a subprocess: the README walk-through (init,
start, a tenant, endpoints on `main` and on a branch, isolation of the branch's writes, the list
commands' output shapes, stop) and operator errors, each one clear line and a non-zero exit.

Every test has its own `NEON_REPO_DIR` under `test_root` and free ports written into the
`init --config` file, so tests never collide with each other or with Neon's default ports.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from neon.control_plane.processes import lock_holder

CLI_TIMEOUT = 120.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class NeonLocal:
    """One repository driven through the CLI."""

    root: Path

    @property
    def repo(self) -> Path:
        return self.root / "repo"

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "NEON_REPO_DIR": str(self.repo)}
        return subprocess.run(
            [sys.executable, "-m", "neon.control_plane", *args],
            cwd=self.root,
            env=env,
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT,
        )

    def ok(self, *args: str) -> str:
        proc = self.run(*args)
        assert proc.returncode == 0, f"neon_local {' '.join(args)}: {proc.stdout}\n{proc.stderr}"
        return proc.stdout

    def fails(self, *args: str) -> str:
        """The command fails with exactly one line on stderr; returns that line."""
        proc = self.run(*args)
        assert proc.returncode != 0, f"neon_local {' '.join(args)} succeeded: {proc.stdout}"
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, f"neon_local {' '.join(args)}: stderr is not one line: {proc.stderr}"
        return lines[0]

    def write_init_config(self) -> Path:
        path = self.root / "neon_local.toml"
        path.write_text(
            f"[broker]\nlisten_addr = '127.0.0.1:{free_port()}'\n\n"
            f"[[pageservers]]\nid = 1\nlisten_pg_addr = '127.0.0.1:{free_port()}'\n"
            f"listen_http_addr = '127.0.0.1:{free_port()}'\npg_auth_type = 'Trust'\nhttp_auth_type = 'Trust'\n\n"
            f"[[safekeepers]]\nid = 1\npg_port = {free_port()}\nhttp_port = {free_port()}\nsync = false\n"
        )
        return path

    def config(self) -> dict[str, object]:
        return tomllib.loads((self.repo / "config").read_text())

    def daemon_pid_files(self) -> list[Path]:
        return [
            self.repo / "storage_broker.pid",
            self.repo / "pageserver_1" / "pageserver.pid",
            self.repo / "safekeepers" / "sk1" / "safekeeper.pid",
        ]


@pytest.fixture
def neon_local(test_root: Path) -> Iterator[NeonLocal]:
    nl = NeonLocal(test_root)
    yield nl
    if (nl.repo / "config").exists():
        nl.run("stop", "-m", "immediate")


def query(port: int, sql: str) -> list[tuple[object, ...]]:
    with psycopg.connect(f"host=127.0.0.1 port={port} user=cloud_admin dbname=postgres", autocommit=True) as conn:
        cur = conn.execute(sql)
        return cur.fetchall() if cur.description else []


def table_rows(output: str) -> list[list[str]]:
    """`endpoint list` rows split on runs of two or more spaces (cells hold single spaces)."""
    return [re.split(r"\s{2,}", line.strip()) for line in output.strip().splitlines()]


def test_readme_session(neon_local: NeonLocal) -> None:
    nl = neon_local
    out = nl.ok("init", "--config", str(nl.write_init_config()))
    ps_pg = nl.config()["pageservers"][0]["listen_pg_addr"]  # type: ignore[index]
    assert out == f"Initializing pageserver node 1 at '{ps_pg}' in \"repo/pageserver_1\"\n"
    assert (nl.repo / "pageserver_1" / "pageserver.toml").is_file()

    out = nl.ok("start")
    assert re.search(r"^Starting neon broker at 127\.0\.0\.1:\d+\.+\nstorage_broker started, pid: \d+$", out, re.M)
    assert re.search(r"^pageserver started, pid: \d+$", out, re.M)
    assert re.search(
        r"^Starting safekeeper at '127\.0\.0\.1:\d+' in '.*sk1'\.+\nsafekeeper-1 started, pid: \d+$", out, re.M
    )

    out = nl.ok("tenant", "create", "--set-default")
    m = re.fullmatch(
        r"tenant (?P<t>[0-9a-f]{32}) successfully created on the pageserver\n"
        r"Created an initial timeline '(?P<tl>[0-9a-f]{32})' at Lsn [0-9A-F]+/[0-9A-F]+ for tenant: (?P=t)\n"
        r"Setting tenant (?P=t) as a default one\n",
        out,
    )
    assert m, out
    tenant_id, main_timeline = m["t"], m["tl"]
    config = nl.config()
    assert config["default_tenant_id"] == tenant_id
    assert dict(config["branch_name_mappings"]["main"]) == {tenant_id: main_timeline}  # type: ignore[index]
    assert nl.ok("tenant", "list").split()[0] == tenant_id

    main_port, branch_port = free_port(), free_port()
    nl.ok("endpoint", "create", "main", "--pg-port", str(main_port), "--http-port", str(free_port()))
    out = nl.ok("endpoint", "start", "main")
    assert "Starting existing endpoint main..." in out
    assert f"Starting postgres node at 'postgresql://cloud_admin@127.0.0.1:{main_port}/postgres'" in out
    query(main_port, "CREATE TABLE t (key int primary key, value text)")
    query(main_port, "INSERT INTO t VALUES (1, 'main')")
    assert query(main_port, "SELECT * FROM t") == [(1, "main")]

    # WAL reaches the pageserver asynchronously (through the safekeepers): branching at main's
    # flush LSN makes the pageserver wait for it, so the branch surely has the row.
    flush_lsn = str(query(main_port, "SELECT pg_current_wal_flush_lsn()::text")[0][0])
    out = nl.ok("timeline", "branch", "--branch-name", "migration_check", "--ancestor-start-lsn", flush_lsn)
    m = re.fullmatch(
        rf"Created timeline '(?P<tl>[0-9a-f]{{32}})' at Lsn (?P<lsn>[0-9A-F]+/[0-9A-F]+) for tenant: {tenant_id}\. "
        r"Ancestor timeline: 'main'\n",
        out,
    )
    assert m, out
    branch_timeline, branch_lsn = m["tl"], m["lsn"]
    assert branch_lsn == flush_lsn
    assert nl.ok("timeline", "list").splitlines() == [
        f"main [{main_timeline}]",
        f"┗━ @{branch_lsn}: migration_check [{branch_timeline}]",
    ]

    nl.ok(
        "endpoint",
        "create",
        "migration_check",
        "--branch-name",
        "migration_check",
        "--pg-port",
        str(branch_port),
        "--http-port",
        str(free_port()),
    )
    nl.ok("endpoint", "start", "migration_check")
    # The branch has main's rows as of the branch point; its own writes stay on the branch.
    assert query(branch_port, "SELECT * FROM t") == [(1, "main")]
    query(branch_port, "INSERT INTO t VALUES (2, 'branch')")
    assert query(branch_port, "SELECT key FROM t ORDER BY key") == [(1,), (2,)]
    assert query(main_port, "SELECT key FROM t ORDER BY key") == [(1,)]

    rows = table_rows(nl.ok("endpoint", "list"))
    assert rows[0] == ["ENDPOINT", "ADDRESS", "TIMELINE", "BRANCH NAME", "LSN", "STATUS"]
    by_name = {row[0]: row for row in rows[1:]}
    assert set(by_name) == {"main", "migration_check"}
    assert by_name["main"][1:4] == [f"127.0.0.1:{main_port}", main_timeline, "main"]
    assert by_name["migration_check"][1:4] == [f"127.0.0.1:{branch_port}", branch_timeline, "migration_check"]
    for row in by_name.values():
        assert re.fullmatch(r"[0-9A-F]+/[0-9A-F]+", row[4]) and row[5] == "running", row

    # A graceful endpoint stop lands the shutdown checkpoint on the pageserver: a restarted
    # endpoint (a fresh basebackup) still has the branch's row.
    nl.ok("endpoint", "stop", "migration_check")
    assert table_rows(nl.ok("endpoint", "list"))[2][-1] == "stopped"
    nl.ok("endpoint", "start", "migration_check")
    assert query(branch_port, "SELECT key FROM t ORDER BY key") == [(1,), (2,)]

    out = nl.ok("stop")
    assert "pageserver stopped" in out and "safekeeper 1 stopped" in out and "storage_broker stopped" in out
    assert all(lock_holder(p) is None for p in nl.daemon_pid_files())
    statuses = {row[0]: row[-1] for row in table_rows(nl.run("endpoint", "list").stdout)[1:]}
    assert statuses == {"main": "stopped", "migration_check": "stopped"}
    # Idempotent: a second stop finds nothing to stop and succeeds.
    assert "already stopped" in nl.ok("stop")


def test_operator_errors(neon_local: NeonLocal) -> None:
    nl = neon_local
    assert "You need to run 'neon_local init' first" in nl.fails("tenant", "list")
    nl.ok("init", "--config", str(nl.write_init_config()))
    config_before = (nl.repo / "config").read_text()
    assert "already exists" in nl.fails("init")
    assert (nl.repo / "config").read_text() == config_before

    nl.ok("start")
    assert "is already running" in nl.fails("pageserver", "start")
    assert "No tenant id" in nl.fails("timeline", "list")
    nl.ok("tenant", "create", "--set-default")
    assert nl.fails("endpoint", "start", "nope", "--branch-name", "nope") == (
        "command failed: Found no timeline id for branch name 'nope'"
    )
    assert not (nl.repo / "endpoints" / "nope").exists()
    assert "Unrecognized tenant settings: bogus" in nl.fails("tenant", "config", "-c", "bogus:1")
    assert "is not found" in nl.fails("endpoint", "stop", "nope")
    assert "renamed to 'endpoint'" in nl.fails("pg", "start")

    # A safekeeper whose port is taken: the start names the address.
    sk_port = nl.config()["safekeepers"][0]["pg_port"]  # type: ignore[index]
    nl.ok("safekeeper", "stop", "1")
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", sk_port))
        squatter.listen()
        assert f"127.0.0.1:{sk_port} is already in use" in nl.fails("safekeeper", "start", "1")
    nl.ok("safekeeper", "start", "1")

    # With the pageserver stopped, commands that need it say so; the config is untouched.
    assert "pageserver stopped" in nl.ok("pageserver", "stop")
    config_before = (nl.repo / "config").read_text()
    assert "pageserver 1 at http://" in nl.fails("tenant", "list")
    assert "is not available" in nl.fails("timeline", "branch", "--branch-name", "b")
    assert "is not available" in nl.fails("endpoint", "start", "ep", "--pg-port", str(free_port()))
    assert "Page server is not available" in nl.fails("pageserver", "status")
    assert (nl.repo / "config").read_text() == config_before
    assert not (nl.repo / "endpoints" / "ep").exists()

    nl.ok("pageserver", "start")
    assert nl.ok("pageserver", "status") == "Page server is up and running\n"
    assert nl.ok("tenant", "list").split()[1] == "Active"
