"""The storage daemons as `neon_local` runs them: the storage broker, pageservers and safekeepers
(spec control-plane §1.8 command lines, §3.1-§3.4).

This module owns each daemon's command line (our Python daemons, `python -m neon.<x>.main`, with
Neon's flags and `-c` overrides), its log and pid file under `.neon/`, its readiness probe, the
banners printed around starting and stopping, and `pageserver --init`.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from .config import LocalEnv, PageServerConf, SafekeeperConf
from .pageserver_api import ApiError, HttpClient, PageserverClient
from .processes import DaemonSpec, NotReady, ProcessError, log_tail, start_process, stop_process

PROBE_TIMEOUT = 1.0


def _python_module(module: str) -> list[str]:
    return [sys.executable, "-m", module]


def _http_probe(client: HttpClient) -> None:
    try:
        client.request("GET", "/v1/status", timeout=PROBE_TIMEOUT)
    except ApiError as e:
        if "is not available" in str(e):
            raise NotReady(str(e)) from None
        raise


# --- storage broker --------------------------------------------------------------------------------
def broker_pid_file(env: LocalEnv) -> Path:
    return env.base_dir / "storage_broker.pid"


def _broker_spec(env: LocalEnv) -> DaemonSpec:
    addr = env.broker.listen_addr

    def probe() -> None:
        # Our broker serves gRPC only on this port (its HTTP /status is a separate, optional
        # listener): an accepted TCP connection means the gRPC server is bound.
        host, _, port = addr.rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=PROBE_TIMEOUT).close()
        except OSError as e:
            raise NotReady(str(e)) from None

    return DaemonSpec(
        name="storage_broker",
        argv=[*_python_module("neon.broker.main"), f"--listen-addr={addr}"],
        log_path=env.base_dir / "storage_broker.log",
        pid_file=broker_pid_file(env),
        daemon_locks_pid_file=False,
        probe=probe,
        listen_addrs=[addr],
        cwd=env.base_dir,
    )


def start_broker(env: LocalEnv) -> int:
    return start_process(_broker_spec(env), f"Starting neon broker at {env.broker.listen_addr}")


def stop_broker(env: LocalEnv) -> None:
    # As Neon: always SIGQUIT (the broker keeps no state, and ours stops cleanly on it).
    stop_process("storage_broker", broker_pid_file(env), sig=signal.SIGQUIT)


# --- pageserver ------------------------------------------------------------------------------------
def pageserver_pid_file(env: LocalEnv, ps: PageServerConf) -> Path:
    return env.pageserver_dir(ps.id) / "pageserver.pid"


def _pageserver_overrides(env: LocalEnv, ps: PageServerConf, extra: list[str]) -> list[str]:
    overrides = [
        f"id={ps.id}",
        f"http_auth_type='{ps.http_auth_type}'",
        f"pg_auth_type='{ps.pg_auth_type}'",
        f"listen_http_addr='{ps.listen_http_addr}'",
        f"listen_pg_addr='{ps.listen_pg_addr}'",
        f"broker_endpoint='{env.broker.client_url}/'",
    ]
    if env.pg_distrib_dir is not None:
        overrides.insert(1, f"pg_distrib_dir='{env.pg_distrib_dir}'")
    if env.control_plane_api is not None:
        overrides.append(f"control_plane_api='{env.control_plane_api}'")
    if "NeonJWT" in (ps.http_auth_type, ps.pg_auth_type):
        overrides.append("auth_validation_public_key_path='../auth_public_key.pem'")
    return [*overrides, *extra]


def _pageserver_argv(env: LocalEnv, ps: PageServerConf, extra: list[str]) -> list[str]:
    argv = [*_python_module("neon.pageserver.main"), "-D", str(env.pageserver_dir(ps.id))]
    for override in _pageserver_overrides(env, ps, extra):
        argv += ["-c", override]
    return argv


def init_pageserver(env: LocalEnv, ps: PageServerConf, extra: list[str]) -> None:
    """`pageserver --init`: writes `pageserver.toml` into the pageserver's workdir and exits."""
    workdir = env.pageserver_dir(ps.id)
    print(f"Initializing pageserver node {ps.id} at '{ps.listen_pg_addr}' in {_debug_path(env, workdir)}", flush=True)
    workdir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([*_pageserver_argv(env, ps, extra), "--init"], capture_output=True, text=True)
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise ProcessError(f"pageserver init failed: {detail[-1] if detail else f'exit {proc.returncode}'}")


def _debug_path(env: LocalEnv, path: Path) -> str:
    """Neon prints the directory with debug quoting, relative when the repo is `.neon` here."""
    try:
        shown = path.relative_to(Path.cwd())
    except ValueError:
        shown = path
    return f'"{shown}"'


