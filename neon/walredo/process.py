"""`WalRedoProcess`: one running redo helper, driven over asyncio pipes.

Requests are pipelined: a caller writes its whole request under the input lock and queues a
future; one reader task reads 8192-byte responses and resolves the futures in order. stderr is
owned by its own task from spawn until the child closes it, so no request ever reads stderr and
a log line can never be mistaken for a failure (the race behind Neon's false "os error 11").
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

import structlog

from neon.walredo.protocol import PAGE_SIZE


class WalRedoError(RuntimeError):
    pass


class WalRedoTimeout(WalRedoError):
    pass


class WalRedoProcess:
    """A spawned helper. Use `await WalRedoProcess.launch(...)`, then `request`, then `kill`."""

    def __init__(self, proc: asyncio.subprocess.Process, log: Any, stderr_level: str = "info") -> None:
        self.proc = proc
        self.pid = proc.pid
        self.log = log.bind(pid=proc.pid)
        self.started = time.monotonic()
        self._pending: deque[asyncio.Future[bytes]] = deque()
        self._failure: WalRedoError | None = None
        self._stderr_level = stderr_level
        self.stderr_lines = 0
        self.stderr_task = asyncio.create_task(self._drain_stderr(), name=f"walredo-stderr-{proc.pid}")
        self._reader_task = asyncio.create_task(self._read_responses(), name=f"walredo-stdout-{proc.pid}")

    @classmethod
    async def launch(
        cls,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        log: Any = None,
        cwd: str | None = None,
        popen_kwargs: Mapping[str, Any] | None = None,
    ) -> WalRedoProcess:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=dict(env),
            cwd=cwd,
            close_fds=True,
            start_new_session=True,  # a signal to our process group must not reach the helper
            **dict(popen_kwargs or {}),
        )
        return cls(proc, log or structlog.get_logger("walredo"))

    @property
    def alive(self) -> bool:
        return self._failure is None and self.proc.returncode is None

    async def request(self, data: bytes, timeout: float) -> bytes:
        """Send one request (ending with G or M) and return its 8192-byte response."""
        if self._failure is not None:
            raise self._failure
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bytes] = loop.create_future()
        stdin = self.proc.stdin
        assert stdin is not None
        # Queueing the future and writing happen without a yield in between, so responses
        # (read in order by one task) match requests in order without a lock.
        self._pending.append(fut)
        try:
            stdin.write(data)
        except (BrokenPipeError, ConnectionResetError, RuntimeError):
            self._fail(WalRedoError("WAL redo process closed its stdin unexpectedly"))
            raise self._failure from None
        timer = loop.call_later(timeout, self._timed_out, timeout)
        try:
            await stdin.drain()
            return await fut
        except (BrokenPipeError, ConnectionResetError):
            self._fail(WalRedoError("WAL redo process closed its stdin unexpectedly"))
            raise self._failure from None
        finally:
            timer.cancel()

    def _timed_out(self, timeout: float) -> None:
        self._fail(WalRedoTimeout(f"WAL redo timed out after {timeout:.1f}s"))

    def _fail(self, err: WalRedoError) -> None:
        if self._failure is None:
            self._failure = err
        while self._pending:
            fut = self._pending.popleft()
            if not fut.done():
                fut.set_exception(self._failure)
            # Callers that already gave up must not leave "exception never retrieved" noise.
            fut.exception()

    async def _read_responses(self) -> None:
        assert self.proc.stdout is not None
        stdout = self.proc.stdout
        try:
            while True:
                page = await stdout.readexactly(PAGE_SIZE)
                if not self._pending:
                    self._fail(WalRedoError("WAL redo process wrote an unrequested page"))
                    return
                fut = self._pending.popleft()
                if not fut.done():
                    fut.set_result(page)
        except asyncio.IncompleteReadError:
            self._fail(WalRedoError("WAL redo process closed its stdout unexpectedly"))
        except Exception as e:  # the pipe itself failed
            self._fail(WalRedoError(f"reading from WAL redo process failed: {e}"))

    async def _drain_stderr(self) -> None:
        """Log every line the helper writes, as it arrives, until the helper closes stderr."""
        assert self.proc.stderr is not None
        stderr = self.proc.stderr
        while True:
            try:
                line = await stderr.readline()
            except ValueError:  # a line longer than the stream limit: take what is there
                line = await stderr.read(1 << 16)
            except Exception as e:
                self.log.error("reading WAL redo stderr failed", error=str(e))
                return
            if not line:
                return
            self.stderr_lines += 1
            text = line.decode("utf-8", "replace").rstrip("\n")
            level = "error" if any(w in text for w in ("ERROR", "FATAL", "PANIC")) else self._stderr_level
            getattr(self.log, level)("received output", output=text)

    async def kill(self) -> None:
        """SIGKILL the helper, reap it, and wait until its stderr has been fully logged."""
        self._fail(WalRedoError("WAL redo process was stopped"))
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        await self.proc.wait()
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        await asyncio.gather(self.stderr_task, self._reader_task, return_exceptions=True)

    async def close(self, grace: float = 2.0) -> None:
        """Orderly stop: EOF on stdin makes the helper exit; kill it if it does not in time."""
        if self.proc.returncode is None and self.proc.stdin is not None:
            self.proc.stdin.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.proc.wait(), grace)
        await self.kill()

    def stop_process(self) -> None:
        """SIGSTOP, for tests of a hung helper."""
        os.kill(self.pid, signal.SIGSTOP)
