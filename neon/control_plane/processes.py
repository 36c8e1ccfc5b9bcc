"""Background daemons: spawning, pid files, readiness and stopping (spec control-plane §1.8).

This module owns the process life cycle `neon_local` gives every storage daemon: a log file the
daemon appends to, a pid file (one the daemon locks itself, or one created and locked here in the
child between fork and exec), a readiness loop that reports a daemon dying at start with the tail
of its log, and an idempotent stop by signal through the pid file. Whether a daemon is alive is
read from its pid-file lock (the kernel drops it when the process exits), so stopping works from
any later invocation and does not depend on who reaps the process.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

START_TIMEOUT = 30.0  # Neon waits 10 s; Python daemons import for a second or two before they listen
STOP_TIMEOUT = 30.0  # a graceful pageserver stop flushes its open layers
POLL_INTERVAL = 0.1
LOG_TAIL_LINES = 3


class ProcessError(Exception):
    """A daemon could not be started or stopped; the message says why in one line."""


class NotReady(Exception):
    """The readiness probe could not reach the daemon yet (keep waiting)."""


@dataclass
class DaemonSpec:
    """How to run one daemon and how to tell that it is up."""

    name: str  # Neon's process name: "pageserver", "safekeeper-1", "storage_broker"
    argv: list[str]
    log_path: Path
    pid_file: Path
    daemon_locks_pid_file: bool  # False: the pid file is created and locked here for the daemon
    probe: Callable[[], None]  # returns when ready, raises NotReady while starting, else fails
    listen_addrs: list[str] = field(default_factory=list)  # checked free before spawning
    cwd: Path | None = None


# --- pid files -------------------------------------------------------------------------------------
def lock_holder(pid_file: Path) -> int | None:
    """The pid holding a POSIX lock on `pid_file` (F_GETLK, without taking it), or None."""
    try:
        fd = os.open(pid_file, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        # struct flock on Linux x86_64/aarch64: short l_type, short l_whence, off_t l_start,
        # off_t l_len, pid_t l_pid (+ padding).
        query = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
        l_type, _, _, _, l_pid = struct.unpack("hhqqi4x", fcntl.fcntl(fd, fcntl.F_GETLK, query))
    finally:
        os.close(fd)
    return None if l_type == fcntl.F_UNLCK else l_pid


def _lock_pid_file_in_child(pid_file: Path) -> Callable[[], None]:
    """A preexec_fn creating, locking and filling `pid_file` with the child's own pid; the
    descriptor survives exec, so the lock lives exactly as long as the daemon."""

    def claim() -> None:
        fd = os.open(pid_file, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.set_inheritable(fd, True)

    return claim


def running_pid(pid_file: Path) -> int | None:
    """The pid of the live daemon owning `pid_file`, or None."""
    return lock_holder(pid_file)


# --- start -----------------------------------------------------------------------------------------
def _check_port_free(addr: str) -> None:
    host, _, port = addr.rpartition(":")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host.strip("[]") or "0.0.0.0", int(port)))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise ProcessError(f"address {addr} is already in use by another process") from None
            raise ProcessError(f"cannot listen on {addr}: {e.strerror}") from None


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return "(no log)"
    tail = [line.strip() for line in text.strip().splitlines()[-lines:] if line.strip()]
    return " | ".join(tail) or "(empty log)"


def start_process(spec: DaemonSpec, banner: str, *, timeout: float = START_TIMEOUT) -> int:
    """Spawn `spec` in its own session and wait until it is ready; returns its pid.

    Prints `banner` (no newline), one dot per second of waiting, then `<name> started, pid: N`.
    """
    holder = running_pid(spec.pid_file)
    if holder is not None:
        raise ProcessError(f"{spec.name} is already running, pid: {holder}")
    for addr in spec.listen_addrs:
        _check_port_free(addr)
    print(banner, end="", flush=True)
    spec.log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(spec.log_path, "ab") as logf:
        # A new session: the daemon outlives this one-shot command and ignores its terminal.
        # close_fds=False only for the pid-file lock, whose descriptor must survive exec; Python's
        # own descriptors are close-on-exec anyway.
        proc = subprocess.Popen(
            spec.argv,
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=subprocess.STDOUT,
            cwd=spec.cwd,
            start_new_session=True,
            close_fds=spec.daemon_locks_pid_file,
            preexec_fn=None if spec.daemon_locks_pid_file else _lock_pid_file_in_child(spec.pid_file),
        )
    started = time.monotonic()
    next_dot = started
    warned = False
    while True:
        now = time.monotonic()
        if now >= next_dot:
            print(".", end="", flush=True)
            next_dot += 1.0
        exit_code = proc.poll()
        if exit_code is not None:
            print()
            raise ProcessError(
                f"{spec.name} failed to start: exited with status {exit_code}: {log_tail(spec.log_path)}"
            )
        try:
            spec.probe()
            ready = lock_holder(spec.pid_file) == proc.pid
        except NotReady:
            ready = False
        except Exception as e:
            print()
            _kill(proc)
            raise ProcessError(f"{spec.name} failed to start: {e}") from None
        if ready:
            print(f"\n{spec.name} started, pid: {proc.pid}")
            return proc.pid
        if now - started > timeout:
            print()
            _kill(proc)
            raise ProcessError(f"{spec.name} did not start in {timeout:.0f} seconds: {log_tail(spec.log_path)}")
        if not warned and now - started > 5:
            print(f"\n{spec.name} has not started yet, continuing to wait", end="", flush=True)
            warned = True
        time.sleep(POLL_INTERVAL)  # the daemon gives no start-up notification: poll its probe


def _kill(proc: subprocess.Popen[bytes]) -> None:
    proc.kill()
    proc.wait()


# --- stop ------------------------------------------------------------------------------------------
def stop_process(name: str, pid_file: Path, *, immediate: bool = False, sig: int | None = None) -> None:
    """Stop the daemon owning `pid_file`: SIGTERM, or SIGKILL with `immediate` (or `sig`); waits
    until it has exited. A daemon already gone is success (the command is idempotent)."""
    if not pid_file.exists():
        print(f"{name} is already stopped: no pid file present at {pid_file}")
        return
    pid = running_pid(pid_file)
    if pid is None:
        # The file stays: deleting it could race with a new daemon creating it.
        print(f"{name} is already stopped: no process holds the pid file {pid_file}")
        return
    signum = sig if sig is not None else (signal.SIGKILL if immediate else signal.SIGTERM)
    print(f"Stopping {name} with pid {pid} {'immediately' if immediate else 'gracefully'}..", flush=True)
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        print(f"{name} with pid {pid} does not exist any more")
        return
    deadline = time.monotonic() + STOP_TIMEOUT
    while running_pid(pid_file) == pid:
        _reap(pid)
        if time.monotonic() > deadline:
            raise ProcessError(f"{name} with pid {pid} did not stop in {STOP_TIMEOUT:.0f} seconds")
        time.sleep(POLL_INTERVAL)  # waiting for another process to exit: poll its lock
    _reap(pid)
    print(f"{name} stopped")


def _reap(pid: int) -> None:
    """Collect `pid` if it is our own child (a daemon this very invocation started)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def print_err(message: str) -> None:
    print(message, file=sys.stderr)