def start_pageserver(env: LocalEnv, ps: PageServerConf, extra: list[str]) -> int:
    workdir = env.pageserver_dir(ps.id)
    if not (workdir / "pageserver.toml").exists():
        raise ProcessError(f"pageserver {ps.id} is not initialised: {workdir}/pageserver.toml is missing")
    spec = DaemonSpec(
        name="pageserver",
        argv=_pageserver_argv(env, ps, extra),
        log_path=workdir / "pageserver.log",
        pid_file=pageserver_pid_file(env, ps),
        daemon_locks_pid_file=True,
        probe=lambda: _http_probe(PageserverClient(ps.listen_http_addr, ps.id)),
        listen_addrs=[ps.listen_pg_addr, ps.listen_http_addr],
        cwd=workdir,
    )
    banner = f"Starting pageserver node {ps.id} at '{ps.listen_pg_addr}' in {_debug_path(env, workdir)}"
    return start_process(spec, banner)


def stop_pageserver(env: LocalEnv, ps: PageServerConf, *, immediate: bool = False) -> None:
    stop_process("pageserver", pageserver_pid_file(env, ps), immediate=immediate)


def pageserver_log_tail(env: LocalEnv, ps: PageServerConf) -> str:
    return log_tail(env.pageserver_dir(ps.id) / "pageserver.log")


# --- safekeepers -----------------------------------------------------------------------------------
def safekeeper_pid_file(env: LocalEnv, sk: SafekeeperConf) -> Path:
    return env.safekeeper_dir(sk.id) / "safekeeper.pid"


def _safekeeper_argv(env: LocalEnv, sk: SafekeeperConf, extra: list[str]) -> list[str]:
    datadir = env.safekeeper_dir(sk.id)
    argv = [
        *_python_module("neon.safekeeper.main"),
        "-D",
        str(datadir),
        "--id",
        str(sk.id),
        "--listen-pg",
        f"127.0.0.1:{sk.pg_port}",
        "--listen-http",
        f"127.0.0.1:{sk.http_port}",
        "--availability-zone",
        f"sk-{sk.id}",
    ]
    if sk.pg_tenant_only_port is not None:
        argv += ["--listen-pg-tenant-only", f"127.0.0.1:{sk.pg_tenant_only_port}"]
    if not sk.sync:
        argv.append("--no-sync")
    argv += ["--broker-endpoint", f"{env.broker.client_url}/"]
    if sk.backup_threads is not None:
        argv += ["--backup-threads", str(sk.backup_threads)]
    if sk.remote_storage is not None:
        argv += ["--remote-storage", sk.remote_storage]
    if sk.auth_enabled:
        key = str(env.base_dir / "auth_public_key.pem")
        argv += [
            "--pg-auth-public-key-path",
            key,
            "--pg-tenant-only-auth-public-key-path",
            key,
            "--http-auth-public-key-path",
            key,
        ]
    # Verbatim and last: the safekeeper takes the last occurrence of a repeated flag.
    return [*argv, *extra]


def start_safekeeper(env: LocalEnv, sk: SafekeeperConf, extra: list[str]) -> int:
    datadir = env.safekeeper_dir(sk.id)
    datadir.mkdir(parents=True, exist_ok=True)
    listen = [f"127.0.0.1:{sk.pg_port}", f"127.0.0.1:{sk.http_port}"]
    if sk.pg_tenant_only_port is not None:
        listen.append(f"127.0.0.1:{sk.pg_tenant_only_port}")
    spec = DaemonSpec(
        name=f"safekeeper-{sk.id}",
        argv=_safekeeper_argv(env, sk, extra),
        log_path=datadir / f"safekeeper-{sk.id}.log",
        pid_file=safekeeper_pid_file(env, sk),
        daemon_locks_pid_file=True,
        probe=lambda: _http_probe(
            HttpClient(f"127.0.0.1:{sk.http_port}", f"safekeeper {sk.id}", "start it with 'safekeeper start'")
        ),
        listen_addrs=listen,
        cwd=datadir,
    )
    shown = os.path.relpath(datadir) if not os.path.relpath(datadir).startswith("..") else str(datadir)
    return start_process(spec, f"Starting safekeeper at '127.0.0.1:{sk.pg_port}' in '{shown}'")


def stop_safekeeper(env: LocalEnv, sk: SafekeeperConf, *, immediate: bool = False) -> None:
    stop_process(f"safekeeper {sk.id}", safekeeper_pid_file(env, sk), immediate=immediate)
